"""Book-keeping: from one backward pass's records to Σ_i C_i g_i per parameter.

Each record is reduced as soon as its output gradient arrives, parameter by parameter: either
the per-sample norms (ghost, or any closed form) are computed and the record is kept for the
clipped sum later, or the per-sample gradients are instantiated (always for a bias: (b, out)),
kept, and reused for the clipped sum as one small contraction; a record none of whose
parameters needs it any more is freed at once. When the backward pass
ends, the norms give the factors C, and each kept record costs one matmul, (C ⊙ s)ᵀ a; the
small per-sample gradients of a clipping group (biases, norm affines) are packed side by side for
one norm and one product.
A parameter used by several calls (tied weights, a reused layer) needs the norm of the *sum* of
its per-sample gradients: ‖Σ_k g_k‖² = Σ_k ‖g_k‖² + 2 Σ_{j<k} ⟨g_j, g_k⟩. Where every call's rule
gives outer-product factors, the cross terms come from those (no per-sample gradient, as for an
embedding tied to the output layer), and each call's record is kept for its share of the clipped
sum; later shares are added in place where the rule can (``add_clipped_grad``), so no temporary
as large as the parameter is made. Otherwise the uses are instantiated and summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dpclip._plan import Plan
from dpclip.clipping import clip_factors, group_clip_norm
from dpclip.errors import IntegrityError, NonFiniteNormError
from dpclip.hooks import Record
from dpclip.layers import LayerRule
from dpclip.layers._common import OuterFactors, outer_inner, sq_norms, weighted_sum
from dpclip.layers._derive import checked_factors, factor_memo

_PACK_LIMIT = 8192  # per-example elements up to which per-sample gradients are packed (biases,
# norm affines; copying larger ones into the pack would cost more than the ops it saves)


@dataclass(eq=False)
class _Entry:
    """One parameter's contribution in this backward: kept (record, name) uses, or per-sample
    grads. ``norm_sq`` covers every use so far (cross terms included)."""

    uses: list[tuple[Record, str]] = field(default_factory=list)
    norm_sq: Tensor | None = None
    per_sample: Tensor | None = None


@dataclass(eq=False)
class Accumulator:
    """Collects one backward pass's records; :meth:`finish` returns the clipped sums."""

    plan: Plan
    group_of: dict[int, int]
    loss_scale: Tensor | None = None  # a GradScaler's S: the records hold S times the gradients
    batch: int | None = None
    forward: int | None = None
    entries: dict[nn.Parameter, _Entry] = field(default_factory=dict)
    # where the finiteness check is left to the step (see checks_at_step): whether every norm
    # of this backward was finite, as a device tensor the engine reads once per logical step
    finite: Tensor | None = None

    def add(self, rec: Record) -> None:
        # one build of the call's outer factors for its choice, norms and per-sample gradients;
        # dropped when add returns (a kept record's clipped sum builds them again), so factors
        # in a wider dtype than the record's tensors never outlive this call
        with factor_memo({}):
            self._add(rec)

    def _add(self, rec: Record) -> None:
        self._check_batch(rec)
        if rec.batch == 0:  # no examples: no per-sample gradient, nothing to clip or add
            rec.inputs, rec.grad_output = (), None
            return
        rule, module = self.plan.rules[rec.module], rec.module
        params = self.plan.params[module]
        again = [n for n, p in params.items() if p in self.entries]
        fresh = [n for n in params if n not in again]
        keep_record = False
        if again:
            keep_record = self._add_again(rec, rule, {n: params[n] for n in again})
        built = _instantiated_names(rule, rec, fresh, self.plan.strategy)
        if built:
            got = _per_sample(rule, rec, built, self.batch)
            for n in built:
                self.entries[params[n]] = _Entry(per_sample=got[n])
        ghost = [n for n in fresh if n not in built]
        if ghost:
            got = _norm_sq(rule, rec, ghost, self.plan.strategy, self.batch)
            for n in ghost:
                self.entries[params[n]] = _Entry(uses=[(rec, n)], norm_sq=got[n])
            keep_record = True
        if not keep_record:
            rec.inputs, rec.grad_output = (), None  # reduced to per-sample grads: free it

    def _add_again(self, rec: Record, rule: LayerRule, params: dict[str, nn.Parameter]) -> bool:
        """Another use of already-seen parameters; True if the record is kept (cross terms)."""
        entries = {n: self.entries[p] for n, p in params.items()}
        crossed = [n for n, e in entries.items() if self._can_cross(rule, e)]
        if crossed:
            mine = _outer_factors(rule, rec, crossed, self.batch)
            own = _norm_sq(rule, rec, crossed, self.plan.strategy, self.batch)
            for n in crossed:
                entry = entries[n]
                cross = sum(outer_inner(self._factors_of(use), mine[n]) for use in entry.uses)
                entry.norm_sq = entry.norm_sq + own[n] + 2 * cross
                entry.uses.append((rec, n))
        summed = [n for n in entries if n not in crossed]
        if summed:
            got = _per_sample(rule, rec, summed, self.batch)
            for n in summed:
                entry = entries[n]
                entry.per_sample = self._instantiated(entry) + got[n]
                entry.uses, entry.norm_sq = [], None
        return bool(crossed)

    def _can_cross(self, rule: LayerRule, entry: _Entry) -> bool:
        rules = [rule] + [self.plan.rules[r.module] for r, _ in entry.uses]
        return entry.per_sample is None and all(r.outer_factors is not None for r in rules)

    def _factors_of(self, use: tuple[Record, str]) -> OuterFactors:
        rec, name = use
        rule = self.plan.rules[rec.module]
        return _outer_factors(rule, rec, [name], self.batch)[name]

    def _check_batch(self, rec: Record) -> None:
        """One backward, one forward of the model: rows of two forwards are not one example."""
        if self.forward is None:
            self.batch, self.forward = rec.batch, rec.forward
        elif rec.forward != self.forward:
            raise IntegrityError(
                "one backward pass reached layer calls from two forward passes of the model; "
                "dpclip clips the examples of one forward per backward, one per row, and would "
                "merge row i of both: call backward after each forward (gradient accumulation), "
                "or run both inputs through one forward (concatenate the batches, or wrap both "
                "calls in one module and attach the engine to it)"
            )
        grads = rec.grad_output if isinstance(rec.grad_output, tuple) else (rec.grad_output,)
        rows = {g.shape[0] for g in grads}
        if rows != {rec.batch}:  # the recorder refuses this at forward time
            raise IntegrityError(
                f"the output gradient of {type(rec.module).__name__} has {sorted(rows)} rows, "
                f"not the forward's batch of {rec.batch}"
            )

    def _instantiated(self, entry: _Entry) -> Tensor:
        if entry.per_sample is not None:
            return entry.per_sample
        parts = [
            _per_sample(self.plan.rules[r.module], r, [n], self.batch)[n] for r, n in entry.uses
        ]
        return sum(parts[1:], parts[0])

    def norms_sq(self) -> dict[nn.Parameter, Tensor]:
        """Each touched parameter's per-sample squared gradient norm, (batch,), all uses summed."""
        for entry in self.entries.values():
            if entry.norm_sq is None:
                entry.norm_sq = sq_norms(entry.per_sample)
        return {p: entry.norm_sq for p, entry in self.entries.items()}

    def finish(self) -> dict[nn.Parameter, Tensor]:
        """Σ_i C_i g_i for every parameter touched (C from the plan's clipping)."""
        if not self.entries:  # a backward over no examples
            return {}
        packs, packed = self._packs()
        norms: list[tuple[int, Tensor]] = [(gi, sq_norms(flat)) for gi, flat, _ in packs]
        for p, entry in self.entries.items():
            if p not in packed:
                if entry.norm_sq is None:
                    entry.norm_sq = sq_norms(entry.per_sample)
                norms.append((self.group_of[id(p)], entry.norm_sq))
        group_factor = self._factors(norms)
        sums: dict[nn.Parameter, Tensor] = {}
        for gi, flat, members in packs:  # one product and one split for the whole pack
            sizes = [param.numel() for param, _ in members]
            pieces = weighted_sum(group_factor[gi], flat).split(sizes)
            for (p, shape), piece in zip(members, pieces, strict=True):
                sums[p] = piece if piece.shape == shape else piece.view(shape)  # 1-D: as is
        kept: dict[Record, dict[str, Tensor]] = {}
        for p, entry in self.entries.items():
            if p in packed:
                continue
            factor = group_factor[self.group_of[id(p)]]
            if entry.per_sample is not None:
                sums[p] = weighted_sum(factor, entry.per_sample)
            else:
                for rec, name in entry.uses:
                    kept.setdefault(rec, {})[name] = factor
        for rec, f in kept.items():
            self._clipped_sum(rec, f, sums)
            rec.inputs, rec.grad_output = (), None  # used up: free it before the next one
        return sums

    def _packs(self) -> tuple[list[tuple[int, Tensor, list]], set[nn.Parameter]]:
        """Small per-sample gradients (biases, norms' affine parameters) of one clipping group,
        dtype and device, side by side in one (b, n) tensor: one norm and one product for all of
        them instead of a few dispatched ops each. Large ones stay apart (no copy of them)."""
        by_key: dict[tuple, list[nn.Parameter]] = {}
        for p, entry in self.entries.items():
            g = entry.per_sample
            if g is not None and entry.norm_sq is None and math.prod(g.shape[1:]) <= _PACK_LIMIT:
                by_key.setdefault((self.group_of[id(p)], g.dtype, g.device), []).append(p)
        packs, packed = [], set()
        for (gi, _, _), params in by_key.items():
            if len(params) < 2:
                continue
            grads = [self.entries[p].per_sample for p in params]
            flat = torch.cat([g if g.dim() == 2 else g.reshape(g.shape[0], -1) for g in grads], 1)
            packs.append((gi, flat, [(p, g.shape[1:]) for p, g in zip(params, grads, strict=True)]))
            packed.update(params)
        return packs, packed

    def _clipped_sum(self, rec: Record, factors: dict[str, Tensor], sums: dict) -> None:
        """Add this call's share of Σ_i C_i g_i to ``sums``: in place where its parameter already
        has a share (a later use of a tied weight) and the rule can, else as a new tensor."""
        rule, module = self.plan.rules[rec.module], rec.module
        into = {}
        if rule.add_clipped_grad is not None:
            into = {
                n: sums[p]
                for n in factors
                if (p := self.plan.params[module][n]) in sums and sums[p].is_contiguous()
            }
        if into:
            versions = {n: t._version for n, t in into.items()}
            rule.add_clipped_grad(
                module, rec.inputs, rec.grad_output, {n: factors[n] for n in into}, into
            )
            missed = [n for n, t in into.items() if t._version == versions[n]]
            if missed:  # this use's share would be lost: a wrong gradient, silently
                raise ValueError(
                    f"the layer rule for {type(module).__name__} returned from add_clipped_grad "
                    f"without adding in place to {missed}"
                )
        rest = {n: c for n, c in factors.items() if n not in into}
        if not rest:
            return
        got = rule.clipped_grad(module, rec.inputs, rec.grad_output, rest)
        shapes = {n: tuple(self.plan.params[module][n].shape) for n in rest}
        for n, g in _checked(rec, "clipped_grad", got, shapes).items():
            p = self.plan.params[module][n]
            sums[p] = sums[p] + g if p in sums else g  # tied, no in-place rule: one share per use

    def _factors(self, norms_sq: list[tuple[int, Tensor]]) -> dict[int, Tensor]:
        """Each clipping group's per-sample factors, from (group, squared norm) contributions."""
        plan = self.plan
        # a mean loss's per-sample gradients are 1/b of the examples' (0 rows: nothing to scale)
        scale = float(self.batch) if plan.mean_reduction and self.batch else 1.0
        parts: dict[int, list[Tensor]] = {}
        for gi, sq in norms_sq:
            parts.setdefault(gi, []).append(sq)
        group_sq = {gi: _total(sq) for gi, sq in parts.items()}
        radius = group_clip_norm(plan.clip_norm, len(plan.groups))
        # the mean loss's per-sample norms: clip_factors applies the scale, in float32 at least
        # (b times a finite half-precision norm can overflow; a finite float32 one cannot)
        norms = {gi: _at_least_float32(sq).sqrt() for gi, sq in group_sq.items()}
        if self.loss_scale is not None:  # clip the unscaled gradients; the sums stay S times
            norms = {gi: n / self.loss_scale.to(n.device, n.dtype) for gi, n in norms.items()}
        # One check for all groups: a sum in float64 of non-negative norms is finite exactly
        # when every norm is (it cannot overflow from finite float32 ones).
        sums = [n.sum(dtype=_wide(n.device)) for n in norms.values()]
        total = (
            sums[0] if len(sums) == 1 else torch.stack([t.to(sums[0].device) for t in sums]).sum()
        )
        if self.loss_scale is None and checks_at_step(total.device):
            self.finite = torch.isfinite(total)  # read at the step: no device sync here
        elif not math.isfinite(float(total)):
            raise NonFiniteNormError(
                "a per-sample gradient norm is NaN or infinite (check the loss for NaN/inf); "
                "the clipped gradient was not accumulated and the model is unchanged"
            )
        return {
            gi: clip_factors(plan.clipping, n, clip_norm=radius, gamma=plan.gamma, scale=scale)
            for gi, n in norms.items()
        }


