"""The training run behind ``dpclip train``: data, model, engine, loop, checkpoints."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dpclip
from dpclip.cli import CliError
from dpclip.cli import _train_output as output
from dpclip.cli._train_config import resolve_config
from dpclip.datasets import CorruptDataset, DatasetError, load_dataset
from dpclip.models import build_model

_FORMAT = "dpclip-train-checkpoint"
_VERSION = 1
_EVAL_BATCH = 1024
_EPS_REFRESH_S = 2.0


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.output).expanduser() if args.output else None
    saved = _load_checkpoint(out / output.CHECKPOINT) if args.resume and out else None
    if out is not None and not args.resume:
        _refuse_existing_run(out)
    config = resolve_config(args, saved["config"] if saved else None)
    if saved is not None:
        _check_progress(saved, config["epochs"], out / output.CHECKPOINT)
    if out is not None:
        _check_writable(out)  # before any training (and only for a valid configuration)
    if saved is not None and saved["epoch"] == config["epochs"]:
        if (out / output.METRICS_JSON).exists():
            raise CliError(f"the run in {out} is already complete ({saved['epoch']} epochs)")
        print(f"the run in {out} finished training; writing its results", flush=True)
    _require_extras(progress=not args.no_progress, curves=out is not None)
    train_set, test_set, info, fingerprint = _data(config, args, saved)
    n = len(train_set)
    if config["seed"] is None:
        config["seed"] = secrets.randbelow(2**31)
    # Independent streams for model init, batch sampling and noise, all from the one seed.
    init_seed, loader_seed, noise_seed = torch.randint(
        0, 2**62, (3,), generator=torch.Generator().manual_seed(config["seed"])
    ).tolist()

    torch.manual_seed(init_seed)
    try:
        model = build_model(config["model"], info.input_shape, info.num_classes)
    except ValueError as err:  # e.g. images too small for the cnn
        raise CliError(f"--model {config['model']}: {err}; choose another --model") from err
    optimizer = _make_optimizer(config["optimizer"], model, config["lr"])
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CliError(f"cannot resume from {out / output.CHECKPOINT}: {reason}") from err
    try:
        engine = dpclip.PrivacyEngine(
            model, optimizer, sample_size=n, batch_size=config["batch_size"],
            epochs=config["epochs"], target_epsilon=config["epsilon"],
            target_delta=config["delta"], clipping=config["clipping"],
            clip_norm=config["clip_norm"], seed=noise_seed,
        )  # fmt: skip
    except ValueError as err:
        raise CliError(str(err)) from err
    generator = torch.Generator().manual_seed(loader_seed)
    loader = engine.data_loader(
        train_set, physical_batch_size=config["physical_batch_size"], generator=generator
    )
    if len(loader) != engine.steps_per_epoch:
        raise RuntimeError(
            f"loader has {len(loader)} steps per epoch, the engine plans {engine.steps_per_epoch}"
        )

    history: list[dict[str, Any]] = []
    elapsed, start_epoch = 0.0, 0
    if saved is not None:
        try:
            engine.load_state_dict(saved["engine"])
            generator.set_state(saved["rng"]["loader"])
            torch.set_rng_state(saved["rng"]["torch"])
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            raise CliError(f"cannot resume from {out / output.CHECKPOINT}: {err}") from err
        history, elapsed, start_epoch = saved["history"], saved["elapsed"], saved["epoch"]
        if engine.steps_taken != start_epoch * engine.steps_per_epoch:
            raise CliError(
                f"{out / output.CHECKPOINT} is damaged: it says {start_epoch} epochs but its "
                f"privacy ledger holds {engine.steps_taken} steps, not "
                f"{start_epoch * engine.steps_per_epoch}; {_FRESH}"
            )

    progress = None if args.no_progress else _tqdm()
    for epoch in range(start_epoch + 1, config["epochs"] + 1):
        label = f"epoch {epoch}/{config['epochs']}"
        train_loss, train_acc = _train_epoch(model, optimizer, engine, loader, progress, label)
        test_loss, test_acc = evaluate(model, test_set)
        row = {
            "epoch": epoch, "steps": engine.steps_taken, "epsilon": engine.epsilon(),
            "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
            "test_accuracy": test_acc,
            "wall_time_s": elapsed + time.perf_counter() - started,
        }  # fmt: skip
        history.append(row)
        _report(row, label, progress)
        if out is not None:
            data = {"fingerprint": fingerprint, "source": info.source}
            _save_checkpoint(out, config, model, optimizer, engine, generator, history, n, data)
            output.write_csv(out / output.METRICS_CSV, history)

    result = _result(config, model, engine, history, info, fingerprint)
    if out is not None:
        output.write_csv(out / output.METRICS_CSV, history)  # again: a run may have died before
        title = f"dpclip: {config['dataset']} / {config['model']}, ε = {result['epsilon']:.2f}"
        output.write_curves(out / output.CURVES, history, title, config["epsilon"])
        output.write_json(out / output.METRICS_JSON, result)
    print(output.summary(result, out))
    return 0


def _train_epoch(model, optimizer, engine, loader, progress, label: str) -> tuple[float, float]:
    """One pass of Poisson-sampled logical batches; returns (mean loss, accuracy) seen in it."""
    model.train()
    bar = loader if progress is None else progress(loader, desc=label, leave=False, unit="step")
    seen, correct, loss_sum = 0, 0, 0.0
    eps, eps_time = 0.0, -math.inf  # computed after the first step, so the bar shows ε now
    for logical in bar:
        for x, y in logical:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
        optimizer.step()  # one noisy step per logical batch, also when it is empty
        optimizer.zero_grad(set_to_none=True)
        if progress is not None and seen:
            if time.perf_counter() - eps_time > _EPS_REFRESH_S:  # ε costs ~50 ms: not every step
                eps, eps_time = engine.epsilon(), time.perf_counter()
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}", ε=f"{eps:.2f}"
            )
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on ``dataset``."""
    model.eval()
    x_all, y_all = dataset.tensors
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y_all), _EVAL_BATCH):
        x, y = x_all[start : start + _EVAL_BATCH], y_all[start : start + _EVAL_BATCH]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum / len(y_all), correct / len(y_all)


