"""The least a DP step can cost here: the matmul work dpclip adds, and the noise, at full speed.

For each model, one non-private and one dpclip step (default ``mixed`` strategy, the benchmark's
batch) run under torch's ``FlopCounterMode``; the difference in matrix products (mm, addmm, bmm, mv,
baddbmm) is every multiply-add dpclip adds there (ghost-norm Grams, instantiated per-sample
gradients, tied-weight cross terms). Convolutions are left out on both sides (the counter's
figure for dpclip's grouped per-sample weight-gradient convolutions is not their multiply-adds),
so a model whose work is mostly convolutions is refused; a patch embedding is fine. The noise
needs one Gaussian draw per trainable parameter. With the machine's peak matmul rate and torch's
``normal_`` cost per element, no implementation of exact per-sample norms and exact noise can
beat

    bound = t_np / (t_np + extra multiply-adds / peak rate + parameters x normal_ time)

where t_np is the non-private step's time. With ``--accumulate K`` (K physical batches per
optimizer step, as DP training with large logical batches runs) the Grams are paid K times and
the noise once:

    bound = K t_np / (K t_np + K extra multiply-adds / peak rate + parameters x normal_ time)

Each repeat times the step, a large matmul and a draw back to back (a shared machine's slow
stretches hit all three); the bound is the median of the repeats' bounds. Everything else
dpclip does (per-sample norm layers, bias sums, hooks, scaling by the clipping factors) only adds
to the denominator.

Usage (from the repository root)::

    python -m benchmarks.floor --models gpt-like,vit-small
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.models import MODELS, ModelSpec

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "mv"}


@dataclass(frozen=True)
class Timing:
    """One repeat, measured back to back so a slow stretch of a shared machine hits all three."""

    step_s: float  # the non-private step
    peak_macs_per_s: float  # one large float32 matmul: the best a Gram can run at
    normal_ns: float  # torch's CPU normal_ per element, into a warm buffer

    def bound(self, extra_macs: float, noise_elements: int, accumulate: int = 1) -> float:
        """The bound with ``accumulate`` physical batches per optimizer step: the extra
        multiply-adds are paid for every batch, the noise once per step."""
        batches = accumulate * self.step_s
        grams = accumulate * extra_macs / self.peak_macs_per_s
        return batches / (batches + grams + noise_elements * self.normal_ns / 1e9)


@dataclass(frozen=True)
class Floor:
    """One model's floor: its non-private step, what dpclip must add, and the bound."""

    model: str
    batch_size: int
    seq_len: int | None
    macs: float  # non-private step, multiply-adds of its matrix products
    extra_macs: float  # dpclip step minus non-private step, the same
    noise_elements: int
    timings: tuple[Timing, ...]

    @property
    def bound(self) -> float:
        """Median over repeats of each repeat's bound, one physical batch per step."""
        return self.bound_at(1)

    def bound_at(self, accumulate: int) -> float:
        """Median over repeats of each repeat's bound, ``accumulate`` batches per step."""
        return statistics.median(
            t.bound(self.extra_macs, self.noise_elements, accumulate) for t in self.timings
        )

    @property
    def step_ms(self) -> float:
        return statistics.median(t.step_s for t in self.timings) * 1e3


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_timing(step: Callable[[], None], n: int = 1024, draws: int = 1 << 20) -> Timing:
    """The non-private step, then the matmul rate and normal_ (each the faster of two runs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    x, gen = torch.empty(draws), torch.Generator().manual_seed(0)
    step_s = _seconds(step)
    matmul_s = min(_seconds(lambda: a @ b) for _ in range(2))
    normal_s = min(_seconds(lambda: x.normal_(generator=gen)) for _ in range(2))
    return Timing(step_s, n**3 / matmul_s, normal_s / draws * 1e9)


def _trainer(
    spec: ModelSpec, private: bool, batch_size: int
) -> tuple[Callable[[], None], torch.nn.Module]:
    import dpclip

    gen = torch.Generator().manual_seed(0)
    x, y = spec.make_batch(batch_size, spec.seq_len, gen)
    torch.manual_seed(0)
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if private:
        dpclip.PrivacyEngine(
            model, opt, sample_size=100 * batch_size, batch_size=batch_size, steps=10**6,
            noise_multiplier=1.0, seed=0,
        )  # fmt: skip

    def step() -> None:
        spec.loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up, and builds lazily created state
    return step, model


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Matrix-vector products (dpclip's per-sample sums): torch's counter has no formula."""
    return 2 * a_shape[0] * a_shape[1]


