"""Equivalents of layers dpclip cannot clip as they are, built from layers it can: same weights,
same outputs. :func:`dpclip.fix` swaps them in (see ``REPLACEMENTS``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dpclip.replacements.attention import DPMultiheadAttention
from dpclip.replacements.recurrent import DPRecurrent

# module type -> a function building its replacement from it (BatchNorm's lives in validate.fix)
REPLACEMENTS: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.MultiheadAttention: DPMultiheadAttention,
    nn.LSTM: DPRecurrent,
    nn.GRU: DPRecurrent,
    nn.RNN: DPRecurrent,
}

__all__ = ["REPLACEMENTS", "DPMultiheadAttention", "DPRecurrent"]
