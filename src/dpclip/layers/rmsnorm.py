"""nn.RMSNorm: per-sample weight gradient Σ_t s_it ⊙ x̂_it, x̂ = x / √(mean(x²) + eps).

The mean runs over the trailing ``normalized_shape`` dims. With ``eps=None`` torch's kernel
uses the machine epsilon of its accumulation type — float32 for half/bf16/float32 input, float64
for float64 input — not of the input dtype; the rule reproduces that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpclip.layers._derive import from_per_sample
from dpclip.layers._registry import LayerRegistry, compute_dtype


def _eps(module: nn.RMSNorm, x: Tensor) -> float:
    if module.eps is not None:
        return module.eps
    return torch.finfo(compute_dtype(x)).eps


def per_sample_grad(
    module: nn.RMSNorm, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    if "weight" not in names:
        return {}
    shape = tuple(module.normalized_shape)
    dtype = compute_dtype(inputs[0], grad_output)
    s = grad_output.to(dtype).reshape(grad_output.shape[0], -1, *shape)
    x_hat = F.rms_norm(inputs[0].to(dtype), shape, None, _eps(module, inputs[0]))
    return {"weight": (s * x_hat.reshape(s.shape)).sum(dim=1)}


RULE = from_per_sample(per_sample_grad)


def register(registry: LayerRegistry) -> None:
    registry.register(nn.RMSNorm, RULE)
