import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.layers import embedding
from tests.layers.oracle import REGISTRY, assert_rule_matches_oracle


def _case(batch, lead, vocab, dim, padding_idx=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = nn.Embedding(vocab, dim, padding_idx=padding_idx, **kwargs).double()
    ids = torch.randint(0, vocab, (batch, *lead))
    s = torch.randn(batch, *lead, dim, dtype=torch.float64)
    return layer, (ids,), s


@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 4), (embedding.PAIRWISE_MAX_T + 5,)])
@pytest.mark.parametrize("padding_idx", [None, 0, -2])
def test_embedding_rule_equals_naive_loop(lead, padding_idx):
    # vocab 5 < T: every longer sample repeats ids, and hits the padding id.
    assert_rule_matches_oracle(*_case(4, lead, 5, 3, padding_idx))


def test_embedding_rule_equals_naive_loop_batch_of_one():
    assert_rule_matches_oracle(*_case(1, (6,), 4, 3, padding_idx=1))


def test_embedding_rule_all_padding_sample_has_zero_gradient():
    layer, (ids,), s = _case(3, (6,), 5, 3, padding_idx=2)
    ids[1] = 2
    assert_rule_matches_oracle(layer, (ids,), s)
    for strategy in ("ghost", "instantiate", "mixed"):
        norms = REGISTRY.rule_for(layer).norm_sq(layer, (ids,), s, ["weight"], strategy)
        assert norms["weight"][1] == 0


def test_embedding_rule_padding_row_never_receives_gradient():
    layer, (ids,), s = _case(4, (9,), 5, 3, padding_idx=3)
    assert (ids == 3).any()
    got = embedding.RULE.clipped_grad(layer, (ids,), s, {"weight": torch.ones(4, dtype=s.dtype)})
    assert torch.equal(got["weight"][3], torch.zeros(3, dtype=s.dtype))
    assert got["weight"].abs().sum() > 0


def test_embedding_rule_equals_naive_loop_with_scale_grad_by_freq():
    assert_rule_matches_oracle(*_case(3, (8,), 4, 2, padding_idx=0, scale_grad_by_freq=True))


def test_embedding_rule_accepts_int32_ids():
    layer, (ids,), s = _case(3, (5,), 4, 2)
    assert_rule_matches_oracle(layer, (ids.int(),), s)


def test_embedding_rule_frozen_weight_returns_nothing():
    layer, inputs, s = _case(2, (3,), 4, 2)
    assert embedding.norm_sq(layer, inputs, s, [], "mixed") == {}
    assert embedding.RULE.clipped_grad(layer, inputs, s, {}) == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_norm": 1.0}, "max_norm=1.0"), ({"sparse": True}, "sparse=True")],
)
def test_embedding_rule_rejects_max_norm_and_sparse(kwargs, message):
    layer, inputs, s = _case(2, (3,), 4, 2, **kwargs)
    factors = {"weight": torch.ones(2, dtype=s.dtype)}
    with pytest.raises(ValueError, match=message):
        embedding.norm_sq(layer, inputs, s, ["weight"], "mixed")
    with pytest.raises(ValueError, match=message):
        embedding.RULE.clipped_grad(layer, inputs, s, factors)
    with pytest.raises(ValueError, match=message):
        embedding.RULE.per_sample_grad(layer, inputs, s, ["weight"])


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    T=st.integers(1, 24),
    vocab=st.integers(1, 6),
    dim=st.integers(1, 4),
    pad=st.booleans(),
    freq=st.booleans(),
)
def test_embedding_rule_equals_naive_loop_any_shape(batch, T, vocab, dim, pad, freq):
    padding_idx = 0 if pad else None
    case = _case(batch, (T,), vocab, dim, padding_idx, scale_grad_by_freq=freq)
    assert_rule_matches_oracle(*case)
