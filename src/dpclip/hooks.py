"""Capture each module call's inputs and output gradient; nothing DP-specific.

A forward hook stores the call's (detached) positional inputs in a :class:`Record` and hooks
the output tensor so its gradient lands in the same record during backward. Each record is
handed to ``on_grad`` as soon as its gradient arrives (so its consumer can reduce it and free
memory early); ``on_backward_end`` is called once when that backward pass ends.
Records are owned by the autograd graph, so a forward that never sees a backward leaks nothing.

A layer whose input has batch size 1 inside a forward pass whose batch is larger (GPT-2's
position embedding gets ``position_ids`` of shape (1, T)) is broadcast by the model. Its output
gradient would arrive summed over the batch, losing the per-sample split, so its output (and
recorded input) are expanded to the batch size first: the model computes the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle


@dataclass(eq=False)
class Record:
    """One call of one module: its inputs, and the gradient of its output once known."""

    module: nn.Module
    inputs: tuple
    grad_output: Tensor | None = None
    done: bool = False  # its gradient arrived (the consumer may drop inputs/grad_output)


class _Attach(torch.autograd.Function):
    """Identity that links an output which needs no gradient into the graph, via a dummy leaf."""

    @staticmethod
    def forward(ctx, anchor: Tensor, output: Tensor) -> Tensor:  # type: ignore[override]
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad


class DoubleBackwardError(RuntimeError):
    """A graph's gradients reached the same module call twice (backward twice on one graph)."""


def _expand(x: object, batch: int) -> object:
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x


@dataclass(eq=False)
class Recorder:
    """Records calls of ``modules`` while attached; streams them to ``on_grad``."""

    on_grad: Callable[[Record], None]
    on_backward_end: Callable[[], None]
    _handles: list[RemovableHandle] = field(default_factory=list)
    _in_backward: bool = False
    _anchor: Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    _batch: int = 0  # the batch size seen so far in the current top-level forward

    def attach(self, modules: Iterable[nn.Module], root: nn.Module) -> None:
        self._handles.append(root.register_forward_pre_hook(self._new_forward))
        for module in modules:
            self._handles.append(module.register_forward_hook(self._forward_hook))

    def _new_forward(self, module: nn.Module, inputs: tuple) -> None:
        self._batch = 0

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._in_backward = False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: object) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"dpclip records modules that return one tensor; {type(module).__name__} "
                f"returned {type(output).__name__}"
            )
        inputs = tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)
        if output.dim() > 0 and output.shape[0] == 1 and self._batch > 1:
            inputs = tuple(_expand(x, self._batch) for x in inputs)
            output = output.expand(self._batch, *output.shape[1:])
        elif output.dim() > 0:
            self._batch = max(self._batch, output.shape[0])
        record = Record(module, inputs)
        if not output.requires_grad:
            output = _Attach.apply(self._anchor, output)
        output.register_hook(lambda grad: self._on_grad(record, grad))
        return output

    def _on_grad(self, record: Record, grad: Tensor) -> None:
        if record.done:
            raise DoubleBackwardError(
                f"a second backward pass reached {type(record.module).__name__} through the same "
                "graph; dpclip needs exactly one backward per forward (do not use retain_graph "
                "to backpropagate twice)"
            )
        record.grad_output, record.done = grad, True
        if not self._in_backward:
            self._in_backward = True
            Variable._execution_engine.queue_callback(self._flush)
        try:
            self.on_grad(record)
        except BaseException:
            self._in_backward = False  # this backward is abandoned; the next one starts afresh
            raise

    def _flush(self) -> None:
        self._in_backward = False
        self.on_backward_end()
