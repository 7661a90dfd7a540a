"""Accuracy of automatic clipping (AUTO-S) against Abadi's clipping at the same privacy.

    python -m benchmarks.utility                      # digits, plus MNIST/Fashion-MNIST if present
    python -m benchmarks.utility --datasets digits --seeds 3 --out DIR --results RESULTS.md

Every cell of the grid trains the same model on the same data set with the same ε, δ, batch,
epochs and seeds; only the clipping, its threshold R and the learning rate change:

- Abadi: min(1, R/‖g_i‖), over R × lr;
- AUTO-S: R/(‖g_i‖ + 0.01), over the same R × lr. Under SGD, R only rescales the step, so
  its accuracy depends on R·lr alone: tuning lr is enough.

It writes a JSON file of every run, a heatmap of accuracy over (R, lr) for both clippings, and a
section of RESULTS.md with the table: AUTO-S tuned over lr at R = 1, Abadi tuned over both, and
Abadi at an untuned R = 1. A second table shows that AUTO-S's R rescales the learning rate under
SGD and drops out under Adam.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.run import _csv, _positive

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIP_NORMS = (0.01, 0.1, 1.0, 10.0)
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
CLIPPINGS = {"AUTO-S": "automatic", "Abadi": "abadi"}
ADAM_LR = 1e-2
# Model and epochs per data set; the grid is the same on each.
DATASETS = {
    "digits": {"model": "mlp", "epochs": 30},
    "mnist": {"model": "cnn", "epochs": 10},
    "fashion-mnist": {"model": "cnn", "epochs": 10},
}


class UtilityError(Exception):
    """A user error: one line, exit status 2."""


@dataclass(frozen=True)
class Cell:
    """One training run."""

    dataset: str
    clipping: str  # "AUTO-S" or "Abadi"
    clip_norm: float
    lr: float
    seed: int
    optimizer: str = "sgd"


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.utility",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--datasets", default="auto",
                   help="comma-separated from digits, mnist, fashion-mnist; auto (default): "
                   "digits, and the others whose files are in --data-dir")  # fmt: skip
    p.add_argument("--data-dir", help="folder holding MNIST / Fashion-MNIST files (IDX format)")
    p.add_argument("--clip-norms", type=_floats, default=CLIP_NORMS, help="the R grid")
    p.add_argument("--lrs", type=_floats, default=LEARNING_RATES, help="the SGD learning rates")
    p.add_argument("--seeds", type=_positive, default=3, help="seeds per cell (default: 3)")
    p.add_argument("--epsilon", type=float, default=3.0, help="target ε of every run")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of every run")
    p.add_argument("--batch-size", type=_positive, default=256, help="expected logical batch")
    p.add_argument("--epochs", type=float, help="override the data set's default epochs")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out" / "utility",
                   help="folder for the JSON records and the heatmaps")  # fmt: skip
    p.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md",
                   help="the markdown file whose utility section is rewritten")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _datasets(args: argparse.Namespace) -> list[str]:
    from dpclip.datasets import DatasetNotFound, load_dataset

    if args.datasets != "auto":
        names = [n.strip() for n in args.datasets.split(",") if n.strip()]
        unknown = [n for n in names if n not in DATASETS]
        if unknown or not names:
            raise UtilityError(f"unknown data set(s) {unknown}; choose from {list(DATASETS)}")
        return names
    present = ["digits"]
    for name in ("mnist", "fashion-mnist"):
        try:
            load_dataset(name, data_dir=args.data_dir)
            present.append(name)
        except DatasetNotFound:
            pass
    return present


def train_accuracy(data: tuple, cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Train one cell privately; its test accuracy (chance level if the run diverged)."""
    import torch

    from dpclip import PrivacyEngine
    from dpclip.cli._train_loop import evaluate
    from dpclip.models import build_model

    train, test, info = data
    spec = DATASETS[cell.dataset]
    epochs = args.epochs or spec["epochs"]
    torch.manual_seed(cell.seed)
    model = build_model(spec["model"], info.input_shape, info.num_classes)
    if cell.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cell.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cell.lr, momentum=0.9)  # as dpclip train
    engine = PrivacyEngine(
        model, opt, sample_size=len(train), batch_size=args.batch_size, epochs=epochs,
        target_epsilon=args.epsilon, target_delta=args.delta, clipping=CLIPPINGS[cell.clipping],
        clip_norm=cell.clip_norm, seed=cell.seed,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(cell.seed)
    loader = engine.data_loader(train, physical_batch_size=512, generator=gen)
    diverged = False
    while engine.steps_taken < engine.planned_steps and not diverged:
        for logical in loader:
            for x, y in logical:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if not torch.isfinite(loss):
                    diverged = True
                    break
                loss.backward()
            if diverged:
                break
            opt.step()
            opt.zero_grad()
            if engine.steps_taken >= engine.planned_steps:
                break
    epsilon = engine.epsilon()
    engine.detach()
    with torch.no_grad():
        _, accuracy = evaluate(model, test)
    if diverged or not all(torch.isfinite(p).all() for p in model.parameters()):
        diverged, accuracy = True, 1.0 / info.num_classes
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {**asdict(cell), "accuracy": accuracy, "diverged": diverged, "epsilon": epsilon,
            "steps": engine.steps_taken, "params_norm": float(flat.norm())}  # fmt: skip


def _grid(datasets: Sequence[str], args: argparse.Namespace) -> list[Cell]:
    cells = [
        Cell(d, clipping, r, lr, seed)
        for d in datasets
        for clipping in CLIPPINGS
        for r in args.clip_norms
        for lr in args.lrs
        for seed in range(args.seeds)
    ]
    # R's role in AUTO-S, at one seed: SGD at a fixed R·lr, and Adam at a fixed lr.
    for d in datasets:
        step = 0.15  # dpclip train's SGD default at R = 1
        cells += [Cell(d, "AUTO-S", r, step / r, 0, "sgd-scaled") for r in args.clip_norms]
        cells += [Cell(d, "AUTO-S", r, ADAM_LR, 0, "adam") for r in args.clip_norms]
    return cells


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _best(cells: dict[tuple, tuple[float, float]], grid: dict[tuple, list[float]], pred):
    """The cell of highest mean accuracy among those ``pred`` keeps; None if none."""
    keys = [k for k in cells if pred(k)]
    if not keys:
        return None
    k = max(keys, key=lambda k: cells[k][0])
    return {"clip_norm": k[1], "lr": k[2], "mean": cells[k][0], "sd": cells[k][1],
            "seeds": len(grid[k])}  # fmt: skip


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per data set: mean accuracy per (clipping, R, lr), and the three tuned results."""
    out: dict[str, Any] = {}
    for d in dict.fromkeys(r["dataset"] for r in records):
        grid: dict[tuple, list[float]] = {}
        for r in records:
            if r["dataset"] == d and r["optimizer"] == "sgd":
                grid.setdefault((r["clipping"], r["clip_norm"], r["lr"]), []).append(r["accuracy"])
        cells = {key: _mean_sd(v) for key, v in grid.items()}

        rescale = [r for r in records if r["dataset"] == d and r["optimizer"] != "sgd"]
        out[d] = {
            "cells": [
                {"clipping": k[0], "clip_norm": k[1], "lr": k[2], "mean": m, "sd": s}
                for k, (m, s) in sorted(cells.items())
            ],  # fmt: skip
            "auto_s_lr_tuned": _best(cells, grid, lambda k: k[0] == "AUTO-S" and k[1] == 1.0),
            "abadi_tuned": _best(cells, grid, lambda k: k[0] == "Abadi"),
            "abadi_r1": _best(cells, grid, lambda k: k[0] == "Abadi" and k[1] == 1.0),
            "auto_s_any_r": _best(cells, grid, lambda k: k[0] == "AUTO-S"),
            "rescale": [
                {k: r[k] for k in ("optimizer", "clip_norm", "lr", "accuracy", "params_norm")}
                for r in rescale
            ],  # fmt: skip
        }
    return out


def plot_heatmaps(dataset: str, summary: dict[str, Any], path: Path) -> Path:
    """Accuracy over (R, lr), one panel per clipping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = sorted({c["clip_norm"] for c in summary["cells"]})
    lrs = sorted({c["lr"] for c in summary["cells"]})
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 0.9 * len(lrs) * 2, 1.6 + 0.55 * len(norms)))
    for ax, clipping in zip(axes, CLIPPINGS, strict=True):
        acc = [[math.nan] * len(lrs) for _ in norms]
        for c in summary["cells"]:
            if c["clipping"] == clipping:
                acc[norms.index(c["clip_norm"])][lrs.index(c["lr"])] = c["mean"]
        image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i, row in enumerate(acc):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if value > 0.6 else "white")  # fmt: skip
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(norms)), [f"{r:g}" for r in norms])
        ax.set_xlabel("learning rate (SGD)")
        ax.set_ylabel("R")
        ax.set_title(f"{clipping} clipping" if clipping == "Abadi" else "AUTO-S (automatic)")
    fig.colorbar(image, ax=axes, label="test accuracy")
    fig.suptitle(f"{dataset}: test accuracy (%) at the same ε, mean over seeds")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _pct(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['sd']:.1f}%"


