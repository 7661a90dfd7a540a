"""nn.LayerNorm: per-sample affine gradients from the recomputed normalised input.

With x̂ = (x − mean) / √(var + eps) over the trailing ``normalized_shape`` dims, sample i's
gradients are Σ_t s_it ⊙ x̂_it (weight) and Σ_t s_it (bias), t running over the leading
positions. They are only (b, *normalized_shape), so the rule builds them outright and derives
the norms and the clipped sum from them; recomputing x̂ costs one normalisation, no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpclip.layers._registry import LayerRegistry, LayerRule, always, compute_dtype


def per_sample_grad(
    module: nn.LayerNorm, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    shape = tuple(module.normalized_shape)
    dtype = compute_dtype(inputs[0], grad_output)
    b = grad_output.shape[0]
    s = grad_output.to(dtype).reshape(b, -1, *shape)
    out: dict[str, Tensor] = {}
    if "weight" in names:
        x_hat = F.layer_norm(inputs[0].to(dtype), shape, None, None, module.eps)
        out["weight"] = (s * x_hat.reshape(s.shape)).sum(dim=1)
    if "bias" in names:
        out["bias"] = s.sum(dim=1)
    return out


def norm_sq(
    module: nn.LayerNorm, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
) -> dict[str, Tensor]:
    grads = per_sample_grad(module, inputs, grad_output, names)
    return {n: g.flatten(1).square().sum(dim=1) for n, g in grads.items()}


def clipped_grad(
    module: nn.LayerNorm, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    grads = per_sample_grad(module, inputs, grad_output, list(factors))
    return {n: torch.tensordot(factors[n].to(g.dtype), g, dims=1) for n, g in grads.items()}


def register(registry: LayerRegistry) -> None:
    registry.register(
        nn.LayerNorm, LayerRule(norm_sq, clipped_grad, per_sample_grad, instantiates=always)
    )
