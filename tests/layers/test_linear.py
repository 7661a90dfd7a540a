import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.layers.oracle import assert_rule_matches_oracle


def _case(batch: int, lead: tuple[int, ...], d_in: int, d_out: int, bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    x = torch.randn(batch, *lead, d_in, dtype=torch.float64)
    s = torch.randn(batch, *lead, d_out, dtype=torch.float64)
    return layer, (x,), s


@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rule_equals_naive_loop(lead, bias):
    assert_rule_matches_oracle(*_case(5, lead, 6, 4, bias))


def test_linear_rule_frozen_weight_trains_bias_only():
    layer, inputs, s = _case(3, (4,), 5, 2, True)
    layer.weight.requires_grad_(False)
    assert_rule_matches_oracle(layer, inputs, s)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    lead=st.sampled_from([(), (1,), (2,), (6,)]),  # (): the (b, in) path without positions
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
)
def test_linear_rule_equals_naive_loop_any_shape(batch, lead, d_in, d_out):
    assert_rule_matches_oracle(*_case(batch, lead, d_in, d_out, True))
