"""fp16 loss scaling: what the engine needs of a ``torch.amp.GradScaler``.

The loss scale S multiplies every per-example gradient. The engine clips the unscaled ones (the
accumulator divides the norms by S) and leaves the clipped sums S times too large, as the scaler
expects; the noise is added after the scaler unscaled them, so it has the ledger's size.

The scaler decides at its inf check whether a step is skipped for overflow: in ``unscale_``, or,
before a fused optimizer's step (fused Adam/AdamW unscale inside their kernel), in its check of
the still-scaled sums. GradScaler has no hook at that check, and two cases need one, so while
the engine is attached the check is wrapped for the engine's optimizer (the scaler was handed to
the engine for this; other optimizers on the same scaler are left alone):

- Over several processes each rank checks only its own clipped sums. A rank whose backward
  overflowed would skip a step that the others take, and they would wait for it at the step's
  agreement. The ranks take the maximum of their flags (one all-reduce of one number per step),
  so all skip or none do, and the scale stays the same on every rank.
- A process with no gradient at all (an empty Poisson sample, or an empty share of one) would
  fail the scaler's own assertion ("No inf checks were recorded"): it reports no overflow, and
  the step is the noise alone, as without a scaler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from dpclip import distributed
from dpclip.errors import LoopOrderError


class LossScaling:
    """An enabled GradScaler as the engine uses it (see the module's docstring)."""

    def __init__(self, scaler: torch.amp.GradScaler, world: distributed.World | None) -> None:
        if not hasattr(scaler, "_unscale_grads_") or not hasattr(scaler, "_per_optimizer_states"):
            raise ValueError(
                "dpclip: this torch's GradScaler has no _unscale_grads_ or _per_optimizer_states, "
                "which dpclip reads to clip the unscaled gradients and skip overflowing steps; "
                "use bf16 autocast (no scaler), or a torch version dpclip supports"
            )
        self.scaler, self.world = scaler, world
        self.device = torch.device(scaler._device)

    @staticmethod
    def of(scaler: Any, world: distributed.World | None) -> LossScaling | None:
        """The engine's ``grad_scaler`` argument, checked; None without an enabled scaler."""
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(
                f"expected grad_scaler to be a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        return LossScaling(scaler, world) if scaler.is_enabled() else None

    def scale(self) -> Tensor | None:
        """S as a tensor (no device sync); None before the scaler's first ``scale()``."""
        return self.scaler._get_scale_async()

    def attach(
        self, optimizer: torch.optim.Optimizer, device: torch.device, on_skip: Callable[[], None]
    ) -> _Unwrap:
        """Wrap the scaler's inf check of ``optimizer`` while attached; ``on_skip`` is called
        when the check finds an overflow (on any rank): the scaler skips that step. Returns the
        handle that removes the wrapper. ``device``: the parameters', for
        :meth:`before_empty_batch`."""
        self.device = device
        shared = _SharedCheck(self.scaler, optimizer, self.world, on_skip)
        self.scaler._unscale_grads_ = shared  # type: ignore[method-assign]
        return _Unwrap(self.scaler, shared)

    def before_empty_batch(self) -> None:
        """An empty logical batch has no loss to scale, and the scaler makes its scale at its
        first ``scale()``: a first batch that is empty gets it here, as that call would."""
        scaler = self.scaler
        if scaler._scale is None:
            same = self.device.type == scaler._device
            scaler._lazy_init_scale_growth_tracker(
                self.device if same else torch.device(scaler._device)
            )

    def check_unscaled(self, optimizer: torch.optim.Optimizer) -> None:
        """The clipped sums of a loss-scaled backward hold S times the gradients until the
        scaler unscales them (``scaler.step`` does, or ``scaler.unscale_``): noise added before
        that would be S times too small for the ledger's σ."""
        if self.scaler._scale is None:
            return  # nothing was scaled yet
        state = self.scaler._per_optimizer_states.get(id(optimizer))
        if state is None or state["stage"] is not OptState.UNSCALED:
            raise LoopOrderError(
                "optimizer.step() was called on loss-scaled gradients: the GradScaler given to "
                "the engine has not unscaled them, so the noise would be S times too small for "
                "the ledger. Step through the scaler, scaler.step(optimizer), or call "
                "scaler.unscale_(optimizer) first; the parameters are unchanged"
            )

    @staticmethod
    def fused_step(optimizer: torch.optim.Optimizer) -> bool | None:
        """A GradScaler stepping an optimizer that unscales in its own kernel (fused Adam/AdamW)
        calls its step with ``grad_scale`` and ``found_inf`` set instead of unscaling first.
        True: an overflow (``found_inf``), a step the kernel skips; False: such a step, whose
        sums :meth:`unscale_fused` must unscale before the noise; None: not such a step."""
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor) and bool(found_inf.sum() > 0):
            return True
        return False if isinstance(getattr(optimizer, "grad_scale", None), Tensor) else None

    @staticmethod
    def unscale_fused(optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> None:
        """Unscale ``grads`` for a fused step (the noise must be added to the unscaled sums)
        and clear ``grad_scale``, so the kernel does not unscale them again. Called once the
        step is allowed: a refused step leaves both as they were."""
        grad_scale = optimizer.grad_scale  # type: ignore[attr-defined]
        if grads:
            torch._foreach_div_(grads, grad_scale.to(grads[0].device))
        optimizer.grad_scale = None  # type: ignore[attr-defined]


class _SharedCheck:
    """The scaler's inf check of one optimizer, shared by the ranks (see the module's
    docstring). A copy or a pickle of the scaler gets the scaler's own check instead."""

    def __init__(
        self,
        scaler: torch.amp.GradScaler,
        optimizer: torch.optim.Optimizer,
        world: distributed.World | None,
        on_skip: Callable[[], None],
    ) -> None:
        self.scaler, self.optimizer, self.world, self.on_skip = scaler, optimizer, world, on_skip

    def __call__(self, opt: Any, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool) -> dict:
        per_device = type(self.scaler)._unscale_grads_(
            self.scaler, opt, inv_scale, found_inf, allow_fp16
        )
        if opt is not self.optimizer:
            return per_device
        if not per_device:  # no gradient here: nothing overflowed (found_inf is 0)
            per_device = {found_inf.device: found_inf}
        world = self.world
        mine = torch.stack([f.to(found_inf.device, torch.float32) for f in per_device.values()])
        # one device sync (the scaler makes one anyway)
        anywhere = float(mine.sum() if world is None else world.maximum(mine.sum()))
        if anywhere:  # the step is skipped
            self.on_skip()
        if world is not None:
            for f in per_device.values():
                f.fill_(anywhere)
        return per_device

    def __reduce__(self) -> tuple:
        return getattr, (self.scaler, "_unscale_grads_")


class _Unwrap:
    """Removes :meth:`LossScaling.share_inf_check`'s wrapper (if it is still the scaler's)."""

    def __init__(self, scaler: torch.amp.GradScaler, wrapper: _SharedCheck) -> None:
        self.scaler, self.wrapper = scaler, wrapper

    def remove(self) -> None:
        if self.scaler.__dict__.get("_unscale_grads_") is self.wrapper:
            del self.scaler._unscale_grads_
