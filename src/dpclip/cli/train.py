"""``dpclip train``: train a small model with DP and automatic clipping, end to end.

The defaults need no download: scikit-learn's handwritten digits, an MLP 64-128-10, DP-SGD with
momentum and automatic clipping at ε = 3, δ = 1e-5. This module only parses and checks the
options (cheap, so ``dpclip --help`` stays fast); the training lives in ``_train_loop``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "adamw")
CLIPPINGS = ("automatic", "automatic-v", "abadi", "global", "psac")
DEFAULT_LR = {"sgd": 0.15, "adam": 1e-2, "adamw": 1e-2}

# Options that define the run (and its privacy guarantee); a resumed run must agree on all of them.
# None in DEFAULTS means "no default" (lr: per optimizer; seed: drawn at random and recorded).
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "epsilon": 3.0,
    "delta": 1e-5,
    "clipping": "automatic",
    "clip_norm": 1.0,
    "optimizer": "sgd",
    "lr": None,
    "batch_size": 256,
    "epochs": 30,
    "seed": None,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the ``dpclip`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train a model with differential privacy (default: digits, ~1 minute on a CPU)",
        description="Train a small image classifier with DP and automatic clipping, report "
        "accuracy and the privacy spent. Runs on scikit-learn's digits without a download.",
    )
    # Defaults are None here and filled in by `resolve_config`, so that --resume can tell which
    # options were given on the command line (those must match the checkpoint).
    p.add_argument("--dataset", choices=DATASETS, help="data set (default: digits)")
    p.add_argument("--data-dir", help="folder holding the data set's files "
                   "(default: $DPCLIP_DATA or ~/.cache/dpclip/data)")  # fmt: skip
    p.add_argument("--download", action="store_true", help="download missing files first")
    p.add_argument("--model", choices=MODELS, help="model (default: mlp)")
    p.add_argument("--epsilon", type=float, help="target ε of the whole run (default: 3)")
    p.add_argument("--delta", type=float, help="target δ (default: 1e-5)")
    p.add_argument("--clipping", choices=CLIPPINGS, help="clipping function (default: automatic)")
    p.add_argument(
        "--clip-norm", type=float, metavar="R",
        help="clipping threshold R (default: 1). automatic, automatic-v and psac need no tuning "
        "(R only rescales the learning rate); abadi and global do: global drops every gradient "
        "whose norm is above R, so R must suit your gradients' norms",
    )  # fmt: skip
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="sgd (momentum 0.9), adam or adamw (default: sgd)")  # fmt: skip
    p.add_argument(
        "--lr", type=float, help="learning rate (default: 0.15 for sgd, 1e-2 for adam/adamw)"
    )
    p.add_argument("--batch-size", type=int, help="expected logical batch size (default: 256)")
    p.add_argument("--physical-batch-size", type=int,
                   help="most examples per forward/backward pass (default: whole batch)")  # fmt: skip
    p.add_argument("--epochs", type=int, help="passes over the data (default: 30)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn and recorded)")
    p.add_argument("--output", metavar="DIR", help="write metrics, checkpoint and curves here")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> dict:
    """The run's configuration: given options, else the saved run's, else the defaults.

    Raises CliError for invalid values and, when resuming, for options that differ from
    the saved run.
    """
    from dpclip.cli import CliError

    given = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}
    if saved is not None:
        diffs = [
            f"--{key.replace('_', '-')} {value} (saved run: {saved.get(key)})"
            for key, value in given.items()
            if _differs(value, saved.get(key))
        ]
        if diffs:
            raise CliError(f"cannot resume: options differ from the saved run: {'; '.join(diffs)}")
        config = {key: saved.get(key, DEFAULTS[key]) for key in DEFAULTS}  # older runs: default
    else:
        config = {**DEFAULTS, **given}
        if config["lr"] is None:
            config["lr"] = DEFAULT_LR[config["optimizer"]]
    config["physical_batch_size"] = args.physical_batch_size  # performance only: may change
    _validate(config)
    return config


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return not math.isclose(a, b, rel_tol=1e-12)
    return a != b


def _validate(config: dict[str, Any]) -> None:
    from dpclip.cli import CliError

    def positive(key: str, integer: bool) -> None:
        value = config[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or not math.isfinite(value) or value <= 0:
            raise CliError(f"--{key.replace('_', '-')} must be > 0, got {value}")

    for key in ("epsilon", "lr", "clip_norm"):
        positive(key, integer=False)
    for key in ("batch_size", "epochs"):
        positive(key, integer=True)
    if config["physical_batch_size"] is not None:
        positive("physical_batch_size", integer=True)
    if not 0 < config["delta"] < 1:
        raise CliError(f"--delta must be in (0, 1), got {config['delta']}")


def run(args: argparse.Namespace) -> int:
    """Run ``dpclip train``; user errors raise CliError."""
    from dpclip.cli import CliError

    if args.resume and not args.output:
        raise CliError("--resume needs --output DIR: the folder of the run to continue")
    from dpclip.cli import _train_loop

    return _train_loop.main(args)
