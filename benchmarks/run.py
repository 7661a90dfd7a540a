"""Benchmark harness: throughput and peak memory of non-private, dpclip and Opacus training.

Every configuration runs in its own fresh interpreter (``benchmarks._worker``), interleaved
A B C A B C ... for several rounds, so slow drifts of a shared machine hit every configuration
alike. The table reports medians over rounds; the ratio to non-private is the median of the
per-round ratios (each against the non-private run of the same round). Results go to
``--results`` (Markdown, only this run's section is replaced) and ``--out`` (JSON, plot).

Usage (from the repository root)::

    python -m benchmarks.run --models cnn,gpt-like --rounds 3 --steps 5
    python -m benchmarks.run --sweep            # GPT-like: sequence-length and batch-size sweeps
    python -m benchmarks.run --profile gpt-like # torch.profiler tables for one step
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import report

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "cnn,gpt-like"
SWEEP_MODEL = "gpt-like"
SWEEP_BATCHES = {"cpu": [4, 8, 16, 32, 64], "cuda": [16, 32, 64, 128, 256]}
SWEEP_CONFIGS = ("non-private", "dpclip-ghost", "dpclip-instantiate", "dpclip-mixed")


class HarnessError(Exception):
    """A user error (unknown model or configuration): one line, no traceback."""


@dataclass(frozen=True)
class Method:
    """A named configuration: which framework and how it is set up."""

    method: str
    norm_strategy: str = "mixed"
    clipping_style: str = "all-layer"
    grad_sample_mode: str = "hooks"


CONFIGS: dict[str, Method] = {
    "non-private": Method("non-private"),
    "dpclip-ghost": Method("dpclip", norm_strategy="ghost"),
    "dpclip-instantiate": Method("dpclip", norm_strategy="instantiate"),
    "dpclip-mixed": Method("dpclip", norm_strategy="mixed"),
    "dpclip-mixed-layer-wise": Method("dpclip", norm_strategy="mixed", clipping_style="layer-wise"),
    "opacus-hooks": Method("opacus", grad_sample_mode="hooks"),
    "opacus-ghost": Method("opacus", grad_sample_mode="ghost"),
}


@dataclass(frozen=True)
class Point:
    """One (model, batch size, sequence length) at which every configuration is measured."""

    model: str
    batch_size: int
    seq_len: int | None


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int_csv(text: str) -> list[int]:
    try:
        values = [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's options (shared with ``dpclip bench``); importing this costs no torch."""
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma-separated model names or 'all' (default: {DEFAULT_MODELS})",
    )
    parser.add_argument(
        "--configs",
        default="all",
        help="comma-separated configurations or 'all': " + ", ".join(CONFIGS),
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=_positive, default=3)
    parser.add_argument("--steps", type=_positive, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch-size", type=_positive, help="override every model's default")
    parser.add_argument("--seq-len", type=_positive, help="override sequence models' default T")
    parser.add_argument(
        "--threads", type=_positive, help="torch.set_num_threads in each worker (default: 2 on cpu)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"{SWEEP_MODEL}: sweep T and batch size instead of the model table",
    )
    parser.add_argument("--sweep-lengths", type=_int_csv, default=[64, 128, 256, 512, 1024])
    parser.add_argument(
        "--sweep-batches",
        type=_int_csv,
        help="default: "
        + "; ".join(f"{','.join(map(str, b))} on {d}" for d, b in SWEEP_BATCHES.items()),
    )
    parser.add_argument(
        "--profile",
        metavar="MODEL",
        help="write torch.profiler tables of one step (non-private, dpclip-mixed)",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=1800.0, help="seconds per worker"
    )
    parser.add_argument(
        "--allocator",
        choices=("default", "retain"),
        default="default",
        help="cpu: glibc as configured (default), or 'retain': no mmap, no trimming, so freed "
        "memory is re-used without page faults (a separate section of RESULTS.md)",
    )
    parser.add_argument(
        "--accumulate",
        type=_positive,
        default=1,
        help="physical batches per optimizer step (gradient accumulation, as DP training with "
        "large logical batches runs): the noise and the update are paid once per accumulate x "
        "batch samples (a separate section of RESULTS.md)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--live-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cpu: one more run per configuration for the peak of live memory (default: on)",
    )
    parser.add_argument(
        "--live-memory-only",
        action="store_true",
        help="cpu: only the live-memory runs (merge with --from-records)",
    )
    parser.add_argument(
        "--from-records",
        type=Path,
        nargs="+",
        metavar="JSONL",
        help="measure nothing: write the table from records files of earlier runs (one section)",
    )


def _select_configs(text: str, opacus: bool) -> list[str]:
    names = list(CONFIGS) if text == "all" else _csv(text)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise HarnessError(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if "non-private" not in names:
        names.insert(0, "non-private")  # every ratio needs its baseline from the same round
    if not opacus and text == "all":
        names = [n for n in names if CONFIGS[n].method != "opacus"]
    elif not opacus and any(CONFIGS[n].method == "opacus" for n in names):
        raise HarnessError("Opacus configurations were asked for but opacus is not installed")
    return names


# The live-memory pass: glibc returns each freed block of 64 KiB or more to the OS at once, so
# the peak RSS is the peak of live memory rather than of what the allocator keeps. Slower (every
# large allocation is a fresh mapping), so only memory is read from these runs.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# --allocator retain: glibc serves every block from its heap and never gives freed memory back, so
# the buffers of one step are re-used by the next instead of being unmapped and faulted in again
# (about a fifth of a non-private CPU step otherwise). It applies to every configuration alike.
RETAIN_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def _allocator_env(env: dict[str, str], allocator: str) -> None:
    """Set up the worker's glibc allocator in ``env`` (in place) for ``--allocator``."""
    if allocator == "retain":
        old = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{old}:{RETAIN_TUNABLES}" if old else RETAIN_TUNABLES


def _run_worker(
    point: Point,
    name: str,
    args: argparse.Namespace,
    profile_path: str | None = None,
    live_memory: bool = False,
) -> dict[str, Any]:
    """One configuration in a fresh interpreter; a crash or timeout becomes a failed record."""
    threads = args.threads or (2 if args.device == "cpu" else None)
    cfg = {
        **asdict(CONFIGS[name]),
        **asdict(point),
        "steps": 1 if live_memory else args.steps,
        "warmup": 1 if live_memory else args.warmup,
        "device": args.device,
        "threads": threads,
        "profile_path": profile_path,
        "accumulate": args.accumulate,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if live_memory:
        env.update(LIVE_MEMORY_ENV)  # measures live memory: must return freed blocks, not retain
    else:
        _allocator_env(env, args.allocator)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks._worker",
            "--config",
            json.dumps(cfg),
            "--result",
            str(result_path),
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            record = {"ok": False, "error": f"timed out after {args.timeout:g} s", "config": cfg}
            return {**record, "name": name}
        if result_path.exists():
            record = json.loads(result_path.read_text())
        else:  # killed (e.g. out of memory) before it could write
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [
                f"exit status {proc.returncode}"
            ]
            record = {"ok": False, "error": f"worker died: {tail[0][:300]}", "config": cfg}
    if not record["ok"]:  # keep the traceback for the JSON file
        record["stderr_tail"] = (proc.stderr or "")[-3000:]
    record["name"] = name
    if live_memory:
        record["pass"] = "live-memory"
    return record


def _progress(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def measure(
    points: Sequence[Point],
    names: Sequence[str],
    args: argparse.Namespace,
    log: Path | None = None,
) -> list[dict[str, Any]]:
    """All points x configurations x rounds, interleaved; returns the raw worker records.

    Each record is also appended to ``log`` (JSON lines) as soon as it exists, so a run cut off
    by a time limit keeps what it measured (``--from-records`` turns such files into tables).
    """
    records = []

    def keep(rec: dict[str, Any], r: int, point: Point, label: str) -> None:
        """Record one worker's result: in the list, in the log, and as a progress line."""
        rec.update(round=r, point=asdict(point), finished_at=report.now())
        records.append(rec)
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps({"record": rec}) + "\n")
        what = (
            f"{rec['samples_per_s']:.1f} samples/s, {rec['peak_mem_bytes'] / 2**20:.0f} MiB"
            + (f", self-check {rec['self_check_s']:.2f} s" if rec.get("self_check_s") else "")
            if rec["ok"]
            else f"FAILED: {rec['error']}"
        )
        _progress(
            args,
            f"[{label}] {point.model} B={point.batch_size} T={point.seq_len or '-'} "
            f"{rec['name']}: {what}",
        )

    if not args.live_memory_only:
        for r in range(args.rounds):
            for point in points:
                for name in names:
                    keep(_run_worker(point, name, args), r, point, f"round {r + 1}/{args.rounds}")
    if _live_memory(args):
        for point in points:
            for name in names:
                keep(_run_worker(point, name, args, live_memory=True), 0, point, "live memory")
    return records


def _live_memory(args: argparse.Namespace) -> bool:
    """The live-memory pass runs for CPU model tables (CUDA's peak already counts live tensors)."""
    return args.device == "cpu" and not args.sweep and (args.live_memory or args.live_memory_only)


def _point_for(model: str, args: argparse.Namespace) -> Point:
    from benchmarks.models import MODELS

    spec = MODELS[model]
    seq_len = (args.seq_len or spec.seq_len) if spec.is_sequence else None
    return Point(model, args.batch_size or spec.default_batch_size(args.device), seq_len)


def _points(args: argparse.Namespace, models: Sequence[str]) -> list[Point]:
    if args.sweep:
        base = _point_for(SWEEP_MODEL, args)
        pts = [Point(SWEEP_MODEL, base.batch_size, length) for length in args.sweep_lengths]
        batches = args.sweep_batches or SWEEP_BATCHES[args.device]
        pts += [Point(SWEEP_MODEL, b, base.seq_len) for b in batches]
        return list(dict.fromkeys(pts))
    return [_point_for(m, args) for m in models]


def _profile(args: argparse.Namespace, model: str) -> int:
    """torch.profiler tables of one step per configuration (default: non-private, dpclip-mixed)."""
    point = _point_for(model, args)
    args.out.mkdir(parents=True, exist_ok=True)
    all_configs = args.configs == "all"
    names = ["non-private", "dpclip-mixed"] if all_configs else _select_configs(args.configs, True)
    status = 0
    for name in names:
        path = args.out / f"profile-{args.device}-{model}-{name}.txt"
        rec = _run_worker(point, name, args, profile_path=str(path))
        if rec["ok"]:
            _progress(args, f"wrote {path}")
        else:
            status = 1
            _progress(args, f"{name}: FAILED: {rec['error']}")
    return status


def machine_description(args: argparse.Namespace, records: Sequence[dict[str, Any]]) -> dict:
    """What the numbers were measured on."""
    cpu = report.cpu_name() or "unknown"

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    ok = [r for r in records if r.get("ok")]
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "device": ok[0]["device_name"] if ok else args.device,
        "torch_threads": ok[0]["torch_threads"] if ok else args.threads,
        "python": sys.version.split()[0],
        "torch": version("torch"),
        "opacus": version("opacus"),
        "dpclip": version("dpclip"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "mem_method": ok[0]["mem_method"] if ok else None,
    }


def _read_records_file(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of one records file: a header line first, then header or record lines."""
    try:
        text = path.read_text()
    except OSError as err:
        raise HarnessError(f"cannot read records from {path}: {err}") from None
    items: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise HarnessError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not (isinstance(item, dict) and len(item) == 1 and {"header", "record"} & item.keys()):
            raise HarnessError(f"{path}, line {number}: neither a header nor a record line")
        if not items and "header" not in item:
            raise HarnessError(f"{path} does not start with a header line: not a records file")
        items.append(item)
    return items


def _load_records(paths: Sequence[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header of the first file and the records of all; rounds renumbered to stay apart."""
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    for path in paths:
        lines = _read_records_file(path)
        if header is None:  # the Run line is the first file's: it ends with its last record
            stamps = [
                i["record"]["finished_at"] for i in lines if "finished_at" in i.get("record", {})
            ]
            first_finished = max(stamps, default=None)
        offset = 1 + max((r["round"] for r in records), default=-1)
        for item in lines:
            if "header" in item:
                if header is None:
                    header = item["header"]
                elif item["header"]["section"] != header["section"]:
                    raise HarnessError(
                        f"{path} holds section {item['header']['section']!r}, "
                        f"not {header['section']!r}: merge one section at a time"
                    )
                else:
                    header["names"] += [
                        n for n in item["header"]["names"] if n not in header["names"]
                    ]
            elif "record" in item:
                records.append({**item["record"], "round": item["record"]["round"] + offset})
    if header is None or not records:
        raise HarnessError(f"no header or no records in {[str(p) for p in paths]}")
    if len(paths) > 1:
        header["machine"]["merged_from"] = [p.name for p in paths]
    machine = header["machine"]
    machine["finished"] = first_finished or machine.get("finished") or "an unrecorded time"
    return header, records


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; 0 when every configuration ran."""
    from benchmarks.models import MODELS

    models = list(MODELS) if args.models == "all" else _csv(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise HarnessError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.profile:
        if args.profile not in MODELS:
            raise HarnessError(f"unknown model {args.profile!r}; choose from {list(MODELS)}")
        return _profile(args, args.profile)
    if args.live_memory_only and not _live_memory(args):
        raise HarnessError(
            "--live-memory-only applies to CPU model tables: not to --sweep or --device cuda "
            "(CUDA's peak memory already counts live tensors)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_records:
        header, records = _load_records(args.from_records)
        rank = {m: i for i, m in enumerate(MODELS)}  # the table's usual model order, any file order
        records.sort(key=lambda r: rank.get(r["point"]["model"], len(rank)))
    else:
        opacus = importlib.util.find_spec("opacus") is not None
        names = _select_configs(args.configs, opacus)
        if args.sweep:
            names = [n for n in names if n in SWEEP_CONFIGS]
        section = f"{'sweep' if args.sweep else 'models'}-{args.device}"
        if args.allocator != "default":
            section += f"-{args.allocator}"
        if args.accumulate > 1:
            section += f"-accumulate{args.accumulate}"
        machine = machine_description(args, [])
        machine.update(
            started=report.now(),
            load_average_before=os.getloadavg() if hasattr(os, "getloadavg") else None,
            rounds=args.rounds,
            steps=args.steps,
            warmup=args.warmup,
            opacus_included=opacus,
            live_memory=_live_memory(args),
            allocator=args.allocator,
            accumulate=args.accumulate,
        )
        header = {"section": section, "sweep": args.sweep, "names": names, "machine": machine}
        log = args.out / f"records-{section}.jsonl"
        log.write_text(json.dumps({"header": header}) + "\n")
        records = measure(_points(args, models), names, args, log)
    return _report(header, records, args)


def _report(header: dict[str, Any], records: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Summarise ``records`` into the JSON file, the plot and the section of RESULTS.md."""
    section, names, sweep = header["section"], header["names"], header["sweep"]
    machine = dict(header["machine"])
    ok = [r for r in records if r.get("ok")]
    seen = {"device": "device_name", "torch_threads": "torch_threads", "mem_method": "mem_method"}
    for key, field in seen.items():  # what the workers saw, not what the parent guessed
        if ok and field in ok[0]:
            machine[key] = ok[0][field]
    machine.setdefault("finished", report.now())  # a live run ends now; records keep theirs
    summary = report.summarise(records, names)
    plot = None
    if sweep:
        plot = report.plot_sweep(summary, args.out / f"{section}.png")
    payload = {
        "section": section,
        "machine": machine,
        "configs": names,
        "summary": summary,
        "records": records,
    }
    (args.out / f"results-{section}.json").write_text(json.dumps(payload, indent=1))
    body = report.markdown_section(
        section, machine, summary, names, sweep, plot, args.results.parent
    )
    report.write_section(args.results, section, body)
    _progress(args, f"wrote {args.results} [{section}] and {args.out}")
    failed = [r for r in records if not r["ok"]]
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except HarnessError as err:
        print(f"benchmarks.run: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
