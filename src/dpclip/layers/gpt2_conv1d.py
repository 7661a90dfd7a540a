"""transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored transposed, (in, out).

``y = x @ W + b``, so sample i's weight gradient is a_iᵀ s_i: the dense rule with the transposed
layout. transformers is imported only when the rule is registered, and only if installed.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from dpclip.layers._registry import LayerRegistry
from dpclip.layers.linear import dense_rule


def conv1d_layout(module: nn.Module) -> tuple[int, int, bool]:
    return module.nx, module.nf, True


def register(registry: LayerRegistry) -> None:
    """Register Conv1D if transformers is installed; without it no Conv1D can exist to clip."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.pytorch_utils import Conv1D

    registry.register(Conv1D, dense_rule(conv1d_layout))
