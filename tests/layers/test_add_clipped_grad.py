"""add_clipped_grad (the in-place form used for the later uses of a tied weight) adds exactly
what clipped_grad returns, for every rule that has it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dpclip.layers import default_registry

B, T = 3, 5


def _cases():
    return [
        (nn.Linear(4, 6).double(), torch.randn(B, T, 4, dtype=torch.float64), (B, T, 6)),
        (nn.Linear(4, 6).double(), torch.randn(B, 4, dtype=torch.float64), (B, 6)),
        (Conv1D(6, 4).double(), torch.randn(B, T, 4, dtype=torch.float64), (B, T, 6)),
        (nn.Embedding(7, 4, padding_idx=1).double(), torch.randint(0, 7, (B, T)), (B, T, 4)),
        (
            nn.Embedding(7, 4, scale_grad_by_freq=True).double(),
            torch.randint(0, 3, (B, T)),
            (B, T, 4),
        ),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_add_clipped_grad_adds_clipped_grad_in_place(case):
    module, x, out_shape = _cases()[case]
    rule = default_registry().rule_for(module)
    assert rule.add_clipped_grad is not None
    s = torch.randn(*out_shape, dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    factors = {n: torch.rand(B, dtype=torch.float64) for n in names}
    want = rule.clipped_grad(module, (x,), s, factors)
    start = {n: torch.randn_like(p) for n, p in module.named_parameters()}
    into = {n: t.clone() for n, t in start.items()}
    targets = {n: t.data_ptr() for n, t in into.items()}
    rule.add_clipped_grad(module, (x,), s, factors, into)
    for n in names:
        assert into[n].data_ptr() == targets[n]  # in place, not rebound
        torch.testing.assert_close(into[n], start[n] + want[n].reshape(start[n].shape))
