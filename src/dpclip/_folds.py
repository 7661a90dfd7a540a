"""The batch flattened into tokens: tensors whose dim 0 holds k rows per example, in order.

A model may run its row-wise layers (Linear, LayerNorm, Embedding) on the batch flattened into
tokens, ``h.reshape(-1, d)`` of a (B, T, d) tensor, as transformers' OPT does in the feed-forward
half of every layer. Row r of such a (B·k, ...) tensor belongs to example r // k exactly when it
comes from a batch-first tensor by reshapes, which keep the order of the elements, and by ops
that act on each row alone (activations, dropout, a residual add of another such tensor). The
forward guard follows those here; a row-wise layer given one is recorded as the same call on
(B, k, ...). Anything else that makes a tensor of B·k rows (a transposed, time-major flattening,
a reordering, an in-place change) leaves it unknown, and a layer on it is refused as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

from torch import Tensor

# calls that reshape (the elements keep their order: a reshape of a batch-first tensor to B·k
# rows puts example b's elements in rows b·k to b·k + k - 1)
RESHAPES = frozenset({"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten"})
# calls that compute each row of their output from the same row of their operands alone (or
# from operands without that dim: broadcast to every row alike)
_ROW_KEEPING = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "mish", "tanh", "tanh_", "sigmoid",
    "sigmoid_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "elu", "elu_", "selu",
    "celu", "leaky_relu", "leaky_relu_", "softplus", "exp", "log", "sqrt", "rsqrt", "neg",
    "__neg__", "abs", "square", "pow", "__pow__", "erf", "clamp", "clamp_", "clip",
    "dropout", "alpha_dropout", "feature_alpha_dropout",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "where", "maximum", "minimum",
    "contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type_as",
})  # fmt: skip


# calls row-wise in their first operand, whose others are weights (a frozen layer's, or one
# called functionally): F.linear(x, w, b), F.layer_norm(x, shape, w, b), F.embedding(ids, w)
_ROW_WISE_IN_FIRST = frozenset({"linear", "layer_norm", "rms_norm", "embedding"})


class Folds:
    """This forward's tensors of the batch flattened into tokens: by id, each with its rows
    per example and its version when it was made (changed in place since: unknown again)."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[weakref.ref, int, int]] = {}

    def clear(self) -> None:
        self.by_id.clear()

    def rows_per_example(self, t: object, changes: int = 0) -> int | None:
        """k for a tensor of the batch flattened into B·k rows, unchanged since (or changed
        ``changes`` times in place: by the row-keeping call being followed); else None."""
        entry = self.by_id.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        assert isinstance(t, Tensor)
        return entry[1] if t._version == entry[2] + changes else None

    def mark(self, t: Tensor, k: int) -> None:
        self.by_id[id(t)] = (weakref.ref(t), k, t._version)

    def after(
        self,
        name: str,
        args: tuple,
        kwargs: Mapping | None,
        out: object,
        batch: int,
        batch_first: Callable[[Tensor], bool],
    ) -> None:
        """Follow one call of the model's forward: ``out`` is flattened too if a reshape made
        it of B·k rows from a batch-first tensor (``batch_first``) or from a flattened one, or if
        a row-keeping call made it of flattened operands of the same rows and of operands that
        broadcast along its rows."""
        if not isinstance(out, Tensor) or not out.dim() or not batch:
            return
        rows = out.shape[0]
        source = args[0] if args else None
        if name in RESHAPES:
            if rows == batch or rows % batch or not isinstance(source, Tensor):
                return
            if self.rows_per_example(source) is not None or batch_first(source):
                self.mark(out, rows // batch)
            return
        if rows == batch or rows % batch:
            return
        k = rows // batch
        if name in _ROW_WISE_IN_FIRST:
            if isinstance(source, Tensor) and source.shape[0] == rows:
                if self.rows_per_example(source) == k:
                    self.mark(out, k)
            return
        if name not in _ROW_KEEPING:
            return
        found = False
        for a in (*args, *(kwargs.values() if kwargs else ())):
            if not isinstance(a, Tensor) or a.dim() < out.dim() or a.shape[0] == 1:
                continue  # a scalar, or the same for every row
            if (
                a.dim() != out.dim()
                or a.shape[0] != rows
                or self.rows_per_example(a, changes=int(a is out)) != k
            ):
                return  # rows of unknown order, or more dims than the output has
            found = True
        if found:
            self.mark(out, k)  # an in-place call's output is its first operand: marked anew
