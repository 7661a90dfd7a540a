"""Where the batch is in tensors that do not hold it on dim 0, one example per row.

Models run their row-wise layers (Linear, LayerNorm, RMSNorm, Embedding) on two such layouts:

- **flattened into tokens**, (B·k, ...) from (B, T, ...) by a reshape, as transformers' OPT runs
  the feed-forward half of its layers. A reshape keeps the elements' order, so row r of a
  reshape of a batch-first tensor to B·k rows is example r // k's;
- **the batch on another dim**, (T, B, ...) from (B, T, ...) by a transpose or a permute, as
  PyTorch's ``nn.Transformer`` layers run by default (``batch_first=False``).

The forward guard follows tensors of either layout through the calls that keep it: reshapes
that keep the dims up to the batch's, transposes, activations, dropout, arithmetic with tensors
of the same layout or broadcast along the batch, functional row-wise layers. A row-wise layer
given one is recorded as the same call on its batch-first view: (B, k, ...), or the batch moved
to dim 0. Anything else leaves a tensor's layout unknown, and a layer on it is refused as
before (dim 0 is taken for the batch only where it has the batch's size).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor

# (the dim of the batch, rows per example along dim 0): (0, k > 1) flattened, (j > 0, 1) moved
Layout = tuple[int, int]
# the mark of a tensor reshaped or moved from one whose dim 0 is not the batch and that no layout
# explains (B·k rows made in some order dpclip did not follow): not a source of either layout,
# whatever its shape, nor is anything computed from it (a layer on it is judged by its dim 0)
_UNKNOWN: Layout = (-1, 0)

# calls that reshape (the elements keep their order)
_RESHAPES = frozenset({"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten"})
# calls that permute dims
_MOVES = frozenset({"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t"})
FOLLOWED = _RESHAPES | _MOVES  # followed from a batch-first tensor too (the others: from tracked)
# calls that compute each entry of their output from the same entries of their operands alone,
# broadcast (the batch's entries keep their places)
_ELEMENTWISE = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "mish", "tanh", "tanh_", "sigmoid",
    "sigmoid_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "elu", "elu_", "selu",
    "celu", "leaky_relu", "leaky_relu_", "softplus", "exp", "log", "sqrt", "rsqrt", "neg",
    "__neg__", "abs", "square", "pow", "__pow__", "erf", "clamp", "clamp_", "clip",
    "dropout", "alpha_dropout", "feature_alpha_dropout",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "where", "maximum", "minimum",
    "contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type_as",
    "masked_fill", "masked_fill_",
})  # fmt: skip
# calls along one dim given as ``dim`` (second argument): the layout is kept unless it is the
# batch's
_ALONG_DIM = frozenset({"softmax", "log_softmax", "normalize"})
# calls row-wise in their first operand, whose others are weights (a frozen layer's, or one
# called functionally): F.linear(x, w, b), F.layer_norm(x, shape, w, b), F.embedding(ids, w)
_ROW_WISE_IN_FIRST = frozenset({"linear", "layer_norm", "rms_norm", "embedding"})


class Forward(Protocol):
    """What the layouts need of the recorder's forward."""

    batch: int | None

    def batch_first(self, t: Tensor) -> bool: ...

    def is_constant(self, t: object) -> bool: ...

    def pending(self, t: object) -> object | None: ...


def holds_batch(t: Tensor, layout: Layout, batch: int) -> bool:
    """Whether ``t`` has the batch where ``layout`` puts it."""
    dim, k = layout
    if dim == 0:
        return t.dim() > 0 and t.shape[0] == batch * k
    return t.dim() > dim and t.shape[dim] == batch


def batch_first_view(t: Tensor, layout: Layout, batch: int) -> Tensor:
    """``t`` as (B, ...), example b at index b: (B, k, ...) for flattened tokens, the batch
    moved to dim 0 otherwise (a view either way)."""
    dim, k = layout
    return t.unflatten(0, (batch, k)) if dim == 0 else t.movedim(dim, 0)


def grad_batch_first(grad: Tensor, layout: Layout, batch: int) -> Tensor:
    """An output gradient of a call on ``layout``, batch-first as its view's would be."""
    dim, k = layout
    return grad.reshape(batch, k, *grad.shape[1:]) if dim == 0 else grad.movedim(dim, 0)


