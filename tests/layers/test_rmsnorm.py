import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.layers import rmsnorm
from tests.layers.oracle import assert_rule_matches_oracle


def _case(batch, lead, shape, seed=0, scale=1.0, **kwargs):
    torch.manual_seed(seed)
    layer = nn.RMSNorm(shape, **kwargs).double()
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(batch, *lead, *shape, dtype=torch.float64) * scale
    s = torch.randn(batch, *lead, *shape, dtype=torch.float64)
    return layer, (x,), s


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3)])
@pytest.mark.parametrize("shape", [(5,), (3, 4)])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rmsnorm_rule_equals_naive_loop(lead, shape, eps):
    assert_rule_matches_oracle(*_case(4, lead, shape, eps=eps))


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rmsnorm_rule_equals_naive_loop_where_eps_dominates(eps):
    # inputs near 1e-9: mean(x²) ~ 1e-18 is far below either eps, so a wrong eps shows.
    assert_rule_matches_oracle(*_case(3, (2,), (4,), scale=1e-9, eps=eps))


def test_rmsnorm_rule_without_affine_has_no_parameters():
    layer, inputs, s = _case(2, (3,), (4,), elementwise_affine=False)
    assert_rule_matches_oracle(layer, (inputs[0].requires_grad_(),), s)
    assert rmsnorm.RULE.norm_sq(layer, inputs, s, [], "mixed") == {}


def test_rmsnorm_default_eps_matches_kernel_for_bfloat16():
    # torch's kernel takes eps from its float32 accumulation type, not from bfloat16.
    layer = nn.RMSNorm(4).to(torch.bfloat16)
    x = torch.full((1, 4), 3e-4, dtype=torch.bfloat16)
    got = rmsnorm.per_sample_grad(layer, (x,), torch.ones_like(x), ["weight"])["weight"]
    torch.testing.assert_close(got, layer(x).float(), rtol=0.02, atol=0)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), T=st.integers(1, 5), d=st.integers(1, 6))
def test_rmsnorm_rule_equals_naive_loop_any_shape(batch, T, d):
    assert_rule_matches_oracle(*_case(batch, (T,), (d,)))


@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_t5_layer_norm_rule_equals_naive_loop(lead):
    """transformers' T5LayerNorm (and its copies, registered by name): x̂ from a float32 mean."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = transformers.models.t5.modeling_t5.T5LayerNorm(5, eps=1e-3).double()
    nn.init.normal_(layer.weight)
    x = torch.randn(4, *lead, 5, dtype=torch.float64)
    assert_rule_matches_oracle(layer, (x,), torch.randn_like(x))


def test_t5_layer_norm_rule_casts_to_a_half_weight_as_the_layer_does():
    transformers = pytest.importorskip("transformers")
    from dpclip.layers import hf_rmsnorm

    torch.manual_seed(0)
    layer = transformers.models.t5.modeling_t5.T5LayerNorm(8).to(torch.bfloat16)
    x, s = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    got = hf_rmsnorm.t5_per_sample_grad(layer, (x,), s, ["weight"])["weight"]
    for i in range(3):  # autograd's, per example, in float32 from the layer's bf16 x̂
        layer.zero_grad()
        layer(x[i : i + 1]).float().backward(s[i : i + 1])
        torch.testing.assert_close(got[i], layer.weight.grad.float(), rtol=1e-2, atol=1e-2)