def _report(row: dict[str, Any], label: str, progress) -> None:
    line = (
        f"{label}: loss {row['train_loss']:.3f}, train acc {row['train_accuracy']:.1%}, "
        f"test acc {row['test_accuracy']:.1%}, ε {row['epsilon']:.3f}"
    )
    (progress.write if progress is not None else print)(line)


def _result(config, model, engine, history, info, fingerprint: str) -> dict[str, Any]:
    last = history[-1]
    return {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "epsilon": engine.epsilon(),
        "delta": engine.target_delta,
        "noise_multiplier": engine.noise_multiplier,
        "sample_rate": engine.sample_rate,
        "steps": engine.steps_taken,
        "epochs": last["epoch"],
        "wall_time_s": last["wall_time_s"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {
            "name": info.name,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "source": info.source,
            "fingerprint": fingerprint,
        },
        "config": dict(config),
        "versions": {"dpclip": dpclip.__version__, "torch": torch.__version__},
    }


def _make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def _data(config: dict[str, Any], args: argparse.Namespace, saved: dict[str, Any] | None):
    """(train, test, info, fingerprint), refused before any training when a split is empty, the
    batch exceeds the data, or (resuming) the data is not the saved run's."""
    train_set, test_set, info = _load_data(config["dataset"], args.data_dir, args.download)
    for split, data in (("training", train_set), ("test", test_set)):
        if len(data) == 0:
            raise CliError(
                f"the {split} set of {info.name} in {info.source} is empty: dpclip train needs "
                "training examples and scores the model on test examples; give files with both"
            )
    n = len(train_set)
    if config["batch_size"] > n:
        raise CliError(f"--batch-size {config['batch_size']} exceeds the {n} training examples")
    fingerprint = _fingerprint(train_set)
    if saved is not None:
        _check_same_data(saved, n, fingerprint, info.source)
    return train_set, test_set, info, fingerprint


def _load_data(name: str, data_dir: str | None, download: bool):
    try:
        return load_dataset(name, data_dir=data_dir, download=download)
    except CorruptDataset as err:
        raise CliError(
            f"{err}; replace the file with a good copy, or delete it and pass --download"
        ) from err
    except DatasetError as err:
        raise CliError(str(err)) from err


def _fingerprint(dataset: TensorDataset) -> str:
    """SHA-256 of the training tensors (dtype, shape, values), 16 hex digits: under a second for
    CIFAR-10's 600 MB."""
    digest = hashlib.sha256()
    for tensor in dataset.tensors:
        array = tensor.contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def _require_extras(*, progress: bool, curves: bool) -> None:
    needed = [("tqdm", "the progress bar (or pass --no-progress)")] if progress else []
    if curves:
        needed.append(("matplotlib", "curves.png"))
    for module, purpose in needed:
        if importlib.util.find_spec(module) is None:
            raise CliError(f"{module} is needed for {purpose}: pip install 'dpclip[examples]'")


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


# ------------------------------------------------------------------------------ checkpoints


def _check_writable(out: Path) -> None:
    """Refuse an --output that is a file or cannot be written, before any training."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--output {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--output {out}: cannot create the folder ({err.strerror})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"--output {out}: the folder is not writable")


def _refuse_existing_run(out: Path) -> None:
    existing = [n for n in (output.CHECKPOINT, output.METRICS_JSON) if (out / n).exists()]
    if existing:
        raise CliError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or choose another --output"
        )


def _save_checkpoint(out, config, model, optimizer, engine, generator, history, n, data) -> None:
    state = {
        "format": _FORMAT, "version": _VERSION, "config": config, "epoch": history[-1]["epoch"],
        "sample_size": n, "data": data, "history": history,
        "elapsed": history[-1]["wall_time_s"],
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "engine": engine.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()},
    }  # fmt: skip
    output.atomic_write(out / output.CHECKPOINT, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CliError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        # torch's own text suggests weights_only=False: wrong advice for a damaged or foreign file
        raise CliError(
            f"{path} is corrupt or not a dpclip checkpoint: it could not be read as the tensors "
            "and plain values dpclip train saves (truncated, damaged, or written by another "
            "program); start a fresh run with another --output"
        ) from err
    keys = ("config", "epoch", "sample_size", "history", "elapsed", "model", "optimizer", "engine")
    if (
        not isinstance(state, dict)
        or state.get("format") != _FORMAT
        or any(k not in state for k in (*keys, "rng"))
    ):
        raise CliError(f"{path} is not a dpclip train checkpoint")
    if state.get("version") != _VERSION:
        raise CliError(f"{path} has checkpoint version {state.get('version')}, need {_VERSION}")
    if not isinstance(state["config"], dict):
        raise CliError(f"{path} is damaged (its config is not a table); {_FRESH}")
    return state


_FRESH = "start a fresh run with another --output"


def _check_progress(state: dict[str, Any], epochs: int, path: Path) -> None:
    """Refuse a checkpoint whose epoch, history or times are not what dpclip train writes."""
    epoch, history = state["epoch"], state["history"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        raise CliError(
            f"{path} is damaged: its epoch {epoch!r} is not a whole number in 1..{epochs}; {_FRESH}"
        )

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    rows_ok = isinstance(history, list) and len(history) == epoch and all(
        isinstance(row, dict) and all(number(row.get(key)) for key in output.CSV_FIELDS)
        for row in history
    )  # fmt: skip
    if not rows_ok or not number(state["elapsed"]) or not number(state["sample_size"]):
        raise CliError(
            f"{path} is damaged: its history does not match its {epoch} epochs; {_FRESH}"
        )


def _check_same_data(state: dict[str, Any], n: int, fingerprint: str, source: str) -> None:
    """Refuse to resume on other training data: the privacy ledger and the model are of the
    saved data. Checkpoints from before fingerprints are checked by size only."""
    if state["sample_size"] != n:
        raise CliError(
            f"cannot resume: the saved run trained on {state['sample_size']} examples, the data "
            f"in {source} has {n}; resume with the run's own data (--data-dir)"
        )
    saved = state.get("data")
    if isinstance(saved, dict) and saved.get("fingerprint") != fingerprint:
        raise CliError(
            f"cannot resume: the saved run trained on other data ({saved.get('source')}, "
            f"fingerprint {saved.get('fingerprint')}) than {source} (fingerprint {fingerprint}); "
            f"resume with the run's own data (--data-dir), or {_FRESH}"
        )
