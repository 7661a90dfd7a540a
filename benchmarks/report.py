"""Turn raw worker records into medians and ratios, a Markdown section, and the sweep plot."""

from __future__ import annotations

import datetime as _dt
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MiB = 2**20
HEADER = """# dpclip benchmark results

Produced by `python -m benchmarks.run` (see `benchmarks/run.py`). Each block between
`BEGIN bench:` / `END bench:` markers is rewritten by the harness for its own kind of run
(model table or sweep, per device); everything outside the markers is written by hand and kept.
"""


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_description() -> str:
    """The CPU and the cores this process may use, for a table's one-line machine note."""
    import platform

    name = cpu_name() or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _point_key(rec: dict[str, Any]) -> tuple:
    p = rec["point"]
    return (p["model"], p["batch_size"], p["seq_len"])


def summarise(records: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per point and configuration: medians over rounds and median per-round ratio to non-private."""
    points: dict[tuple, dict[tuple[str, int], dict]] = {}
    live: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        if rec.get("pass") == "live-memory":
            live.setdefault(_point_key(rec), {})[rec["name"]] = rec
        else:
            points.setdefault(_point_key(rec), {})[(rec["name"], rec["round"])] = rec
    for key in live:
        points.setdefault(key, {})
    out = []
    for (model, batch, seq_len), by in points.items():
        live_by = live.get((model, batch, seq_len), {})
        live_base = live_by.get("non-private")
        rounds = sorted({r for _, r in by})
        rows = []
        for name in names:
            runs = [by[(name, r)] for r in rounds if (name, r) in by]
            ok = [rec for rec in runs if rec["ok"]]
            thr_ratio, best_ratio, mem_ratio, ops_ratio, warmup_ratio = [], [], [], [], []
            for r in rounds:
                rec, base = by.get((name, r)), by.get(("non-private", r))
                if rec and base and rec["ok"] and base["ok"]:
                    thr_ratio.append(rec["samples_per_s"] / base["samples_per_s"])
                    if rec.get("step_times_s") and base.get("step_times_s"):
                        best_ratio.append(min(base["step_times_s"]) / min(rec["step_times_s"]))
                    if base["peak_mem_bytes"] > 0:
                        mem_ratio.append(rec["peak_mem_bytes"] / base["peak_mem_bytes"])
                        if rec.get("warmup_peak_mem_bytes"):  # against non-private's training
                            warmup_ratio.append(
                                rec["warmup_peak_mem_bytes"] / base["peak_mem_bytes"]
                            )
                    if rec.get("ops_per_step") and base.get("ops_per_step"):
                        ops_ratio.append(rec["ops_per_step"] / base["ops_per_step"])
            thr = [rec["samples_per_s"] for rec in ok]
            lv = live_by.get(name)
            live_mib = lv["peak_mem_bytes"] / MiB if lv and lv["ok"] else None
            live_ratio = None
            if live_mib is not None and live_base and live_base["ok"]:
                live_ratio = lv["peak_mem_bytes"] / max(1, live_base["peak_mem_bytes"])
            rows.append(
                {
                    "name": name,
                    "rounds_ok": len(ok),
                    "rounds": len(runs),
                    "samples_per_s": _median(thr),
                    "samples_per_s_min": min(thr) if thr else None,
                    "samples_per_s_max": max(thr) if thr else None,
                    "throughput_ratio": _median(thr_ratio),
                    "best_step_ratio": _median(best_ratio),
                    "peak_mem_mib": _median([rec["peak_mem_bytes"] / MiB for rec in ok]),
                    "memory_ratio": _median(mem_ratio),
                    "warmup_memory_ratio": _median(warmup_ratio),
                    "live_mem_mib": live_mib,
                    "live_memory_ratio": live_ratio,
                    "ops_per_step": _median(
                        [r["ops_per_step"] for r in ok if r.get("ops_per_step")]
                    ),
                    "ops_ratio": _median(ops_ratio),
                    "errors": sorted({rec["error"] for rec in runs if not rec["ok"]}),
                }
            )
        out.append({"model": model, "batch_size": batch, "seq_len": seq_len, "rows": rows})
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    load = machine.get("load_average_before")
    load_text = ", ".join(f"{v:.2f}" for v in load) if load else "n/a"
    return [
        f"- Machine: {machine['cpu']}, {machine['usable_cores']} usable of "
        f"{machine['logical_cores']} logical cores; device `{machine['device']}`; "
        f"torch {machine['torch']} with {machine['torch_threads']} threads; "
        f"Python {machine['python']}; opacus {machine['opacus']}; dpclip {machine['dpclip']}.",
        f"- Run: {machine['started']} to {machine['finished']}; {machine['rounds']} rounds, "
        f"{machine['warmup']} warm-up + {machine['steps']} timed steps per run, each configuration "
        f"in a fresh process, interleaved; load average at start (1/5/15 min): {load_text}.",
        f"- Peak memory: {machine['mem_method']}."
        + (
            " First steps' memory ×: the peak of the model build and the warm-up steps, where "
            "dpclip's first step runs its self-check, against non-private training's peak."
            if (machine.get("mem_method") or "").startswith("VmHWM over")
            or machine.get("mem_method") == "torch.cuda.max_memory_allocated"
            else ""
        )
        + (
            " Live MiB: the same, from one more run per configuration in which glibc returns "
            "every freed block of 64 KiB or more to the OS (MALLOC_MMAP_THRESHOLD_=65536), so "
            "the peak is that of live memory, not of what the allocator keeps."
            if machine.get("live_memory")
            else ""
        ),
        "- Ops/step: aten operations dispatched in one more, untimed step (a "
        "TorchDispatchMode count: a proxy for kernel launches and host overhead; "
        "`python -m benchmarks.ops` for the reference points).",
        *(
            [
                "- Merged from the records files "
                + ", ".join(f"`{name}`" for name in machine["merged_from"])
                + ": machine, run dates, rounds and steps above are the first file's; each "
                "file's own are in its header line, and rounds of different files stay apart."
            ]
            if machine.get("merged_from")
            else []
        ),
        *(
            [
                f"- Gradient accumulation (`--accumulate {k}`): a step is {k} forward and "
                f"backward passes of `batch` samples and one optimizer step, so the DP methods "
                f"draw their noise once per {k} x batch samples; samples/s counts all of them."
            ]
            if (k := machine.get("accumulate", 1)) > 1
            else []
        ),
        "- samples/s = samples per step / median step time of a run (robust to stalls on a "
        "shared machine; the mean-based figure is in the JSON).",
        "- Ratios are medians of per-round ratios against the non-private run of the same round; "
        "samples/s shows the median and [min-max] over rounds. Best step ×: the same from each "
        "run's fastest step (the least disturbed by other load on a shared machine).",
        "- Allocator: "
        + (
            "glibc keeps freed memory for re-use in every worker (`--allocator retain`, "
            "GLIBC_TUNABLES mmap_max=0, trim_threshold=4 GiB): no page faults on re-used buffers."
            if machine.get("allocator") == "retain"
            else "glibc as configured (large blocks are unmapped when freed and faulted in again "
            "when re-used; `--allocator retain` measures without that)."
        ),
    ]


def _model_table(summary: Sequence[dict[str, Any]]) -> list[str]:
    live = any(row.get("live_mem_mib") is not None for p in summary for row in p["rows"])
    head = "| model | batch | T | configuration | samples/s [min-max] | × non-private |"
    warmup = any(row.get("warmup_memory_ratio") is not None for p in summary for row in p["rows"])
    head += " best step × | peak MiB | memory × non-private |"
    head += " first steps' memory × |" if warmup else ""
    head += " live MiB | live × non-private |" if live else ""
    head += " ops/step | ops × non-private |"
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if warmup else "")
             + ("---:|---:|" if live else "") + "---:|---:|"]  # fmt: skip
    for point in summary:
        for row in point["rows"]:
            if row["rounds"] == 0:
                thr = "not timed"
            elif row["rounds_ok"] == 0:
                thr = "failed: " + "; ".join(row["errors"]).replace("|", "/")
            else:
                thr = (
                    f"{row['samples_per_s']:.1f} [{row['samples_per_s_min']:.1f}-"
                    f"{row['samples_per_s_max']:.1f}]"
                )
                if row["rounds_ok"] < row["rounds"]:
                    thr += f" ({row['rounds_ok']}/{row['rounds']} rounds ok)"
            line = (
                f"| {point['model']} | {point['batch_size']} | {point['seq_len'] or '-'} | "
                f"{row['name']} | {thr} | {_fmt(row['throughput_ratio'], '.2f', '×')} | "
                f"{_fmt(row.get('best_step_ratio'), '.2f', '×')} | "
                f"{_fmt(row['peak_mem_mib'], '.0f')} | {_fmt(row['memory_ratio'], '.2f', '×')} |"
            )
            if warmup:
                line += f" {_fmt(row.get('warmup_memory_ratio'), '.2f', '×')} |"
            if live:
                line += (
                    f" {_fmt(row.get('live_mem_mib'), '.0f')} |"
                    f" {_fmt(row.get('live_memory_ratio'), '.2f', '×')} |"
                )
            line += f" {_fmt(row.get('ops_per_step'), '.0f')} | {_fmt(row.get('ops_ratio'), '.2f', '×')} |"
            lines.append(line)
    return lines


def _sweep_table(summary: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    dp = [n for n in names if n != "non-private"]
    head = (
        "| T | batch | non-private samples/s | "
        + " | ".join(f"{n} × thr / × mem" for n in dp)
        + " |"
    )
    lines = [head, "|---:|---:|---:|" + "---:|" * len(dp)]
    for point in sorted(summary, key=lambda p: (p["seq_len"] or 0, p["batch_size"])):
        rows = {row["name"]: row for row in point["rows"]}
        cells = [
            f"{_fmt(rows[n]['throughput_ratio'], '.2f')} / {_fmt(rows[n]['memory_ratio'], '.2f')}"
            if rows[n]["rounds_ok"]
            else "failed"
            for n in dp
        ]
        lines.append(
            f"| {point['seq_len']} | {point['batch_size']} | "
            f"{_fmt(rows['non-private']['samples_per_s'], '.1f')} | " + " | ".join(cells) + " |"
        )
    return lines


def markdown_section(
    section: str,
    machine: dict[str, Any],
    summary: Sequence[dict[str, Any]],
    names: Sequence[str],
    sweep: bool,
    plot: Path | None,
    results_dir: Path,
) -> str:
    """The Markdown body for one section of RESULTS.md."""
    title = "Sequence-length and batch-size sweep (GPT-like)" if sweep else "Models"
    device = section.split("-")[1].upper()
    retain = (
        ", glibc allocator retaining freed memory" if machine.get("allocator") == "retain" else ""
    )
    k = machine.get("accumulate", 1)
    accumulate = f", {k} physical batches per step" if k > 1 else ""
    lines = [f"### {title}, {device}{retain}{accumulate}", ""] + _machine_lines(machine)
    if not machine.get("opacus_included"):
        lines.append("- Opacus is not installed: its rows are omitted.")
    lines.append("")
    lines += _sweep_table(summary, names) if sweep else _model_table(summary)
    if plot is not None:
        rel = os.path.relpath(plot, results_dir)
        lines += ["", f"![throughput against batch size and sequence length]({rel})"]
    errors = sorted({e for p in summary for row in p["rows"] for e in row["errors"]})
    if errors and sweep:
        lines += ["", "Failures: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the marked section ``section`` of ``path``, keeping everything else."""
    begin, end = f"<!-- BEGIN bench:{section} -->", f"<!-- END bench:{section} -->"
    block = f"{begin}\n{body}{end}\n"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot_sweep(summary: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Throughput against batch size (at the most common T) and against T; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_lens = [p["seq_len"] for p in summary]
    batches = [p["batch_size"] for p in summary]
    t_fixed = max(set(seq_lens), key=seq_lens.count)
    b_fixed = max(set(batches), key=batches.count)
    panels = [
        (
            "batch_size",
            [p for p in summary if p["seq_len"] == t_fixed],
            f"batch size (T = {t_fixed})",
        ),
        ("seq_len", [p for p in summary if p["batch_size"] == b_fixed], f"T (batch = {b_fixed})"),
    ]
    panels = [pn for pn in panels if len(pn[1]) > 1]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, pts, label) in zip(axes[0], panels, strict=True):
        pts = sorted(pts, key=lambda p: p[key])
        names = [row["name"] for row in pts[0]["rows"]]
        for i, name in enumerate(names):
            done = [p for p in pts if p["rows"][i]["samples_per_s"] is not None]
            xs = [p[key] for p in done]
            ys = [p["rows"][i]["samples_per_s"] for p in done]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks([p[key] for p in pts], [str(p[key]) for p in pts])  # plain 64, 128, ...
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("samples / s (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("GPT-like decoder: training throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