class Layouts:
    """This forward's tensors of either layout: by id, each with its layout and its version
    when it was marked (changed in place since: unknown again)."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[weakref.ref, Layout, int]] = {}

    def clear(self) -> None:
        self.by_id.clear()

    def of(self, t: object, changes: int = 0) -> Layout | None:
        """The layout of a followed tensor unchanged since (or changed ``changes`` times in
        place: by the call being followed); else None."""
        entry = self.by_id.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] == _UNKNOWN:
            return None
        assert isinstance(t, Tensor)
        return entry[1] if t._version == entry[2] + changes else None

    def unknown(self, t: object) -> bool:
        """Whether ``t`` was made from B·k rows of an order dpclip did not follow."""
        entry = self.by_id.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == _UNKNOWN

    def mark(self, t: Tensor, layout: Layout) -> None:
        self.by_id[id(t)] = (weakref.ref(t), layout, t._version)

    def forget(self, t: object) -> None:
        """Drop ``t``'s mark (a layer's batch-first output: taken for one, as every layer's)."""
        entry = self.by_id.get(id(t))
        if entry is not None and entry[0]() is t:
            del self.by_id[id(t)]

    def lose(self, t: object) -> None:
        """A followed tensor whose order dpclip can no longer vouch for (its ``.data`` read:
        changed through it, its version would not show)."""
        entry = self.by_id.get(id(t))
        if entry is not None and entry[0]() is t:
            self.by_id[id(t)] = (entry[0], _UNKNOWN, entry[2])

    def after(
        self, name: str, args: tuple, kwargs: Mapping | None, out: object, forward: Forward
    ) -> None:
        """Follow one call of the model's forward (one of :data:`FOLLOWED`, or any call on a
        followed tensor): mark ``out`` with its layout if the call keeps one."""
        batch = forward.batch
        if not isinstance(out, Tensor) or not out.dim() or not batch:
            return
        if self.by_id and any(self.unknown(a) for a in _operands(args, kwargs)):
            self.mark(out, _UNKNOWN)  # whatever the call: its order stays unknown
            return
        source = args[0] if args else None
        if name in _RESHAPES or name in _MOVES:
            if not isinstance(source, Tensor) or not source.dim():
                return
            layout = self.of(source)
            if layout is None:  # cheap tests first: every view and transpose comes here
                if source.shape[0] != batch:
                    if out.shape[0] % batch == 0 and _of_unknown_order(source, forward):
                        self.mark(out, _UNKNOWN)
                    return
                if name in _RESHAPES and (out.shape[0] == batch or out.shape[0] % batch):
                    return  # batch-first still, or rows that are no multiple of the batch
                if name in _MOVES and not _may_move_dim0(name, args, kwargs, source.dim()):
                    return
                if not forward.batch_first(source):
                    return
                layout = (0, 1)
            got = (
                _reshaped(source, out, layout, batch)
                if name in _RESHAPES
                else _moved(name, args, kwargs, source, out, layout, batch)
            )
            if got is not None:
                self.mark(out, got)
            return
        if name in _ROW_WISE_IN_FIRST:
            layout = self.of(source)
            if layout is not None and holds_batch(out, layout, batch):
                assert isinstance(source, Tensor)
                if layout[0] < out.dim() - _trailing(name, args, kwargs, source):
                    self.mark(out, layout)
            return
        if name in _ALONG_DIM:
            layout = self.of(source)
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
            if layout is not None and isinstance(dim, int) and holds_batch(out, layout, batch):
                assert isinstance(source, Tensor)
                if dim % source.dim() != layout[0] and out.dim() == source.dim():
                    self.mark(out, layout)
            return
        if name == "__getitem__":
            layout = self.of(source)
            if layout is not None and _slices_keep(args[1] if len(args) > 1 else None, layout):
                if holds_batch(out, layout, batch):
                    self.mark(out, layout)
            return
        if name in _ELEMENTWISE:
            layout = self._elementwise(args, kwargs, out, forward)
            if layout is not None:
                self.mark(out, layout)  # an in-place call's output is its first operand

    def _elementwise(
        self, args: tuple, kwargs: Mapping | None, out: Tensor, forward: Forward
    ) -> Layout | None:
        """The layout of an elementwise call's output: that of its followed operands (aligned
        from the right, as broadcasting aligns them), if every operand that spans the batch's
        place has the batch there (followed, or batch-first) or is a constant or broadcast
        along it; else None."""
        batch = forward.batch
        assert batch is not None
        found: Layout | None = None
        for a in (*args, *(kwargs.values() if kwargs else ())):
            if isinstance(a, Tensor) and a.dim():
                layout = self.of(a, changes=int(a is out))
                if layout is not None:
                    offset = out.dim() - a.dim()
                    if layout[0] == 0 and layout[1] > 1 and offset:
                        return None  # flattened rows broadcast against more dims
                    shifted = (layout[0] + offset, layout[1])
                    if found is not None and shifted != found:
                        return None
                    found = shifted
        if found is None or not holds_batch(out, found, batch):
            return None
        dim, k = found
        for a in (*args, *(kwargs.values() if kwargs else ())):
            if not isinstance(a, Tensor) or not a.dim():
                continue
            offset = out.dim() - a.dim()
            if offset > dim or a.shape[dim - offset] == 1:
                continue  # the same for every example
            layout = self.of(a, changes=int(a is out))
            if layout is not None:
                continue  # checked above
            if k == 1 and offset == dim and forward.batch_first(a):
                continue  # (B, d) against (T, B, d): example b's at b
            if forward.is_constant(a):
                continue
            return None  # the batch's place holds entries of unknown examples
        return found


