"""transformers' RMS norms (LLaMA, Mistral, Qwen2): ``y = w ⊙ x̂``, and Gemma's
``y = (1 + w) ⊙ x̂``, with ``x̂ = x / √(mean(x², last dim) + eps)``, so sample i's weight
gradient is Σ_t s_it ⊙ x̂_it either way.

Each model family carries its own copy of the class, so each is registered by name (dpclip
never imports transformers: an instance that exists means transformers is loaded), and only
families checked against the naive per-sample loop in the tests are listed. These layers
normalise in float32 whatever the input dtype and cast x̂ back before the weight; the rule does
the same, so its x̂ is bit for bit theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dpclip.layers._derive import from_per_sample
from dpclip.layers._registry import LayerRegistry, compute_dtype

NAMES = (
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
)  # not T5LayerNorm: T5's relative-position bias embedding has no batch dim


def per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    if "weight" not in names:
        return {}
    x = inputs[0]
    dtype = compute_dtype(x, grad_output)
    x32 = x.to(torch.float32)  # as the layer does, whatever the input dtype (float64 included)
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    x_hat = x_hat.to(x.dtype).to(dtype)  # and back to the input dtype before the weight
    s = grad_output.to(dtype).reshape(grad_output.shape[0], -1, grad_output.shape[-1])
    return {"weight": (s * x_hat.reshape(s.shape)).sum(dim=1)}


def gemma_per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    """Gemma's ``y = (x̂ · (1 + w)).type_as(x)``, all in float32: the gradient of w is
    Σ_t s_it ⊙ x̂_it with s and x̂ in float32 (so the rule rounds as autograd does there)."""
    if "weight" not in names:
        return {}
    x = inputs[0].to(torch.float32)
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps)
    s = grad_output.to(torch.float32).reshape(grad_output.shape[0], -1, grad_output.shape[-1])
    g = (s * x_hat.reshape(s.shape)).sum(dim=1)
    return {"weight": g.to(compute_dtype(inputs[0], grad_output))}


RULE = from_per_sample(per_sample_grad)
GEMMA_RULE = from_per_sample(gemma_per_sample_grad)


def register(registry: LayerRegistry) -> None:
    for name in NAMES:
        registry.register_by_name(name, RULE)
    registry.register_by_name("transformers.models.gemma.modeling_gemma.GemmaRMSNorm", GEMMA_RULE)
