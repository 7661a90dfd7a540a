"""nn.Linear with any number of leading dims: g_i = s_iᵀ a_i over the flattened positions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dpclip.layers._common import (
    as_btd,
    bias_per_sample,
    outer_clipped_sum,
    outer_norm_sq,
    outer_per_sample,
    use_ghost,
)
from dpclip.layers._registry import LayerRegistry, LayerRule, compute_dtype


def _flat(module: nn.Linear, inputs: tuple, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(module.weight, grad_output)
    return as_btd(inputs[0], dtype), as_btd(grad_output, dtype)


def norm_sq(
    module: nn.Linear, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
) -> dict[str, Tensor]:
    a, s = _flat(module, inputs, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in names:
        ghost = use_ghost(strategy, a.shape[1], module.in_features, module.out_features)
        out["weight"] = outer_norm_sq(a, s, ghost)
    if "bias" in names:
        out["bias"] = bias_per_sample(s).square().sum(dim=1)
    return out


def clipped_grad(
    module: nn.Linear, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    a, s = _flat(module, inputs, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in factors:
        out["weight"] = outer_clipped_sum(a, s, factors["weight"])
    if "bias" in factors:
        out["bias"] = factors["bias"].to(s.dtype) @ bias_per_sample(s)
    return out


def per_sample_grad(
    module: nn.Linear, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    a, s = _flat(module, inputs, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in names:
        out["weight"] = outer_per_sample(a, s)
    if "bias" in names:
        out["bias"] = bias_per_sample(s)
    return out


def instantiates(module: nn.Linear, inputs: tuple, grad_output: Tensor, strategy: str) -> bool:
    T = grad_output.numel() // (grad_output.shape[0] * module.out_features)
    return T > 1 and not use_ghost(strategy, T, module.in_features, module.out_features)


def register(registry: LayerRegistry) -> None:
    rule = LayerRule(norm_sq, clipped_grad, per_sample_grad, instantiates=instantiates)
    registry.register(nn.Linear, rule)
