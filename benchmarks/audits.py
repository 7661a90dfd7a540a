"""One-run privacy audits of dpclip on digits, correct and with injected faults.

    python -m benchmarks.audits                   # into benchmarks/RESULTS.md
    python -m benchmarks.audits --results FILE

Each row is one ``dpclip.audit`` run (the defaults of ``dpclip audit`` for its canary kind):
the ledger's ε and the lower bound the canaries show at 95% confidence. The fault rows patch the
engine for the duration of one run, to show what the audit catches: clipping switched off, and
the noise's standard deviation divided by 10 and by 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def fault(name: str | None) -> Iterator[None]:
    """Inject one fault into the engine while the block runs (None: none)."""
    import torch

    from dpclip import _bookkeeping
    from dpclip.noise import GaussianNoise

    if name is None:
        yield
        return
    if name == "no clipping":
        saved = _bookkeeping.clip_factors
        # every example whole: factor 1 on its own gradient (the engine's mean-loss scale kept)
        _bookkeeping.clip_factors = lambda kind, norms, scale=1.0, **kw: torch.full_like(
            norms, scale
        )
        try:
            yield
        finally:
            _bookkeeping.clip_factors = saved
        return
    divisor = {"noise / 10": 10.0, "noise / 2": 2.0}[name]
    add = GaussianNoise.add_

    def weaker(self, tensors, *, scale=1.0):
        std, self.std = self.std, self.std / divisor
        try:
            add(self, tensors, scale=scale)
        finally:
            self.std = std

    GaussianNoise.add_ = weaker
    try:
        yield
    finally:
        GaussianNoise.add_ = add


RUNS = [  # (canaries, target ε or None for no noise, fault)
    *((kind, eps, None) for kind in ("dirac", "input") for eps in (1.0, 3.0, 8.0, None)),
    ("dirac", 3.0, "no clipping"),
    ("dirac", 3.0, "noise / 10"),
    ("dirac", 3.0, "noise / 2"),
]


def run_one(kind: str, epsilon: float | None, fault_name: str | None) -> dict:
    import torch

    from dpclip.auditing import audit
    from dpclip.cli.audit import DEFAULT_LR, KIND_DEFAULTS
    from dpclip.datasets import load_dataset
    from dpclip.models import mlp

    train, _, info = load_dataset("digits")
    d = KIND_DEFAULTS[kind]
    make = torch.optim.Adam if d["optimizer"] == "adam" else torch.optim.SGD
    lr = DEFAULT_LR[d["optimizer"]]
    torch.manual_seed(0)
    budget = {"target_epsilon": epsilon} if epsilon else {"noise_multiplier": 0.0}
    with fault(fault_name):
        result = audit(mlp(info.input_shape, info.num_classes), train, canaries=kind,
                       num_canaries=d["num_canaries"], epochs=d["epochs"],
                       optimizer=lambda ps: make(ps, lr=lr), target_delta=1e-5, **budget)  # fmt: skip
    return {"fault": fault_name, **result.to_dict()}


def markdown(rows: list[dict], machine: str) -> str:
    lines = [
        "## Privacy audits",
        "",
        "One-run audits (Steinke, Nasr, Jagielski 2023) on digits with the defaults of "
        "`dpclip audit`: Dirac canaries (1000, white-box: every noisy update seen; SGD, 30 "
        "epochs) and input canaries (200 mislabelled examples, black-box: the final model; "
        "Adam, 100 epochs), δ = 1e-5, seed 0. The bound holds at 95% confidence; above the "
        "ledger's ε it shows a leak; a ledger ε above the ceiling (the bound with every guess "
        "right) cannot be contradicted by these canaries. Fault rows patch the engine for one "
        "run. "
        f"Measured on {machine}.",
        "",
        "Reproduce: `python -m benchmarks.audits` (one run: `dpclip audit --epsilon 3 --json`)",
        "",
        "| canaries | engine | σ | ledger ε | correct / guesses | ε lower bound | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        eps = r["epsilon"]
        ledger = "∞" if eps is None else f"{eps:.2f}"
        verdict = {"leak": "leak detected", "consistent": "consistent",
                   "inconclusive": f"inconclusive (ceiling {r['ceiling']:.2f})"}[r["verdict"]]  # fmt: skip
        lines.append(
            f"| {r['canaries']} | {r['fault'] or 'correct'} | {r['noise_multiplier']:.3g} | "
            f"{ledger} | {r['correct']} / {r['guesses']} | {r['epsilon_lower_bound']:.2f} | "
            f"{verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks import report

    p = argparse.ArgumentParser(prog="python -m benchmarks.audits",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    rows = []
    for kind, eps, fault_name in RUNS:
        rows.append(run_one(kind, eps, fault_name))
        r = rows[-1]
        ledger = math.inf if r["epsilon"] is None else r["epsilon"]
        print(f"{kind:5s} {fault_name or 'correct':12s} ε={ledger:.3g} "
              f"bound={r['epsilon_lower_bound']:.3f}")  # fmt: skip
    report.write_section(args.results, "audit", markdown(rows, report.cpu_description()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
