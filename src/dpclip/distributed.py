"""Data-parallel DP on torch.distributed: every rank clips its own examples, once per step.

Each rank's backward leaves its clipped sum in ``.grad``. At the optimizer step the ranks first
agree that every one of them may step (one small all-reduce: a rank that refused, or that took a
different number of steps, stops them all before anything changes), then rank 0 alone adds the
Gaussian noise to its sum and the sums are all-reduced in flat buckets. Noise enters exactly once
per logical step, the division is by the expected global batch, and every rank ends the step
with the same bits. DistributedDataParallel's own reduction is switched off: it would average
gradients that dpclip's parameters never get (they have ``requires_grad=False`` while attached).

Why not overlap the reduction with the backward, as DDP does: the clipping factor of an example
needs its norm over every layer (all-layer clipping), which is known only when the backward ends.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dpclip._buckets import buckets
from dpclip.errors import DistributedStepError

# Gradients are summed in flat buckets of at most this many bytes, all in flight at once.
_BUCKET_BYTES = 25 << 20

# c10d's worker threads can hold a collective's tensors after the caller's wait() returned (gloo's
# barrier keeps the works it found in flight, and frees them on its own thread). When a tensor's
# Python object is gone by then, the worker thread frees that object, which takes the GIL; at
# interpreter exit that thread is ended instead and the process aborts ("terminate called
# without an active exception", 1 run in ~40 of examples/ddp_train.py under load). So each
# tensor dpclip hands to a collective is an alias only c10d and this list hold, kept until c10d
# lets go of it, and the process waits for that at exit (at most this many seconds).
_LENT: list[Tensor] = []
_EXIT_WAIT_S = 5.0


def _lend(t: Tensor) -> Tensor:
    """``t`` to hand to a collective: an alias (same storage, its own tensor object) kept in
    :data:`_LENT` until c10d drops its references to it."""
    alias = t.detach()
    _LENT.append(alias)
    return alias


def _release() -> bool:
    """Drop the lent tensors that only :data:`_LENT` holds; True while c10d holds any."""
    _LENT[:] = [t for t in _LENT if t._use_count() > 1]
    return bool(_LENT)


def _wait_for_c10d(timeout_s: float = _EXIT_WAIT_S) -> None:
    """At exit, while the interpreter still runs c10d's threads: wait (sleeping, so without the
    GIL) until they drop every lent tensor."""
    deadline = time.monotonic() + timeout_s
    while _release() and time.monotonic() < deadline:
        time.sleep(0.001)


atexit.register(_wait_for_c10d)


class World:
    """The default process group as dpclip uses it: its rank, size and the control device."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device

    @classmethod
    def detect(cls) -> World | None:
        """The default process group when it has more than one process, else None."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), device)

    # ------------------------------------------------------------------------ at attach
    def check_same(self, settings: dict[str, Any]) -> None:
        """Refuse unless every rank built its engine with the same settings (ε, σ and the
        division by B are per world, so ranks that disagree would each account differently)."""
        every: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(every, settings)
        for key in settings:
            values = [s.get(key) for s in every]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                raise ValueError(
                    f"dpclip.distributed: the ranks built their PrivacyEngine with different "
                    f"{key} ({shown}); build it with the same arguments on every rank"
                )

    def broadcast_module(self, module: nn.Module) -> None:
        """Every rank starts from rank 0's parameters and buffers (DDP does this for a wrapped
        model; an unwrapped one may have been initialised differently per rank)."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(_lend(t), src=0)
        _release()

    # ------------------------------------------------------------------------ per step
    def agree(self, failure: str | None, steps: int, draws: int = 0, examples: int = 0) -> int:
        """Raise on every rank unless every rank may take step ``steps + 1`` of logical batch
        ``draws`` (how many logical batches its engine.data_loader has begun: a rank that
        skipped one would sum its share of another sample into this step); else return the
        step's examples summed over the ranks (``examples``: this rank's).

        The failing rank's own error is raised by its caller; the others raise
        :class:`DistributedStepError` naming it. A peer that died (or left) makes the collective
        fail, which is reported the same way; nothing has changed at that point.
        """
        counts = [0] * self.size  # each rank's count in its own slot: the maximum keeps them all
        counts[self.rank] = examples
        status = torch.tensor(
            [1 if failure else 0, steps, -steps, draws, -draws, *counts], dtype=torch.int64,
            device=self.device,
        )  # fmt: skip
        self._maximum_(status, "on the step with the other ranks")
        failed, most, fewest, latest, earliest, *counts = (int(v) for v in status.tolist())
        if failed:
            failures: list[Any] = [None] * self.size
            torch.distributed.all_gather_object(failures, failure)
            if failure is None:
                named = "; ".join(f"rank {r}: {f}" for r, f in enumerate(failures) if f)
                raise DistributedStepError(
                    f"dpclip.distributed: another rank refused the step, so no rank takes it "
                    f"({named})"
                )
            return 0
        if most != -fewest:
            raise DistributedStepError(
                f"dpclip.distributed: the ranks have taken different numbers of steps "
                f"({-fewest} to {most}); every rank must load the same checkpoint and iterate "
                "the same engine.data_loader"
            )
        if latest != -earliest:
            raise DistributedStepError(
                f"dpclip.distributed: the ranks are at different logical batches of "
                f"engine.data_loader ({-earliest} to {latest}): a rank went on to the next one "
                "without stepping (a `continue` on an empty share, or an error caught and "
                "skipped), so this step would sum shares of different samples. Every rank steps "
                "once per logical batch, an empty share included; the step was not applied"
            )
        return sum(counts)

    def maximum(self, value: Tensor) -> Tensor:
        """The maximum of the scalar ``value`` over the ranks (every rank calls this once)."""
        out = value.detach().to(self.device, torch.float32).reshape(1).clone()
        self._maximum_(out, "with the other ranks on skipping the step for fp16 overflow")
        return out[0]

    def _maximum_(self, t: Tensor, about: str) -> None:
        """``t`` made its maximum over the ranks, in place; a peer that failed or left raises
        :class:`DistributedStepError` ("could not agree ``about``")."""
        try:
            torch.distributed.all_reduce(_lend(t), op=torch.distributed.ReduceOp.MAX)
            _release()
        except Exception as err:
            raise DistributedStepError(
                f"dpclip.distributed: rank {self.rank} could not agree {about} (a rank failed or "
                f"left: {_first_line(err)}); the step was not applied"
            ) from err

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place, in flat buckets all in flight at once."""
        pending = []
        for bucket in buckets(tensors, lambda t: max(1, _BUCKET_BYTES // t.element_size())):
            flat = bucket[0] if len(bucket) == 1 and bucket[0].is_contiguous() else None
            if flat is None:
                flat = torch.cat([t.reshape(-1) for t in bucket])
            work = torch.distributed.all_reduce(_lend(flat), async_op=True)
            pending.append((work, flat, bucket))
        try:
            for work, flat, bucket in pending:
                work.wait()
                if flat is not bucket[0]:
                    pieces = flat.split([t.numel() for t in bucket])
                    for t, piece in zip(bucket, pieces, strict=True):
                        t.copy_(piece.view_as(t))
            pending = work = None  # c10d's work handles hold the lent tensors
            _release()
        except Exception as err:
            raise DistributedStepError(
                f"dpclip.distributed: summing the clipped gradients over the ranks failed on rank "
                f"{self.rank} ({_first_line(err)}); the step was not applied"
            ) from err

    def shared_seed(self, generator: torch.Generator | None) -> int:
        """A seed drawn on rank 0 (from ``generator``, or torch's global generator) and sent to
        every rank, so that all ranks draw the same Poisson sample and take disjoint shares."""
        return self.from_rank_0(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def from_rank_0(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (an int64)."""
        sent = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(_lend(sent), src=0)
        _release()
        return int(sent.item())


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the module dpclip instruments, the DistributedDataParallel wrapper or None)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, DataParallel):
        raise ValueError(
            "dpclip.distributed: nn.DataParallel copies the model to every GPU in each forward "
            "and dpclip's hooks do not follow the copies; use one process per GPU with "
            "DistributedDataParallel (torchrun), or no wrapper"
        )
    if not isinstance(model, DistributedDataParallel):
        _refuse_sharded(model)
        return model, None
    if getattr(model, "static_graph", False):
        raise ValueError(
            "dpclip.distributed: DistributedDataParallel(static_graph=True) reduces gradients "
            "in its own delayed pass; wrap the model without static_graph"
        )
    return model.module, model


def mute(ddp: nn.Module | None) -> Callable[[], None]:
    """Switch DDP's gradient reduction (and its per-forward buffer broadcast) off; returns the
    function that switches it back."""
    if ddp is None:
        return lambda: None
    before = ddp.require_backward_grad_sync
    ddp.require_backward_grad_sync = False

    def restore() -> None:
        ddp.require_backward_grad_sync = before

    return restore


def _refuse_sharded(model: nn.Module) -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return  # FSDP needs a process group
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        raise ValueError(
            "dpclip.distributed: sharded parameters (FSDP) are not supported yet; use "
            "DistributedDataParallel"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