def checks_at_step(device: torch.device) -> bool:
    """Whether the norms' finiteness is read at the optimizer step instead of at the end of each
    backward: on an accelerator, reading it back makes the host wait for the device, which then
    idles while the host queues the clipped sums, the noise and the next forward. On a CPU the
    read costs nothing and the error comes from the backward that made the NaN. (A loss-scaled
    backward always reads it: an overflow must turn the sums into NaN for the scaler.)"""
    return device.type != "cpu"


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _total(tensors: list[Tensor]) -> Tensor:
    """Σ of same-shape tensors in one or two dispatched ops instead of one per term."""
    if len(tensors) == 1:
        return tensors[0]
    if len({(t.device, t.dtype) for t in tensors}) > 1:
        return sum(tensors[1:], tensors[0])
    return torch.stack(tensors).sum(dim=0)


def _per_sample(rule: LayerRule, rec: Record, names: list[str], batch: int | None) -> dict:
    if rule.per_sample_grad is None:
        raise TypeError(
            f"{type(rec.module).__name__} shares a parameter with another layer call, which "
            "needs per_sample_grad in its layer rule"
        )
    got = rule.per_sample_grad(rec.module, rec.inputs, rec.grad_output, names)
    shapes = {n: (batch, *rec.module.get_parameter(n).shape) for n in names}
    return _checked(rec, "per_sample_grad", got, shapes)


