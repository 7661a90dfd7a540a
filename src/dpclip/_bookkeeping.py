"""Book-keeping: from one backward pass's records to Σ_i C_i g_i per parameter.

Each record is reduced as soon as its output gradient arrives: either its per-sample norms
(ghost, or any closed form) are computed and the record is kept for the clipped sum later, or
its per-sample gradients are instantiated, kept instead of the record (whose activations are
then freed) and reused for the clipped sum as one small contraction. When the backward pass
ends, the norms give the factors C, and each kept record costs one matmul, (C ⊙ s)ᵀ a.
A parameter used by several calls (tied weights, a reused layer) needs the norm of the *sum* of
its per-sample gradients, so its uses are always instantiated and summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dpclip.clipping import clip_factors, group_clip_norm
from dpclip.hooks import Record
from dpclip.layers import LayerRule


class NonFiniteNormError(FloatingPointError):
    """Some per-sample gradient norm is NaN or infinite (a NaN/inf loss or overflow)."""


@dataclass(frozen=True)
class Plan:
    """Static facts about the attached model, fixed at construction."""

    rules: dict[nn.Module, LayerRule]
    names: dict[nn.Module, tuple[str, ...]]  # trainable parameter names owned by each module
    groups: list[list[nn.Parameter]]
    clipping: str
    clip_norm: float
    gamma: float
    strategy: str
    mean_reduction: bool

    def group_index(self) -> dict[int, int]:
        return {id(p): gi for gi, group in enumerate(self.groups) for p in group}


@dataclass(eq=False)
class _Entry:
    """One parameter's contribution in this backward: a kept record, or per-sample grads."""

    record: Record | None = None
    name: str = ""
    norm_sq: Tensor | None = None
    per_sample: Tensor | None = None


@dataclass(eq=False)
class Accumulator:
    """Collects one backward pass's records; :meth:`finish` returns the clipped sums."""

    plan: Plan
    group_of: dict[int, int]
    batch: int | None = None
    entries: dict[nn.Parameter, _Entry] = field(default_factory=dict)

    def add(self, rec: Record) -> None:
        self._check_batch(rec.grad_output.shape[0])
        rule, module = self.plan.rules[rec.module], rec.module
        params = {n: getattr(module, n) for n in self.plan.names[module]}
        again = [n for n, p in params.items() if p in self.entries]
        fresh = [n for n in params if n not in again]
        if again:
            got = _per_sample(rule, rec, again)
            for n in again:
                entry = self.entries[params[n]]
                entry.per_sample = self._instantiated(entry) + got[n]
                entry.record, entry.norm_sq = None, None
        kept = bool(fresh) and not (
            rule.per_sample_grad is not None and _instantiates(rule, rec, self.plan.strategy)
        )
        if kept:
            got = rule.norm_sq(module, rec.inputs, rec.grad_output, fresh, self.plan.strategy)
            for n in fresh:
                self.entries[params[n]] = _Entry(record=rec, name=n, norm_sq=got[n])
        else:
            if fresh:
                got = rule.per_sample_grad(module, rec.inputs, rec.grad_output, fresh)
                for n in fresh:
                    self.entries[params[n]] = _Entry(per_sample=got[n])
            rec.inputs, rec.grad_output = (), None  # reduced to per-sample grads: free it

    def _check_batch(self, size: int) -> None:
        if self.batch is None:
            self.batch = size
        elif size != self.batch:
            raise ValueError(
                f"layers saw different batch sizes ({self.batch} and {size}) in one backward "
                "pass; dpclip needs the batch on dim 0 of every layer's input (batch_first=True)"
            )

    def _instantiated(self, entry: _Entry) -> Tensor:
        if entry.per_sample is not None:
            return entry.per_sample
        rec = entry.record
        return _per_sample(self.plan.rules[rec.module], rec, [entry.name])[entry.name]

    def finish(self) -> dict[nn.Parameter, Tensor]:
        """Σ_i C_i g_i for every parameter touched (C from the plan's clipping)."""
        for entry in self.entries.values():
            if entry.norm_sq is None:
                entry.norm_sq = entry.per_sample.reshape(self.batch, -1).square().sum(dim=1)
        factors = self._factors()
        sums: dict[nn.Parameter, Tensor] = {}
        kept: dict[Record, dict[str, Tensor]] = {}
        for p, entry in self.entries.items():
            if entry.per_sample is not None:
                g = entry.per_sample
                sums[p] = torch.tensordot(factors[p].to(g.dtype), g, dims=1).reshape(p.shape)
            else:
                kept.setdefault(entry.record, {})[entry.name] = factors[p]
        for rec, f in kept.items():
            got = self.plan.rules[rec.module].clipped_grad(
                rec.module, rec.inputs, rec.grad_output, f
            )
            for n in f:
                sums[getattr(rec.module, n)] = got[n].reshape(getattr(rec.module, n).shape)
        return sums

    def _factors(self) -> dict[nn.Parameter, Tensor]:
        plan = self.plan
        scale = float(self.batch) if plan.mean_reduction else 1.0
        group_sq: dict[int, Tensor] = {}
        for p, entry in self.entries.items():
            gi = self.group_of[id(p)]
            group_sq[gi] = group_sq[gi] + entry.norm_sq if gi in group_sq else entry.norm_sq
        radius = group_clip_norm(plan.clip_norm, len(plan.groups))
        group_factor = {}
        for gi, sq in group_sq.items():
            norms = sq.sqrt() * scale
            if not bool(torch.isfinite(norms).all()):
                raise NonFiniteNormError(
                    "a per-sample gradient norm is NaN or infinite (check the loss for NaN/inf); "
                    "the clipped gradient was not accumulated and the model is unchanged"
                )
            factor = clip_factors(plan.clipping, norms, clip_norm=radius, gamma=plan.gamma)
            group_factor[gi] = factor * scale
        return {p: group_factor[self.group_of[id(p)]] for p in self.entries}


def _per_sample(rule: LayerRule, rec: Record, names: list[str]) -> dict[str, Tensor]:
    if rule.per_sample_grad is None:
        raise TypeError(
            f"{type(rec.module).__name__} shares a parameter with another layer call, which "
            "needs per_sample_grad in its layer rule"
        )
    return rule.per_sample_grad(rec.module, rec.inputs, rec.grad_output, names)


def _instantiates(rule: LayerRule, rec: Record, strategy: str) -> bool:
    return rule.instantiates is not None and rule.instantiates(
        rec.module, rec.inputs, rec.grad_output, strategy
    )
