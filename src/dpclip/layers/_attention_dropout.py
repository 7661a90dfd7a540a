"""Attention dropout that the generic fallback can draw again.

``F.scaled_dot_product_attention`` with ``dropout_p > 0`` draws its mask inside the fused kernel,
in a way that depends on the kernel: the fallback's rerun (vmapped, where SDPA runs one example
at a time, or looped over examples) draws other masks, so its outputs differ from the forward's
and the step is refused. Inside a module that takes the fallback, :class:`AttentionByParts`
computes such a call from its parts instead (scores, softmax, ``F.dropout``, the product with
the values), in the forward and in the rerun alike: the mask is then an ordinary dropout on a
batched tensor, which the rerun replays exactly. Calls without dropout are left to the kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
             "enable_gqa": False}  # fmt: skip


def attention_by_parts(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """What ``F.scaled_dot_product_attention`` computes, with its dropout as ``F.dropout`` on the
    attention weights (a row that attends nowhere gives zeros, as torch's own math path does)."""
    if enable_gqa:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    # each side scaled by the square root before the product, as torch's own math path does
    # (in half precision the product alone can overflow)
    factor = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    root = math.sqrt(abs(factor))
    scores = (query * math.copysign(root, factor)) @ (key.transpose(-2, -1) * root)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(~causal.tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch._safe_softmax(scores, -1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p, training=True)
    return weights @ value


def by_parts_args(args: tuple, kwargs: dict, every: bool = False) -> dict | None:
    """An SDPA call's arguments by name if it draws dropout (or, with ``every``, whatever it
    draws), so that it runs by parts; None if not, or if the kernel refuses the call (it then
    raises its own error) or takes an argument this module does not know."""
    given = {**_DEFAULTS, **dict(zip(_PARAMS, args, strict=False)), **kwargs}
    if not (every or given["dropout_p"]) or (given["is_causal"] and given["attn_mask"] is not None):
        return None
    return None if set(given) - set(_PARAMS) else given


class AttentionByParts(TorchFunctionMode):
    """SDPA calls with dropout computed by :func:`attention_by_parts`: the fallback's rerun. (In
    the forward, dpclip's parameter-use guard, a mode already, does the same inside modules
    that take the fallback.) With ``every``, all SDPA calls: the vmapped rerun's, where SDPA
    would run one example at a time through a kernel that takes no gradient for a mask (T5's
    position bias is one)."""

    def __init__(self, every: bool = False) -> None:
        super().__init__()
        self.every = every

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        parts = by_parts_args(args, kwargs, self.every) if func is _SDPA else None
        return func(*args, **kwargs) if parts is None else attention_by_parts(**parts)
