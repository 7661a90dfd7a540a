"""``python -m benchmarks.utility``: a small grid end to end, MNIST-format files when present, and
the claim the full grid shows (AUTO-S's R rescales the step under SGD, drops out under Adam)
checked exactly on the engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's `benchmarks`, not Opacus's package of that name

from benchmarks import utility  # noqa: E402

import dpclip  # noqa: E402
from tests.test_datasets import _idx_set  # noqa: E402

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = ["--clip-norms", "0.1,1", "--lrs", "0.1,1", "--seeds", "2", "--epochs", "1", "--quiet"]


def _run(tmp_path: Path, *extra: str) -> int:
    out = ["--out", str(tmp_path / "out"), "--results", str(tmp_path / "RESULTS.md")]
    with torch.random.fork_rng():
        return utility.main([*out, *TINY, *extra])


def test_a_small_grid_writes_records_heatmap_and_a_results_section(tmp_path):
    assert _run(tmp_path, "--datasets", "digits") == 0
    payload = json.loads((tmp_path / "out" / "utility.json").read_text())
    grid = [r for r in payload["records"] if r["optimizer"] == "sgd"]
    assert len(grid) == 2 * 2 * 2 * 2  # clippings × R × lr × seeds
    assert {(r["clipping"], r["clip_norm"], r["lr"]) for r in grid} == {
        (c, r, lr) for c in ("AUTO-S", "Abadi") for r in (0.1, 1.0) for lr in (0.1, 1.0)
    }
    assert all(2.9 <= r["epsilon"] <= 3.0 for r in payload["records"])  # the same ε everywhere
    assert all(0 <= r["accuracy"] <= 1 for r in payload["records"])
    summary = payload["summary"]["digits"]
    cells = {(c["clipping"], c["clip_norm"], c["lr"]): c["mean"] for c in summary["cells"]}
    assert summary["abadi_tuned"]["mean"] == max(v for k, v in cells.items() if k[0] == "Abadi")
    assert summary["auto_s_lr_tuned"]["clip_norm"] == 1.0
    assert (tmp_path / "out" / "utility-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "RESULTS.md").read_text()
    assert "BEGIN bench:utility" in text and "](out/utility-digits.png)" in text
    assert "| digits | " in text and "Reproduce: `python -m benchmarks.utility " in text
    rescaled = [r for r in payload["records"] if r["optimizer"] == "sgd-scaled"]
    assert len({round(r["params_norm"], 4) for r in rescaled}) == 1  # R only rescaled the step


def test_mnist_files_in_the_idx_format_are_found_and_trained(tmp_path):
    _idx_set(tmp_path / "data" / "mnist", n_train=40, n_test=10)
    argv = ["--datasets", "auto", "--data-dir", str(tmp_path / "data"), "--batch-size", "8",
            "--clip-norms", "1", "--lrs", "0.1", "--seeds", "1"]  # fmt: skip
    assert _run(tmp_path, *argv) == 0
    payload = json.loads((tmp_path / "out" / "utility.json").read_text())
    assert list(payload["summary"]) == ["digits", "mnist"]  # fashion-mnist's files are absent
    assert (tmp_path / "out" / "utility-mnist.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [(["--datasets", "cifar"], "unknown data set(s) ['cifar']"),
     (["--datasets", "mnist", "--data-dir", "/nonexistent"], "mnist"),
     (["--epsilon", "0"], "--epsilon must be > 0")],
)  # fmt: skip
def test_bad_options_are_one_line_and_exit_2(tmp_path, argv, message, capsys):
    assert _run(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "RESULTS.md").exists()


def _train(clip_norm: float, lr: float, adam: bool, steps: int = 6) -> torch.Tensor:
    """A few noisy AUTO-S steps in float64 from a fixed start, data and noise seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=lr)
    engine = dpclip.PrivacyEngine(model, opt, sample_size=64, batch_size=16, steps=steps,
                                  noise_multiplier=1.0, clip_norm=clip_norm, seed=3)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen, dtype=torch.float64), torch.arange(64) % 3
    for k in range(steps):
        idx = torch.arange(k * 10, k * 10 + 16) % 64
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    engine.detach()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_auto_s_threshold_only_rescales_the_sgd_step_and_drops_out_under_adam():
    base = _train(1.0, 0.15, adam=False)
    for r in (0.01, 10.0):
        assert torch.allclose(_train(r, 0.15 / r, adam=False), base, rtol=0, atol=1e-12)
    assert not torch.allclose(_train(10.0, 0.15, adam=False), base, atol=1e-3)  # not a no-op
    adam = _train(1.0, 1e-2, adam=True)
    for r in (0.1, 10.0):  # Adam divides by the gradient's scale, up to its eps (1e-8)
        assert torch.allclose(_train(r, 1e-2, adam=True), adam, rtol=0, atol=1e-6)
