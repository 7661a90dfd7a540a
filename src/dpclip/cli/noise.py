"""``dpclip noise``: the noise multiplier σ that meets a target ε over a planned run.

``--epochs E`` means ceil(E · round(1/q)) steps, exactly as ``PrivacyEngine(epochs=E)`` plans
them (one epoch is round(1/q) logical batches, what its data loader yields per pass);
``--steps`` gives the count directly. Plain text for people, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json

from dpclip.accounting import steps_for_epochs
from dpclip.cli import CliError
from dpclip.cli.epsilon import (
    NOTES,
    accountants_for,
    add_mechanism_options,
    checked,
    quiet_dp_accounting,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``noise`` on the ``dpclip`` parser."""
    p = subparsers.add_parser(
        "noise",
        help="noise multiplier σ for a target ε, δ, sampling rate and number of epochs or steps",
        description="Calibrate σ of DP-SGD (Poisson sampling, add/remove-one adjacency) so the "
        "whole run spends at most the target ε, and at least 99% of it.",
    )
    p.add_argument("--epsilon", type=float, required=True, help="target ε (> 0)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument(
        "--epochs",
        type=float,
        help="passes over the data (steps = ceil(E * round(1/q)), as the engine plans them)",
    )
    length.add_argument("--steps", type=int, help="number of noisy steps (>= 1)")
    add_mechanism_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the calibrated σ (and the ε it spends) for each requested accountant."""
    from dpclip.accounting import get_epsilon, get_noise_multiplier
    from dpclip.accounting.events import check_delta, check_epsilon, check_sample_rate, check_steps

    checked(check_epsilon, args.epsilon, "--epsilon")
    checked(check_delta, args.delta, "--delta")
    checked(check_sample_rate, args.sample_rate, "--sample-rate")
    if args.epochs is not None:
        checked(check_epsilon, args.epochs, "--epochs")
        steps = steps_for_epochs(args.epochs, args.sample_rate)  # as the engine plans them
    else:
        checked(lambda v, n: check_steps(v, n, minimum=1), args.steps, "--steps")
        steps = args.steps
    quiet_dp_accounting()
    names = accountants_for(args.accountant)
    common = {"delta": args.delta, "sample_rate": args.sample_rate, "steps": steps}
    try:
        sigma = {
            name: get_noise_multiplier(target_epsilon=args.epsilon, accountant=name, **common)
            for name in names
        }
    except ValueError as err:  # e.g. a target no σ in the searched range reaches
        raise CliError(str(err)) from None
    spent = {
        name: get_epsilon(noise_multiplier=sigma[name], accountant=name, **common) for name in names
    }
    if args.json:
        print(json.dumps({"target_epsilon": args.epsilon, **common,
                          "noise_multiplier": sigma, "epsilon": spent}))  # fmt: skip
        return 0
    print(f"target ε = {args.epsilon:g}, δ = {args.delta:g}, q = {args.sample_rate:g}, "
          f"{steps} steps")  # fmt: skip
    for name in names:
        note = f", {NOTES[name]}" if name in NOTES else ""
        print(f"σ = {sigma[name]:.4f}  spends ε = {spent[name]:.4g}  ({name}{note})")
    return 0
