"""nn.MultiheadAttention rebuilt from nn.Linear: same weights, same outputs, clipped per example.

torch's module reads its projection weights inside one fused function
(``F.multi_head_attention_forward``), out_proj's included, so no layer call carries them. Here
the query, key, value and output projections are nn.Linear layers called on batch-first
tensors (a sequence-first module transposes on the way in and out), so their ordinary rule
clips them; ``bias_k``/``bias_v`` (``add_bias_kv``) live in a small batch-first module of their
own, which takes the generic fallback.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DPMultiheadAttention(nn.Module):
    """Drop-in for :class:`torch.nn.MultiheadAttention` (same forward signature and outputs)."""

    # nn.TransformerEncoderLayer's eval fast path reads these and would call torch's fused
    # kernel with them; with no packed input projection, it takes the module's own forward
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        e, h = source.embed_dim, source.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, h, e // h
        self.dropout, self.batch_first = source.dropout, source.batch_first
        self.add_zero_attn = source.add_zero_attn
        bias = source.in_proj_bias is not None
        ref = source.out_proj.weight
        self.q_proj = nn.Linear(e, e, bias=bias, device=ref.device, dtype=ref.dtype)
        self.k_proj = nn.Linear(source.kdim, e, bias=bias, device=ref.device, dtype=ref.dtype)
        self.v_proj = nn.Linear(source.vdim, e, bias=bias, device=ref.device, dtype=ref.dtype)
        self.out_proj = nn.Linear(
            e, e, bias=source.out_proj.bias is not None, device=ref.device, dtype=ref.dtype
        )
        if source._qkv_same_embed_dim:
            weights = source.in_proj_weight.chunk(3)
            weight_of = (source.in_proj_weight,) * 3
        else:
            weight_of = (source.q_proj_weight, source.k_proj_weight, source.v_proj_weight)
            weights = weight_of
        biases = source.in_proj_bias.chunk(3) if bias else (None,) * 3
        pairs = [(self.out_proj.weight, source.out_proj.weight, source.out_proj.weight)]
        if source.out_proj.bias is not None:
            pairs.append((self.out_proj.bias, source.out_proj.bias, source.out_proj.bias))
        for proj, w, of, b in zip(
            (self.q_proj, self.k_proj, self.v_proj), weights, weight_of, biases, strict=True
        ):
            pairs.append((proj.weight, w, of))
            if b is not None:
                pairs.append((proj.bias, b, source.in_proj_bias))
        with torch.no_grad():
            for mine, value, held_by in pairs:
                mine.copy_(value).requires_grad_(held_by.requires_grad)
        self.bias_kv = _BiasKV(source.bias_k, source.bias_v) if source.bias_k is not None else None
        self.train(source.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3:
            raise ValueError(
                "dpclip's DPMultiheadAttention takes batched 3-d inputs, got shape "
                f"{tuple(query.shape)}"
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, length = query.shape[:2]
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, b, length, k.shape[1], q)
        if self.bias_kv is not None:
            k, v = self.bias_kv(k, v)
            mask = None if mask is None else F.pad(mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(b, 1, v.shape[-1])], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
        h, d = self.num_heads, self.head_dim
        q = q.view(b, length, h, d).transpose(1, 2)
        k = k.view(b, -1, h, d).transpose(1, 2)
        v = v.view(b, -1, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, length, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        b: int,
        length: int,
        source: int,
        like: Tensor,
    ) -> Tensor | None:
        """One additive float mask, (b, heads, L, S), or None."""
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, like)
            mask = m.view(b, self.num_heads, length, source) if m.dim() == 3 else m
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, like).view(b, 1, 1, source)
            mask = pad if mask is None else mask + pad
        return mask


class _BiasKV(nn.Module):
    """``add_bias_kv``: one learned key and value appended to each example's (b, S, E) keys and
    values."""

    def __init__(self, bias_k: Tensor, bias_v: Tensor) -> None:
        super().__init__()
        self.bias_k = nn.Parameter(bias_k.detach().clone(), requires_grad=bias_k.requires_grad)
        self.bias_v = nn.Parameter(bias_v.detach().clone(), requires_grad=bias_v.requires_grad)

    def forward(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        return (
            torch.cat([k, self.bias_k.expand(b, 1, -1)], dim=1),
            torch.cat([v, self.bias_v.expand(b, 1, -1)], dim=1),
        )


def _additive(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean mask (True = not allowed) as -inf/0, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(like.dtype)
