"""Checks on the forward pass that hooks and shapes alone cannot make.

1. Refuse a trainable parameter used outside the forward of a layer that owns it.

While attached, the managed parameters have ``requires_grad=False``: their gradients come only
from the layer rules of the modules that own them. A parameter used anywhere else in the forward
pass (an output layer tied functionally, ``F.linear(h, embedding.weight)``, or an L2 penalty
written into the loss) would get nothing from that use, without any error. So during every
grad-enabled forward of the attached model a torch function mode sees each torch call and
raises on such a use. Uses that carry no gradient pass: ``detach()``, attribute reads (shape,
dtype), anything under ``torch.no_grad()``.

A read that returns a tensor (``emb.weight.T``) is a use like any other; ``.data`` and
``.grad`` carry no gradient and pass.

2. Refuse a recorded layer output broadcast against a tensor of more dims (``x + pos(ids)``)
or given new leading dims (``pos(ids)[None]``), with ids (T,) made outside the forward (made
inside, they are constants: see 3): its dim 0 is not the batch, and when it happens to equal the
batch size no shape check can tell, so each "sample" would be a position and the clipping would
bound nothing.

3. Follow the pending layer outputs (batch 1, or no batch dim: see :mod:`dpclip.hooks`) and the
tensors computed from them and constants only, and split one where it is broadcast over the
batch (an elementwise op, an attention mask): the op gets the recorder's copy with one row per
example instead (same values, same result), whose gradient is taken back to the layer per
example. Using one with a tensor that carries the batch otherwise, or with a layer's parameter,
is refused. Mark the tensors computed from constants only (factories such as ``torch.arange``,
the model's buffers): a layer called on those has no batch dim, whatever its shape.

4. Refuse reordering the rows of an activation whose dim 0 is the batch (``h[perm]``,
``h.flip(0)``, ``index_select(0, ...)``, ``out[perm] = h``): dpclip clips row j of every layer
as example j, so a layer after the reordering would add one example's gradient to another's
(sorting by length around an RNN, then unsorting). Picking each row itself
(``h[torch.arange(B), last]``) passes.

5. Inside a module that takes the generic fallback, compute attention with dropout
(``F.scaled_dot_product_attention`` with ``dropout_p``) from its parts, so that the fallback's
rerun can draw its masks again (:mod:`dpclip.layers._attention_dropout`), and note the answers
of its branches on tensor values (``bool(t)``), which its vmapped rerun takes again. The mode
sees every call already; a mode of its own would cost each call of such a module's forward a
second one.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from dpclip._layouts import FOLLOWED
from dpclip.errors import IntegrityError, ParameterUseError
from dpclip.hooks import PLAIN_TENSORS, ROW_WISE, Recorder
from dpclip.layers._attention_dropout import attention_by_parts, by_parts_args

# calls that read a parameter without putting it on a gradient path
_NO_GRADIENT = {
    "detach", "size", "dim", "numel", "stride", "data_ptr", "element_size", "is_contiguous",
    "is_floating_point", "is_complex", "__repr__", "__format__", "__len__", "item", "tolist",
    "numpy", "__bool__", "__int__", "__float__", "__index__", "__hash__",
}  # fmt: skip
_GRADIENT_FREE_ATTRIBUTES = {"data", "grad"}
# elementwise calls that broadcast their tensor operands
_BROADCASTING = {
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "where", "addcmul", "lerp",
}  # fmt: skip
# calls that make a tensor from constants (their values carry no example; not torch.tensor:
# its Python values may come from the batch)
_FACTORIES = {
    "arange", "zeros", "ones", "full", "empty", "eye", "linspace", "logspace", "scalar_tensor",
    "zeros_like", "ones_like", "full_like", "empty_like", "tril_indices", "triu_indices",
    "new_zeros", "new_ones", "new_full", "new_empty", "rand", "randn", "randint", "randperm",
}  # fmt: skip
# factories whose length is a sequence's: constants whatever it is (the others, of two dims or
# more shaped like the batch on dim 0 (torch.zeros(B, H), an RNN's initial state), unless
# shaped like a constant (full_like(table)), are taken for batched)
_SEQUENCES = {"arange", "linspace", "logspace", "randperm", "eye", "tril_indices", "triu_indices"}
# random calls (a pending tensor computed through one has rows that differ by chance)
_RANDOM = {
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "bernoulli", "bernoulli_", "native_dropout",
}  # fmt: skip
# calls that join a list of tensors along a dim: one of B rows pending, joined with the batch
# along another dim than 0, meets it row by row (torch.cat([h, pos(ids)], dim=-1) at T = B)
_JOINS = {"cat", "concat", "concatenate", "stack"}
# batched matrix products: one of B rows pending against a batched one of as many dims (three or
# more), its dim 0 a batch dim of the product, meets it row by row
_MATMULS = {"matmul", "bmm", "__matmul__", "__rmatmul__"}
# calls that pick, move, join or sum rows of a tensor (a pending one of B rows so changed by
# place cannot be met row by row where dropout made its rows differ)
_ROWS_OPS = {
    "__getitem__", "__setitem__", "narrow", "select", "index_select", "index_put", "index_put_",
    "split", "chunk", "unbind", "tensor_split", "roll", "flip", "gather", "scatter", "scatter_",
    "cumsum", "cumprod", "cummax", "cummin", "sum", "mean", "amax", "amin", "max", "min",
    "prod", "cat", "concat", "concatenate", "stack",
}  # fmt: skip


def _on_rows(name: str, args: tuple, kwargs: Mapping) -> bool:
    """Whether a call of :data:`_ROWS_OPS` acts along dim 0 (a slice of rows, a sum over them):
    ``t[:, None]`` does not, ``t[1:]`` does; a call along no dim given (a sum of all) does."""
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_"):
        key = _key(args, kwargs)
        first = key[0] if type(key) is tuple and key else key
        return not (first is None or first is Ellipsis or first == slice(None))
    dim = kwargs.get("dim", kwargs.get("dims", args[1] if len(args) > 1 else None))
    if name in ("roll",):
        dim = kwargs.get("dims", args[2] if len(args) > 2 else None)
    if dim is None:
        return name not in ("cat", "concat", "concatenate", "stack", "unbind", "split", "chunk")
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return any(isinstance(d, int) and d == 0 for d in dims)


# calls whose tensor arguments after the first give a dtype or device only
_CASTS = {"to", "type_as"}
# calls that can copy a tensor over a new or size-1 dim 0 (position ids to (B, T)): a constant
# made so is taken for one with the batch on dim 0, as BERT's token types are
_REPLICATING = {"expand", "expand_as", "broadcast_to", "repeat"}
# calls that can put new dims in front (x[None], x.unsqueeze(0), x.expand(B, ...))
_NEW_LEADING_DIMS = {
    "__getitem__", "unsqueeze", "view", "reshape", "expand", "expand_as", "broadcast_to",
}  # fmt: skip


def _touches(pending: Mapping, args: tuple, kwargs: Mapping | None) -> bool:
    """Whether a call's arguments (or the lists among them) hold a pending tensor: asked on
    every call while one exists, so a plain loop."""
    for values in (args, kwargs.values()) if kwargs else (args,):
        for a in values:
            if id(a) in pending:
                return True
            if type(a) in (list, tuple):
                for x in a:
                    if id(x) in pending:
                        return True
    return False


def _tensors(args: tuple, kwargs: Mapping) -> Iterator[object]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


# calls that can move rows along dim 0 (beside __getitem__): the positions of their dim and
# index arguments (None: the op has no such argument)
_ROW_MOVES = {
    "index_select": (1, 2),
    "gather": (1, 2),
    "take_along_dim": (2, 1),
    "index_copy": (1, 2),
    "index_copy_": (1, 2),
    "flip": (1, None),
    "roll": (2, None),
    "index_add": (1, 2),
    "index_add_": (1, 2),
    "index_reduce": (1, 2),
    "index_reduce_": (1, 2),
    "scatter": (1, 2),
    "scatter_": (1, 2),
    "scatter_add": (1, 2),
    "scatter_add_": (1, 2),
    "scatter_reduce": (1, 2),
    "scatter_reduce_": (1, 2),
}
# calls that put a value at the rows a key indexes (rows move only if a tensor value is put)
_PUTS = {"__setitem__", "index_put", "index_put_"}

# What the mode does with a call, by the called function (decided once per function: the mode
# sees every torch call of every forward, so its per-call work is host time on every step).
(_PLAIN, _FREE, _ATTRIBUTE, _BROADCAST, _LEADING, _GETITEM, _PUT, _ROWS, _ATTENTION, _BOOL,
 _FACTORY, _CAST, _DETACH, _JOIN, _MATMUL) = range(15)  # fmt: skip
_KIND: dict[object, tuple[int, str]] = {}  # func -> (what to do, its name)


def _kind_of(func: object) -> tuple[int, str]:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        kind = _ATTRIBUTE
    elif func is torch.Tensor.__bool__:
        kind = _BOOL
    elif name == "detach":
        kind = _DETACH
    elif name in _NO_GRADIENT:
        kind = _FREE
    elif name in _JOINS:
        kind = _JOIN
    elif name in _MATMULS:
        kind = _MATMUL
    elif name in _BROADCASTING:
        kind = _BROADCAST
    elif name == "__getitem__":
        kind = _GETITEM
    elif name in _PUTS:
        kind = _PUT
    elif name in _ROW_MOVES:
        kind = _ROWS
    elif name in _NEW_LEADING_DIMS:
        kind = _LEADING
    elif func is F.scaled_dot_product_attention:
        kind = _ATTENTION
    elif name in _FACTORIES:
        kind = _FACTORY
    elif name in _CASTS:
        kind = _CAST
    else:
        kind = _PLAIN
    if kind != _ATTRIBUTE:  # an attribute read's func is a new bound wrapper each time
        try:
            _KIND[func] = (kind, name)
        except TypeError:  # an unhashable callable: classified on each call
            pass
    return kind, name


class _Mode(TorchFunctionMode):
    def __init__(self, guard: ParamUseGuard) -> None:
        super().__init__()
        self.guard = guard
        # The managed parameters by id: the guard holds them, so a live object with one of these
        # ids is that parameter. Tested by id, not isinstance: Parameter's isinstance check is
        # Python code (its metaclass), and the mode tests every argument of every call.
        self.managed = guard._owners
        # the guard's and the recorder's live tables, read on every call without a method call
        self.active, self.outputs = guard._active, guard._outputs
        self.pending = guard._recorder.pending_by_id if guard._recorder is not None else {}
        self.consts = guard._recorder.consts_by_id if guard._recorder is not None else {}
        self.layouts = guard._recorder.layouts if guard._recorder is not None else None
        self.recorder = guard._recorder

    def _mark_constant(
        self, kind: int, name: str, args: tuple, kwargs: Mapping | None, out: object
    ) -> None:
        """``out`` made from constants only (a factory, or a call whose tensors are all
        constants): a constant too (see :attr:`Recorder.consts_by_id`)."""
        if kind == _FACTORY and name not in _SEQUENCES and self._batch_shaped(name, args, out):
            return  # torch.zeros(B, H): batched
        if kind != _FACTORY:
            assert self.recorder is not None
            operands = args[:1] if kind == _CAST else (*args, *(kwargs or {}).values())
            constant = self.recorder.all_constant(operands)
            if constant is None:
                return
            if not constant:  # a constant changed in place by others (t[1:] = ids) is none
                self._unmark(kind, args, out)
                return
            if name in _REPLICATING and self._replicates(args[0], out):
                return  # copied over the batch: batched, as BERT's token types
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor):
                self.consts[id(t)] = weakref.ref(t)

    def _detached(self, t: object, out: object) -> None:
        """``t.detach()`` of a pending output or a constant: a constant (its values carry no
        example; taken for batched, it would be split against, e - e.detach())."""
        if id(t) in self.pending or id(t) in self.consts:
            assert self.recorder is not None
            if self.recorder.pending(t) is not None or self.recorder.is_constant(t):
                self.consts[id(out)] = weakref.ref(out)

    def _unmark(self, kind: int, args: tuple, out: object) -> None:
        first = args[0] if args else None
        if (kind == _PUT or out is first) and isinstance(first, torch.Tensor):
            self.consts.pop(id(first), None)
            if first._base is not None:  # a view's change is its base's
                self.consts.pop(id(first._base), None)

    def _batch_shaped(self, name: str, args: tuple, out: object) -> bool:
        """Whether a factory's output is shaped like the batch: two dims or more, the batch's
        size on dim 0, and not shaped like a constant (T5 fills (T, T) tables by full_like).
        (Its rows are all alike: taken for batched, a (T, T) table at T = B changes nothing
        unless a layer is run on it; a recurrent cell's first state torch.zeros(B, H) must be
        batched, also at H = B.)"""
        assert self.recorder is not None
        if name.endswith("_like") and args and self.recorder.is_constant(args[0]):
            return False
        return (
            isinstance(out, torch.Tensor) and out.dim() > 1 and out.shape[0] == self.recorder.batch
        )

    def _replicates(self, t: object, out: object) -> bool:
        """Whether ``out`` copies ``t`` over a new or size-1 dim 0 of this forward's batch, and
        over no dim of the batch's size beside it."""
        batch = self.recorder.batch if self.recorder is not None else None
        return (
            isinstance(t, torch.Tensor)
            and isinstance(out, torch.Tensor)
            and out.dim() > 0
            and out.shape[0] == batch
            and (t.dim() < out.dim() or t.shape[0] == 1)
            and _unambiguous(out, batch)
        )

    def _check_args(self, args: tuple, func: object) -> None:
        """Refuse a managed parameter among ``args`` (or in a list or tuple argument) outside
        the forward of every layer that owns it."""
        managed, active = self.managed, self.active
        for a in args:
            owners = managed.get(id(a))
            if owners is not None:
                for m in owners:  # inline: this runs for every parameter use of every forward
                    if active[m]:
                        break
                else:
                    self.guard.check(a, func)
            elif isinstance(a, (list, tuple)):
                for item in a:
                    if id(item) in managed:
                        self.guard.check(item, func)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        try:
            known = _KIND.get(func)
        except TypeError:  # unhashable
            known = None
        kind, name = known if known is not None else _kind_of(func)
        if kind == _BOOL:  # a branch on a tensor's value: its fallback rerun takes it too
            answer = func(*args, **kwargs) if kwargs else func(*args)
            if self.recorder is not None and self.recorder.in_whole_call:
                self.recorder.branched(answer)
            return answer
        if kind == _FREE:
            return func(*args, **kwargs) if kwargs else func(*args)
        if not torch.is_grad_enabled():
            out = func(*args, **kwargs) if kwargs else func(*args)
            layouts = self.layouts
            if layouts is not None and layouts.by_id and _touches(layouts.by_id, args, kwargs):
                assert self.recorder is not None  # no_grad blocks, custom Functions' insides
                layouts.after(name, args, kwargs, out, self.recorder)
            return out
        if kind == _DETACH:
            out = func(*args, **kwargs) if kwargs else func(*args)
            if (self.pending or self.consts) and args:
                self._detached(args[0], out)
            if self.layouts is not None and self.layouts.by_id and args:
                self.layouts.copy(args[0], out)  # the same entries, in the same places
            return out
        guard = self.guard
        if kind == _ATTRIBUTE:  # an attribute read: a use if it gives a tensor (p.T)
            out = func(*args, **kwargs) if kwargs else func(*args)
            if not isinstance(out, torch.Tensor):
                return out
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            if attribute == "data" and (self.pending or self.consts) and args:
                self._detached(args[0], out)  # as t.detach()
            if attribute == "data" and self.layouts is not None and self.layouts.by_id and args:
                self.layouts.lose(args[0])  # changed through .data, its version would not show
            if attribute not in _GRADIENT_FREE_ATTRIBUTES:
                for a in args:
                    if id(a) in self.managed:
                        guard.check(a, f".{attribute}")
                if self.pending and _touches(self.pending, args, None):
                    guard.follow_pending(args, None, out, f".{attribute}")
                if self.consts:
                    self._mark_constant(kind, attribute, args, None, out)
            return out
        self._check_args(args, func)
        if kwargs:
            self._check_args(tuple(kwargs.values()), func)
        pending, outputs = self.pending, self.outputs
        if kind == _BROADCAST:
            if pending:
                args = guard.split_pending(args)
            if any(id(a) in outputs for a in args):  # only a layer output can be refused
                guard.check_broadcast(args, name)
        if kind == _ROWS or (kind in (_GETITEM, _PUT) and _advanced(_key(args, kwargs))):
            guard.check_rows_kept(name, args, kwargs or {})
        layouts = self.layouts
        if kind in (_ROWS, _GETITEM, _PUT) and layouts is not None and layouts.by_id and args:
            if _touches(layouts.by_id, args, kwargs):
                guard.check_layout_kept(name, args, kwargs or {})
        parts = None
        if kind == _ATTENTION and pending:
            args, kwargs = guard.split_pending_mask(args, kwargs or {})
        if kind == _JOIN and args and type(args[0]) in (list, tuple):
            guard.check_rows_rejoined(name, args, kwargs or {})
        if kind == _JOIN and pending and args and _touches(pending, args[:1], None):
            args = guard.split_pending_joined(name, args, kwargs or {})
        if kind == _MATMUL and pending and _touches(pending, args, None):
            args = guard.split_pending_matmul(args)
        if kind == _ATTENTION and self.recorder is not None and self.recorder.in_whole_call:
            parts = by_parts_args(args, kwargs or {})
        if parts is not None:  # its dropout, drawn again in the fallback's rerun
            self.recorder.ran_by_parts()
            out = attention_by_parts(**parts)
        else:
            out = func(*args, **kwargs) if kwargs else func(*args)
        if pending and _touches(pending, args, kwargs):
            split = guard.split_expand_as(args, out) if name == "expand_as" else None
            if split is not None:  # p.expand_as(h): a broadcast over h's batch
                out = split
            else:
                guard.follow_pending(args, kwargs, out, name)
        if layouts is not None and (
            (layouts.by_id and _touches(layouts.by_id, args, kwargs))
            or (
                name in FOLLOWED
                and not layouts.skips(name, args, kwargs, out, self.recorder.batch or 0)
            )
        ):
            assert self.recorder is not None
            layouts.after(name, args, kwargs, out, self.recorder)
        if kind in (_LEADING, _GETITEM) and args and id(args[0]) in outputs:
            guard.check_new_leading_dims(args[0], out, name)
        consts = self.consts
        if kind == _FACTORY or (  # a call on a tensor that is not a constant makes none
            consts and (not args or type(args[0]) not in PLAIN_TENSORS or id(args[0]) in consts)
        ):
            self._mark_constant(kind, name, args, kwargs, out)
        return out


