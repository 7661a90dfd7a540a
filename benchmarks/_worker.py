"""One benchmark configuration in one fresh process: build, attach, warm up, time, report as JSON.

Invoked by :mod:`benchmarks.run` as ``python -m benchmarks._worker --config JSON --result PATH``.

Peak memory, counted from after the DP library is imported (see :func:`_import_framework`).
On CUDA: ``torch.cuda.max_memory_allocated`` from a reset before the model is built,
so it counts parameters, optimizer state, activations and per-sample buffers. On CPU: the peak
resident set size (VmHWM) minus the resident size just before the model is built. The peak is
reset first by writing ``5`` to ``/proc/self/clear_refs`` so that import-time peaks do not count;
where that is not allowed, ``ru_maxrss`` is used instead (method recorded in the result).
Two peaks are recorded: ``warmup_peak_mem_bytes`` over the build and the warm-up steps (dpclip's
first step runs its self-check), then, after a second reset, ``peak_mem_bytes`` over the timed
steps: the memory training needs (with ``ru_maxrss``, which cannot be reset, both include all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from benchmarks.models import MODELS, ModelSpec
from benchmarks.ops import count_step

OPACUS_NOISE = 1.0  # the settings the issue asks for; only the cost matters here
OPACUS_CLIP = 1.0
DPCLIP_NOISE = 1.0
SAMPLE_RATE_DENOM = 100  # sample_size = 100 x batch: a plausible sampling rate for the accountant


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one run needs; serialised as JSON by the parent."""

    model: str
    method: str  # non-private | dpclip | opacus
    batch_size: int
    seq_len: int | None
    steps: int
    warmup: int
    device: str = "cpu"
    threads: int | None = None
    norm_strategy: str = "mixed"  # dpclip only
    clipping_style: str = "all-layer"  # dpclip only
    grad_sample_mode: str = "hooks"  # opacus only
    seed: int = 0
    profile_path: str | None = None  # write a torch.profiler table here instead of timing
    accumulate: int = 1  # physical batches (forward + backward) per optimizer step

    @property
    def logical_batch(self) -> int:
        """Samples per optimizer step (one noise draw for the DP methods)."""
        return self.batch_size * self.accumulate


# --- memory ----------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory growth of this process from :meth:`start` on (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self.baseline = "torch.cuda.max_memory_allocated", 0
            return
        rss_kb = _proc_status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm_ok = rss_kb is not None and _proc_status_kb("VmHWM") is not None
        except OSError:
            hwm_ok = False
        if hwm_ok:
            self.method, self.baseline = (
                "VmHWM after reset - VmRSS before model build",
                rss_kb * 1024,
            )
        else:
            self.method = "ru_maxrss - ru_maxrss before model build (includes import-time peak)"
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def restart_peak(self) -> None:
        """From here on, :meth:`peak_bytes` is the peak of what follows (the baseline stays):
        the steady steps' peak, apart from what the first steps (dpclip's self-check) took."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = (
                "VmHWM over the timed steps (reset after warm-up) - VmRSS before model build"
            )

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method.startswith("VmHWM"):
            return int(_proc_status_kb("VmHWM") or 0) * 1024 - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


# --- one training step per method ----------------------------------------------------------------

Step = Callable[[], Tensor]


def _plain_step(
    model: nn.Module, opt: Any, spec: ModelSpec, x: Tensor, y: Tensor, accumulate: int = 1
) -> Step:
    """``accumulate`` forward and backward passes of (x, y), then one optimizer step. Opacus'
    optimizer is told to skip (clip and sum, no noise, no update) after all but the last."""
    skip = getattr(opt, "signal_skip_step", None)

    def step() -> Tensor:  # record_function labels let a profile split the step into phases
        for k in range(accumulate):
            with record_function("bench.forward"):
                loss = spec.loss_fn(model(x), y)
            with record_function("bench.backward"):
                loss.backward()
            if k < accumulate - 1 and skip is not None:
                skip(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        with record_function("bench.optimizer_step"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _attach_dpclip(cfg: WorkerConfig, model: nn.Module, opt: Any) -> Any:
    import dpclip

    return dpclip.PrivacyEngine(
        model,
        opt,
        sample_size=SAMPLE_RATE_DENOM * cfg.logical_batch,
        batch_size=cfg.logical_batch,
        # warm-up, timed, the counted step, and the profiled one when asked
        steps=cfg.warmup + cfg.steps + 1 + bool(cfg.profile_path),
        noise_multiplier=DPCLIP_NOISE,
        clipping="automatic",
        clipping_style=cfg.clipping_style,
        norm_strategy=cfg.norm_strategy,
        seed=cfg.seed,
    )


def _opacus_step(cfg: WorkerConfig, spec: ModelSpec, model: nn.Module, opt: Any, x, y) -> Step:
    """Opacus 1.6 make_private on a fixed batch (no Poisson sampling); ghost mode wraps the loss."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore", module="opacus")  # secure-RNG and accountant notices
    k = cfg.accumulate  # the loader only sets Opacus' expected batch: the logical one
    loader = DataLoader(
        TensorDataset(x.repeat(k, *[1] * (x.dim() - 1)), y.repeat(k, *[1] * (y.dim() - 1))),
        batch_size=cfg.logical_batch,
    )
    engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    made = engine.make_private(
        module=model,
        optimizer=opt,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=OPACUS_NOISE,
        max_grad_norm=OPACUS_CLIP,
        poisson_sampling=False,
        grad_sample_mode=cfg.grad_sample_mode,
    )
    if cfg.grad_sample_mode == "hooks":
        dp_model, dp_opt, _ = made
        return _plain_step(dp_model, dp_opt, spec, x, y, cfg.accumulate)
    dp_model, dp_opt, dp_criterion, _ = made

    def step() -> Tensor:
        for k in range(cfg.accumulate):
            out = dp_model(x)
            if spec.is_sequence:  # per-sample loss = mean over the sequence (Opacus' `shape`)
                loss = dp_criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=out.shape)
            else:
                loss = dp_criterion(out, y)
            loss.backward()  # Opacus runs its two backward passes in here
            dp_opt.signal_skip_step(do_skip=k < cfg.accumulate - 1)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _build(cfg: WorkerConfig, device: torch.device) -> tuple[Step, int, Any]:
    spec = MODELS[cfg.model]
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = spec.make_batch(cfg.batch_size, cfg.seq_len, gen)
    x, y = x.to(device), y.to(device)
    model = spec.build().to(device).train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    keep_alive = None
    if cfg.method == "non-private":
        step = _plain_step(model, opt, spec, x, y, cfg.accumulate)
    elif cfg.method == "dpclip":
        keep_alive = _attach_dpclip(cfg, model, opt)
        step = _plain_step(model, opt, spec, x, y, cfg.accumulate)
    elif cfg.method == "opacus":
        step = _opacus_step(cfg, spec, model, opt, x, y)
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    return step, n_params, keep_alive


