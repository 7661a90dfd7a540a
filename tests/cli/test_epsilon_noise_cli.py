"""``dpclip epsilon`` and ``dpclip noise``: the real entry point, output shapes and user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpclip.accounting import get_epsilon, steps_for_epochs
from dpclip.cli import main


def dpclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpclip.cli", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_epsilon_json_reports_every_accountant(capsys):
    assert main(["epsilon", "--sigma", "1.1", "--sample-rate", "0.004", "--steps", "10000",
                 "--delta", "1e-5", "--accountant", "all", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 10000 and report["delta"] == 1e-5
    for name in ("pld", "rdp", "gdp"):
        assert report["epsilon"][name] == get_epsilon(noise_multiplier=1.1, sample_rate=0.004,
                                                      steps=10000, delta=1e-5, accountant=name)  # fmt: skip


def test_noise_from_epochs_meets_the_target(capsys):
    assert main(["noise", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.004",
                 "--epochs", "40", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 10000  # ceil(40 / 0.004), without float noise
    sigma = report["noise_multiplier"]["pld"]
    spent = get_epsilon(noise_multiplier=sigma, sample_rate=0.004, steps=10000, delta=1e-5)
    assert spent == report["epsilon"]["pld"]
    assert 0.99 * 3 <= spent <= 3


def test_bad_value_is_one_line_exit_2_without_traceback_through_the_entry_point():
    out = dpclip("epsilon", "--sigma", "1", "--sample-rate", "1.5", "--steps", "10",
                 "--delta", "1e-5")  # fmt: skip
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == "dpclip epsilon: error: expected --sample-rate in (0, 1], got 1.5\n"


def test_plain_text_is_for_people(capsys):
    assert main(["epsilon", "--sigma", "4", "--sample-rate", "0.01", "--steps", "10000",
                 "--delta", "1e-5", "--accountant", "rdp"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "σ = 4, q = 0.01, 10000 steps, δ = 1e-05"
    assert lines[1] == "ε = 1.035  (rdp)"


def test_noise_plain_text_names_gdp_an_approximation(capsys):
    assert main(["noise", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01",
                 "--steps", "1000", "--accountant", "gdp"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "1000 steps" in out and "(gdp, CLT approximation, not a bound)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["epsilon", "--sigma", "0", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
         "expected --sigma > 0 and finite, got 0.0"),
        (["epsilon", "--sigma", "-2", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
         "expected --sigma > 0 and finite, got -2.0"),
        (["epsilon", "--sigma", "1e-300", "--sample-rate", "0.1", "--steps", "10", "--delta",
          "1e-5"], "--sigma 1e-300 is below 1e-100, where the accountants overflow and the noise "
                   "protects nothing; use a larger --sigma"),
        (["epsilon", "--sigma", "1", "--sample-rate", "0", "--steps", "10", "--delta", "1e-5"],
         "expected --sample-rate in (0, 1], got 0.0"),
        (["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "0", "--delta", "1e-5"],
         "expected --steps >= 1, got 0"),
        (["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"],
         "expected --delta in (0, 1), got 1.0"),
        (["noise", "--epsilon", "0", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "10"],
         "expected --epsilon > 0 and finite, got 0.0"),
        (["noise", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "2", "--epochs", "3"],
         "expected --sample-rate in (0, 1], got 2.0"),
        (["noise", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1", "--epochs", "-3"],
         "expected --epochs > 0 and finite, got -3.0"),
        (["noise", "--epsilon", "1", "--delta", "1.5", "--sample-rate", "0.1", "--steps", "10"],
         "expected --delta in (0, 1), got 1.5"),
        (["noise", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "-1"],
         "expected --steps >= 1, got -1"),
    ],
)  # fmt: skip
def test_bad_values_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"dpclip {argv[0]}: error: {message}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["noise", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1"],
        ["noise", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1", "--epochs", "2",
         "--steps", "20"],
        ["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "1e4", "--delta", "1e-5"],
        ["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5",
         "--accountant", "moments"],
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dpclip {argv[0]}: error:")


@pytest.mark.parametrize(("epochs", "q", "steps"), [(40, 0.004, 10000), (1, 0.3, 3),
                                                    (1.2, 0.01, 120), (0.5, 1.0, 1)])  # fmt: skip
def test_epochs_become_ceil_epochs_times_steps_per_epoch(epochs, q, steps):
    assert steps_for_epochs(epochs, q) == steps


def test_the_calculator_plans_the_steps_and_sigma_the_engine_plans(capsys):
    """N = 1437, B = 256, 30 epochs: both plan 180 steps (the calculator used to plan 169)."""
    import torch

    import dpclip

    model = torch.nn.Linear(2, 2)
    engine = dpclip.PrivacyEngine(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sample_size=1437, batch_size=256,
        epochs=30, target_epsilon=3.0, target_delta=1e-5,
    )  # fmt: skip
    main(["noise", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", str(256 / 1437),
          "--epochs", "30", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert engine.planned_steps == 180
    assert out["steps"] == 180
    assert abs(out["noise_multiplier"]["pld"] - engine.noise_multiplier) < 1e-9


@pytest.mark.parametrize("epochs", [0, -1.0, float("nan"), float("inf"), True])
def test_steps_for_epochs_refuses_a_bad_number_of_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        steps_for_epochs(epochs, 0.1)


def test_noise_for_ten_million_steps_finishes_within_the_target(capsys):
    """It used to run for minutes (dp_accounting's self-composition of a small grid)."""
    assert main(["noise", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01",
                 "--steps", "10000000", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    sigma, spent = report["noise_multiplier"]["pld"], report["epsilon"]["pld"]
    assert 0.99 * 3 <= spent <= 3
    # RDP, a looser bound computed without any grid, must not be below it
    rdp = get_epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=10**7, delta=1e-5,
                      accountant="rdp")  # fmt: skip
    assert spent <= rdp <= 1.2 * spent


def test_epsilon_of_a_tiny_sigma_is_computed_not_out_of_memory(capsys):
    """σ = 1e-3 used to build a grid of 10⁸ points per step."""
    argv = ["epsilon", "--sigma", "1e-3", "--sample-rate", "1", "--steps", "100",
            "--delta", "1e-5", "--accountant", "all", "--json"]  # fmt: skip
    assert main(argv) == 0
    eps = json.loads(capsys.readouterr().out)["epsilon"]
    # 100 steps of σ = 1e-3 at q = 1 are one Gaussian at σ = 1e-4: ε ≈ 1/(2σ²) = 5e7, and a bit
    assert 5e7 < eps["pld"] < 1.001 * 5e7 < eps["rdp"]
    assert eps["gdp"] == float("inf")  # the approximation overflows; the other two are shown


def test_epsilon_too_large_to_compute_is_refused_with_the_reason(capsys):
    argv = ["epsilon", "--sigma", "1e-4", "--sample-rate", "0.01", "--steps", "10",
            "--delta", "1e-5", "--json"]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("dpclip epsilon: error: ε is infinite or beyond what the pld "
                                   "accountant can compute for σ = 0.0001")  # fmt: skip
    assert "use a larger --sigma" in captured.err
