"""``dpclip train``: train a small model with DP and automatic clipping, end to end.

The defaults need no download: scikit-learn's handwritten digits, an MLP 64-128-10, DP-SGD with
momentum and automatic clipping at ε = 3, δ = 1e-5. This module only declares the options
(cheap, so ``dpclip --help`` stays fast); their defaults and checks live in ``_train_config``,
the training in ``_train_loop``; neither imports this module.
"""

from __future__ import annotations

import argparse

from dpclip.cli._train_config import CLIPPINGS, DATASETS, MODELS, OPTIMIZERS


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


def run(args: argparse.Namespace) -> int:
    """Run ``dpclip train``; user errors raise CliError."""
    from dpclip.cli import CliError

    if args.resume and not args.output:
        raise CliError("--resume needs --output DIR: the folder of the run to continue")
    from dpclip.cli import _train_loop

    return _train_loop.main(args)
