"""Every script in examples/ runs to completion (with few epochs) as a user would run it."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_trains_digits_and_reports_accuracy_and_epsilon():
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    # The whole two-epoch budget is spent by the end: ε reaches its target of 3, not more.
    epsilons = [float(line.rsplit("ε = ", 1)[1]) for line in lines]
    assert epsilons[0] < epsilons[1] and 2.9 <= epsilons[1] <= 3.0


def test_quickstart_is_at_most_40_lines():
    assert len((EXAMPLES / "quickstart.py").read_text().splitlines()) <= 40
