"""PrivacyLedger: composition, resumption, the budget boundary and malformed states."""

from __future__ import annotations

import json
import math

import pytest

from dpclip.accounting import GaussianStep, PrivacyLedger, get_epsilon
from dpclip.accounting import ledger as ledger_module
from tests.accounting.test_reference_values import exact_gaussian_epsilon, gdp_epsilon_for_mu

PHASES = [(1.2, 0.01, 300), (0.9, 0.02, 200), (1.2, 0.01, 100)]


def ledger_with(phases, accountant="pld") -> PrivacyLedger:
    ledger = PrivacyLedger(accountant)
    for sigma, q, steps in phases:
        ledger.record(sigma, q, steps)
    return ledger


@pytest.mark.parametrize("accountant", ["pld", "rdp", "gdp"])
def test_state_dict_round_trip_through_json_gives_the_same_epsilon(accountant):
    ledger = ledger_with(PHASES, accountant)
    state = json.loads(json.dumps(ledger.state_dict()))
    resumed = PrivacyLedger()  # accountant comes from the state
    resumed.load_state_dict(state)
    assert resumed.accountant == accountant
    assert resumed.events == ledger.events
    assert resumed.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_resumed_ledger_equals_uninterrupted_ledger():
    uninterrupted = ledger_with([(1.1, 0.01, 1)] * 500)
    first = ledger_with([(1.1, 0.01, 1)] * 200)
    resumed = PrivacyLedger()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for _ in range(300):
        resumed.record(1.1, 0.01)
    assert resumed.events == uninterrupted.events
    assert resumed.epsilon(1e-5) == uninterrupted.epsilon(1e-5)


def test_consecutive_identical_steps_are_one_event():
    ledger = ledger_with([(1.0, 0.004, 1)] * 10_000)
    assert ledger.events == (GaussianStep(1.0, 0.004, 10_000),)
    assert ledger.steps == 10_000
    assert ledger.epsilon(1e-5) == get_epsilon(
        noise_multiplier=1.0, sample_rate=0.004, steps=10_000, delta=1e-5
    )


def test_changing_sigma_or_q_starts_a_new_event():
    ledger = ledger_with(PHASES)
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.events] == PHASES
    assert ledger.steps == 600


def test_heterogeneous_full_batch_history_equals_exact_gaussian_composition():
    # With q = 1 each phase is a Gaussian mechanism; composing T_i rounds at σ_i is exactly one
    # Gaussian with σ_eff = (Σ T_i / σ_i²)^(-1/2) (Dong, Roth, Su 2019), whose ε is known exactly.
    phases = [(2.0, 1.0, 10), (3.0, 1.0, 30), (1.5, 1.0, 5)]
    sigma_eff = sum(steps / sigma**2 for sigma, _, steps in phases) ** -0.5
    exact = exact_gaussian_epsilon(sigma_eff, 1e-5)
    assert exact <= ledger_with(phases).epsilon(1e-5) <= exact * (1 + 1e-3)


def test_heterogeneous_subsampled_history_composes_in_any_order():
    forward = ledger_with(PHASES[:2]).epsilon(1e-5)
    backward = ledger_with(PHASES[1::-1]).epsilon(1e-5)
    assert forward == pytest.approx(backward, rel=2e-3)
    # and costs more than either phase alone, less than their sum
    alone = [ledger_with([p]).epsilon(1e-5) for p in PHASES[:2]]
    assert max(alone) < forward < sum(alone)


def test_heterogeneous_history_under_gdp_adds_mu_squared():
    # μ-GDP composes as sqrt(Σ μ_i²) (Dong, Roth, Su 2019, Cor. 3.3).
    phases = [(1.0, 0.01, 400), (2.0, 0.5, 1), (1.0, 0.01, 600)]
    mu = math.sqrt(sum(q**2 * steps * math.expm1(sigma**-2) for sigma, q, steps in phases))
    assert ledger_with(phases, "gdp").epsilon(1e-5) == pytest.approx(
        gdp_epsilon_for_mu(mu, 1e-5), rel=1e-9
    )


