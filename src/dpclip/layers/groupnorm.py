"""nn.GroupNorm and affine nn.InstanceNorm1d/2d/3d: per-channel affine gradients.

Input is (b, C, *spatial). With x̂ the normalised input, sample i's gradients are
Σ_spatial s_i ⊙ x̂_i (weight, per channel) and Σ_spatial s_i (bias) — only (b, C), so the rule
builds them outright. x̂ is recomputed the way the module computes it in its current mode:
GroupNorm and InstanceNorm in training (or without running stats) normalise each sample by its
own statistics; InstanceNorm in eval mode with ``track_running_stats`` uses the running
statistics. The running statistics are only read, never updated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dpclip.layers._common import cast, sum_over
from dpclip.layers._derive import from_per_sample
from dpclip.layers._registry import LayerRegistry, compute_dtype

_INSTANCE_NORM_NDIM = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def _check_batched(module: nn.Module, x: Tensor) -> None:
    for cls, ndim in _INSTANCE_NORM_NDIM.items():
        if isinstance(module, cls) and x.dim() != ndim:
            raise ValueError(
                f"{type(module).__name__} rule expects batched input of {ndim} dims "
                f"(b, C, *spatial), got shape {tuple(x.shape)}"
            )


def _x_hat(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if module.training or not module.track_running_stats:
        return F.instance_norm(x, eps=module.eps)
    return F.instance_norm(
        x,
        module.running_mean.to(x.dtype),
        module.running_var.to(x.dtype),
        use_input_stats=False,
        eps=module.eps,
    )


def per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    _check_batched(module, inputs[0])
    dtype = compute_dtype(inputs[0], grad_output)
    s = cast(grad_output, dtype)
    out: dict[str, Tensor] = {}
    spatial = tuple(range(2, s.dim()))  # (b, C, *spatial) -> (b, C)
    if "weight" in names:
        out["weight"] = sum_over(s * _x_hat(module, cast(inputs[0], dtype)), spatial)
    if "bias" in names:
        out["bias"] = sum_over(s, spatial)
    return out


RULE = from_per_sample(per_sample_grad)


def register(registry: LayerRegistry) -> None:
    for module_type in (nn.GroupNorm, *_INSTANCE_NORM_NDIM):
        registry.register(module_type, RULE)
