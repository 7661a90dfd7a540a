"""Where the batch is in tensors that do not hold it on dim 0, one example per row.

Models run their row-wise layers (Linear, LayerNorm, RMSNorm, Embedding) on two such layouts:

- **flattened into tokens**, (B·k, ...) from (B, T, ...) by a reshape, as transformers' OPT runs
  the feed-forward half of its layers. A reshape keeps the elements' order, so row r of a
  reshape of a batch-first tensor to B·k rows is example r // k's;
- **the batch on another dim**, (T, B, ...) from (B, T, ...) by a transpose, permute, movedim
  or ``unsqueeze(0)``, or a stack of a layer's batch-first steps, as PyTorch's
  ``nn.Transformer`` layers run by default (``batch_first=False``).

The forward guard hands every call on a followed tensor (and every view, transpose and join)
to :class:`Layouts`, which marks its output with the layout the call keeps
(:mod:`dpclip._layout_calls` says which calls keep what). A row-wise layer given a followed
tensor is recorded as the same call on its batch-first view: (B, k, ...), or the batch moved to
dim 0. A call on a sequence-first tensor that keeps no layout marks its output suspect, and a
layer on a suspect tensor is refused (at T = B it would pass for batch-first); flattened tokens
a call does not keep are judged by their dim 0 again, as is everything without a mark.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from torch import Tensor

from dpclip._layout_calls import (
    ALONG_DIM,
    ELEMENTWISE,
    FOLLOWED,
    JOINS,
    MATMULS,
    MOVES,
    REDUCTIONS,
    RESHAPES,
    ROW_WISE_IN_FIRST,
    SPLITS,
    Layout,
    along_dims,
    ambiguous,
    call_operands,
    holds_batch,
    indexed,
    may_move_dim0,
    moved,
    reduced,
    reshaped,
    trailing,
)

__all__ = ["FOLLOWED", "Layout", "Layouts", "batch_first_view", "grad_batch_first", "holds_batch"]

# a tensor reshaped or moved from one whose dim 0 is not the batch and that no layout explains
# (B·k rows made in some order dpclip did not follow): never a source of a layout, nor is
# anything computed from it (a layer on it is judged by its dim 0, as before layouts)
_UNKNOWN: Layout = (-1, 0)
# a tensor computed from a followed one by a call that dpclip does not follow, or moved from one
# whose batch could be on another dim too (T = B): it cannot tell which entries are whose, and a
# layer on it (or on anything computed from it) is refused
_SUSPECT: Layout = (-2, 0)


class Forward(Protocol):
    """What the layouts need of the recorder's forward."""

    batch: int | None

    def batch_first(self, t: Tensor) -> bool: ...

    def is_constant(self, t: object) -> bool: ...

    def pending(self, t: object) -> object | None: ...


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
    when it was marked (changed in place since: unknown again); and the tensors known to be
    batch-first (the model's inputs, layers' outputs, layouts moved back), which settle where
    the batch is when another dim has its size too."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[weakref.ref, Layout, int]] = {}
        self.known: dict[int, weakref.ref] = {}
        # this forward's layer outputs by id (the forward guard's table): batch-first too
        self.outputs: Mapping[int, tuple[object, weakref.ref]] = {}

    def clear(self) -> None:
        self.by_id.clear()
        self.known.clear()

    def _entry(self, t: object) -> tuple[weakref.ref, Layout, int] | None:
        entry = self.by_id.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def of(self, t: object, changes: int = 0) -> Layout | None:
        """The layout of a followed tensor unchanged since (or changed up to ``changes`` times
        in place: by the call being followed, which may return it unchanged: dropout of p = 0);
        else None."""
        entry = self._entry(t)
        if entry is None or entry[1][0] < 0:
            return None
        assert isinstance(t, Tensor)
        return entry[1] if entry[2] <= t._version <= entry[2] + changes else None

    def suspect(self, t: object) -> bool:
        """Whether ``t`` was computed from a followed tensor in a way dpclip did not follow
        (see :data:`_SUSPECT`), or changed in place since it was followed."""
        entry = self._entry(t)
        if entry is None:
            return False
        assert isinstance(t, Tensor)
        return entry[1] == _SUSPECT or (entry[1][0] >= 0 and t._version != entry[2])

    def mark(self, t: Tensor, layout: Layout) -> None:
        # dropped when the tensor goes (most go within a statement: attention's permuted
        # projections), so that the forward guard's test for a followed argument, made on
        # every call while any is marked, mostly finds none
        self.by_id[id(t)] = (weakref.ref(t, self._dropper(self.by_id, id(t))), layout, t._version)

    def know(self, t: Tensor) -> None:
        """``t`` is batch-first: a layer's output, the model's input."""
        self.known[id(t)] = weakref.ref(t, self._dropper(self.known, id(t)))
        self.forget(t)

    @staticmethod
    def _dropper(table: dict, key: int) -> Callable[[weakref.ref], None]:
        def drop(ref: weakref.ref) -> None:
            entry = table.get(key)
            if entry is not None and (entry is ref or (type(entry) is tuple and entry[0] is ref)):
                del table[key]

        return drop

    def marked(self, t: object) -> bool:
        """Whether ``t`` has any mark: a layout, or unknown or suspect (its dim 0 is not sure to
        be the batch, even where it has the batch's size)."""
        return self._entry(t) is not None

    def is_known(self, t: object) -> bool:
        ref = self.known.get(id(t))
        if ref is not None and ref() is t:
            return True
        hit = self.outputs.get(id(t))
        return hit is not None and hit[1]() is t

    def forget(self, t: object) -> None:
        """Drop ``t``'s mark: a layer's batch-first output (taken for one, as every layer's)."""
        if self._entry(t) is not None:
            del self.by_id[id(t)]

    def skips(
        self, name: str, args: tuple, kwargs: Mapping | None, out: object, batch: int
    ) -> bool:
        """Whether a view or transpose of an unmarked tensor is sure to keep nothing to follow
        (batch-first in, batch-first out): asked first, for every such call of every forward."""
        if name in JOINS:
            return False
        try:
            source = args[0]
            if id(source) in self.by_id or source.shape[0] != batch:
                return False
            if name in MOVES:
                return not may_move_dim0(name, args, kwargs, source.dim())
            return out.shape[0] == batch  # a reshape
        except (IndexError, AttributeError, TypeError):  # no tensor, or one of no dims
            return True

    def copy(self, t: object, out: object) -> None:
        """``out`` holds ``t``'s entries in their places (``t.detach()``): its mark too."""
        entry = self._entry(t)
        if entry is not None and isinstance(out, Tensor):
            self.mark(out, _SUSPECT if self.suspect(t) else entry[1])

    def lose(self, t: object) -> None:
        """A followed tensor whose order dpclip can no longer vouch for (its ``.data`` read:
        changed through it, its version would not show)."""
        if self._entry(t) is not None:
            assert isinstance(t, Tensor)
            self.mark(t, _SUSPECT)

    def after(
        self, name: str, args: tuple, kwargs: Mapping | None, out: object, forward: Forward
    ) -> None:
        """Follow one call of the model's forward (one of :data:`FOLLOWED`, or any call on a
        followed tensor): mark its outputs with their layout if the call keeps one; as
        :data:`_SUSPECT` if it takes a followed operand and does not."""
        batch = forward.batch
        many = isinstance(out, (list, tuple))  # torch.return_types too: (values, indices)
        outs = [t for t in (out if many else (out,)) if isinstance(t, Tensor)]
        if not batch or not outs:
            return
        operands = call_operands(args, kwargs)
        if self.by_id:
            worst = None
            for a in operands:
                entry = self._entry(a)
                if entry is None:
                    continue
                if entry[1][0] < 0:
                    worst = entry[1] if worst != _SUSPECT else worst
                elif not entry[2] <= a._version <= entry[2] + int(a is out):
                    worst = _SUSPECT  # changed in place since (not by this call: relu_)
            if worst is not None:
                for t in outs:
                    self.mark(t, worst)  # whatever the call: its order stays unknown
                return
        # an operand whose batch a move put on another dim: a call that does not keep that
        # layout leaves no telling where the batch is (at T = B its result would pass for
        # batch-first). Flattened tokens that a call does not keep are judged by their dim 0
        # (B·k rows, refused by a layer; heads folded into the batch go through many such calls)
        followed = self.by_id and any(
            (layout := self.of(a, int(a is out))) is not None and layout[0] > 0 for a in operands
        )
        if many:
            got = self._split(name, args, kwargs, outs, batch) if name in SPLITS else None
            if got is None and followed:
                got = [_SUSPECT] * len(outs)
            for t, layout in zip(outs, got or (), strict=False):
                if layout == (0, 1):
                    self.know(t)
                elif layout is not None:
                    self.mark(t, layout)
            return
        assert isinstance(out, Tensor)
        got = self._follow(name, args, kwargs, out, operands, forward) if out.dim() else None
        if got == (0, 1):
            self.know(out)
        elif got is not None:
            self.mark(out, got)
        elif followed and out.dim():
            self.mark(out, _SUSPECT)

    def _follow(
        self, name: str, args: tuple, kwargs: Mapping | None, out: Tensor, operands: list,
        forward: Forward,
    ) -> Layout | None:  # fmt: skip
        """The layout of ``out`` ((0, 1): batch-first, known), or None."""
        batch = forward.batch
        assert batch is not None
        source = args[0] if args else None
        if name in RESHAPES or name in MOVES:
            if not isinstance(source, Tensor) or not source.dim():
                return None
            layout = self.of(source)
            if layout is None:  # cheap tests first: every view and transpose comes here
                if source.shape[0] != batch:
                    if out.shape[0] % batch == 0 and _of_unknown_order(source, forward):
                        return _UNKNOWN
                    return None
                if name in RESHAPES and (out.shape[0] == batch or out.shape[0] % batch):
                    return None  # batch-first still, or rows that are no multiple of the batch
                if name in MOVES and not may_move_dim0(name, args, kwargs, source.dim()):
                    return None
                if not forward.batch_first(source):
                    return None
                if name == "unsqueeze" and not self.is_known(source):
                    return None  # one example's rows at T = B look like a step's
                if name in MOVES and ambiguous(source, batch) and not self.is_known(source):
                    return None  # (T, B, d) at T = B, or (B, T, d)? judged by dim 0, as ever
                layout = (0, 1)
            if name in RESHAPES:
                return reshaped(source, out, layout, batch)
            return moved(name, args, kwargs, source, out, layout, batch)
        if name in JOINS:
            return self._joined(name, args, kwargs, out, forward)
        layout = self.of(source, int(source is out))
        if name in ROW_WISE_IN_FIRST:
            if layout is not None and holds_batch(out, layout, batch):
                assert isinstance(source, Tensor)
                if layout[0] < out.dim() - trailing(name, args, kwargs, source):
                    return layout
            return None
        if name in ALONG_DIM:
            dims = along_dims(name, args, kwargs)
            if layout is not None and dims is not None and holds_batch(out, layout, batch):
                assert isinstance(source, Tensor)
                if all(d % source.dim() != layout[0] for d in dims) and out.dim() == source.dim():
                    return layout
            return None
        if name == "pad":  # F.pad of the last dims but the batch's
            widths = args[1] if len(args) > 1 else (kwargs or {}).get("pad", ())
            if layout is None or not isinstance(widths, Sequence):
                return None
            assert isinstance(source, Tensor)
            first_padded = source.dim() - len(widths) // 2
            return layout if layout[0] < first_padded and holds_batch(out, layout, batch) else None
        if name in REDUCTIONS:
            if layout is None:
                return None
            assert isinstance(source, Tensor)
            return reduced(args, kwargs, source, out, layout, batch)
        if name == "__getitem__":
            if layout is None:
                return None
            assert isinstance(source, Tensor)
            got = indexed(args[1] if len(args) > 1 else None, layout, source.dim())
            return got if got is not None and holds_batch(out, got, batch) else None
        if name in MATMULS or name in ELEMENTWISE:
            return self._elementwise(name, args, kwargs, out, forward)
        return None

    def _joined(
        self, name: str, args: tuple, kwargs: Mapping | None, out: Tensor, forward: Forward
    ) -> Layout | None:
        """``torch.cat`` along another dim than the batch's of tensors of one layout (and
        constants); ``torch.stack`` of such tensors, or of batch-first ones along dim 0 (the
        steps of a recurrent loop: the batch on dim 1)."""
        batch = forward.batch
        assert batch is not None
        parts = args[0] if args and type(args[0]) in (list, tuple) else None
        dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
        if not parts or not isinstance(dim, int) or not all(isinstance(p, Tensor) for p in parts):
            return None
        layouts = {self.of(p) for p in parts if not forward.is_constant(p)}
        if len(layouts) != 1:
            return None
        (layout,) = layouts
        ndim = parts[0].dim()
        if layout is None:  # batch-first parts
            if name != "stack" or dim % (ndim + 1) != 0:
                return None
            if not all(forward.batch_first(p) and self.is_known(p) for p in parts):
                return None  # rows of one example each (a loop over the batch) look alike
            return (1, 1) if holds_batch(out, (1, 1), batch) else None
        j, k = layout
        if name == "stack":
            where = dim % (ndim + 1)
            got = (j + 1, k) if where <= j else layout
            return got if k == 1 and holds_batch(out, got, batch) else None
        return layout if dim % ndim != j and holds_batch(out, layout, batch) else None

    def _split(
        self, name: str, args: tuple, kwargs: Mapping | None, outs: list, batch: int
    ) -> list[Layout | None] | None:
        source = args[0] if args else None
        layout = self.of(source)
        if layout is None:
            return None
        assert isinstance(source, Tensor)
        dim = args[2] if len(args) > 2 else (kwargs or {}).get("dim", 0)
        if name == "unbind":
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
        if not isinstance(dim, int) or dim % source.dim() == layout[0]:
            return None
        dim %= source.dim()
        j, k = layout
        got = (j - 1, k) if name == "unbind" and dim < j else layout
        if got == (0, 1):  # the batch back on dim 0 (q, k, v of a permuted projection)
            return [None if holds_batch(t, got, batch) else _SUSPECT for t in outs]
        return [got if holds_batch(t, got, batch) else _SUSPECT for t in outs]

    def _elementwise(
        self, name: str, args: tuple, kwargs: Mapping | None, out: Tensor, forward: Forward
    ) -> Layout | None:
        """The layout of an elementwise call's output (or a batched matrix product's, whose
        batch dims are all but the last two): that of its followed operands (aligned from the
        right, as broadcasting aligns them), if every operand that spans the batch's place has
        the batch there (followed, or batch-first) or is a constant or broadcast along it."""
        batch = forward.batch
        assert batch is not None
        tensors = [a for a in call_operands(args, kwargs) if isinstance(a, Tensor) and a.dim()]
        found: Layout | None = None
        for a in tensors:
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
        if name in MATMULS and dim >= out.dim() - 2:
            return None  # the product would sum over the batch
        for a in tensors:
            offset = out.dim() - a.dim()
            if offset > dim or a.shape[dim - offset] == 1:
                continue  # the same for every example
            if self.of(a, changes=int(a is out)) is not None:
                continue  # checked above
            if k == 1 and offset == dim and forward.batch_first(a):
                continue  # (B, d) against (T, B, d): example b's at b
            if forward.is_constant(a):
                continue
            return None  # the batch's place holds entries of unknown examples
        return found


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
