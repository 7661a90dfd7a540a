"""Privacy auditing with one run: the bound's statistics against an independent oracle, audits of
correct, noiseless and deliberately broken runs, and ``dpclip audit``'s interface."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's `benchmarks`

from benchmarks.audits import fault

import dpclip  # noqa: E402
from dpclip.auditing import AuditError, audit, audit_scores, epsilon_lower_bound, p_value
from dpclip.cli import main
from dpclip.datasets import load_dataset
from dpclip.models import mlp

pytest.importorskip("sklearn")  # digits


def _oracle_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's right-hand side term by term, with exact binomial coefficients."""
    p = math.exp(eps) / (1 + math.exp(eps))

    def pmf(k: int) -> float:
        return math.comb(r, k) * p**k * (1 - p) ** (r - k)

    tail = sum(pmf(k) for k in range(v, r + 1))
    window = max((sum(pmf(k) for k in range(v - i, v)) / i for i in range(1, v + 1)), default=0)
    return min(1.0, tail + 2 * m * delta * window)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [(100, 40, 30, 1.0, 0.0), (100, 40, 30, 1.0, 1e-3), (50, 20, 20, 2.5, 1e-5),
     (200, 60, 35, 0.1, 1e-4), (30, 10, 0, 1.0, 1e-5), (1000, 30, 29, 4.0, 1e-5)],
)  # fmt: skip
def test_p_value_is_the_theorems_bound(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_oracle_p_value(m, r, v, eps, delta))


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_correct_without_delta_gives_the_closed_form(r):
    p = 0.05 ** (1 / r)  # P[Bin(r, p) = r] = p^r = 0.05 at the bound
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), rel=1e-9)


def test_the_bound_is_where_the_p_value_crosses_the_confidence_level():
    eps = epsilon_lower_bound(500, 100, 80, 1e-5)
    assert eps > 0
    assert p_value(500, 100, 80, eps, 1e-5) <= 0.05 < p_value(500, 100, 80, eps + 1e-6, 1e-5)
    assert epsilon_lower_bound(500, 100, 50, 1e-5) == 0.0  # a coin's guesses show nothing
    assert epsilon_lower_bound(500, 100, 80, 1e-3) < eps  # δ can only weaken the bound


def test_guesses_from_scores_take_the_best_count_at_a_split_confidence():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    perfect = audit_scores(included + 0.001 * rng.random(400), included, 1e-5)
    assert perfect.correct == perfect.guesses and perfect.epsilon_lower_bound > 2
    k = perfect.guesses  # the bound at a confidence shared by the 6 counts tried
    assert perfect.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(400, k, k, 1e-5, 1 - 0.05 / 6)
    )
    noise = audit_scores(rng.normal(size=400), included, 1e-5)
    assert noise.epsilon_lower_bound == 0.0


