"""``dpclip audit``: train once with canaries and print an empirical lower bound on ε.

A correct run's bound stays below the ledger's ε; a bound above it means the implementation
leaks more than it accounts for. ``--json`` prints one object (``epsilon`` is null when there is
no noise); the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math

from dpclip.cli import CliError

DATASETS = ("digits", "mnist", "fashion-mnist")
# Per canary kind: white-box Dirac canaries audit the noisy updates themselves; input canaries
# (mislabelled examples) are seen only through the final model, which must fit them to show
# anything, hence longer training with Adam.
KIND_DEFAULTS = {
    "dirac": {"num_canaries": 1000, "epochs": 30, "optimizer": "sgd"},
    "input": {"num_canaries": 200, "epochs": 100, "optimizer": "adam"},
}
DEFAULT_LR = {"sgd": 0.15, "adam": 1e-2}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``audit`` on the ``dpclip`` parser."""
    p = subparsers.add_parser(
        "audit",
        help="audit the privacy of one training run: an empirical lower bound on ε",
        description="Train privately with canaries, each included with probability 1/2, then "
        "guess which were in (Steinke, Nasr, Jagielski 2023: privacy auditing with one "
        "training run). The correct guesses give a lower bound on ε at the stated confidence.",
    )
    p.add_argument("--canaries", choices=tuple(KIND_DEFAULTS), default="dirac",
                   help="dirac: gradient canaries, every noisy update seen (white-box, default); "
                   "input: mislabelled examples, only the final model seen (black-box)")  # fmt: skip
    p.add_argument("--num-canaries", type=int,
                   help="canaries (>= 10; default 1000 dirac, 200 input)")  # fmt: skip
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epsilon", type=float, help="target ε of the run (default: 3)")
    budget.add_argument("--noise-multiplier", type=float,
                        help="σ instead of a target ε (0: no noise, a leak the audit detects)")  # fmt: skip
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default: 1e-5)")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="data set (default: digits, embedded)")  # fmt: skip
    p.add_argument("--data-dir", help="folder holding the data set's files")
    p.add_argument("--download", action="store_true", help="download missing files first")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="model (default: mlp)")
    p.add_argument(
        "--epochs", type=float, help="passes over the data (default 30 dirac, 100 input)"
    )
    p.add_argument("--batch-size", type=int, default=256,
                   help="expected logical batch size (default: 256)")  # fmt: skip
    p.add_argument("--optimizer", choices=tuple(DEFAULT_LR),
                   help="default sgd for dirac, adam for input")  # fmt: skip
    p.add_argument("--lr", type=float, help="learning rate (default 0.15 sgd, 1e-2 adam)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the bound (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _settings(args: argparse.Namespace) -> dict:
    defaults = KIND_DEFAULTS[args.canaries]
    s = {
        "num_canaries": args.num_canaries
        if args.num_canaries is not None
        else defaults["num_canaries"],
        "epochs": args.epochs if args.epochs is not None else defaults["epochs"],
        "optimizer": args.optimizer or defaults["optimizer"],
    }
    s["lr"] = args.lr if args.lr is not None else DEFAULT_LR[s["optimizer"]]
    if args.epsilon is None and args.noise_multiplier is None:
        args.epsilon = 3.0
    for flag, value in [("--epsilon", args.epsilon), ("--epochs", s["epochs"]),
                        ("--lr", s["lr"]), ("--batch-size", args.batch_size)]:  # fmt: skip
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CliError(f"{flag} must be > 0, got {value}")
    sigma = args.noise_multiplier
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise CliError(f"--noise-multiplier must be >= 0, got {sigma}")
    if not 0 <= args.seed < 2**63:
        raise CliError(f"seed must be an integer in [0, 2**63), got {args.seed}")
    if not 0.5 <= args.confidence < 1:
        raise CliError(f"--confidence must be in [0.5, 1), got {args.confidence}")
    return s


def run(args: argparse.Namespace) -> int:
    s = _settings(args)
    import torch

    from dpclip.auditing import AuditError, audit
    from dpclip.datasets import DatasetError, load_dataset
    from dpclip.models import build_model

    try:
        train_set, _, info = load_dataset(args.dataset, data_dir=args.data_dir,
                                          download=args.download)  # fmt: skip
    except DatasetError as err:
        raise CliError(str(err)) from None
    torch.manual_seed(args.seed)
    model = build_model(args.model, info.input_shape, info.num_classes)
    make = torch.optim.Adam if s["optimizer"] == "adam" else torch.optim.SGD
    progress = None if args.no_progress else _tqdm()
    try:
        result = audit(
            model, train_set, canaries=args.canaries, num_canaries=s["num_canaries"],
            batch_size=args.batch_size, epochs=s["epochs"], target_epsilon=args.epsilon,
            noise_multiplier=args.noise_multiplier, target_delta=args.delta,
            optimizer=lambda params: make(params, lr=s["lr"]), num_classes=info.num_classes,
            confidence=args.confidence, seed=args.seed, progress=progress,
        )  # fmt: skip
    except AuditError as err:
        raise CliError(str(err).removeprefix("dpclip.audit: ")) from None
    if args.json:
        out = {**result.to_dict(), "dataset": args.dataset, "model": args.model, **s}
        print(json.dumps(out))
    else:
        print(result.summary())
    return 0


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety: run without it
        return None
    return tqdm
