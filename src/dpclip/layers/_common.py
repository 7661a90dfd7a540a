"""Shared algebra for layers whose weight gradient is ``g_i = s_iᵀ a_i`` (Linear, Conv, Conv1D)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_btd(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Reshape (b, ..., d) to (b, T, d) in ``dtype``; T = product of the middle dims (1 if none)."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)


def use_ghost(strategy: str, T: int, d_in: int, d_out: int) -> bool:
    """Ghost norm when asked, or under "mixed" when it is the cheaper way to the norm.

    Per sample, the ghost norm costs T²·(d_in + d_out) and instantiation T·d_in·d_out, so ghost
    wins when T·(d_in + d_out) < d_in·d_out: exactly when the per-sample gradient would be
    larger than the layer's activations a and output gradients s.
    """
    if strategy == "ghost":
        return True
    if strategy == "instantiate":
        return False
    return T * (d_in + d_out) < d_in * d_out


def outer_norm_sq(a: Tensor, s: Tensor, ghost: bool) -> Tensor:
    """‖s_iᵀ a_i‖²_F per sample for a: (b, T, in), s: (b, T, out)."""
    if a.shape[1] == 1:
        return a.square().sum(dim=(1, 2)) * s.square().sum(dim=(1, 2))
    if ghost:
        gram_a = torch.bmm(a, a.transpose(1, 2))
        gram_s = torch.bmm(s, s.transpose(1, 2))
        return (gram_a * gram_s).sum(dim=(1, 2))
    return torch.bmm(s.transpose(1, 2), a).square().sum(dim=(1, 2))


def outer_clipped_sum(a: Tensor, s: Tensor, factors: Tensor) -> Tensor:
    """Σ_i C_i s_iᵀ a_i as one matmul: (C ⊙ s)ᵀ a = sᵀ (C ⊙ a), shape (out, in).

    The factors scale whichever of a and s is smaller (same result, less elementwise work).
    """
    c = factors.to(s.dtype).view(-1, 1, 1)
    if s.shape[-1] <= a.shape[-1]:
        s = s * c
    else:
        a = a * c
    return s.reshape(-1, s.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


def outer_per_sample(a: Tensor, s: Tensor) -> Tensor:
    """Per-sample s_iᵀ a_i, shape (b, out, in)."""
    return torch.bmm(s.transpose(1, 2), a)


def bias_per_sample(s: Tensor) -> Tensor:
    """Per-sample bias gradient Σ_t s_it, shape (b, out), from s: (b, T, out)."""
    return s.sum(dim=1)
