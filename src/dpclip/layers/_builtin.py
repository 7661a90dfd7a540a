"""Registers the built-in rules; the only place that lists them."""

from __future__ import annotations

from dpclip.layers._registry import LayerRegistry


def register_all(registry: LayerRegistry) -> None:
    from dpclip.layers import (
        conv,
        embedding,
        gpt2_conv1d,
        groupnorm,
        hf_rmsnorm,
        hf_scaled_embedding,
        hf_scopes,
        layernorm,
        linear,
        rmsnorm,
    )

    linear.register(registry)
    conv.register(registry)
    embedding.register(registry)
    layernorm.register(registry)
    groupnorm.register(registry)
    rmsnorm.register(registry)
    gpt2_conv1d.register(registry)
    hf_rmsnorm.register(registry)
    hf_scaled_embedding.register(registry)
    hf_scopes.register(registry)