def _import_framework(method: str) -> None:
    """Import the DP library and its accountant before memory is counted: their code and
    import-time data (dpclip's accountant pulls in scipy: ~70 MB RSS; Opacus ~50 MB) are a
    constant per process, not training memory."""
    if method == "dpclip":
        import dpclip
        import dpclip.engine  # noqa: F401  (with dpclip.accounting and dp_accounting)
    elif method == "opacus":
        import opacus  # noqa: F401
        import opacus.accountants  # noqa: F401


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(step: Step, device: torch.device, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    phases = [f"{e.key:<24} {e.cpu_time_total / 1e3:10.1f} ms" for e in events
              if e.key.startswith("bench.")]  # fmt: skip
    text = "Phases (CPU time incl. children):\n" + "\n".join(sorted(phases)) + "\n\n"
    Path(path).write_text(text + events.table(sort_by=sort, row_limit=40))


def _time_self_check(engine: Any, cfg: WorkerConfig, device: torch.device) -> float:
    """The self-check dpclip runs before its first step, timed on its own (engine.verify on the
    benchmark's batch and loss): what the first step costs beyond a steady one."""
    spec = MODELS[cfg.model]
    x, y = spec.make_batch(cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    x, y = x.to(device), y.to(device)
    t0 = time.perf_counter()
    engine.verify(x, loss_fn=lambda out: spec.loss_fn(out, y))
    _sync(device)
    return time.perf_counter() - t0


def run_config(cfg: WorkerConfig) -> dict[str, Any]:
    """Build, warm up, time ``cfg.steps`` steps; return throughput, peak memory and context."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    _import_framework(cfg.method)
    meter = MemoryMeter(device)
    meter.start()
    step, n_params, engine = _build(cfg, device)
    first_step_s, t0 = None, time.perf_counter()
    for k in range(cfg.warmup):
        step()  # dpclip's first step runs its self-check
        _sync(device)
        if k == 0:
            first_step_s = time.perf_counter() - t0
    warmup_peak = meter.peak_bytes()  # build and warm-up: dpclip's first step runs its check
    meter.restart_peak()
    if cfg.profile_path:
        _profile(step, device, cfg.profile_path)
    times, loss = [], float("nan")
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        loss = float(step())
        _sync(device)
        times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}")
    peak = meter.peak_bytes()  # the timed steps': not the counted step nor the timed self-check
    counted = count_step(step)  # one more, untimed step: the operations it dispatches
    timed = cfg.method == "dpclip" and hasattr(engine, "verify")  # older dpclip: no self-check
    self_check_s = _time_self_check(engine, cfg, device) if timed else None
    # the median step is robust to the stalls a shared machine inflicts on a few steps
    median_step = statistics.median(times)
    return {
        "ok": True,
        "samples_per_s": cfg.logical_batch / median_step,
        "samples_per_s_mean_step": cfg.logical_batch * cfg.steps / sum(times),
        "step_times_s": times,
        "first_step_s": first_step_s,
        "self_check_s": self_check_s,
        "peak_mem_bytes": peak,
        "warmup_peak_mem_bytes": warmup_peak,
        "ops_per_step": counted.total,
        "kernels_per_step": counted.kernels,
        "mem_method": meter.method,
        "final_loss": loss,
        "n_params": n_params,
        "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="WorkerConfig as JSON")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    cfg = WorkerConfig(**json.loads(args.config))
    try:
        result = run_config(cfg)
    except Exception as err:  # reported in the table; the parent decides the exit status
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    result["config"] = cfg.__dict__
    result["pid"] = os.getpid()
    Path(args.result).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
