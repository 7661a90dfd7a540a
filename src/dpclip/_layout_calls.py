"""How each torch call of a forward moves the batch of a tensor that does not hold it on dim 0
alone (see :mod:`dpclip._layouts`): the names of the calls followed, and for each kind of call,
where the batch is in its output. Pure functions of a call's name, arguments and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# (the dim of the batch, rows per example along dim 0): (0, k > 1) flattened, (j > 0, 1) moved
Layout = tuple[int, int]

# calls that reshape (the elements keep their order)
RESHAPES = frozenset({"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten"})
# calls that permute dims, or add or drop a dim of size 1
MOVES = frozenset({
    "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "unsqueeze",
    "squeeze",
})  # fmt: skip
# joins of several tensors along a dim
JOINS = frozenset({"cat", "concat", "concatenate", "stack"})
FOLLOWED = RESHAPES | MOVES | JOINS  # followed from batch-first tensors too
# calls that compute each entry of their output from the same entries of their operands alone,
# broadcast (the batch's entries keep their places)
ELEMENTWISE = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "mish", "tanh", "tanh_", "sigmoid",
    "sigmoid_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "elu", "elu_", "selu",
    "celu", "leaky_relu", "leaky_relu_", "softplus", "exp", "log", "sqrt", "rsqrt", "neg",
    "__neg__", "abs", "square", "pow", "__pow__", "erf", "clamp", "clamp_", "clip",
    "dropout", "alpha_dropout", "feature_alpha_dropout",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "where", "maximum", "minimum",
    "contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type_as",
    "masked_fill", "masked_fill_", "zeros_like", "ones_like", "full_like", "empty_like",
})  # fmt: skip
# calls along one dim given as ``dim`` (second argument): the layout is kept unless it is the
# batch's
ALONG_DIM = frozenset({
    "softmax", "log_softmax", "normalize", "cumsum", "cumprod", "logcumsumexp", "flip", "roll",
})  # fmt: skip
# reductions over the dims given as ``dim``: the layout is kept (shifted) unless the batch's is
# among them
REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "logsumexp", "nansum", "nanmean"})
# batched matrix products (their batch dims are all but the last two)
MATMULS = frozenset({"matmul", "__matmul__", "bmm", "baddbmm"})
# calls row-wise in their first operand, whose others are weights (a frozen layer's, or one
# called functionally): F.linear(x, w, b), F.layer_norm(x, shape, w, b), F.embedding(ids, w)
ROW_WISE_IN_FIRST = frozenset({"linear", "layer_norm", "rms_norm", "embedding"})
# calls that split a tensor along a dim (a tuple of parts)
SPLITS = frozenset({"chunk", "split", "unbind", "tensor_split"})


def holds_batch(t: Tensor, layout: Layout, batch: int) -> bool:
    """Whether ``t`` has the batch where ``layout`` puts it."""
    dim, k = layout
    if dim == 0:
        return t.dim() > 0 and t.shape[0] == batch * k
    return t.dim() > dim and t.shape[dim] == batch


def may_move_dim0(name: str, args: tuple, kwargs: Mapping | None, n: int) -> bool:
    """Whether a transpose or permute can move dim 0 (most move others: attention's heads)."""
    if name in ("unsqueeze", "squeeze"):
        at = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
        return name == "unsqueeze" and isinstance(at, int) and at % (n + 1) == 0
    if name in ("transpose", "swapaxes", "swapdims"):
        if len(args) > 2 and type(args[1]) is int and type(args[2]) is int:
            return not (args[1] % n and args[2] % n)
        dims = tuple((kwargs or {}).values())
        return not all(isinstance(d, int) and d % n != 0 for d in dims) or len(dims) < 2
    if name == "permute":
        dims = args[1:] if len(args) > 1 else ((kwargs or {}).get("dims", ()),)
        first = (
            dims[0][0]
            if dims and isinstance(dims[0], Sequence) and dims[0]
            else dims[0]
            if dims
            else None
        )
        return not (isinstance(first, int) and first % n == 0)
    return True


def call_operands(args: tuple, kwargs: Mapping | None) -> list[object]:
    out: list[object] = []
    for a in (*args, *(kwargs.values() if kwargs else ())):
        out.extend(a) if type(a) in (list, tuple) else out.append(a)
    return out


def along_dims(name: str, args: tuple, kwargs: Mapping | None) -> list[int] | None:
    """The dims a call of :data:`ALONG_DIM` acts along (None: all, or not given as ints)."""
    kwargs = kwargs or {}
    if name == "roll":
        dims = args[2] if len(args) > 2 else kwargs.get("dims")
    elif name == "flip":
        dims = args[1:] if len(args) > 1 else kwargs.get("dims")
        if isinstance(dims, tuple) and len(dims) == 1 and isinstance(dims[0], Sequence):
            dims = dims[0]
    else:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = list(dims) if isinstance(dims, Sequence) else [dims]
    return dims if dims and all(isinstance(d, int) for d in dims) else None


def ambiguous(t: Tensor, batch: int) -> bool:
    """Whether a tensor of the batch's size on dim 0 has that size on another dim too: a
    time-major (T, B, ...) one at T = B looks batch-first, and so does a (T, 2, B, d) buffer."""
    return any(n == batch for n in t.shape[1:])


def reduced(
    args: tuple, kwargs: Mapping | None, source: Tensor, out: Tensor, layout: Layout, batch: int
) -> Layout | None:
    """A reduction over dims other than the batch's keeps it (one dim further forward per dim
    before it that goes)."""
    dims = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
    if dims is None:
        return None  # over everything: the examples' entries together
    dims = [d % source.dim() for d in (dims if isinstance(dims, Sequence) else (dims,))]
    j, k = layout
    if j in dims:
        return None  # over the examples
    if j == 0:
        return layout if holds_batch(out, layout, batch) else None
    keep = (args[2] if len(args) > 2 else (kwargs or {}).get("keepdim", False)) is True
    got = (j if keep else j - sum(d < j for d in dims), k)
    return got if holds_batch(out, got, batch) else None


def indexed(key: object, layout: Layout, ndim: int) -> Layout | None:
    """Where ``t[key]`` has the batch: plain slices and ints before it (an int drops its dim),
    ``slice(None)`` at it, anything but tensors after it; None for another key."""
    keys = key if type(key) is tuple else (key,)
    j, k = layout
    at = shift = 0  # the source dim reached; output dims added (None) or dropped (int)
    for key_ in keys:
        if at > j:
            if key_ is Ellipsis or type(key_) in (slice, int) or key_ is None:
                continue
            return None
        if key_ is None:
            shift += 1
        elif key_ is Ellipsis:
            return None
        elif type(key_) is int:
            if at == j:
                return None
            shift -= 1
            at += 1
        elif type(key_) is slice:
            if at == j and key_ != slice(None):
                return None
            at += 1
        elif (
            isinstance(key_, Tensor) and at == j and key_.dim() == 1 and not key_.is_floating_point()
            and key_.dtype != torch.bool
        ):  # fmt: skip
            # B entries along the batch, each example's own (the forward guard refused any
            # other index there): the batch, in order; B rows of flattened tokens: batch-first
            return (0, 1) if k > 1 else (j + shift, 1)
        else:
            return None
    return (j + shift, k)


def trailing(name: str, args: tuple, kwargs: Mapping | None, source: Tensor) -> int:
    """How many trailing dims a functional row-wise layer reduces over or replaces (the batch
    must come before them)."""
    if name in ("layer_norm", "rms_norm"):
        shape = args[1] if len(args) > 1 else (kwargs or {}).get("normalized_shape", ())
        return len(shape) if isinstance(shape, Sequence) else 1
    return 0 if name == "embedding" else 1


def reshaped(source: Tensor, out: Tensor, layout: Layout, batch: int) -> Layout | None:
    dim, _ = layout
    if dim == 0:  # batch-first or flattened: a reshape to B·k rows keeps the examples' order
        rows = out.shape[0]
        return (0, rows // batch) if rows >= batch and rows % batch == 0 else None
    # the batch on dim j: kept where the dims up to it are kept
    if out.dim() > dim and out.shape[: dim + 1] == source.shape[: dim + 1]:
        return layout
    return None


def moved(
    name: str, args: tuple, kwargs: Mapping | None, source: Tensor, out: Tensor,
    layout: Layout, batch: int,
) -> Layout | None:  # fmt: skip
    dim, k = layout
    n = source.dim()
    if name in ("unsqueeze", "squeeze"):
        at = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
        if name == "unsqueeze":
            if not isinstance(at, int):
                return None
            where = dim + (at % (n + 1) <= dim)
        else:
            ats = range(n) if at is None else at if isinstance(at, Sequence) else (at,)
            gone = {a % n for a in ats if isinstance(a, int) and source.shape[a] == 1}
            if dim in gone:
                return None
            where = dim - sum(a < dim for a in gone)
    elif k != 1:
        return None  # flattened rows moved off dim 0
    else:
        order = permutation(name, args, kwargs or {}, n)
        if order is None:
            return None
        where = order.index(dim)
    if where == 0 and k > 1:
        return layout if holds_batch(out, layout, batch) else None
    return (where, k) if holds_batch(out, (where, k), batch) else None


def permutation(name: str, args: tuple, kwargs: Mapping, n: int) -> list[int] | None:
    """Which source dim each dim of the output of a transpose, permute or movedim is."""
    order = list(range(n))
    try:
        if name == "t":
            return order[::-1]
        if name in ("transpose", "swapaxes", "swapdims"):
            a = args[1] if len(args) > 1 else kwargs.get("dim0", kwargs.get("axis0"))
            b = args[2] if len(args) > 2 else kwargs.get("dim1", kwargs.get("axis1"))
            a, b = a % n, b % n
            order[a], order[b] = order[b], order[a]
            return order
        if name == "permute":
            dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
            if len(dims) == 1 and isinstance(dims[0], Sequence):
                dims = dims[0]
            return [d % n for d in dims]
        source = args[1] if len(args) > 1 else kwargs.get("source")
        dest = args[2] if len(args) > 2 else kwargs.get("destination")
        sources = [s % n for s in (source if isinstance(source, Sequence) else [source])]
        dests = [d % n for d in (dest if isinstance(dest, Sequence) else [dest])]
        out: list[int | None] = [None] * n
        for s, d in zip(sources, dests, strict=True):
            out[d] = s
        rest = iter(d for d in order if d not in sources)
        return [next(rest) if d is None else d for d in out]
    except (TypeError, ValueError, IndexError, StopIteration):
        return None
