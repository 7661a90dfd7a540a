"""Record how the loss is computed from the model's output, to compute it again on other outputs.

The self-check (:mod:`dpclip._selfcheck`) needs the user's loss as a function of the model's
output, but a training loop only shows the engine the model call and, later, ``backward()``.
So on the first physical batch a torch function mode, pushed when the model's forward returns,
records every torch call that takes a tensor derived from the output (``F.cross_entropy(out, y)``,
``loss / 4``, ``out.logits``'s uses…) until ``backward`` is called on one of them. Other tensors
in those calls (labels, masks) are kept as constants. Replaying the calls on another output gives
the loss that output would have had. Python control flow, and any Python value read from the output (``.item()``), is frozen as it
ran. Parameters used in the loss are recorded by reference, so a replay sees their gradient.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

# calls that only read (no tensor result): replaying them is pointless
_READS = {
    "size", "dim", "numel", "item", "tolist", "numpy", "__len__", "__repr__", "__format__",
    "__bool__", "__int__", "__float__", "__index__", "stride", "is_contiguous", "data_ptr",
}  # fmt: skip


class ReplayError(RuntimeError):
    """The recorded loss could not be computed on another output."""


@dataclass(frozen=True)
class _Ref:
    slot: int


@dataclass(frozen=True)
class _Const:
    """A tensor constant of the loss (labels, a mask): a fresh copy for each replay, so an
    in-place op in the loss does not change it for the next one."""

    value: Tensor

    def fresh(self, like: tuple[int, int] | None = None) -> Tensor:
        v = self.value
        if like is not None and v.dim() and v.shape[0] == like[0]:
            return v[like[1] : like[1] + 1].expand_as(v).clone()
        return v.clone()


class LossTape(TorchFunctionMode):
    """Records the calls from ``output``'s tensors to the tensor ``backward`` is called on."""

    def __init__(self, output: object, batch: int | None = None) -> None:
        """``batch``: tensors the loss takes with the batch on dim 0 (labels, masks) become
        roots of the tape too, so calls on them (``labels.view(-1)``) replay on other labels."""
        super().__init__()
        self.batch = batch
        self.consts: dict[int, _Const] = {}  # slot -> a batch-shaped constant, as it was
        leaves, self.spec = tree_flatten(output)
        self._ids: dict[int, tuple[int, weakref.ref]] = {}
        self._slots = 0
        self.leaf_slots = [self._new(t) if isinstance(t, Tensor) else None for t in leaves]
        self.ops: list[tuple[object, list, TreeSpec, list[int | None]]] = []
        self.root: int | None = None
        self.gradient: Tensor | None = None
        self.done = False
        self.problem: str | None = None  # why no loss was captured, if backward was unusable
        self.limit = 100_000  # calls recorded at most (a forward never followed by backward)
        self.mixing: str | None = None  # a loss seen to mix examples, whatever the batch holds

    def _new(self, t: Tensor) -> int:
        self._slots += 1
        self._ids[id(t)] = (self._slots, weakref.ref(t))
        return self._slots

    def _ref(self, x: object) -> _Ref | None:
        if isinstance(x, Tensor):
            hit = self._ids.get(id(x))
            if hit is not None and hit[1]() is x:
                return _Ref(hit[0])
        return None

    def _batch_const(self, x: object) -> _Ref | None:
        """A batch-shaped constant (labels), registered as a root the first time it is seen."""
        if (
            isinstance(x, Tensor)
            and not isinstance(x, nn.Parameter)
            and self.batch is not None
            and x.dim()
            and x.shape[0] == self.batch
            and not x.requires_grad
        ):
            slot = self._new(x)
            self.consts[slot] = _Const(x.detach().clone())
            return _Ref(slot)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self.done:
            return func(*args, **kwargs)
        if func is Tensor.backward or func is torch.autograd.backward:
            self._finish(func, args, kwargs)
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        refs = [self._ref(x) for x in flat]
        if getattr(func, "__name__", "") in _READS:
            return func(*args, **kwargs)
        refs = [
            r if r is not None else self._batch_const(x) for r, x in zip(refs, flat, strict=True)
        ]
        touched = any(r is not None for r in refs) or any(isinstance(x, nn.Parameter) for x in flat)
        if not touched:
            return func(*args, **kwargs)
        if self.problem is None and any(
            r is None
            and isinstance(x, Tensor)
            and x.requires_grad
            and not isinstance(x, nn.Parameter)
            for r, x in zip(refs, flat, strict=True)
        ):
            self.problem = (
                "the loss uses a tensor the model computed besides its output, such as an "
                "activation kept on a module or an auxiliary loss"
            )
        if self.mixing is None and func in _MEAN_OVER_WEIGHTS and _weighted_mean(args, kwargs):
            self.mixing = (
                f"the loss is {func.__name__} with class weights and reduction='mean', which "
                "divides by the sum of the batch's weights: each example's loss is weighted by "
                "the other examples' labels. Average per example instead: "
                f"{func.__name__}(out, y, weight=w, reduction='none').mean()"
            )
        if len(self.ops) >= self.limit:
            self.done, self.problem = True, f"more than {self.limit} calls before backward"
            return func(*args, **kwargs)
        template = [r if r is not None else _constant(x) for r, x in zip(refs, flat, strict=True)]
        out = func(*args, **kwargs)
        slots = [self._new(t) if isinstance(t, Tensor) else None for t in tree_leaves(out)]
        self.ops.append((func, template, spec, slots))
        return out

    def set_root(self, loss: Tensor) -> None:
        """Stop recording: ``loss`` is the loss (as if backward had been called on it)."""
        self._finish(Tensor.backward, (loss,), {})

    def _finish(self, func: object, args: tuple, kwargs: dict) -> None:
        self.done = True
        if func is Tensor.backward:
            root, gradient = args[0], (args[1] if len(args) > 1 else kwargs.get("gradient"))
        else:
            root = args[0] if args else kwargs.get("tensors")
            gradient = args[1] if len(args) > 1 else kwargs.get("grad_tensors")
            if isinstance(root, (list, tuple)):
                if len(root) != 1:
                    self.problem = "backward was called on several tensors at once"
                    return
                root = root[0]
            if isinstance(gradient, (list, tuple)):
                gradient = gradient[0] if gradient else None
        ref = self._ref(root)
        if self.problem is not None:
            return
        if ref is None:
            self.problem = "backward was called on a tensor not computed from the model's output"
            return
        self.root = ref.slot
        self.gradient = gradient.detach().clone() if isinstance(gradient, Tensor) else None

    @property
    def captured(self) -> bool:
        return self.root is not None and self.problem is None

    def loss(self, output: object, like: tuple[int, int] | None = None) -> Tensor:
        """The loss the recorded calls give for ``output`` (shaped like the recorded one).

        ``like=(batch, i)``: every constant with the batch on dim 0 (labels, masks) has all its
        rows replaced by row i, as if every other example had example i's labels.
        """
        leaves, spec = tree_flatten(output)
        if spec != self.spec:
            raise ReplayError(f"the model's output has structure {spec}, not {self.spec}")
        env = {s: t for s, t in zip(self.leaf_slots, leaves, strict=True) if s is not None}
        env.update((s, c.fresh(like)) for s, c in self.consts.items())
        for func, template, in_spec, slots in self.ops:
            flat = [
                env[x.slot]
                if isinstance(x, _Ref)
                else x.fresh(like)
                if isinstance(x, _Const)
                else x
                for x in template
            ]
            args, kwargs = tree_unflatten(flat, in_spec)
            out = func(*args, **kwargs)  # type: ignore[operator]
            got = tree_leaves(out)
            if len(got) != len(slots):
                raise ReplayError(f"{getattr(func, '__name__', func)} returned another structure")
            env.update((s, t) for s, t in zip(slots, got, strict=True) if s is not None)
        assert self.root is not None
        loss = env[self.root]
        return loss if self.gradient is None else (loss * self.gradient).sum()