class ParamUseGuard:
    """Tracks which owning layers are inside their forward; checks every parameter use."""

    def __init__(
        self,
        owners: Mapping[nn.Parameter, Iterable[nn.Module]],
        names: Mapping[nn.Parameter, str],
        unruled: Mapping[nn.Parameter, Iterable[str]] | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        """``unruled``: for a parameter also held by modules without a rule (aliases), their
        paths, named in the error since the use is likely theirs. ``recorder``: whose pending
        batch-1 outputs are split where broadcast."""
        self.enabled = True
        self._recorder = recorder
        self._owners = {id(p): tuple(mods) for p, mods in owners.items()}
        # held, so that no other object can take one of these ids while attached (the mode
        # matches arguments by id), even if the model drops a parameter meanwhile
        self._held = list(owners)
        self._names = {id(p): n for p, n in names.items()}
        self._unruled = {id(p): tuple(paths) for p, paths in (unruled or {}).items()}
        # this forward's layer outputs, held weakly: an output the model drops is freed as usual
        self._outputs: dict[int, tuple[nn.Module, weakref.ref]] = {}
        if recorder is not None:  # layer outputs are batch-first for the followed layouts too
            recorder.layouts.outputs = self._outputs
        self._active: Counter[nn.Module] = Counter()
        self._depth = 0
        self._mode: _Mode | None = None
        self._handles: list[RemovableHandle] = []

    def attach(self, modules: Iterable[nn.Module], root: nn.Module) -> None:
        self._handles.append(root.register_forward_pre_hook(self._enter_root))
        self._handles.append(root.register_forward_hook(self._exit_root, always_call=True))
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            # its forward ends before any forward hook of the user's: dpclip clips a layer's
            # parameters by their uses in its forward, so a use in a hook is refused
            self._handles.append(
                module.register_forward_hook(self._leave, always_call=True, prepend=True)
            )
            self._handles.append(module.register_forward_hook(self._exit))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode, self._depth = None, 0

    def check(self, p: nn.Parameter, func: object) -> None:
        owners = self._owners.get(id(p))
        if owners is None or any(self._active[m] for m in owners):
            return
        what = func if isinstance(func, str) else getattr(func, "__name__", repr(func))
        held = self._unruled.get(id(p))
        also = (
            f" It is also held by {', '.join(held)}, which has no per-sample rule: if that layer "
            "uses it, register a rule for it with dpclip.register_layer."
            if held
            else ""
        )
        sharer = next(  # a running layer holding it too, whose rule does not cover it
            (m for m, n in self._active.items() if n and any(q is p for q in m.parameters(False))),
            None,
        )
        if sharer is not None:
            raise ParameterUseError(
                f"parameter {self._names[id(p)]!r} of {type(owners[0]).__name__} is shared with a "
                f"{type(sharer).__name__}, whose forward used it ({what}), but the "
                f"{type(sharer).__name__} has no per-sample rule for it: dpclip cannot clip a "
                "parameter tied between a layer with a rule and one without. Untie them, or "
                f"register a rule for {type(sharer).__name__} with dpclip.register_layer."
            )
        raise ParameterUseError(
            f"parameter {self._names[id(p)]!r} was used by {what} outside the forward of the "
            f"layer that owns it ({type(owners[0]).__name__}), elsewhere in the model or in a "
            "hook of that layer. dpclip computes its gradient from that layer's forward only, "
            "so this use would get none. Use it inside forward (a hook's work can move there), "
            "tie weights by assigning the "
            "same Parameter to both layers (head.weight = embedding.weight), put weight decay "
            "in the optimizer (weight_decay=...) rather than in the loss, or use .detach() "
            "where no gradient is meant." + also
        )

    def _batch_rank(
        self, a: torch.Tensor, others: Iterable[object], leading: bool = False
    ) -> int | None:
        """The rank of the operand that broadcasts pending ``a`` over the batch, if one does:
        a tensor of this forward's batch on dim 0 (not a pending one, not a constant) against
        which a's dim 0 is 1, or the batch itself (row by row), or a has exactly its other dims
        (``x + pos(arange(T))``, (T, d) on (B, T, d)). Fewer dims, or a broadcast along them,
        would let a time-major (T, B, d) tensor with T = B pass for batched; ``leading``: any
        dims a lacks are the batch's (an attention mask, on a (B, H, T, d) query)."""
        recorder = self._recorder
        assert recorder is not None
        batch, rank = recorder.batch, None
        for t in others:
            if (
                isinstance(t, torch.Tensor)
                and t is not a
                and t.dim() >= a.dim()
                and t.dim()
                and t.shape[0] == batch
                and recorder.pending(t) is None
                and not recorder.is_constant(t)
                and not recorder.layouts.marked(t)  # its batch is elsewhere, or unsure (T = B)
            ):
                if t.dim() == a.dim():
                    fits = a.shape[0] == 1 or _row_by_row(a, t)
                elif leading:
                    fits = True
                else:
                    fits = t.dim() == a.dim() + 1 and t.shape[1:] == a.shape
                if fits:
                    rank = max(rank or 0, t.dim())
        return rank

    def split_pending(self, args: tuple) -> tuple:
        """``args`` with each pending tensor broadcast over the batch replaced by the
        recorder's copy with one row per example (the op computes the same values)."""
        recorder = self._recorder
        if recorder is None or not recorder.has_pending():
            return args
        out = list(args)
        for k, a in enumerate(args):
            if recorder.pending(a) is None:
                continue
            rank = self._batch_rank(a, args)
            if rank is not None:
                out[k] = recorder.broadcast_use(a, rank)
            else:
                out[k] = self._split_pending_moved(a, args)
        return tuple(out)

    def _split_pending_moved(self, a: torch.Tensor, args: tuple) -> torch.Tensor:
        """Pending ``a`` broadcast along the batch of a sequence-first operand (``pos(arange(T))
        [:, None]``, (T, 1, d), against (T, B, d)): split as for a batch-first one, in the frame
        with the batch moved to dim 0, and moved back (marked sequence-first); else ``a``."""
        recorder = self._recorder
        assert recorder is not None
        for t in args:
            layout = recorder.layouts.of(t) if isinstance(t, torch.Tensor) else None
            if layout is None or layout[0] == 0 or t.dim() != a.dim() or a.shape[layout[0]] != 1:
                continue
            j = layout[0]
            moved = a.movedim(j, 0)  # a view: pending as ``a`` is (no op of the model's)
            recorder.derive(moved, [recorder.pending(a)], [])
            use = recorder.broadcast_use(moved, t.dim()).movedim(0, j)
            recorder.layouts.mark(use, layout)
            return use
        return a

    def split_pending_joined(self, name: str, args: tuple, kwargs: Mapping) -> tuple:
        """``torch.cat``/``torch.stack`` of pending tensors of B rows with batched ones along a
        dim other than 0: each such pending tensor replaced by its split for a use row by row
        (joined along dim 0 they would merge examples: :meth:`follow_pending` refuses that)."""
        recorder = self._recorder
        assert recorder is not None
        tensors = args[0]
        batched = [
            t for t in tensors
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == recorder.batch
            and recorder.pending(t) is None and not recorder.is_constant(t)
        ]  # fmt: skip
        if not batched:
            return args
        rank = batched[0].dim()
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % (rank + (name == "stack")) == 0:
            return args
        joined = [
            recorder.broadcast_use(t, rank)
            if recorder.pending(t) is not None and t.dim() == rank and t.shape[0] == recorder.batch
            else t
            for t in tensors
        ]
        return (type(tensors)(joined), *args[1:])

    def split_pending_matmul(self, args: tuple) -> tuple:
        """A batched matrix product of a pending tensor of B rows and a batched one of as many
        dims (three or more): the pending one split for a use row by row."""
        recorder = self._recorder
        assert recorder is not None
        batch = recorder.batch
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        if len(tensors) != 2 or tensors[0].dim() != tensors[1].dim() or tensors[0].dim() < 3:
            return args
        if any(t.shape[0] != batch for t in tensors):
            return args
        pending = [recorder.pending(t) is not None for t in tensors]
        if pending.count(True) != 1 or any(recorder.is_constant(t) for t in tensors):
            return args
        rank = tensors[0].dim()
        return tuple(
            recorder.broadcast_use(a, rank) if k < 2 and pending[k] else a
            for k, a in enumerate(args)
        )

    def split_expand_as(self, args: tuple, out: object) -> torch.Tensor | None:
        """``p.expand_as(h)`` of a pending ``p`` and a batched ``h`` (XLM's positions): the
        recorder's copy of p per example, expanded so; None if it is not that."""
        recorder = self._recorder
        if recorder is None or len(args) < 2 or recorder.pending(args[0]) is None:
            return None
        rank = self._batch_rank(args[0], args[1:2])
        if rank is None or not isinstance(out, torch.Tensor):
            return None
        return recorder.broadcast_use(args[0], rank).expand_as(out)

    def split_pending_mask(self, args: tuple, kwargs: Mapping) -> tuple[tuple, dict]:
        """Attention's arguments with a pending mask (T5's relative-position bias) replaced by
        its copy per example, when the query carries the batch."""
        recorder = self._recorder
        kwargs = dict(kwargs)
        query = args[0] if args else kwargs.get("query")
        at_args = len(args) > 3
        mask = args[3] if at_args else kwargs.get("attn_mask")
        if recorder is None or recorder.pending(mask) is None:
            return args, kwargs
        assert isinstance(mask, torch.Tensor)
        rank = self._batch_rank(mask, (query,), leading=True)
        if rank is None:
            return args, kwargs
        used = recorder.broadcast_use(mask, rank)
        if at_args:
            return (*args[:3], used, *args[4:]), kwargs
        kwargs["attn_mask"] = used
        return args, kwargs

    def follow_pending(self, args: tuple, kwargs: Mapping | None, out: object, what: str) -> None:
        """A call on pending tensors (see :mod:`dpclip.hooks`): its output is pending too when
        the others are constants (a mask, a scale); refused with a tensor that carries the
        batch (beside a broadcast, which :meth:`split_pending` split) or a layer's parameter."""
        recorder = self._recorder
        if recorder is None:
            return
        operands = [a for a in _tensors(args, kwargs or {}) if isinstance(a, torch.Tensor)]
        found, other, rest = [], None, []
        for a in operands:
            entry = recorder.pending(a)
            if entry is not None:
                found.append(entry)
            elif id(a) in self._owners:
                owners = self._owners[id(a)]
                if not all(recorder.is_whole_call(m) for m in owners) and not any(
                    self._active[m] and isinstance(m, ROW_WISE) and not recorder.is_whole_call(m)
                    for m in owners
                ):  # a row-wise layer's own use, fc(pos(arange(T))), is pending too
                    other = other or f"the parameter {self._names[id(a)]!r} of a layer with a rule"
            elif a.requires_grad:
                other = other or "a tensor that carries the batch"
            else:
                rest.append(a)
        if not found:
            return
        if other is not None:
            raise IntegrityError(
                f"{found[0].what}, and {what} uses it (or a tensor computed from it) with "
                f"{other}, other than by broadcasting it over the batch (x + layer(pos)): its "
                "gradient would sum over examples and could not be split per example. Give the "
                "layer a batched input (e.g. torch.arange(T).expand_as(ids), a copy over the "
                "batch of the model's input); do not run layers "
                "per example (x[i:i+1]) or on chunks of the batch."
            )
        for entry in found:
            changed = recorder.changed_base(entry)
            if changed is not None:
                raise IntegrityError(
                    f"{changed.what}, and {what} changed it in place: dpclip takes its "
                    "per-example gradients back to the layer's output as the layer returned it. "
                    "Make that operation out of place"
                )
        rows_op = what in _ROWS_OPS and _on_rows(what, args, kwargs or {})
        recorder.derive(out, found, rest, random=what in _RANDOM, rows_op=rows_op)

    def check_rows_kept(self, name: str, args: tuple, kwargs: Mapping) -> None:
        """Refuse ``name`` moving rows along dim 0 of a tensor on the gradient path whose dim 0
        is this forward's batch (row j would no longer be example j for the layers after it)."""
        recorder = self._recorder
        batch = recorder.batch if recorder is not None else None
        tensors = [a for a in _tensors(args, kwargs) if isinstance(a, torch.Tensor)]
        if not batch or batch < 2 or not any(t.requires_grad for t in tensors):
            return
        t = args[0]
        if not isinstance(t, torch.Tensor) or not t.dim() or t.shape[0] != batch:
            return
        if recorder is not None and recorder.pending(t) is not None:
            return  # no batch dim: its rows are positions
        if recorder is not None and recorder.layouts.of(t) is not None:
            return  # its batch is elsewhere (a time-major view at T = B): check_layout_kept
        if _moves_rows(name, args, kwargs, batch):
            raise IntegrityError(
                f"{name} moves rows along dim 0 of a tensor whose dim 0 is the batch ({batch}) "
                "inside the model's forward: dpclip clips row j of every layer as example j, so "
                "a layer after the move would add one example's gradient to another's (sorting "
                "the batch by length around an RNN, then unsorting). Keep the batch's order "
                "inside the forward (pad instead of sorting), or do the reordering in a module "
                "that dpclip.register_layer gives a rule as a whole. (A time-major (T, B, ...) "
                "view whose T happens to equal the batch looks the same: move along the time "
                "dim of the batch-first tensor instead, e.g. h.flip(1) before transposing)"
            )

    def check_rows_rejoined(self, name: str, args: tuple, kwargs: Mapping) -> None:
        """Refuse ``torch.cat``/``torch.stack`` along dim 0 of slices (rows, or single rows) of
        one tensor that put all its rows back in another order: ``cat([x[2:], x[:2]])`` moves
        rows as ``x[perm]`` does."""
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(dim, int) or len(parts) < 2:
            return
        if not all(isinstance(p, torch.Tensor) and p.dim() for p in parts):
            return
        base = parts[0]._base if parts[0]._base is not None else parts[0]
        along = dim % (base.dim() + (name == "stack")) if base.dim() else 0
        if along:  # along the batch of a sequence-first tensor only
            recorder = self._recorder
            layout = recorder.layouts.of(base) if recorder is not None else None
            if layout is None or layout != (along, 1) or name == "stack":
                return
        if base.dim() == 0 or base.shape[along] < 2:
            return
        step, start = base.stride(along), base.storage_offset()
        rows: list[int] = []
        for p in parts:
            if (p._base if p._base is not None else p) is not base or not step:
                return
            first, rest = divmod(p.storage_offset() - start, step)
            if rest or not 0 <= first < base.shape[along]:
                return  # not whole slices of the base along that dim
            count = 1 if name == "stack" else p.shape[along]
            if name == "stack" and p.shape != base.shape[1:]:
                return
            if name != "stack" and (
                p.shape[:along] != base.shape[:along]
                or p.shape[along + 1 :] != base.shape[along + 1 :]
            ):
                return
            rows.extend(range(first, first + count))
        if sorted(rows) == list(range(base.shape[along])) and rows != sorted(rows):
            raise IntegrityError(
                f"{name} along dim 0 of slices of one tensor puts its rows back in another order "
                "inside the model's forward: dpclip clips row j of every layer as example j, so "
                "a layer after it would add one example's gradient to another's. Keep the "
                "batch's order inside the forward"
            )

    def check_layout_kept(self, name: str, args: tuple, kwargs: Mapping) -> None:
        """Refuse ``name`` moving entries along the batch of a tensor that holds it elsewhere
        than on dim 0 alone (see :mod:`dpclip._layouts`): rows of the batch flattened into
        tokens, or the dim that holds it in a sequence-first layout."""
        recorder = self._recorder
        assert recorder is not None
        if not recorder.batch or recorder.batch < 2:
            return
        t = args[0]
        value = _put_value(name, args, kwargs)
        moved = recorder.layouts.of(value) if value is not None else None
        if moved is not None and _puts_across(name, args, kwargs, moved):
            raise IntegrityError(
                f"{name} puts a tensor whose batch is on dim {moved[0]} (sequence-first, or "
                "flattened into tokens) at an index along that dim inside the model's forward: "
                "its entries would land at other examples' places. Keep the examples' order "
                "inside the forward"
            )
        layout = recorder.layouts.of(t)
        if layout is None:
            return
        dim, k = layout
        if (
            _moves_rows(name, args, kwargs, t.shape[dim], dim)
            or _picks_across(name, args, kwargs, layout, recorder.batch)
            or _gathers_across(name, args, kwargs, layout, t.shape[dim])
        ):
            where = (
                f"rows of the batch flattened into tokens ({k} per example, in order)"
                if dim == 0
                else f"dim {dim} of a tensor that holds the batch there (a sequence-first layout)"
            )
            raise IntegrityError(
                f"{name} moves or gathers {where} inside the model's forward: dpclip clips "
                "each example's entries as that example's, so a layer after the move would add one example's "
                "gradient to another's. Keep the examples' order inside the forward, or move "
                "along another dim (the tokens of a batch-first tensor: h.flip(1))"
            )

    def check_broadcast(self, args: tuple, what: str) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) < 2 or not self._outputs:
            return
        top = max(t.dim() for t in tensors)
        for t in tensors:
            hit = self._outputs.get(id(t))
            if hit is not None and hit[1]() is t and t.dim() < top and not self._pending(t):
                self._refuse(hit[0], t, f"is broadcast by {what} against a tensor of {top} dims")

    def check_new_leading_dims(self, t: object, out: object, what: str) -> None:
        """``pos(ids)[None]`` and the like: the same mistake, one call before the broadcast
        (a pending layer output is left alone: the recorder splits those)."""
        hit = self._outputs.get(id(t))
        if hit is None or hit[1]() is not t or not isinstance(out, torch.Tensor):
            return
        if self._pending(t):
            return  # no batch dim: the recorder splits it where it meets the batch
        assert self._recorder is not None
        if self._recorder.layouts.of(t) is not None:
            return  # the batch flattened into tokens, viewed back as (B, T, ...)
        assert isinstance(t, torch.Tensor)
        if t.shape[0] > 1 and out.dim() > t.dim() and out.shape[out.dim() - t.dim() :] == t.shape:
            self._refuse(hit[0], t, f"gets new leading dims from {what}")

    def _pending(self, t: torch.Tensor) -> bool:
        return self._recorder is not None and self._recorder.pending(t) is not None

    def _refuse(self, module: nn.Module, t: torch.Tensor, how: str) -> None:
        raise IntegrityError(
            f"the output of {type(module).__name__} (shape {tuple(t.shape)}) {how}: its dim 0 "
            "is not the batch (an input without one, such as torch.arange(T)), so its "
            "per-sample gradients cannot be told apart; give the layer a batched input, e.g. "
            "torch.arange(T).expand_as(ids), a copy over the batch of the model's input"
        )

    def _enter_root(self, module: nn.Module, inputs: tuple) -> None:
        if self._depth == 0 and torch.is_grad_enabled() and self.enabled:
            self._mode = _Mode(self)
            self._mode.__enter__()
        if self._mode is not None:
            self._depth += 1

    def _exit_root(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self._mode is None:
            return
        self._depth -= 1
        if self._depth == 0:
            mode, self._mode = self._mode, None
            self._outputs.clear()
            self._active.clear()  # a forward that raised leaves none inside
            mode.__exit__(None, None, None)

    def _enter(self, module: nn.Module, inputs: tuple) -> None:
        self._active[module] += 1

    def _leave(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self._active[module] > 0:  # not if a pre-hook raised before _enter ran
            self._active[module] -= 1

    def _exit(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self._mode is not None and isinstance(output, torch.Tensor):
            self._outputs[id(output)] = (module, weakref.ref(output))


def _unambiguous(out: torch.Tensor, batch: int | None) -> bool:
    """Whether a constant's copy with the batch's size on dim 0 can be taken for batched: not
    if another of its dims has that size too. ``pos.expand(T, T)`` at T = B is a table of
    pairs, and so is BERT's ``token_type_ids.expand(B, T)`` at T = B for all dpclip can tell:
    such a copy stays a constant (a layer on it has no batch dim, and is split per example where
    it meets the batch, which is right either way)."""
    return batch == 1 or batch not in out.shape[1:]  # one example: both readings are one


def _row_by_row(a: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``a`` meets ``t`` row by row, with no dim of ``a`` broadcast: its dim 0 is then
    the batch's (a (T, 1, d) table against time-major (T, B, d) states is not)."""
    return a.shape[0] == t.shape[0] and all(
        x == y or y == 1 for x, y in zip(a.shape[1:], t.shape[1:], strict=True)
    )


def _key(args: tuple, kwargs: Mapping | None) -> object:
    """The index of ``t[key]``, ``t[key] = v`` or ``index_put(t, indices, v)``."""
    return args[1] if len(args) > 1 else (kwargs or {}).get("indices")


def _advanced(key: object) -> bool:
    """Whether an index (of ``t[key]``) indexes dim 0 with a tensor, a list or an array."""
    if type(key) is tuple:
        key = key[0] if key else None
    return isinstance(key, (torch.Tensor, list)) or hasattr(key, "__array__")


def _moves_rows(name: str, args: tuple, kwargs: Mapping, batch: int, along: int = 0) -> bool:
    """Whether the call takes or puts entries of dim ``along`` (of size ``batch``) anywhere but
    in place."""
    t = args[0]
    if name == "__getitem__" or name in _PUTS:
        key = _key(args, kwargs)
        if name in _PUTS:  # a value put at the rows: only a tensor of rows moves any
            value = _put_value(name, args, kwargs)
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                return False
        if name not in ("__getitem__", "__setitem__") and not along:  # index_put: per dim
            return not _is_identity(key[0] if key else None, batch)
        return not _is_identity(_index_of(key, along, t.dim()), batch)
    if name not in _ROW_MOVES:
        return False
    dim_at, index_at = _ROW_MOVES[name]
    dim = _arg(args, kwargs, dim_at, "dims" if name in ("flip", "roll") else "dim")
    if name == "flip":
        dims = [dim] if isinstance(dim, int) else list(dim)
        return any(d % t.dim() == along for d in dims)
    if name == "roll":
        shifts = args[1] if len(args) > 1 else kwargs.get("shifts")
        if dim is None:
            return True  # a roll of the flattened tensor
        dims = [dim] if isinstance(dim, int) else list(dim)
        shifts = [shifts] if isinstance(shifts, int) else list(shifts)
        return any(d % t.dim() == along and s % batch for d, s in zip(dims, shifts, strict=False))
    if dim is None or dim % t.dim() != along:
        return False
    return not _is_identity(_arg(args, kwargs, index_at, "index"), batch)


def _picks_across(
    name: str, args: tuple, kwargs: Mapping, layout: tuple[int, int], batch: int
) -> bool:
    """Whether an index into a followed tensor (see :mod:`dpclip._layouts`) takes entries
    along its batch other than in order: for sequence-first, any index at the batch's dim but
    ``arange(B)`` (a mask or an index over it gathers entries of several examples in another
    order: Longformer's global tokens); for flattened tokens, B rows not one per example in
    order (the last token of each: rows b·k + t_b)."""
    if name != "__getitem__" and name not in _PUTS:
        return False
    t, (dim, k) = args[0], layout
    index = _index_of(_key(args, kwargs), dim, t.dim())
    if isinstance(index, (list, tuple)) or hasattr(index, "__array__"):
        index = torch.as_tensor(index)
    if isinstance(index, int) and not isinstance(index, bool):
        return dim > 0  # one example of a sequence-first batch
    if not isinstance(index, torch.Tensor):
        return False
    if index.dtype == torch.bool:
        return dim > 0  # a row mask keeps flattened rows in order
    if dim > 0:
        return not (index.dim() == 1 and index.shape[0] == batch) or not _is_identity(index, batch)
    if index.dim() != 1 or index.shape[0] != batch:
        return False  # not B rows: a layer on them is refused by their count
    owners = torch.div(index % t.shape[0], k, rounding_mode="floor")
    return not bool((owners == torch.arange(batch, device=index.device)).all())


def _put_value(name: str, args: tuple, kwargs: Mapping) -> object:
    """The tensor a put or a scatter writes (``t[key] = value``, ``index_copy(d, i, source)``)."""
    if name in _PUTS:
        return args[2] if len(args) > 2 else kwargs.get("values", kwargs.get("value"))
    if name.startswith(("index_copy", "index_add", "scatter", "index_reduce")):
        return args[3] if len(args) > 3 else kwargs.get("source", kwargs.get("src"))
    return None


def _puts_across(name: str, args: tuple, kwargs: Mapping, layout: tuple[int, int]) -> bool:
    """Whether a followed tensor written into another lands along its batch other than whole
    and in place: a key with anything but ``slice(None)`` at the batch's place (its dims align
    with the key's last ones), or an index-put or scatter along that dim."""
    dim, _ = layout
    value = _put_value(name, args, kwargs)
    assert isinstance(value, torch.Tensor)
    target = args[0]
    if name in _PUTS:
        at = target.dim() - value.dim() + dim  # the target's dim that takes the batch
        index = _index_of(_key(args, kwargs), at, target.dim())
        return not (type(index) is slice and index == slice(None))
    along = args[1] if len(args) > 1 else kwargs.get("dim")
    return not isinstance(along, int) or along % target.dim() == dim


def _gathers_across(
    name: str, args: tuple, kwargs: Mapping, layout: tuple[int, int], size: int
) -> bool:
    """Whether a gather along the batch's dim of a followed tensor takes other entries than
    each one's own: its index (shaped like the tensor) must be ``arange`` along that dim."""
    if name not in ("gather", "take_along_dim", "index_select"):
        return False
    t, (dim, _) = args[0], layout
    along = args[1] if len(args) > 1 else kwargs.get("dim")
    if name == "take_along_dim":
        along = args[2] if len(args) > 2 else kwargs.get("dim")
    if not isinstance(along, int) or along % t.dim() != dim:
        return False
    index = _arg(args, kwargs, 1 if name == "take_along_dim" else 2, "index")
    if not isinstance(index, torch.Tensor):
        return True
    if index.dim() == 1:
        return not (index.shape[0] == size and _is_identity(index, size))
    if index.dim() != t.dim() or index.shape[dim] != size:
        return True
    shape = [1] * index.dim()
    shape[dim] = size
    places = torch.arange(size, device=index.device).view(shape)
    return not bool((index == places).all())


def _index_of(key: object, dim: int, ndim: int) -> object:
    """The index that ``t[key]`` takes along dim ``dim`` of t (of ``ndim`` dims): one of the
    key's, or ``slice(None)`` where the key leaves that dim whole."""
    keys = key if type(key) in (tuple, list) and key and not _is_index(key) else (key,)
    keys = [k for k in keys if k is not None]  # a new dim takes none of t's

    def width(k: object) -> int:  # how many of t's dims an index takes
        return k.dim() if isinstance(k, torch.Tensor) and k.dtype == torch.bool else 1

    cut = next((i for i, k in enumerate(keys) if k is Ellipsis), None)  # not ==: arrays
    if cut is not None:  # the keys after it take the last dims
        tail = keys[cut + 1 :]
        start = ndim - sum(width(k) for k in tail)
        keys = keys[:cut] if dim < start else tail
        if dim >= start:
            dim -= start
    at = 0
    for k in keys:
        if at <= dim < at + width(k):
            return k
        at += width(k)
    return slice(None)


def _arg(args: tuple, kwargs: Mapping, at: int | None, name: str) -> object:
    if at is not None and len(args) > at:
        return args[at]
    return kwargs.get(name, kwargs.get("indices"))


def _is_index(key: list) -> bool:
    """A list used as one index (``t[[2, 0, 1]]``), not as a list of per-dim indices."""
    return type(key) is list and all(isinstance(k, int) for k in key)


def _is_identity(index: object, batch: int) -> bool:
    """Whether ``index`` along dim 0 keeps each row's place: a slice, an int, a boolean mask
    (it keeps the rows' order), or ``arange(batch)`` (other row counts than the batch's are the
    layers' own checks to make)."""
    if not isinstance(index, torch.Tensor) and (
        isinstance(index, list) or hasattr(index, "__array__")
    ):
        index = torch.as_tensor(index)
    if not isinstance(index, torch.Tensor) or not index.dim() or index.dtype == torch.bool:
        return True
    if index.dim() > 1 and index.shape[-1] == batch:  # h[p[None]]: rows of B along its last dim
        rows = torch.arange(batch, device=index.device)
        return bool((index == rows).all())
    if index.shape[0] != batch:
        return True
    rows = torch.arange(batch, device=index.device).view(-1, *([1] * (index.dim() - 1)))
    return bool((index == rows).all())
