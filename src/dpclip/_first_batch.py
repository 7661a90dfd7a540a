"""Keep the first physical batch's inputs and loss until the first step checks them.

When the model's forward returns, the inputs are copied and a loss tape (:mod:`dpclip._loss_tape`)
is pushed to record the loss until ``backward()``. The tape is a torch function mode, so it must
not outlive its use: it is taken off the mode stack at the next forward, at the step, when the
engine detaches, and, for an engine dropped in between, when the engine is collected.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from dpclip._loss_tape import LossTape, remove, remove_dropped, remove_orphans
from dpclip.errors import SelfCheckError


class FirstBatch:
    """The first physical batch: its inputs (copied) and the tape of its loss."""

    def __init__(self) -> None:
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.tape: LossTape | None = None
        self.interrupted = False  # a forward began while the tape still waited for backward
        self.stale = False  # its backward was refused (a NaN): the next forward replaces it
        self._live: list[LossTape] = []
        weakref.finalize(self, remove_dropped, self._live)

    # Not traced by dynamo under torch.compile(model) (the engine's pre-hook calls it inside the
    # compiled forward): the tape is a Python object dynamo cannot walk.
    @torch.compiler.disable
    def forward_begins(self, grad: bool = True) -> None:
        """A forward of the model begins; one without gradients (a metric under no_grad) leaves
        the tape waiting for its loss's backward."""
        remove_orphans()
        if grad and self.stale:
            self.clear()
        if grad and self.tape is not None:
            waiting = not self.tape.done
            remove(self.tape)  # it stopped at backward, or there was none: no mode left behind
            if not self.tape.captured:
                self.clear()
                self.interrupted = waiting

    @torch.compiler.disable
    def forward_ends(self, args: tuple, kwargs: dict, output: object, batch: int | None) -> None:
        if self.tape is not None and self.tape.captured:
            return
        interrupted = self.interrupted
        self.clear()
        self.interrupted = interrupted
        copy = tree_map(
            lambda x: x.detach().clone() if isinstance(x, Tensor) else x, (args, kwargs)
        )
        self.args, self.kwargs = copy
        self.tape = LossTape(output, batch)
        self.tape.__enter__()
        self._live[:] = [self.tape]

    def get(self) -> tuple[tuple, dict, LossTape]:
        """The inputs and the loss (kept until :meth:`clear`); refused if the loss was not seen."""
        remove_orphans()
        tape = self.tape
        if tape is not None:
            remove(tape)
        if tape is None or not tape.captured:
            why = (tape.problem if tape is not None else None) or (
                "the loss was not computed from the model's output by torch calls followed by "
                "backward()"
            )
            if self.interrupted:
                why += (
                    "; another forward of the model ran before that backward (a validation pass "
                    "with gradients on? run it under torch.no_grad())"
                )
            raise SelfCheckError(
                f"dpclip's self-check could not see how the first batch's loss was computed "
                f"({why}); call engine.verify(*inputs, loss_fn=...) once before the first step, or "
                "pass verify=False to PrivacyEngine. The step was refused; nothing changed."
            )
        if tape.mixing is not None:
            raise SelfCheckError(f"{tape.mixing}. The step was refused; nothing changed.")
        return self.args, self.kwargs, tape

    def clear(self) -> None:
        if self.tape is not None:
            remove(self.tape)
        self.args, self.kwargs, self.tape = (), {}, None
        self.interrupted = self.stale = False
        self._live.clear()