def _norm_sq(rule: LayerRule, rec: Record, names: list[str], strategy: str, batch: int | None):
    got = rule.norm_sq(rec.module, rec.inputs, rec.grad_output, names, strategy)
    return _checked(rec, "norm_sq", got, {n: (batch,) for n in names})


def _checked(
    rec: Record, what: str, got: object, shapes: dict[str, tuple[int | None, ...]]
) -> dict[str, Tensor]:
    """A layer rule's result, refused unless it has a tensor of exactly the expected shape for
    every name: norms (batch,), per-sample gradients (batch, *param.shape), clipped sums the
    parameter's shape. A norm of the wrong shape would broadcast into wrong clipping factors,
    and a gradient of the right size in another shape would be reshaped into a wrong one,
    silently."""
    for n, shape in shapes.items():
        t = got.get(n) if isinstance(got, Mapping) else None
        if not (isinstance(t, Tensor) and tuple(t.shape) == shape):
            have = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"the layer rule for {type(rec.module).__name__} returned {have} from {what} "
                f"for {n!r}; expected a tensor of shape {shape}"
            )
    return got  # type: ignore[return-value]


def _outer_factors(
    rule: LayerRule, rec: Record, names: list[str], batch: int | None
) -> dict[str, OuterFactors]:
    """A rule's outer factors, refused unless each side has the batch and the same positions
    (see :func:`dpclip.layers._derive.checked_factors`)."""
    got = rule.outer_factors(rec.module, rec.inputs, rec.grad_output, names)  # type: ignore[misc]
    return checked_factors(rec.module, got, names, batch)


def _instantiated_names(rule: LayerRule, rec: Record, names: list[str], strategy: str) -> list[str]:
    """Which of ``names`` this call builds per-sample gradients for (in ``names``' order)."""
    if not names or rule.instantiates is None or rule.per_sample_grad is None:
        return []
    chosen = set(rule.instantiates(rec.module, rec.inputs, rec.grad_output, names, strategy))
    if not chosen <= set(names):
        raise ValueError(
            f"the layer rule for {type(rec.module).__name__} chose {sorted(chosen - set(names))} "
            f"in instantiates, which were not among the names it was offered {names}"
        )
    return [n for n in names if n in chosen]