def test_epsilon_is_cached_until_the_next_step(monkeypatch):
    ledger = ledger_with(PHASES)
    calls = []
    real = ledger_module.epsilon
    monkeypatch.setattr(ledger_module, "epsilon", lambda *a: calls.append(a) or real(*a))
    first = ledger.epsilon(1e-5)
    assert ledger.epsilon(1e-5) == first and len(calls) == 1
    ledger.record(0.9, 0.02)
    assert ledger.epsilon(1e-5) > first and len(calls) == 2


def test_epsilon_is_zero_before_any_step_and_infinite_after_a_step_without_noise():
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(0.0, 0.01)
    assert ledger.epsilon(1e-5) == math.inf


@pytest.mark.parametrize("accountant", ["pld", "rdp", "gdp"])
@pytest.mark.parametrize("history", [[], [(1.0, 0.02, 50)], [(2.0, 0.05, 100)]])
def test_steps_within_budget_is_the_boundary(accountant, history):
    ledger = ledger_with(history, accountant)
    k = ledger.steps_within_budget(noise_multiplier=1.0, sample_rate=0.02, target_epsilon=2.0,
                                   delta=1e-5)  # fmt: skip
    assert k > 0

    def after(extra: int) -> float:
        probe = PrivacyLedger()
        probe.load_state_dict(ledger.state_dict())
        probe.record(1.0, 0.02, extra)
        return probe.epsilon(1e-5)

    assert after(k) <= 2.0 < after(k + 1)


def test_steps_within_budget_is_zero_when_the_budget_is_spent():
    ledger = ledger_with([(0.7, 0.05, 1000)])
    assert ledger.epsilon(1e-5) > 2.0
    assert ledger.steps_within_budget(noise_multiplier=1.0, sample_rate=0.02, target_epsilon=2.0,
                                      delta=1e-5) == 0  # fmt: skip
    assert PrivacyLedger().steps_within_budget(noise_multiplier=0.0, sample_rate=0.02,
                                               target_epsilon=2.0, delta=1e-5) == 0  # fmt: skip


GOOD = {"version": 1, "accountant": "pld",
        "events": [{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 5}]}  # fmt: skip


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([], "expected a dict with keys"),
        ({**GOOD, "extra": 1}, "expected a dict with keys"),
        ({**GOOD, "version": 2}, "expected version 1, got 2"),
        ({**GOOD, "accountant": "moments"}, "expected accountant in"),
        ({**GOOD, "events": "none"}, "expected 'events' to be a list"),
        ({**GOOD, "events": [[1.0, 0.01, 5]]}, "event 0 should be a dict"),
        ({**GOOD, "events": [{"noise_multiplier": 1.0, "sample_rate": 0.01}]}, "event 0"),
        ({**GOOD, "events": [{"noise_multiplier": -1.0, "sample_rate": 0.01, "steps": 5}]},
         "event 0: expected noise_multiplier >= 0, got -1.0"),
        ({**GOOD, "events": [{"noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 5}]},
         "expected sample_rate in (0, 1], got 2.0"),
        ({**GOOD, "events": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1.5}]},
         "expected steps to be an int"),
    ],
)  # fmt: skip
def test_load_state_dict_rejects_malformed_state_and_keeps_the_ledger(state, message):
    ledger = ledger_with(PHASES)
    before = ledger.events
    with pytest.raises(ValueError, match="malformed ledger state") as info:
        ledger.load_state_dict(state)
    assert message in str(info.value)
    assert ledger.events == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1.0, 0.01, 1), "expected noise_multiplier >= 0, got -1.0"),
        ((1.0, 0.0, 1), "expected sample_rate in (0, 1], got 0.0"),
        ((1.0, 0.5, -2), "expected steps >= 0, got -2"),
    ],
)
def test_record_rejects_bad_steps(args, message):
    ledger = PrivacyLedger()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        ledger.record(*args)
    assert ledger.steps == 0


def test_unknown_accountant_is_rejected():
    with pytest.raises(ValueError, match="expected accountant in \\('pld', 'rdp', 'gdp'\\)"):
        PrivacyLedger("moments")
    with pytest.raises(ValueError, match="got 'x'"):
        ledger_with(PHASES).epsilon(1e-5, accountant="x")
