"""Properties of ε and of noise calibration that hold for every accountant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpclip.accounting import get_epsilon, get_noise_multiplier

ACCOUNTANTS = ["pld", "rdp", "gdp"]
FAST = settings(max_examples=8, deadline=None, derandomize=True)

sigmas = st.floats(0.5, 8.0)
rates = st.floats(1e-3, 1.0)
step_counts = st.integers(1, 2000)
# Relative gaps well above the PLD discretization error (≤ 0.1 %), so the property is about the
# mathematics, not about rounding of the grid.
gaps = st.floats(0.05, 1.0)


def eps(accountant: str, sigma: float, q: float, steps: int) -> float:
    return get_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5,
                       accountant=accountant)  # fmt: skip


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@FAST
@given(sigma=sigmas, q=rates, steps=step_counts, gap=gaps)
def test_epsilon_decreases_as_noise_grows(accountant, sigma, q, steps, gap):
    assert eps(accountant, sigma * (1 + gap), q, steps) <= eps(accountant, sigma, q, steps)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@FAST
@given(sigma=sigmas, q=st.floats(1e-3, 0.5), steps=step_counts, gap=gaps)
def test_epsilon_increases_with_sample_rate(accountant, sigma, q, steps, gap):
    assert eps(accountant, sigma, min(1.0, q * (1 + gap)), steps) >= eps(
        accountant, sigma, q, steps
    )


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@FAST
@given(sigma=sigmas, q=rates, steps=step_counts, extra=st.integers(1, 2000))
def test_epsilon_increases_with_steps(accountant, sigma, q, steps, extra):
    assert eps(accountant, sigma, q, steps + extra) >= eps(accountant, sigma, q, steps)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(target=st.floats(0.2, 10.0), q=st.floats(1e-3, 0.1), steps=st.integers(10, 5000))
def test_calibrated_noise_spends_between_99_and_100_percent_of_target(accountant, target, q, steps):
    sigma = get_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                                 accountant=accountant)  # fmt: skip
    assert 0.99 * target <= eps(accountant, sigma, q, steps) <= target


def test_calibration_for_10000_steps_with_pld_needs_a_handful_of_accountant_calls(monkeypatch):
    """The search's cost, counted instead of timed: each PLD call is one composition over a
    grid bounded by pld_discretization, and the search makes a few (ε nearly a power law)."""
    from dpclip.accounting import accountants

    calls, pld = [], accountants._REGISTRY["pld"]
    # a new function: the cache of ε (keyed by it) cannot answer for it
    monkeypatch.setitem(accountants._REGISTRY, "pld", lambda h, d: (calls.append(h), pld(h, d))[1])
    sigma = get_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=256 / 60000,
                                 steps=10_000)  # fmt: skip
    assert 1 <= len(calls) <= 6
    assert 0.99 * 3.0 <= eps("pld", sigma, 256 / 60000, 10_000) <= 3.0
