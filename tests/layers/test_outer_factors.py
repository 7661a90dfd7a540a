"""Outer-product factors: Σ_t rows_t ⊗ cols_t is the per-sample gradient, and outer_inner is the
per-sample inner product of two such gradients, for every side kind (dense, ids)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpclip.layers import default_registry
from dpclip.layers._common import OuterFactors, outer_inner

B, T = 3, 5


def _matrix(f: OuterFactors, rows: int) -> torch.Tensor:
    """(b, rows, cols) from the factors, one-hot expanding an ids side."""
    r, c = f.rows, f.cols
    if c is None:  # a side of ones (a bias)
        c = torch.ones(*r.shape[:2], 1, dtype=r.dtype)
    if not r.is_floating_point():
        r = nn.functional.one_hot(r, rows).to(c.dtype)
    return torch.einsum("btr,btc->brc", r, c)


def _layer_case(module: nn.Module, x: torch.Tensor, out_dim: int):
    rule = default_registry().rule_for(module)
    s = torch.randn(B, T, out_dim, dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    return (
        rule,
        rule.outer_factors(module, (x,), s, names),
        rule.per_sample_grad(module, (x,), s, names),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: (nn.Linear(4, 6).double(), torch.randn(B, T, 4, dtype=torch.float64), 6),
        lambda: (nn.Embedding(7, 4, padding_idx=1).double(), torch.randint(0, 7, (B, T)), 4),
    ],
)
def test_factors_sum_to_the_per_sample_gradient(make):
    module, x, out_dim = make()
    _, factors, per_sample = _layer_case(module, x, out_dim)
    for name, f in factors.items():
        param = getattr(module, name)
        want = per_sample[name].reshape(B, param.shape[0], -1)
        torch.testing.assert_close(_matrix(f, param.shape[0]), want)


def _dense(n: int, t: int = T) -> torch.Tensor:
    return torch.randn(B, t, n, dtype=torch.float64)


def _ids(vocab: int, t: int = T) -> torch.Tensor:
    return torch.randint(0, vocab, (B, t))


@pytest.mark.parametrize(
    "f, g",
    [
        (OuterFactors(_dense(6), _dense(4)), OuterFactors(_dense(6, 2), _dense(4, 2))),
        (OuterFactors(_ids(6), _dense(4)), OuterFactors(_dense(6, 3), _dense(4, 3))),
        (OuterFactors(_dense(6), _dense(4)), OuterFactors(_ids(6, 7), _dense(4, 7))),
        (OuterFactors(_ids(6), _dense(4)), OuterFactors(_ids(6, 4), _dense(4, 4))),
        (OuterFactors(_dense(6), None), OuterFactors(_dense(6, 2), None)),  # two biases
        (OuterFactors(_dense(6), None), OuterFactors(_dense(6, 3), _dense(1, 3))),
    ],
)
def test_outer_inner_is_the_per_sample_frobenius_inner_product(f, g):
    want = (_matrix(f, 6) * _matrix(g, 6)).sum(dim=(1, 2))
    torch.testing.assert_close(outer_inner(f, g), want)
    torch.testing.assert_close(outer_inner(g, f), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clipped_sum_scales_into_scratch_and_returns_nothing_aliasing_it(dtype):
    """Σ_i C_i s_iᵀ a_i, scaling whichever side is smaller into a kept scratch buffer: the
    first result stays right after a second call reuses that buffer (float64 factors)."""
    from dpclip.layers._common import outer_clipped_sum

    gen = torch.Generator().manual_seed(0)
    c = torch.rand(B, dtype=torch.float64, generator=gen)
    cases = [  # (a, s): the smaller side is s, then a
        (torch.randn(B, T, 7, generator=gen), torch.randn(B, T, 4, generator=gen)),
        (torch.randn(B, T, 2, generator=gen), torch.randn(B, T, 6, generator=gen)),
    ]
    cases = [(a.to(dtype), s.to(dtype)) for a, s in cases]
    with torch.no_grad():  # as in the backward, where the scratch is used
        got = [outer_clipped_sum(a, s, c) for a, s in cases]
    for (a, s), g in zip(cases, got, strict=True):
        want = torch.einsum("b,bto,bti->oi", c, s.double(), a.double())
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)