def _may_move_dim0(name: str, args: tuple, kwargs: Mapping | None, n: int) -> bool:
    """Whether a transpose or permute can move dim 0 (most move others: attention's heads)."""
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = args[1:3] if len(args) > 2 else tuple((kwargs or {}).values())
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


def _operands(args: tuple, kwargs: Mapping | None) -> list[object]:
    out: list[object] = []
    for a in (*args, *(kwargs.values() if kwargs else ())):
        out.extend(a) if type(a) in (list, tuple) else out.append(a)
    return out


def _of_unknown_order(t: object, forward: Forward) -> bool:
    """A tensor whose dim 0 is not the batch's and that is neither pending nor a constant: its
    rows (B·k of them, or T of a sequence-first one) are in an order no layout explains."""
    return (
        isinstance(t, Tensor)
        and t.dim() > 0
        and t.shape[0] != forward.batch
        and forward.pending(t) is None
        and not forward.is_constant(t)
    )


def _slices_keep(key: object, layout: Layout) -> bool:
    """Whether ``t[key]`` keeps every dim up to the batch's whole: a key of plain slices (and
    an Ellipsis after them), ``slice(None)`` up to the batch's dim."""
    keys = key if type(key) is tuple else (key,)
    for at, k in enumerate(keys):
        if k is Ellipsis:
            return at > layout[0]
        if type(k) is not slice or (at <= layout[0] and k != slice(None)):
            return False
    return True


def _trailing(name: str, args: tuple, kwargs: Mapping | None, source: Tensor) -> int:
    """How many trailing dims a functional row-wise layer reduces over or replaces (the batch
    must come before them)."""
    if name in ("layer_norm", "rms_norm"):
        shape = args[1] if len(args) > 1 else (kwargs or {}).get("normalized_shape", ())
        return len(shape) if isinstance(shape, Sequence) else 1
    return 0 if name == "embedding" else 1


def _reshaped(source: Tensor, out: Tensor, layout: Layout, batch: int) -> Layout | None:
    dim, _ = layout
    if dim == 0:  # batch-first or flattened: a reshape to B·k rows keeps the examples' order
        rows = out.shape[0]
        return (0, rows // batch) if rows > batch and rows % batch == 0 else None
    # the batch on dim j: kept where the dims up to it are kept
    if out.dim() > dim and out.shape[: dim + 1] == source.shape[: dim + 1]:
        return layout
    return None


def _moved(
    name: str, args: tuple, kwargs: Mapping | None, source: Tensor, out: Tensor,
    layout: Layout, batch: int,
) -> Layout | None:  # fmt: skip
    dim, k = layout
    if k != 1:
        return None  # flattened rows moved off dim 0
    order = _permutation(name, args, kwargs or {}, source.dim())
    if order is None:
        return None
    where = order.index(dim)
    return (where, 1) if where and out.shape[where] == batch else None


def _permutation(name: str, args: tuple, kwargs: Mapping, n: int) -> list[int] | None:
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
