"""Operations dispatched per training step: a count, not a timing, that stands in for the kernel
launches and host work that a short GPU step cannot hide.

    python -m benchmarks.ops                       # the reference points, into RESULTS.md
    python -m benchmarks.ops --out DIR --results RESULTS.md
    python -m benchmarks.ops --compiled-bookkeeping   # eager vs torch.compile'd book-keeping

Every aten operation that reaches the dispatcher in one steady-state step (forward, backward,
optimizer step; after two warm-up steps, so dpclip's first-step self-check is not counted) is
counted with a ``TorchDispatchMode``. "Kernels" leaves out the view and metadata operations,
which launch nothing on a GPU. The host time of a tiny model, where compute is negligible, is
reported beside the counts (a median over steps; it varies with the machine, the counts do not).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parent.parent
# Operations that only make a new view of existing memory (or drop autograd history): no kernel.
METADATA_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten._reshape_alias", "aten.t", "aten.transpose",
    "aten.permute", "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.slice", "aten.select",
    "aten.alias", "aten.detach", "aten.split", "aten.split_with_sizes", "aten.unfold",
    "aten.as_strided", "aten.view_as", "aten.unbind", "aten.diagonal", "aten.narrow",
})  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in METADATA_OPS)


def count_step(step: Callable[[], Any]) -> OpCounter:
    """The operations of one call of ``step``."""
    with OpCounter() as counter:
        step()
    return counter


@dataclass(frozen=True)
class Reference:
    """A point at which dpclip's op count is compared with non-private training."""

    name: str
    model: str
    batch_size: int
    seq_len: int | None
    description: str


REFERENCES = (
    Reference("gpt-like-small", "gpt-like-small", 8, 32, "GPT-like 4 blocks, d=64, T=32, B=8"),
    Reference("cnn", "cnn", 64, None, "Tramer-Boneh CNN, B=64"),
    Reference("tiny-mlp", "tiny-mlp", 8, None, "MLP 16-16-4, B=8 (host time: compute negligible)"),
)


def _model(name: str, seq_len: int | None):
    import torch.nn.functional as F
    from torch import nn

    from benchmarks.models import MODELS, GPTLike, lm_loss

    gen = torch.Generator().manual_seed(0)
    if name == "gpt-like-small":
        model = GPTLike(vocab=5000, width=64, layers=4, heads=4, max_len=1024)
        return model, lambda b: MODELS["gpt-like"].make_batch(b, seq_len, gen), lm_loss
    if name == "tiny-mlp":
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        return (
            model,
            lambda b: (torch.randn(b, 16, generator=gen), torch.arange(b) % 4),
            F.cross_entropy,
        )
    spec = MODELS[name]
    return spec.build(), lambda b: spec.make_batch(b, seq_len, gen), spec.loss_fn