_MEAN_OVER_WEIGHTS = {F.cross_entropy, F.nll_loss}


def _weighted_mean(args: tuple, kwargs: dict) -> bool:
    """cross_entropy/nll_loss(input, target, weight, ..., reduction='mean') with a weight."""
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    reduction = kwargs.get("reduction", args[6] if len(args) > 6 else "mean")
    legacy = kwargs.get("size_average", args[3] if len(args) > 3 else None)
    return weight is not None and reduction == "mean" and legacy is None


def _constant(x: object) -> object:
    if isinstance(x, nn.Parameter):
        return x  # by reference: a parameter used in the loss must get its gradient in a replay
    if isinstance(x, Tensor):
        return _Const(x.detach().clone())
    return x


_ORPHANS: list[LossTape] = []  # tapes of collected engines, taken off the stack later


def remove_orphans() -> None:
    """Take the tapes of collected engines off the stack (at an engine's forward or step)."""
    while _ORPHANS:
        remove(_ORPHANS.pop())


def remove_dropped(tapes: list[LossTape]) -> None:
    """For an engine collected mid-batch (a finalizer): its tape stops recording now and leaves
    the stack at the next engine's forward or step. Never here: a collection can run between
    torch's check that a mode is active and its pop of that mode, and an empty stack then fails."""
    for tape in tapes:
        tape.done = True
        _ORPHANS.append(tape)


def remove(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off this thread's torch function mode stack, wherever it is in it (the
    modes above it are put back in order, without re-entering them); False if it is not there."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(m is mode for m in stack):
        return False
    above = []
    while True:
        top = torch.overrides._pop_mode()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch.overrides._push_mode(m)
    return True
