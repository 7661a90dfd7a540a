import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.layers import layernorm
from tests.layers.oracle import assert_rule_matches_oracle


def _case(batch, lead, shape, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = nn.LayerNorm(shape, **kwargs).double()
    for p in layer.parameters():  # away from the init values, so x̂ and s both matter
        nn.init.normal_(p)
    x = torch.randn(batch, *lead, *shape, dtype=torch.float64) * 3 + 1
    s = torch.randn(batch, *lead, *shape, dtype=torch.float64)
    return layer, (x,), s


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3)])
@pytest.mark.parametrize("shape", [(5,), (3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_rule_equals_naive_loop(lead, shape, bias):
    assert_rule_matches_oracle(*_case(4, lead, shape, bias=bias))


def test_layernorm_rule_equals_naive_loop_batch_of_one_custom_eps():
    assert_rule_matches_oracle(*_case(1, (3,), (6,), eps=0.5))


def test_layernorm_rule_without_affine_has_no_parameters():
    layer, inputs, s = _case(3, (2,), (4,), elementwise_affine=False)
    assert_rule_matches_oracle(layer, (inputs[0].requires_grad_(),), s)
    assert layernorm.RULE.norm_sq(layer, inputs, s, [], "mixed") == {}


def test_layernorm_rule_computes_in_float32_for_bfloat16():
    layer, (x,), s = _case(3, (4,), (8,))
    want = layernorm.per_sample_grad(layer, (x,), s, ["weight", "bias"])
    low = layer.to(torch.bfloat16)
    got = layernorm.per_sample_grad(low, (x.bfloat16(),), s.bfloat16(), ["weight", "bias"])
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), want[n], rtol=0.05, atol=0.05)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), T=st.integers(1, 5), d=st.integers(1, 6))
def test_layernorm_rule_equals_naive_loop_any_shape(batch, T, d):
    assert_rule_matches_oracle(*_case(batch, (T,), (d,)))
