"""transformers blocks whose submodules' parameters no per-layer rule can clip per example, so
the block's generic fallback takes them (see :meth:`LayerRegistry.register_scope`).

Each is listed with why, and only families checked against the naive per-sample loop in the
tests are listed; registered by name, so dpclip never imports transformers.
"""

from __future__ import annotations

from dpclip.layers._registry import LayerRegistry

SCOPES = {
    # the relative-position tables have no batch dim; they become the attention mask
    "transformers.models.beit.modeling_beit.BeitLayer": ("relative_position_bias",),
    "transformers.models.beit.modeling_beit.BeitModel": ("shared_position_bias",),
    # the encoder's relative embeddings (and their LayerNorm) are read as a weight and fed,
    # batch-less, to every attention layer's own projections: the whole encoder
    "transformers.models.deberta_v2.modeling_deberta_v2.DebertaV2Encoder": ("*",),
    "transformers.models.deberta.modeling_deberta.DebertaEncoder": ("*",),  # the same in v1
    # windows fold the batch into dim 0 (b × windows) inside the block
    "transformers.models.swin.modeling_swin.SwinLayer": ("*",),
    "transformers.models.swinv2.modeling_swinv2.Swinv2Layer": ("*",),
}


def register(registry: LayerRegistry) -> None:
    for name, lifted in SCOPES.items():
        registry.register_scope(name, lifted)
