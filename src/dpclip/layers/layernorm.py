"""nn.LayerNorm: per-sample affine gradients from the recomputed normalised input.

With x̂ = (x − mean) / √(var + eps) over the trailing ``normalized_shape`` dims, sample i's
gradients are Σ_t s_it ⊙ x̂_it (weight) and Σ_t s_it (bias), t running over the leading
positions. They are only (b, *normalized_shape), so the rule builds them outright and derives
the norms and the clipped sum from them; recomputing x̂ costs one normalisation, no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dpclip.layers._common import cast, sum_over
from dpclip.layers._derive import from_per_sample
from dpclip.layers._registry import LayerRegistry, compute_dtype


def per_sample_grad(
    module: nn.LayerNorm, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    shape = tuple(module.normalized_shape)
    dtype = compute_dtype(inputs[0], grad_output)
    s = cast(grad_output, dtype)
    lead = tuple(range(1, s.dim() - len(shape)))  # the positions between batch and shape
    out: dict[str, Tensor] = {}
    if "weight" in names:
        x_hat = F.layer_norm(cast(inputs[0], dtype), shape, None, None, module.eps)
        out["weight"] = sum_over(x_hat.mul_(s), lead)  # x_hat is ours: no second temporary
    if "bias" in names:
        out["bias"] = sum_over(s, lead)
    return out


RULE = from_per_sample(per_sample_grad)


def register(registry: LayerRegistry) -> None:
    registry.register(nn.LayerNorm, RULE)
