"""Every script in examples/ runs to completion (with few epochs) as a user would run it."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ports import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_trains_digits_and_reports_accuracy_and_epsilon(monkeypatch, capsys):
    """As ``python examples/quickstart.py 2``, in this process (the launcher tests below start
    interpreters of their own)."""
    pytest.importorskip("sklearn")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / "quickstart.py"), "2"])
    with torch.random.fork_rng():
        runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    # The whole two-epoch budget is spent by the end: ε reaches its target of 3, not more.
    epsilons = [float(line.rsplit("ε = ", 1)[1]) for line in lines]
    assert epsilons[0] < epsilons[1] and 2.9 <= epsilons[1] <= 3.0


def test_quickstart_is_at_most_40_lines():
    assert len((EXAMPLES / "quickstart.py").read_text().splitlines()) <= 40


def _launched(command: list[str]) -> list[str]:
    """Run a 2-process example under its launcher; rank 0's epoch lines."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-1500:]}\nstderr:\n{proc.stderr[-3000:]}"
    return [line for line in proc.stdout.splitlines() if line.startswith("epoch")]


def test_ddp_example_trains_under_torchrun_with_two_processes():
    pytest.importorskip("sklearn")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]  # fmt: skip
    lines = _launched([*torchrun, str(EXAMPLES / "ddp_train.py"), "2"])
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]  # rank 0 alone
    assert 2.9 <= float(lines[-1].rsplit("ε = ", 1)[1]) <= 3.0


def test_accelerate_example_trains_under_accelerate_launch_with_two_processes():
    pytest.importorskip("sklearn")
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    lines = _launched([*launch, str(EXAMPLES / "accelerate_train.py"), "2"])
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert 2.9 <= float(lines[-1].rsplit("ε = ", 1)[1]) <= 3.0


def test_hf_finetune_example_loads_sst2_from_a_hub_format_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import hf_finetune

    path = tmp_path / "train.parquet"
    hf_finetune.synthetic_sst2(600).to_parquet(str(path))  # sentence, label, idx: SST-2's columns
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no download attempt: the offline fallback model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with torch.random.fork_rng():
        code = hf_finetune.main(["--data-file", str(path), "--epochs", "4",
                                 "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("validation accuracy") and "δ = " in last
    assert 2.9 <= float(last.split("ε = ")[1].split()[0]) <= 3.0
