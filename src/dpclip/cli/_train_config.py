"""The options of ``dpclip train`` that define a run: defaults, resolution against a saved run,
validation. Shared by the parser (``train``) and the loop (``_train_loop``); imports no torch."""

from __future__ import annotations

import argparse
import math
from typing import Any

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "adamw")
CLIPPINGS = ("automatic", "automatic-v", "abadi", "global", "psac")
DEFAULT_LR = {"sgd": 0.15, "adam": 1e-2, "adamw": 1e-2}
CHOICES = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "clipping": CLIPPINGS}

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
    if not isinstance(config["delta"], (int, float)) or not 0 < config["delta"] < 1:
        raise CliError(f"--delta must be in (0, 1), got {config['delta']}")
    seed = config["seed"]  # torch's generators take a 64-bit seed, signed or not
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64
    ):
        raise CliError(f"--seed must be an integer from -2**63 to 2**64 - 1, got {seed}")
    for key, choices in CHOICES.items():  # argparse checks given ones; these may come from a file
        if config[key] not in choices:
            raise CliError(f"--{key} must be one of {', '.join(choices)}, got {config[key]!r}")
