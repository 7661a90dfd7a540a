"""Data-parallel scaling: throughput per process at 1 and 2 processes (torch.distributed).

Each process trains on its own fixed batch of ``--batch-size`` examples with one thread (weak
scaling: the global batch grows with the processes), under non-private DistributedDataParallel,
dpclip on a DDP-wrapped model, and Opacus' DifferentiallyPrivateDistributedDataParallel. A run
is ``world`` fresh processes over gloo on loopback (nccl on GPUs); configurations are
interleaved over rounds like :mod:`benchmarks.run`, and the table reports medians over rounds.

Usage (from the repository root)::

    python -m benchmarks.scaling --models cnn,gpt-like --rounds 3 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METHODS = ("non-private", "dpclip", "opacus")
BATCHES = {"cnn": 256, "gpt-like": 8}  # per process; CPU-sized


def _rank_main(rank: int, world: int, port: int, cfg: dict, result: str) -> None:
    """One process of one run: join the group, build, wrap, warm up, time; rank 0 reports."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks import _worker
    from benchmarks.models import MODELS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
    spec, b, method = MODELS[cfg["model"]], cfg["batch_size"], cfg["method"]
    _worker._import_framework(method)
    torch.manual_seed(0)
    x, y = spec.make_batch(b, spec.seq_len, torch.Generator().manual_seed(rank))
    x, y = x.to(device), y.to(device)
    model = spec.build().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ids = [rank] if cuda else None
    if method == "opacus":
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        wrapped = DPDDP(model) if world > 1 else model
        wcfg = _worker.WorkerConfig(cfg["model"], "opacus", b, spec.seq_len, 1, 1)
        step = _worker._opacus_step(wcfg, spec, wrapped, opt, x, y)
    else:
        wrapped = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
        if method == "dpclip":
            import dpclip

            keep = dpclip.PrivacyEngine(  # noqa: F841  (attached while it lives)
                wrapped, opt, sample_size=100 * b * world, batch_size=b * world,
                steps=cfg["warmup"] + cfg["steps"] + 1, noise_multiplier=1.0, seed=0,
            )  # fmt: skip
        step = _worker._plain_step(wrapped, opt, spec, x, y)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(cfg["warmup"]):
        step()
    sync()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        median = statistics.median(times)
        Path(result).write_text(json.dumps({
            **cfg, "world": world, "ok": True, "step_times_s": times,
            "samples_per_s_per_process": b / median,
        }))  # fmt: skip
    if world > 1:
        dist.barrier()  # both ranks done before teardown: gloo aborted a rank that tore down early
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(cfg: dict, world: int, timeout: float) -> dict[str, Any]:
    """``world`` fresh processes for one configuration; a crash becomes a failed record."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        context = mp.start_processes(
            _rank_main, args=(world, _free_port(), cfg, str(result)), nprocs=world,
            start_method="spawn", join=False,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        for process in context.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        codes = [p.exitcode for p in context.processes]
        for p in context.processes:
            if p.is_alive():
                p.kill()
        if result.exists() and codes == [0] * world:
            return json.loads(result.read_text())
    return {**cfg, "world": world, "ok": False, "error": f"exit codes {codes}"}


def table(records: Sequence[dict[str, Any]], worlds: Sequence[int]) -> str:
    """Markdown: per model and method, samples/s per process at each world size (median over
    rounds), the scaling (per-process throughput against one process) and the ratio to
    non-private DDP at the same world size."""

    def median(model: str, method: str, world: int) -> float | None:
        values = [
            r["samples_per_s_per_process"]
            for r in records
            if r["ok"] and (r["model"], r["method"], r["world"]) == (model, method, world)
        ]
        return statistics.median(values) if values else None  # fmt: skip

    top = worlds[-1]
    head = ["model", "method", *(f"{w} proc: samples/s per proc" for w in worlds),
            f"scaling 1→{top} (per proc)", f"vs non-private at {top}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    models = sorted({r["model"] for r in records}, key=list(BATCHES).index)
    for model in models:
        for method in METHODS:
            values = [median(model, method, w) for w in worlds]
            if all(v is None for v in values):
                continue
            base, last = values[0], values[-1]
            plain = median(model, "non-private", top)
            cells = [model, method, *(f"{v:.1f}" if v else "failed" for v in values),
                     f"{last / base:.2f}×" if base and last else "-",
                     f"{last / plain:.2f}×" if last and plain else "-"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,gpt-like")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--worlds", default="1,2", help="process counts (default 1,2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", type=Path, required=True, help="folder for records and table")
    args = parser.parse_args(argv)
    models, methods = args.models.split(","), args.methods.split(",")
    worlds = [int(w) for w in args.worlds.split(",")]
    unknown = [m for m in models if m not in BATCHES] + [m for m in methods if m not in METHODS]
    if unknown:
        print(f"benchmarks.scaling: unknown model or method {unknown}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "scaling.jsonl"
    records = []
    for r in range(args.rounds):
        for model in models:
            for world in worlds:
                for method in methods:
                    cfg = dict(model=model, method=method, batch_size=BATCHES[model],
                               steps=args.steps, warmup=args.warmup, device=args.device,
                               round=r)  # fmt: skip
                    rec = run_one(cfg, world, args.timeout)
                    records.append(rec)
                    with log.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    shown = (f"{rec['samples_per_s_per_process']:.1f} samples/s per process"
                             if rec["ok"] else rec["error"])  # fmt: skip
                    print(f"[round {r + 1}/{args.rounds}] {model} {method} ×{world}: {shown}",
                          file=sys.stderr, flush=True)  # fmt: skip
    text = table(records, worlds)
    (args.out / "scaling.md").write_text(text + "\n")
    print(text)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
