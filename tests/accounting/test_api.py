"""The module-level API: input checks, edge cases, default δ, and no torch import."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpclip import accounting
from dpclip.accounting import default_delta, get_epsilon, get_noise_multiplier

GOOD = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5}


def test_importing_accounting_does_not_import_torch():
    code = "import sys, dpclip.accounting; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names():
    assert set(accounting.__all__) >= {"get_epsilon", "get_noise_multiplier", "default_delta",
                                       "PrivacyLedger", "PrivacyBudgetExceeded", "GaussianStep"}  # fmt: skip
    assert issubclass(accounting.PrivacyBudgetExceeded, RuntimeError)
    assert accounting.ACCOUNTANTS == ("pld", "rdp", "gdp")


@pytest.mark.parametrize("accountant", ["pld", "rdp", "gdp"])
def test_no_noise_means_infinite_epsilon_and_no_steps_mean_zero(accountant):
    assert get_epsilon(**{**GOOD, "noise_multiplier": 0.0}, accountant=accountant) == math.inf
    assert get_epsilon(**{**GOOD, "steps": 0}, accountant=accountant) == 0.0


@pytest.mark.parametrize("accountant", ["pld", "rdp", "gdp"])
def test_noise_too_small_to_account_for_is_refused_or_infinite_never_zero(accountant):
    """dp_accounting's RDP overflowed to ε = 0 from σ ≈ 1e-152 on: such σ is refused. The PLD's
    grid would need intervals it cannot compute below σ ≈ 2e-4: ∞, a valid bound, there."""
    with pytest.raises(ValueError, match="expected noise_multiplier = 0 or >= 1e-100, got 1e-153"):
        get_epsilon(**{**GOOD, "noise_multiplier": 1e-153}, accountant=accountant)
    tiny = get_epsilon(**{**GOOD, "noise_multiplier": 1e-4}, accountant=accountant)
    assert tiny == math.inf if accountant != "rdp" else 1e8 < tiny < math.inf
    if accountant == "pld":  # the smallest σ it computes: one step's loss spans 10⁶
        assert 1e6 < get_epsilon(**{**GOOD, "noise_multiplier": 1e-3}) < math.inf


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"noise_multiplier": -1.0}, "expected noise_multiplier >= 0, got -1.0"),
        ({"noise_multiplier": math.nan}, "expected noise_multiplier >= 0, got nan"),
        ({"noise_multiplier": "1"}, "expected noise_multiplier to be a real number, got '1'"),
        ({"sample_rate": 0.0}, "expected sample_rate in (0, 1], got 0.0"),
        ({"sample_rate": 1.5}, "expected sample_rate in (0, 1], got 1.5"),
        ({"steps": -1}, "expected steps >= 0, got -1"),
        ({"steps": 10.0}, "expected steps to be an int >= 0, got 10.0"),
        ({"steps": True}, "expected steps to be an int >= 0, got True"),
        ({"delta": 0.0}, "expected delta in (0, 1), got 0.0"),
        ({"delta": 1.0}, "expected delta in (0, 1), got 1.0"),
        ({"accountant": "moments"}, "expected accountant in ('pld', 'rdp', 'gdp'), got 'moments'"),
    ],
)
def test_get_epsilon_rejects_bad_inputs_with_a_clear_message(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_epsilon(**{**GOOD, **override})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"target_epsilon": 0.0}, "expected target_epsilon > 0 and finite, got 0.0"),
        ({"target_epsilon": math.inf}, "expected target_epsilon > 0 and finite, got inf"),
        ({"steps": 0}, "expected steps >= 1, got 0"),
        ({"sample_rate": -0.1}, "expected sample_rate in (0, 1], got -0.1"),
        ({"delta": 2.0}, "expected delta in (0, 1), got 2.0"),
        ({"accountant": "PLD"}, "got 'PLD'"),
    ],
)
def test_get_noise_multiplier_rejects_bad_inputs_with_a_clear_message(override, message):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100}
    with pytest.raises(ValueError, match=re.escape(message)):
        get_noise_multiplier(**{**args, **override})


def test_keyword_only():
    with pytest.raises(TypeError):
        get_epsilon(1.0, 0.01, 100, 1e-5)  # type: ignore[misc]


@pytest.mark.parametrize(("n", "expected"), [(1, 0.1), (9, 0.01), (10, 0.01), (11, 1e-3),
                                             (10_000, 1e-5), (60_000, 1e-6), (50_000, 1e-6)])  # fmt: skip
def test_default_delta_values(n, expected):
    assert default_delta(n) == expected


@given(st.integers(1, 10**12))
def test_default_delta_is_a_power_of_ten_at_most_a_tenth_of_one_over_n(n):
    delta = default_delta(n)
    assert delta * n <= 0.1 * (1 + 1e-12) < 1
    assert delta * n > 0.01 * (1 - 1e-12)  # the largest such power of ten
    assert math.log10(delta) == round(math.log10(delta))


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_default_delta_rejects_bad_sample_size(n):
    with pytest.raises(ValueError, match="sample_size"):
        default_delta(n)
