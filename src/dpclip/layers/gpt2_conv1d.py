"""transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored transposed, (in, out).

``y = x @ W + b``, so sample i's weight gradient is a_iᵀ s_i: the dense rule with the transposed
layout. Registered by name, so dpclip never imports transformers: a Conv1D that exists
means transformers is already loaded.
"""

from __future__ import annotations

from dpclip.layers._registry import LayerRegistry
from dpclip.layers.linear import dense_rule


def register(registry: LayerRegistry) -> None:
    registry.register_by_name("transformers.pytorch_utils.Conv1D", dense_rule(lambda m: True))