def markdown(summary: dict[str, Any], machine: dict[str, Any], pngs: dict[str, Path],
             results_dir: Path) -> str:  # fmt: skip
    """The RESULTS.md section: the tuned table, the heatmaps, and R's role in AUTO-S."""
    m = machine
    lines = [
        "## Accuracy: automatic clipping against Abadi's clipping",
        "",
        f"Every run: ε = {m['epsilon']:g}, δ = {m['delta']:g}, expected batch {m['batch_size']}, "
        f"SGD with momentum 0.9, {m['seeds']} seeds per cell, the model and epochs of each data set "
        f"({m['models']}); R ∈ {{{', '.join(f'{r:g}' for r in m['clip_norms'])}}}, "
        f"lr ∈ {{{', '.join(f'{lr:g}' for lr in m['lrs'])}}}. A diverged run counts as chance. "
        f"Measured on {m['cpu']} ({m['started']} to {m['finished']}, {m['minutes']:.1f} min).",
        "",
        f"Reproduce: `{m['command']}`",
        "",
        "| data set | AUTO-S, lr tuned (R = 1) | Abadi, R and lr tuned | Abadi, R = 1, lr tuned |",
        "|---|---|---|---|",
    ]
    for d, s in summary.items():
        a, b, c = s["auto_s_lr_tuned"], s["abadi_tuned"], s["abadi_r1"]
        lines.append(
            f"| {d} | {_pct(a)} (lr {a['lr']:g}) | {_pct(b)} (R {b['clip_norm']:g}, lr {b['lr']:g})"
            f" | {_pct(c)} (lr {c['lr']:g}) |"
            if a and b and c
            else f"| {d} | {_pct(a)} | {_pct(b)} | {_pct(c)} |"
        )
    lines.append("")
    for d, png in pngs.items():
        rel = png.resolve().relative_to(results_dir.resolve()) if png.resolve().is_relative_to(
            results_dir.resolve()) else png  # fmt: skip
        lines += [f"![{d}: accuracy over R and lr]({rel.as_posix()})", ""]
    lines += [
        "AUTO-S's R, one seed: under SGD at a fixed R·lr = 0.15 the runs are the same run (R "
        "only rescales the step); under Adam at lr = 0.01 R drops out.",
        "",
        "| data set | optimizer | R | lr | test accuracy | ‖θ‖ at the end |",
        "|---|---|---|---|---|---|",
    ]
    for d, s in summary.items():
        for r in s["rescale"]:
            opt = "SGD" if r["optimizer"] == "sgd-scaled" else "Adam"
            lines.append(f"| {d} | {opt} | {r['clip_norm']:g} | {r['lr']:g} | "
                         f"{100 * r['accuracy']:.2f}% | {r['params_norm']:.6f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _command(argv: Sequence[str]) -> str:
    """The command line that reproduces the table (without --quiet, which changes nothing)."""
    return " ".join(["python -m benchmarks.utility", *(a for a in argv if a != "--quiet")])


def run(args: argparse.Namespace) -> int:
    from benchmarks import report
    from dpclip.datasets import DatasetError, load_dataset

    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise UtilityError(f"--epsilon must be > 0, got {args.epsilon}")
    names = _datasets(args)
    try:
        data = {d: load_dataset(d, data_dir=args.data_dir) for d in names}
    except DatasetError as err:
        raise UtilityError(str(err)) from None
    cells = _grid(names, args)
    args.out.mkdir(parents=True, exist_ok=True)
    started, t0 = report.now(), time.perf_counter()
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="utility grid", unit="run")
    records = []
    for cell in cells:
        records.append(train_accuracy(data[cell.dataset], cell, args))
        if bar is not None:
            bar.set_postfix_str(
                f"{cell.dataset} {cell.clipping} R={cell.clip_norm:g} lr={cell.lr:g}"
            )
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = summarise(records)
    pngs = {d: plot_heatmaps(d, summary[d], args.out / f"utility-{d}.png") for d in summary}
    machine = {
        "cpu": report.cpu_description(),
        "started": started, "finished": report.now(),
        "minutes": (time.perf_counter() - t0) / 60, "epsilon": args.epsilon,
        "delta": args.delta, "batch_size": args.batch_size, "seeds": args.seeds,
        "clip_norms": list(args.clip_norms), "lrs": list(args.lrs),
        "models": ", ".join(f"{d}: {DATASETS[d]['model']}, {args.epochs or DATASETS[d]['epochs']:g} epochs"
                            for d in names),
        "command": _command(sys.argv[1:] if args.argv is None else args.argv),
    }  # fmt: skip
    payload = {"machine": machine, "summary": summary, "records": records}
    (args.out / "utility.json").write_text(json.dumps(payload, indent=1))
    report.write_section(args.results, "utility",
                         markdown(summary, machine, pngs, args.results.parent))  # fmt: skip
    if not args.quiet:
        print(f"wrote {args.results} [utility] and {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return run(args)
    except UtilityError as err:
        print(f"benchmarks.utility: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
