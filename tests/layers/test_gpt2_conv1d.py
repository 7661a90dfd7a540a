import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.layers.oracle import REGISTRY, assert_rule_matches_oracle

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")


def _case(batch, lead, nx, nf, seed=0):
    torch.manual_seed(seed)
    layer = pytorch_utils.Conv1D(nf, nx).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(batch, *lead, nx, dtype=torch.float64)
    s = torch.randn(batch, *lead, nf, dtype=torch.float64)
    return layer, (x,), s


@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 4)])
def test_conv1d_rule_equals_naive_loop(lead):
    assert_rule_matches_oracle(*_case(5, lead, 6, 4))


def test_conv1d_rule_equals_naive_loop_gpt2_attention_shape():
    # GPT-2's c_attn maps n_embd to 3·n_embd; a tiny n_embd = 8, batch 1, 5 tokens.
    assert_rule_matches_oracle(*_case(1, (5,), 8, 24))


def test_conv1d_rule_frozen_weight_trains_bias_only():
    layer, inputs, s = _case(3, (4,), 5, 2)
    layer.weight.requires_grad_(False)
    assert_rule_matches_oracle(layer, inputs, s)


def test_conv1d_is_registered_when_transformers_is_installed():
    assert pytorch_utils.Conv1D in REGISTRY


def test_registering_conv1d_does_not_import_transformers():
    code = (
        "import sys; from dpclip.layers import default_registry; default_registry(); "
        "assert not any(m.startswith('transformers') for m in sys.modules), 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    lead=st.sampled_from([(), (1,), (2,), (6,)]),  # (): the (b, in) path without positions
    nx=st.integers(1, 5),
    nf=st.integers(1, 5),
)
def test_conv1d_rule_equals_naive_loop_any_shape(batch, lead, nx, nf):
    assert_rule_matches_oracle(*_case(batch, lead, nx, nf))
