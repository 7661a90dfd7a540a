"""transformers' scaled word embeddings (Gemma, BART and the families that copy them):
``y = E[ids] · c`` for a constant c (√width, or 1).

The weight gradient is the embedding's for the output gradient c · s, so every function of the
nn.Embedding rule is reused on c · s. Registered by name (see ``gpt2_conv1d``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from torch import Tensor, nn

from dpclip.layers import embedding
from dpclip.layers._registry import LayerRegistry, LayerRule

# the classes whose forward and __init__ are Gemma's or BART's, word for word (transformers
# 5.25; a test checks it for every one installed)
_GEMMA = ("gemma.GemmaText", "gemma2.Gemma2Text", "gemma3.Gemma3Text", "gemma3n.Gemma3nText",
          "vaultgemma.VaultGemmaText", "minicpm3.MiniCPM3")  # fmt: skip
_BART = ("bart.Bart", "mbart.MBart", "m2m_100.M2M100", "nllb_moe.NllbMoe", "plbart.PLBart",
         "blenderbot.Blenderbot", "bigbird_pegasus.BigBirdPegasus", "pegasus_x.PegasusX",
         "biogpt.BioGpt", "xglm.XGLM", "trocr.TrOCR")  # fmt: skip
GEMMA_NAMES = tuple(
    f"transformers.models.{m}.modeling_{m}.{c}ScaledWordEmbedding"
    for m, c in (n.split(".") for n in _GEMMA)
)
BART_NAMES = tuple(
    f"transformers.models.{m}.modeling_{m}.{c}ScaledWordEmbedding"
    for m, c in (n.split(".") for n in _BART)
)
NAMES = GEMMA_NAMES + BART_NAMES


def _on_scaled_grad(fn: Callable | None) -> Callable | None:
    """``fn(module, inputs, grad_output, ...)`` called with grad_output · c."""
    if fn is None:
        return None

    @wraps(fn)
    def scaled(module: nn.Module, inputs: tuple, grad_output: Tensor, *rest):
        c = module.embed_scale  # what the forward multiplies by: a buffer or a float
        if isinstance(c, Tensor):
            c = c.to(module.weight.dtype)
        return fn(module, inputs, grad_output * c, *rest)

    return scaled


def _scaled_rule(rule: LayerRule) -> LayerRule:
    return LayerRule(
        _on_scaled_grad(rule.norm_sq),  # type: ignore[arg-type]
        _on_scaled_grad(rule.clipped_grad),  # type: ignore[arg-type]
        _on_scaled_grad(rule.per_sample_grad),
        rule.check,
        instantiates=_on_scaled_grad(rule.instantiates),
        outer_factors=_on_scaled_grad(rule.outer_factors),
        add_clipped_grad=_on_scaled_grad(rule.add_clipped_grad),
    )


def register(registry: LayerRegistry) -> None:
    rule = _scaled_rule(embedding.RULE)
    for name in NAMES:
        registry.register_by_name(name, rule)
