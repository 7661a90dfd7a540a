"""Book-keeping: from one backward's records to Σ_i C_i g_i per parameter, without per-sample grads.

Norms come first (ghost or instantiated, per layer rule), then factors per clipping group, then
one clipped matmul per layer. A parameter used by several calls (tied weights, a reused layer)
needs the norm of the *sum* of its per-sample gradients, so only such parameters are instantiated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def clipped_sums(
    plan: Plan, group_of: dict[int, int], records: Sequence[Record]
) -> dict[nn.Parameter, Tensor]:
    """Σ_i C_i g_i for every parameter these records touched (C from the plan's clipping)."""
    batch = _batch_size(records)
    uses: dict[nn.Parameter, list[tuple[Record, str]]] = {}
    for rec in records:
        for name in plan.names[rec.module]:
            uses.setdefault(getattr(rec.module, name), []).append((rec, name))
    shared = {p for p, u in uses.items() if len(u) > 1}

    norm_sq: dict[nn.Parameter, Tensor] = {}
    per_sample: dict[nn.Parameter, Tensor] = {}  # shared parameters: Σ over uses, per sample
    reuse: dict[Record, dict[str, Tensor]] = {}  # instantiated per-sample grads kept for the sum
    for rec in records:
        rule, names = plan.rules[rec.module], plan.names[rec.module]
        single = [n for n in names if getattr(rec.module, n) not in shared]
        if single and _instantiate(rule, rec, plan.strategy):
            got = rule.per_sample_grad(rec.module, rec.inputs, rec.grad_output, single)
            for n in single:
                norm_sq[getattr(rec.module, n)] = got[n].reshape(batch, -1).square().sum(dim=1)
            if sum(g.numel() for g in got.values()) <= _recorded_numel(rec):
                reuse[rec] = got
        elif single:
            got = rule.norm_sq(rec.module, rec.inputs, rec.grad_output, single, plan.strategy)
            for n in single:
                norm_sq[getattr(rec.module, n)] = got[n]
        multi = [n for n in names if getattr(rec.module, n) in shared]
        if multi:
            if rule.per_sample_grad is None:
                raise TypeError(
                    f"{type(rec.module).__name__} shares a parameter with another layer, which "
                    "needs per_sample_grad in its layer rule"
                )
            got = rule.per_sample_grad(rec.module, rec.inputs, rec.grad_output, multi)
            for n in multi:
                p = getattr(rec.module, n)
                per_sample[p] = per_sample[p] + got[n] if p in per_sample else got[n]
    for p, g in per_sample.items():
        norm_sq[p] = g.reshape(batch, -1).square().sum(dim=1)

    factors = _factors(plan, group_of, norm_sq, batch)

    sums: dict[nn.Parameter, Tensor] = {}
    for rec, got in reuse.items():
        for n, g in got.items():
            p = getattr(rec.module, n)
            _accumulate(sums, p, torch.tensordot(factors[p].to(g.dtype), g, dims=1))
    for rec in records:
        names = [n for n in plan.names[rec.module] if getattr(rec.module, n) not in shared]
        if names and rec not in reuse:
            f = {n: factors[getattr(rec.module, n)] for n in names}
            got = plan.rules[rec.module].clipped_grad(rec.module, rec.inputs, rec.grad_output, f)
            for n in names:
                _accumulate(sums, getattr(rec.module, n), got[n])
    for p, g in per_sample.items():
        _accumulate(sums, p, torch.tensordot(factors[p].to(g.dtype), g, dims=1))
    return sums


def _instantiate(rule: LayerRule, rec: Record, strategy: str) -> bool:
    return (
        rule.instantiates is not None
        and rule.per_sample_grad is not None
        and rule.instantiates(rec.module, rec.inputs, rec.grad_output, strategy)
    )


def _recorded_numel(rec: Record) -> int:
    """What the record already holds: reusing per-sample grads at most doubles it."""
    held = sum(x.numel() for x in rec.inputs if isinstance(x, Tensor))
    return held + rec.grad_output.numel()


def _batch_size(records: Sequence[Record]) -> int:
    sizes = {rec.grad_output.shape[0] for rec in records}
    if len(sizes) != 1:
        raise ValueError(
            f"layers saw different batch sizes {sorted(sizes)} in one backward pass; dpclip "
            "needs the batch on dim 0 of every layer's input (batch_first=True)"
        )
    return sizes.pop()


def _factors(
    plan: Plan, group_of: dict[int, int], norm_sq: dict[nn.Parameter, Tensor], batch: int
) -> dict[nn.Parameter, Tensor]:
    scale = float(batch) if plan.mean_reduction else 1.0
    group_sq: dict[int, Tensor] = {}
    for p, sq in norm_sq.items():
        gi = group_of[id(p)]
        group_sq[gi] = group_sq[gi] + sq if gi in group_sq else sq
    radius = group_clip_norm(plan.clip_norm, len(plan.groups))
    group_factor = {}
    for gi, sq in group_sq.items():
        norms = sq.sqrt() * scale
        if not bool(torch.isfinite(norms).all()):
            raise NonFiniteNormError(
                "a per-sample gradient norm is NaN or infinite (check the loss for NaN/inf); "
                "the clipped gradient was not accumulated and the model is unchanged"
            )
        group_factor[gi] = (
            clip_factors(plan.clipping, norms, clip_norm=radius, gamma=plan.gamma) * scale
        )
    return {p: group_factor[group_of[id(p)]] for p in norm_sq}


def _accumulate(sums: dict[nn.Parameter, Tensor], p: nn.Parameter, g: Tensor) -> None:
    g = g.reshape(p.shape)
    sums[p] = sums[p] + g if p in sums else g
