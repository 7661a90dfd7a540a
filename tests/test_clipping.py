"""Clipping functions: the guarantee ‖C_i g_i‖ ≤ R for every function and norm, the table's
edge cases, and the factors of each function against its definition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpclip.clipping import CLIPPING_FUNCTIONS, clip_factors
from tests.oracle import CLIPPING

NAMES = sorted(CLIPPING_FUNCTIONS)
norms = st.one_of(
    st.just(0.0), st.floats(min_value=1e-300, max_value=1e300, allow_nan=False), st.just(1e-320)
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    norm=norms,
    radius=st.floats(min_value=1e-6, max_value=1e6),
    gamma=st.floats(min_value=1e-6, max_value=10.0),
)
def test_clipped_norm_is_at_most_r_for_every_function(name, norm, radius, gamma):
    n = torch.tensor([norm], dtype=torch.float64)
    factor = clip_factors(name, n, clip_norm=radius, gamma=gamma)
    assert torch.isfinite(factor).all() and (factor >= 0).all()
    assert float(factor * n) <= radius * (1 + 1e-12)


@pytest.mark.parametrize(
    "name, at_zero",
    [
        ("automatic", 1.0 / 0.5),
        ("automatic-v", 0.0),
        ("abadi", 1.0),
        ("global", 1.0),
        ("psac", 1.0),
    ],
)
def test_factor_at_norm_zero_is_the_table_value(name, at_zero):
    factor = clip_factors(name, torch.zeros(1, dtype=torch.float64), clip_norm=1.0, gamma=0.5)
    assert math.isclose(float(factor), at_zero)


def test_automatic_v_at_norm_zero_is_finite_and_clips_a_zero_gradient_to_zero():
    factor = clip_factors(
        "automatic-v", torch.zeros(1, dtype=torch.float64), clip_norm=1.0, gamma=0.0
    )
    assert torch.isfinite(factor).all() and float(factor * 0.0) == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", [1e-3, 0.5, 1.0, 2.0, 1e3])
def test_factors_equal_the_definitions(name, norm):
    n = torch.tensor(norm, dtype=torch.float64)
    got = clip_factors(name, n.reshape(1), clip_norm=1.0, gamma=0.01)
    torch.testing.assert_close(got.reshape(()), CLIPPING[name](n, 1.0, 0.01), rtol=1e-12, atol=0)


def test_an_unknown_clipping_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown clipping 'flat'; expected one of \['abadi'"):
        clip_factors("flat", torch.ones(1), clip_norm=1.0, gamma=0.01)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [0.25, 1.0, 64.0])
def test_a_scale_gives_the_scaled_factors_of_the_scaled_norms(name, scale):
    """The engine's mean-loss case: scale · C(scale · norm), against the oracle's definition
    (the scale folded into the formula must not change it)."""
    n = torch.tensor([1e-4, 0.01, 0.3, 1.0, 7.0], dtype=torch.float64)
    got = clip_factors(name, n, clip_norm=0.7, gamma=0.01, scale=scale)
    want = torch.stack([scale * CLIPPING[name](scale * v, 0.7, 0.01) for v in n])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the clipped example: C'·‖g/b‖ = C(‖g‖)·‖g‖ ≤ R, with b = scale
    assert bool((got * n <= 0.7 * (1 + 1e-12)).all())
