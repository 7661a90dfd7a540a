import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.layers import groupnorm
from tests.layers.oracle import assert_rule_matches_oracle


def _randomise(layer):
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p)
    return layer


def _inputs(batch, channels, spatial, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, dtype=torch.float64) * 2 - 1
    s = torch.randn(batch, channels, *spatial, dtype=torch.float64)
    return (x,), s


# groups = channels needs more than one position: GroupNorm rejects one value per group.
_GROUP_CASES = [
    (groups, spatial)
    for groups in (1, 2, 6)
    for spatial in [(), (1,), (5,), (3, 4), (2, 2, 3)]
    if groups < 6 or spatial not in [(), (1,)]
]


@pytest.mark.parametrize(("groups", "spatial"), _GROUP_CASES)
def test_groupnorm_rule_equals_naive_loop(groups, spatial):
    layer = _randomise(nn.GroupNorm(groups, 6).double())
    assert_rule_matches_oracle(layer, *_inputs(4, 6, spatial))


def test_groupnorm_rule_equals_naive_loop_batch_of_one_without_bias():
    layer = _randomise(nn.GroupNorm(2, 4, eps=0.1, bias=False).double())
    assert_rule_matches_oracle(layer, *_inputs(1, 4, (3,)))


def test_groupnorm_rule_without_affine_has_no_parameters():
    layer = nn.GroupNorm(2, 4, affine=False).double()
    (x,), s = _inputs(2, 4, (3,))
    assert_rule_matches_oracle(layer, (x.requires_grad_(),), s)
    assert groupnorm.RULE.norm_sq(layer, (x,), s, [], "mixed") == {}


_INSTANCE = [(nn.InstanceNorm1d, (7,)), (nn.InstanceNorm2d, (3, 4)), (nn.InstanceNorm3d, (2, 3, 2))]


@pytest.mark.parametrize(("cls", "spatial"), _INSTANCE)
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_instancenorm_rule_equals_naive_loop(cls, spatial, track, training):
    layer = _randomise(cls(3, affine=True, track_running_stats=track).double())
    if track:  # running stats far from the per-sample stats, so eval mode is told apart
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    assert_rule_matches_oracle(layer, *_inputs(4, 3, spatial))


def test_instancenorm_rule_does_not_touch_running_stats():
    layer = _randomise(nn.InstanceNorm2d(3, affine=True, track_running_stats=True).double())
    inputs, s = _inputs(2, 3, (3, 3))
    before = layer.running_mean.clone(), layer.running_var.clone()
    groupnorm.RULE.norm_sq(layer, inputs, s, ["weight", "bias"], "mixed")
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


def test_instancenorm_rule_rejects_unbatched_input():
    layer = nn.InstanceNorm1d(3, affine=True).double()
    (x,), s = _inputs(3, 5, ())  # (C=3, L=5) unbatched, as the module would read it
    with pytest.raises(ValueError, match="InstanceNorm1d rule expects batched input of 3 dims"):
        groupnorm.RULE.norm_sq(layer, (x,), s, ["bias"], "mixed")


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    length=st.integers(1, 5),
)
def test_groupnorm_rule_equals_naive_loop_any_shape(batch, groups, per_group, length):
    assume(per_group * length > 1)  # GroupNorm rejects one value per group in training
    layer = _randomise(nn.GroupNorm(groups, groups * per_group).double())
    assert_rule_matches_oracle(layer, *_inputs(batch, groups * per_group, (length,)))
