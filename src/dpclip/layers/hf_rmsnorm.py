"""transformers' RMS norms (LLaMA, Mistral, Qwen2): ``y = w ⊙ x̂``, and Gemma's
``y = (1 + w) ⊙ x̂``, with ``x̂ = x / √(mean(x², last dim) + eps)``, so sample i's weight
gradient is Σ_t s_it ⊙ x̂_it either way. T5's layer norm (and the families that copy it) is the
same norm with its own casts: the mean in float32, x̂ in the wider of x's dtype and float32, cast
to the weight's dtype when that is half.

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
)
# the classes whose forward and __init__ are T5's, statement for statement (transformers 5.25;
# a test checks it for every one installed)
_T5 = ("t5.T5", "mt5.MT5", "longt5.LongT5", "umt5.UMT5", "udop.Udop",
       "switch_transformers.SwitchTransformers", "pop2piano.Pop2Piano", "pix2struct.Pix2Struct",
       "kosmos2_5.Kosmos2_5")  # fmt: skip
T5_NAMES = tuple(
    f"transformers.models.{m}.modeling_{m}.{c}LayerNorm" for m, c in (n.split(".") for n in _T5)
)


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


def t5_per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    """T5's ``y = w · x̂`` with x̂ = x · rsqrt(mean(x² in float32) + eps), cast to w's dtype when
    w is half: the rule's x̂ is the layer's, bit for bit."""
    if "weight" not in names:
        return {}
    x = inputs[0]
    x_hat = x * torch.rsqrt(
        x.to(torch.float32).pow(2).mean(-1, keepdim=True) + module.variance_epsilon
    )
    if module.weight.dtype in (torch.float16, torch.bfloat16):
        x_hat = x_hat.to(module.weight.dtype)
    dtype = compute_dtype(x_hat, grad_output)
    s = grad_output.to(dtype).reshape(grad_output.shape[0], -1, grad_output.shape[-1])
    return {"weight": (s * x_hat.to(dtype).reshape(s.shape)).sum(dim=1)}


RULE = from_per_sample(per_sample_grad)
GEMMA_RULE = from_per_sample(gemma_per_sample_grad)
T5_RULE = from_per_sample(t5_per_sample_grad)


def register(registry: LayerRegistry) -> None:
    for name in NAMES:
        registry.register_by_name(name, RULE)
    registry.register_by_name("transformers.models.gemma.modeling_gemma.GemmaRMSNorm", GEMMA_RULE)
    for name in T5_NAMES:
        registry.register_by_name(name, T5_RULE)
