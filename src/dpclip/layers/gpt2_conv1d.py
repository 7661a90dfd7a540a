"""transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored transposed, (in, out).

``y = x @ W + b``, so sample i's weight gradient is a_iᵀ s_i — the transpose of Linear's — and
the shared outer-product algebra applies with the roles of a and s swapped where shape matters.
transformers is imported only when the rule is registered, and only if it is installed.
"""

from __future__ import annotations

import importlib.util
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


def _flat(module: nn.Module, inputs: tuple, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(module.weight, grad_output)
    return as_btd(inputs[0], dtype), as_btd(grad_output, dtype)


def norm_sq(
    module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
) -> dict[str, Tensor]:
    a, s = _flat(module, inputs, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in names:
        ghost = use_ghost(strategy, a.shape[1], module.nx, module.nf)
        out["weight"] = outer_norm_sq(a, s, ghost)
    if "bias" in names:
        out["bias"] = bias_per_sample(s).square().sum(dim=1)
    return out


def clipped_grad(
    module: nn.Module, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    a, s = _flat(module, inputs, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in factors:
        out["weight"] = outer_clipped_sum(s, a, factors["weight"])  # (C ⊙ a)ᵀ s: (in, out)
    if "bias" in factors:
        out["bias"] = factors["bias"].to(s.dtype) @ bias_per_sample(s)
    return out


def per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    a, s = _flat(module, inputs, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in names:
        out["weight"] = outer_per_sample(s, a)  # a_iᵀ s_i: (b, in, out)
    if "bias" in names:
        out["bias"] = bias_per_sample(s)
    return out


def instantiates(module: nn.Module, inputs: tuple, grad_output: Tensor, strategy: str) -> bool:
    """As for nn.Linear: per-sample gradients when no larger than the activations they replace."""
    T = grad_output.numel() // (grad_output.shape[0] * module.nf)
    return T > 1 and not use_ghost(strategy, T, module.nx, module.nf)


def register(registry: LayerRegistry) -> None:
    """Register Conv1D if transformers is installed; without it no Conv1D can exist to clip."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.pytorch_utils import Conv1D

    rule = LayerRule(norm_sq, clipped_grad, per_sample_grad, instantiates=instantiates)
    registry.register(Conv1D, rule)
