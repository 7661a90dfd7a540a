"""The engine's oracle: per-sample gradients from a loop over samples, clipped by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[list[Tensor]]:
    """grads[i][k]: sample i's gradient of its own loss for the k-th trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(  # a parameter the loss does not reach (a pooler left unused) gets zero
            [
                torch.zeros_like(p) if g is None else g.detach().clone()
                for p, g in zip(params, grads, strict=True)
            ]
        )
    return out


# The clipping functions, written here from their definitions (not imported from dpclip), so the
# oracle does not share a bug with the code under test. n: a per-sample norm (a 0-d tensor).
CLIPPING = {
    "automatic": lambda n, r, gamma: r / (n + gamma),
    "automatic-v": lambda n, r, gamma: r / n if n > 0 else torch.zeros_like(n),
    "abadi": lambda n, r, gamma: torch.clamp(r / n, max=1.0) if n > 0 else torch.ones_like(n),
    "global": lambda n, r, gamma: torch.ones_like(n) if n <= r else torch.zeros_like(n),
    "psac": lambda n, r, gamma: r / (n + gamma / (n + gamma)),
}


def clipped_sum(
    grads: list[list[Tensor]],
    groups: Sequence[Sequence[int]],
    *,
    clipping: str,
    clip_norm: float,
    gamma: float,
) -> list[Tensor]:
    """Σ_i C_i g_i with groups given as lists of parameter positions, each clipped to R/√K."""
    radius = clip_norm / math.sqrt(len(groups))
    total = [torch.zeros_like(g) for g in grads[0]]
    for g_i in grads:
        for group in groups:
            norm = torch.sqrt(sum(g_i[k].square().sum() for k in group))
            factor = CLIPPING[clipping](norm, radius, gamma)
            for k in group:
                total[k] += factor * g_i[k]
    return total