@pytest.mark.parametrize(
    "scores, included, message",
    [([0.0, 1.0], [True], "one score and one inclusion flag per canary"),
     ([0.0, math.nan], [True, False], "not finite; the training diverged")],
)  # fmt: skip
def test_bad_scores_are_refused(scores, included, message):
    with pytest.raises(ValueError, match=message):
        audit_scores(scores, included, 1e-5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")[0]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp((1, 8, 8), 10)  # dpclip train's and dpclip audit's default model


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def test_a_correct_run_stays_below_its_ledger(digits):
    result = audit(_mlp(1), digits, target_epsilon=3.0, seed=1)
    assert result.canaries == "dirac" and result.num_canaries == 1000
    assert 2.9 <= result.epsilon <= 3.0 and result.delta == 1e-5
    assert result.epsilon_lower_bound <= result.epsilon
    assert 400 < result.included < 600 and result.correct <= result.guesses


def test_a_run_without_noise_is_detected_by_dirac_canaries(digits):
    result = audit(_mlp(), digits, noise_multiplier=0.0)
    assert result.epsilon == math.inf and result.epsilon_lower_bound >= 2
    assert result.correct == result.guesses and result.verdict == "leak"
    assert "leak detected" in result.summary()


@pytest.mark.parametrize("clipping", ["global", "abadi"])
def test_canaries_reach_the_threshold_of_every_clipping_function(digits, clipping):
    # global clipping drops an example above R: a canary just under R is kept whole. An
    # included canary that no step samples scores 0, as one left out does: 6 epochs make that
    # rare (e^-6 per canary at one expected draw per epoch), so every guess is right
    result = audit(_mlp(), digits, noise_multiplier=0.0, epochs=6, num_canaries=100,
                   clipping=clipping, clip_norm=500.0)  # fmt: skip
    assert result.correct == result.guesses and result.epsilon_lower_bound >= 2


def test_a_ledger_above_what_the_canaries_can_show_is_inconclusive_not_consistent(digits):
    with fault("no clipping"):
        result = audit(_mlp(), digits, target_epsilon=8.0)  # broken, but ε = 8 is out of reach
    assert result.epsilon_lower_bound < result.epsilon and result.ceiling < result.epsilon
    assert result.verdict == "inconclusive" and "inconclusive" in result.summary()
    assert result.to_dict()["verdict"] == "inconclusive"


def test_input_canaries_detect_a_run_without_noise_and_not_a_private_one(digits):
    kw = dict(canaries="input", num_canaries=200, epochs=100, optimizer=_adam)
    leaky = audit(_mlp(), digits, noise_multiplier=0.0, **kw)
    assert leaky.epsilon_lower_bound >= 2
    private = audit(_mlp(), digits, target_epsilon=3.0, **kw)
    assert private.epsilon_lower_bound <= private.epsilon


@pytest.mark.parametrize("broken", ["no clipping", "noise / 10"])
def test_a_broken_mechanism_is_detected(digits, broken):
    with fault(broken):  # the faults benchmarks.audits reports, injected for this run only
        result = audit(_mlp(), digits, target_epsilon=3.0)
    assert result.epsilon_lower_bound > result.epsilon  # the ledger's ε is false
    assert result.verdict == "leak"


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_canaries=9, target_epsilon=3.0), "need between 10 and 100000 canaries, got 9"),
     (dict(canaries="input", num_canaries=800, target_epsilon=3.0), "need at least 1600 examples"),
     (dict(canaries="pixel", target_epsilon=3.0), "canaries must be one of"),
     (dict(), "exactly one of target_epsilon and noise_multiplier"),
      (dict(target_epsilon=3.0, target_delta=0.5), "cannot plan this run: target_delta=0.5"),
     (dict(target_epsilon=3.0, confidence=1.5), r"confidence must be in \[0.5, 1\), got 1.5"),
     (dict(target_epsilon=3.0, confidence=math.nan), "confidence must be in"),
     (dict(target_epsilon=3.0, confidence=0.0), "confidence must be in"),
     (dict(noise_multiplier=1e-300), "cannot plan this run"),
     (dict(noise_multiplier=1e5), r"noise_multiplier must be in \[0, 10000\], got 100000.0"),
     (dict(noise_multiplier=math.nan), "noise_multiplier must be in"),
     (dict(num_canaries=100.0, target_epsilon=3.0), "num_canaries must be an integer"),
     (dict(num_canaries=10**6, target_epsilon=3.0), "need between 10 and 100000 canaries"),
     (dict(target_epsilon=3.0, seed=-1), "seed must be an integer"),
     (dict(target_epsilon=3.0, clipping_style="layer-wise"), "pass clipping_style='all-layer'"),
     (dict(target_epsilon=3.0, canaries="input", num_canaries=100, num_classes=5),
      "num_classes=5 but the labels run from 0 to 9"),
     (dict(target_epsilon=3.0, optimizer=lambda ps: torch.optim.SGD(_mlp().parameters(), lr=1)),
      "must be built over the parameters optimizer\\(params\\) is given")],
)  # fmt: skip
def test_an_audit_that_cannot_run_is_refused_before_training(digits, kwargs, message):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(AuditError, match=message):
        audit(model, digits, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.requires_grad for p in model.parameters())  # no engine left attached