def build_step(ref: Reference, method: str) -> Callable[[], Any]:
    """One SGD step of ``ref`` under ``method`` ("non-private" or "dpclip"), warmed up."""
    import dpclip

    torch.manual_seed(0)
    model, make_batch, loss_fn = _model(ref.model, ref.seq_len)
    x, y = make_batch(ref.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if method == "dpclip":
        engine = dpclip.PrivacyEngine(model, opt, sample_size=100 * ref.batch_size,
                                      batch_size=ref.batch_size, steps=10**6,
                                      noise_multiplier=1.0, seed=0)  # fmt: skip
    elif method != "non-private":
        raise ValueError(f"benchmarks.ops: unknown method {method!r}")

    def step() -> None:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.engine = engine if method == "dpclip" else None  # type: ignore[attr-defined]
    step.batch, step.loss_fn = (x, y), loss_fn  # type: ignore[attr-defined]
    step()
    step()  # the first step runs dpclip's self-check
    return step


def host_time_s(step: Callable[[], Any], steps: int = 50) -> float:
    """Median wall time of one step (on a tiny model: the host's own cost)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(refs=REFERENCES, host_steps: int = 50) -> list[dict[str, Any]]:
    rows = []
    for ref in refs:
        row: dict[str, Any] = {"name": ref.name, "description": ref.description}
        for method in ("non-private", "dpclip"):
            step = build_step(ref, method)
            counted = count_step(step)
            row[method] = {"ops": counted.total, "kernels": counted.kernels,
                           "by_op": dict(counted.ops.most_common())}  # fmt: skip
            if ref.model == "tiny-mlp":
                row[method]["host_time_us"] = 1e6 * host_time_s(step, host_steps)
        row["ops_ratio"] = row["dpclip"]["ops"] / row["non-private"]["ops"]
        row["kernels_ratio"] = row["dpclip"]["kernels"] / row["non-private"]["kernels"]
        rows.append(row)
    return rows


def compiled_bookkeeping_host_times(rounds: int = 3, steps: int = 100) -> dict[str, float]:
    """Median host time (µs) of a tiny-MLP dpclip step with the book-keeping's end of backward
    (``Accumulator.finish``: norms to factors to clipped sums) eager and under ``torch.compile``,
    alternating ``rounds`` times: whether compiling the book-keeping helps the host."""
    from dpclip import _bookkeeping

    ref = next(r for r in REFERENCES if r.model == "tiny-mlp")
    eager = _bookkeeping.Accumulator.finish
    compiled = torch.compile(eager)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    try:
        for _ in range(rounds):
            for name in times:
                _bookkeeping.Accumulator.finish = (  # type: ignore[method-assign]
                    eager if name == "eager" else lambda self: compiled(self)
                )
                step = build_step(ref, "dpclip")
                for _ in range(10):  # compiled: traced and recompiled for the shapes here
                    step()
                times[name].append(1e6 * host_time_s(step, steps))
    finally:
        _bookkeeping.Accumulator.finish = eager  # type: ignore[method-assign]
    return {name: statistics.median(ts) for name, ts in times.items()}


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        "### Operations dispatched per training step",
        "",
        "aten operations in one steady-state SGD step, counted with a TorchDispatchMode (no "
        "timing): a proxy for GPU kernel launches and host overhead. Kernels: the same without "
        "view and metadata operations. Exact counts: they do not depend on the machine. The "
        f"host time of the tiny MLP is a median over 50 steps on {machine}.",
        "",
        "Reproduce: `python -m benchmarks.ops`",
        "",
        "| point | non-private ops | dpclip ops | ops × non-private | kernels × non-private | host µs/step, non-private → dpclip |",
        "|---|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        host = "-"
        if "host_time_us" in r["dpclip"]:
            a, b = r["non-private"]["host_time_us"], r["dpclip"]["host_time_us"]
            host = f"{a:.0f} → {b:.0f} ({b / a:.2f}×)"
        lines.append(
            f"| {r['description']} | {r['non-private']['ops']} | {r['dpclip']['ops']} | "
            f"{r['ops_ratio']:.2f}× | {r['kernels_ratio']:.2f}× | {host} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import json

    from benchmarks import report

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out" / "cpu")
    p.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--compiled-bookkeeping", action="store_true",
                   help="only compare the tiny MLP's host time with the book-keeping eager and "
                   "under torch.compile (printed; nothing written)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # host time of a tiny model: one thread, no pool hand-offs
    if args.compiled_bookkeeping:
        for name, us in compiled_bookkeeping_host_times().items():
            print(f"tiny MLP, Accumulator.finish {name}: {us:.0f} µs per step")
        return 0
    rows = measure()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops.json").write_text(json.dumps(rows, indent=1))
    report.write_section(args.results, "ops-cpu", markdown(rows, report.cpu_description()))
    for r in rows:
        print(f"{r['description']}: {r['non-private']['ops']} -> {r['dpclip']['ops']} ops "
              f"({r['ops_ratio']:.2f}x), kernels {r['kernels_ratio']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
