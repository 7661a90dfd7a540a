"""Refuse a trainable parameter used outside the forward of a layer that owns it.

While attached, the managed parameters have ``requires_grad=False``: their gradients come only
from the layer rules of the modules that own them. A parameter used anywhere else in the forward
pass (an output layer tied functionally, ``F.linear(h, embedding.weight)``, or an L2 penalty
written into the loss) would get nothing from that use, without any error. So during every
grad-enabled forward of the attached model a torch function mode sees each torch call and
raises on such a use. Uses that carry no gradient pass: ``detach()``, attribute reads (shape,
dtype), anything under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

# calls that read a parameter without putting it on a gradient path
_NO_GRADIENT = {
    "__get__", "detach", "size", "dim", "numel", "stride", "data_ptr", "element_size",
    "is_contiguous", "is_floating_point", "is_complex", "__repr__", "__format__", "__len__",
}  # fmt: skip


class ParameterUseError(RuntimeError):
    """A managed parameter was used outside its layers: that use would get no gradient."""


def _tensors(args: tuple, kwargs: Mapping) -> Iterator[object]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class _Mode(TorchFunctionMode):
    def __init__(self, guard: ParamUseGuard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and getattr(func, "__name__", "") not in _NO_GRADIENT:
            for a in _tensors(args, kwargs):
                if isinstance(a, nn.Parameter):
                    self.guard.check(a, func)
        return func(*args, **kwargs)


class ParamUseGuard:
    """Tracks which owning layers are inside their forward; checks every parameter use."""

    def __init__(self, owners: Mapping[nn.Parameter, Iterable[nn.Module]], names: Mapping) -> None:
        self._owners = {id(p): tuple(mods) for p, mods in owners.items()}
        self._names = {id(p): n for p, n in names.items()}
        self._active: Counter[nn.Module] = Counter()
        self._depth = 0
        self._mode: _Mode | None = None
        self._handles: list[RemovableHandle] = []

    def attach(self, modules: Iterable[nn.Module], root: nn.Module) -> None:
        self._handles.append(root.register_forward_pre_hook(self._enter_root))
        self._handles.append(root.register_forward_hook(self._exit_root, always_call=True))
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))

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
        what = getattr(func, "__name__", repr(func))
        raise ParameterUseError(
            f"parameter {self._names[id(p)]!r} was used by {what} outside the forward of the "
            f"layer that owns it ({type(owners[0]).__name__}). dpclip computes its gradient from "
            "that layer's calls only, so this use would get none. Tie weights by assigning the "
            "same Parameter to both layers (head.weight = embedding.weight), put weight decay "
            "in the optimizer (weight_decay=...) rather than in the loss, or use .detach() "
            "where no gradient is meant"
        )

    def _enter_root(self, module: nn.Module, inputs: tuple) -> None:
        if self._depth == 0 and torch.is_grad_enabled():
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
            mode.__exit__(None, None, None)

    def _enter(self, module: nn.Module, inputs: tuple) -> None:
        self._active[module] += 1

    def _exit(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self._active[module] -= 1
