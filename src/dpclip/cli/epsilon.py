"""``dpclip epsilon``: the ε that σ, q and a number of steps spend at a given δ.

Plain text for people, ``--json`` for scripts (one shape: ``epsilon`` maps accountant → ε).
The accounting is imported only when the command runs, so ``dpclip --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence

from dpclip.cli import CliError

ACCOUNTANT_CHOICES = ("pld", "rdp", "gdp", "all")
NOTES = {"gdp": "CLT approximation, not a bound"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``epsilon`` on the ``dpclip`` parser."""
    p = subparsers.add_parser(
        "epsilon",
        help="privacy spent (ε) by DP-SGD with noise σ, sampling rate q and a number of steps",
        description="Compute ε of the Poisson-subsampled Gaussian mechanism (DP-SGD) under "
        "add/remove-one adjacency.",
    )
    p.add_argument("--sigma", type=float, required=True, help="noise multiplier σ (> 0)")
    p.add_argument("--steps", type=int, required=True, help="number of noisy steps (>= 1)")
    add_mechanism_options(p)
    p.set_defaults(run=run)
    return p


def add_mechanism_options(p: argparse.ArgumentParser) -> None:
    """``--sample-rate``, ``--delta``, ``--accountant`` and ``--json``, shared with ``noise``."""
    p.add_argument("--sample-rate", type=float, required=True,
                   help="Poisson sampling rate q = batch size / data set size, in (0, 1]")  # fmt: skip
    p.add_argument("--delta", type=float, required=True, help="δ, in (0, 1)")
    p.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default="pld",
                   help="pld (tight, default), rdp, gdp (an approximation) or all")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")


def accountants_for(choice: str) -> tuple[str, ...]:
    """The accountant names that ``--accountant choice`` asks for."""
    return ("pld", "rdp", "gdp") if choice == "all" else (choice,)


def checked(check: Callable[..., object], value: object, flag: str) -> None:
    """Run a validator from :mod:`dpclip.accounting`; a bad value becomes a one-line CliError."""
    try:
        check(value, flag)
    except ValueError as err:
        raise CliError(str(err)) from None


def quiet_dp_accounting() -> None:
    """dp_accounting logs a warning per RDP order it skips; the answer is unaffected."""
    logging.getLogger("absl").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    """Print ε for each requested accountant."""
    from dpclip.accounting import get_epsilon
    from dpclip.accounting.events import (
        MIN_NOISE_MULTIPLIER,
        check_delta,
        check_sample_rate,
        check_steps,
    )

    if not args.sigma > 0 or args.sigma == float("inf"):
        raise CliError(f"expected --sigma > 0 and finite, got {args.sigma!r}")
    if args.sigma < MIN_NOISE_MULTIPLIER:
        raise CliError(
            f"--sigma {args.sigma:g} is below {MIN_NOISE_MULTIPLIER:g}, where the accountants "
            "overflow and the noise protects nothing; use a larger --sigma"
        )
    checked(check_sample_rate, args.sample_rate, "--sample-rate")
    checked(lambda v, n: check_steps(v, n, minimum=1), args.steps, "--steps")
    checked(check_delta, args.delta, "--delta")
    quiet_dp_accounting()
    names = accountants_for(args.accountant)
    eps = {
        name: get_epsilon(noise_multiplier=args.sigma, sample_rate=args.sample_rate,
                          steps=args.steps, delta=args.delta, accountant=name)
        for name in names
    }  # fmt: skip
    if all(eps[name] == float("inf") for name in names):  # with --accountant all: show the rest
        which = " and ".join(names) + (" accountants" if len(names) > 1 else " accountant")
        raise CliError(
            f"ε is infinite or beyond what the {which} can compute for σ = {args.sigma:g}, "
            f"q = {args.sample_rate:g} and {args.steps} steps: σ is far too small for any "
            "meaningful privacy (one step's privacy loss is about 1/(2σ²)); use a larger --sigma "
            "(DP-SGD uses about 0.5 or more)"
        )
    if args.json:
        print(json.dumps({"noise_multiplier": args.sigma, "sample_rate": args.sample_rate,
                          "steps": args.steps, "delta": args.delta, "epsilon": eps}))  # fmt: skip
        return 0
    print(f"σ = {args.sigma:g}, q = {args.sample_rate:g}, {args.steps} steps, δ = {args.delta:g}")
    print_table("ε", eps, names)
    return 0


def print_table(symbol: str, values: dict[str, float], names: Sequence[str]) -> None:
    """One line per accountant: ``ε = 1.841  (pld)``."""
    for name in names:
        note = f", {NOTES[name]}" if name in NOTES else ""
        print(f"{symbol} = {values[name]:.4g}  ({name}{note})")