_EXTRA_FORMULAS = {torch.ops.aten.mv: _mv_flop}


def _macs(step: Callable[[], None]) -> tuple[float, float]:
    """Multiply-adds of one step: its matrix products, and everything the counter counts."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        step()
    ops = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in ops.items() if op.__name__.split(".")[0] in _MATMULS)
    return matmuls / 2, counter.get_total_flops() / 2


def measure_floor(model: str, *, batch_size: int | None = None, repeats: int = 3) -> Floor:
    """The floor of ``model`` at ``batch_size`` (default: the benchmark's CPU batch)."""
    spec = MODELS[model]
    batch = batch_size or spec.default_batch_size("cpu")
    (plain, _), (private, attached) = _trainer(spec, False, batch), _trainer(spec, True, batch)
    params = sum(p.numel() for p in attached.parameters())  # all trainable: each gets noise
    macs, everything = _macs(plain)
    if macs < everything / 2:
        raise ValueError(
            f"{model}: most of its non-private multiply-adds are convolutions, which the bound "
            "leaves out; it is meant for models made of matrix products (transformers)"
        )
    extra = _macs(private)[0] - macs
    del private, attached  # only the non-private model is timed
    return Floor(
        model=model, batch_size=batch, seq_len=spec.seq_len, macs=macs, extra_macs=extra,
        noise_elements=params, timings=tuple(measure_timing(plain) for _ in range(repeats)),
    )  # fmt: skip


def markdown(floors: Sequence[Floor], accumulate: int = 1) -> str:
    """The floors as a Markdown table; a column more for ``accumulate`` > 1 batches per step."""
    more = accumulate > 1
    lines = [
        "| model | batch | T | non-private step | its matmul G multiply-adds | dpclip adds (G) | "
        "noise draws (M) | peak matmul G/s | normal_ ns | bound × non-private |"
        + (f" bound at {accumulate} batches/step |" if more else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if more else ""),
    ]
    for f in floors:
        peak = statistics.median(t.peak_macs_per_s for t in f.timings) / 1e9
        normal_ns = statistics.median(t.normal_ns for t in f.timings)
        lines.append(
            f"| {f.model} | {f.batch_size} | {f.seq_len or '-'} | {f.step_ms:.0f} ms | "
            f"{f.macs / 1e9:.1f} | {f.extra_macs / 1e9:.2f} ({f.extra_macs / f.macs:.1%}) | "
            f"{f.noise_elements / 1e6:.1f} | {peak:.0f} | {normal_ns:.1f} | {f.bound:.2f}× |"
            + (f" {f.bound_at(accumulate):.2f}× |" if more else "")
        )
    lines.append(f"\ntorch {torch.__version__} with {torch.get_num_threads()} threads.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument("--models", default="gpt-like,gpt2,gpt2-untied,vit-small")
    parser.add_argument("--batch-size", type=int, help="override every model's default")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed non-private steps, each with its rates"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="also the bound with this many physical batches per optimizer step (noise once)",
    )
    args = parser.parse_args(argv)
    if args.accumulate < 1:
        parser.error(f"--accumulate must be at least 1, got {args.accumulate}")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(args.threads)
    try:
        floors = [
            measure_floor(m, batch_size=args.batch_size, repeats=args.repeats) for m in models
        ]
    except ValueError as err:
        parser.error(str(err))
    print(markdown(floors, args.accumulate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
