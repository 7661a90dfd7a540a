"""Files and text that ``dpclip train`` produces, each written atomically.

Every file goes to a temporary name in the same folder and is renamed into place, so an
interrupted run never leaves a half-written file. ``metrics.json`` is written last, only when
the run completes: its presence marks a finished run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CURVES = "curves.png"
CSV_FIELDS = (
    "epoch", "steps", "epsilon", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
    "wall_time_s",
)  # fmt: skip


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; use the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: _round(row[key]) for key in CSV_FIELDS})
    write_text(path, buffer.getvalue())


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def write_curves(path: Path, history: Sequence[dict[str, Any]], title: str, target: float) -> None:
    """Accuracy (train and test) and ε spent against epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (acc_ax, eps_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    acc_ax.plot(epochs, [100 * r["train_accuracy"] for r in history], label="train", marker=".")
    acc_ax.plot(epochs, [100 * r["test_accuracy"] for r in history], label="test", marker=".")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc_ax.legend(loc="lower right")
    acc_ax.grid(alpha=0.3)
    eps_ax.plot(epochs, [r["epsilon"] for r in history], marker=".", color="tab:red", label="spent")
    eps_ax.axhline(target, linestyle="--", color="gray", label=f"target ε = {target:g}")
    eps_ax.set(xlabel="epoch", ylabel="ε", title="privacy spent", ylim=(0, target * 1.1))
    eps_ax.legend(loc="lower right")
    eps_ax.grid(alpha=0.3)
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def summary(result: dict[str, Any], output: Path | None) -> str:
    """The end-of-run report: one screen."""
    c = result["config"]
    lines = [
        "",
        f"dpclip train: {c['dataset']} / {c['model']} ({result['parameters']:,} parameters)",
        f"  test accuracy   {100 * result['test_accuracy']:.2f}%",
        f"  privacy         ε = {result['epsilon']:.3f} (target {c['epsilon']:g}), "
        f"δ = {result['delta']:g}",
        f"  noise           σ = {result['noise_multiplier']:.4f}, "
        f"sample rate q = {result['sample_rate']:.4g}, {result['steps']} steps",
        f"  training        {c['epochs']} epochs, {c['optimizer']} lr={c['lr']:g}, "
        f"batch {c['batch_size']}, {c['clipping']} clipping, seed {c['seed']}",
        f"  wall time       {result['wall_time_s']:.1f} s",
    ]
    if output is not None:
        names = ", ".join((METRICS_JSON, METRICS_CSV, CHECKPOINT, CURVES))
        lines.append(f"  output          {output}/ ({names})")
    return "\n".join(lines)