def test_a_run_that_fails_midway_leaves_the_model_detached_and_trainable(digits):
    model = _mlp()
    with pytest.raises(dpclip.NonFiniteNormError):
        audit(model, digits, target_epsilon=3.0, epochs=1, lr=math.nan)  # NaN after one step
    assert all(p.requires_grad for p in model.parameters()) and model.training
    x, y = digits.tensors
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()  # plain training works again
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "labels, message",
    [(lambda y: y.double(), "needs one integer class index per example"),
     (lambda y: nn.functional.one_hot(y, 10), "labels of shape (1437, 10)")],
)  # fmt: skip
def test_labels_the_default_loss_cannot_use_are_refused(digits, labels, message):
    x, y = digits.tensors
    pairs = [(x[i], labels(y)[i]) for i in range(len(y))]  # not truncated or reshaped silently
    with pytest.raises(AuditError, match=re.escape(message)):
        audit(_mlp(), pairs, target_epsilon=3.0)


def test_the_users_own_data_set_and_loss(digits):
    x, y = digits.tensors
    pairs = [(x[i], int(y[i])) for i in range(600)]  # any map-style data set of pairs
    result = audit(_mlp(), pairs, num_canaries=50, noise_multiplier=1.0, epochs=5,
                   loss_fn=lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"))  # fmt: skip
    assert result.steps > 0 and math.isfinite(result.epsilon)
    assert result.epsilon_lower_bound <= result.epsilon
    assert isinstance(dpclip.audit, type(audit)) and dpclip.AuditResult is type(result)
    with pytest.raises(AuditError, match=r"yield \(input, label\) pairs"):
        audit(_mlp(), TensorDataset(x[:20]), num_canaries=10, noise_multiplier=1.0)


def test_cli_json_reports_the_ledger_and_the_bound(capsys):
    small = ["--epochs", "5", "--num-canaries", "200", "--no-progress"]  # defaults: tests above
    assert main(["audit", "--epsilon", "3", "--json", *small]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 2.9 <= out["epsilon"] <= 3.0 and 0 <= out["epsilon_lower_bound"] <= out["epsilon"]
    assert out["canaries"] == "dirac" and out["dataset"] == "digits"
    assert main(["audit", "--noise-multiplier", "0", "--json", *small]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] is None and out["epsilon_lower_bound"] >= 2  # no noise: detected


def test_cli_summary_is_one_readable_line(capsys):
    assert main(["audit", "--noise-multiplier", "0", "--epochs", "3", "--num-canaries", "100",
                 "--no-progress"]) == 0  # fmt: skip
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("dirac canaries: ") and "ε ≥ " in line and "∞ (no noise)" in line


@pytest.mark.parametrize(
    "argv, fragment",
    [(["--num-canaries", "5"], "need between 10 and 100000 canaries, got 5"),
     (["--epsilon", "0"], "--epsilon must be > 0, got 0.0"),
     (["--epsilon", "nan"], "--epsilon must be > 0, got nan"),
     (["--noise-multiplier", "-1"], "--noise-multiplier must be >= 0, got -1.0"),
     (["--delta", "0.5"], "cannot plan this run: target_delta=0.5"),
     (["--canaries", "input", "--num-canaries", "1000"], "need at least 2000 examples"),
     (["--epochs", "-2"], "--epochs must be > 0"),
     (["--confidence", "1"], "--confidence must be in [0.5, 1)"),
     (["--epochs", "1e9"], "epochs must be in (0, 10000], got 1000000000.0"),
     (["--seed", "100000000000000000000000"], "seed must be an integer in [0, 2**63)"),
     (["--epsilon", "3", "--noise-multiplier", "1"], "not allowed with argument")],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    try:
        code = main(["audit", "--no-progress", *argv])
    except SystemExit as exit_:  # argparse's own errors exit from the parser
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
