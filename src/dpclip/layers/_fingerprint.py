"""What the generic fallback checks its rerun against: a fingerprint of a module's output.

The fallback reruns a module per example during backward; its per-example gradients are only
right if each example's rerun gives that example's rows of the forward's output. The output
itself cannot be held for the comparison: the model may change it in place afterwards
(``h += x``, an in-place ReLU), and it may be large. So the call keeps, per token (a row of the
trailing dims, at least 256 elements), the token's norm and its projections on two fixed random
directions; any difference beyond rounding in a token shows in them. Computed in float32 (or
float64) outside autocast, with no host sync.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

_PROBE = 4096  # elements of the random directions; longer tokens weight each chunk randomly
_MIN_TOKEN = 256  # elements per token at least: its trailing dims, as many as that takes
_FLOOR = 1e-3  # differences are relative to a token's norm plus this share of its example's largest
_PROBES: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _probes(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(_PROBE, 2) directions and (_PROBE, 2) chunk weights, fixed (the call's and the
    rerun's alike), made once per dtype and device."""
    made = _PROBES.get((dtype, device))
    if made is None:
        gen = torch.Generator().manual_seed(0)
        base, weights = torch.randn(2, _PROBE, 2, generator=gen, dtype=torch.float64)
        made = (base.to(device, dtype), weights.to(device, dtype))
        _PROBES[(dtype, device)] = made
    return made


def _token_size(shape: tuple[int, ...]) -> int:
    size = 1
    for n in reversed(shape):
        if size >= _MIN_TOKEN:
            break
        size *= n
    return max(size, 1)  # an empty output: one empty token per row


def _project(tokens: Tensor) -> Tensor:
    """(..., n) -> (..., 2): each token on the two directions, chunk k of a longer token
    weighted by the k-th chunk weight (so moving elements between chunks shows)."""
    base, weights = _probes(tokens.dtype, tokens.device)
    n = tokens.shape[-1]
    if n <= _PROBE:
        return tokens @ base[:n]
    whole, rest = divmod(n, _PROBE)
    chunks = tokens[..., : whole * _PROBE].unflatten(-1, (whole, _PROBE)) @ base
    picked = weights[torch.arange(whole + 1, device=tokens.device) % _PROBE]
    out = (chunks * picked[:whole]).sum(dim=-2)
    return out + (tokens[..., whole * _PROBE :] @ base[:rest]) * picked[whole]


@dataclass(frozen=True)
class Fingerprint:
    """Per example and token: the token's norm and its two projections, (rows, tokens, 3)."""

    tokens: Tensor
    shape: tuple[int, ...]  # the output's shape after dim 0

    @staticmethod
    def of(t: Tensor) -> Fingerprint:
        """The fingerprint of ``t``, an output with the batch (or one row) on dim 0."""
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        size = _token_size(tuple(t.shape[1:]))
        kind = t.device.type if t.device.type in ("cpu", "cuda") else "cpu"
        with torch.no_grad(), torch.autocast(kind, enabled=False):
            tokens = t.detach().reshape(t.shape[0], -1, size).to(dtype)
            norms = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True)
            return Fingerprint(torch.cat([norms, _project(tokens)], dim=-1), tuple(t.shape[1:]))

    def expanded(self, batch: int) -> Fingerprint:
        """A batch-1 call's fingerprint for the ``batch`` examples it was broadcast to."""
        if self.tokens.shape[0] != 1:
            return self
        return dataclasses.replace(self, tokens=self.tokens.expand(batch, -1, -1))

    def difference(self, t: Tensor) -> float:
        """How far ``t`` (the rerun's rows) is from the recorded ones: the largest difference
        of a token's entries over its norm plus a floor (a thousandth of the largest norm); inf
        if the shapes differ or a non-finite entry differs (NaN and inf in the same places as
        the call's are the same)."""
        if tuple(t.shape[1:]) != self.shape or t.shape[0] != self.tokens.shape[0]:
            return float("inf")
        if not t.numel():
            return 0.0
        want, got = self.tokens, Fingerprint.of(t).tokens
        same = (want == got) | (want.isnan() & got.isnan())
        delta = torch.where(same, 0.0, (want - got).abs())
        norms = torch.where(want[..., :1].isfinite(), want[..., :1], 0.0)
        floor = _FLOOR * norms.amax(dim=1, keepdim=True) + 1e-30  # per example
        worst = float((delta / (norms + floor)).max())
        return worst if not math.isnan(worst) else float("inf")
