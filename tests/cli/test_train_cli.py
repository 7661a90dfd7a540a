"""`dpclip train` end to end: the real entry point in a subprocess, its files and exit codes; the
other runs in this process."""

import contextlib
import csv
import gzip
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpclip.cli import main

FAST = ("--epochs", "2", "--no-progress", "--seed", "0")


def _dpclip_train(*args, cwd=None, timeout=120):
    """The real entry point, in a subprocess (its files, exit code and output)."""
    return subprocess.run(
        [sys.executable, "-m", "dpclip.cli", "train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def _train(*args):
    """``dpclip train`` in this process (no interpreter start-up and torch import per run), with
    the global RNG left as it was; the result reads like the subprocess's."""
    out, err = io.StringIO(), io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["train", *args])
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete two-epoch run on digits with --output, shared by the tests that inspect it."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = _dpclip_train(*FAST, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc  # the one full run through the real entry point


def test_run_writes_metrics_csv_checkpoint_and_curves(finished_run):
    out, proc = finished_run
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "curves.png",
        "metrics.csv",
        "metrics.json",
    ]  # and no temporary files left behind
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert config["dataset"] == "digits" and config["model"] == "mlp" and config["seed"] == 0
    assert config["epochs"] == 2 and config["batch_size"] == 256 and config["lr"] == 0.15
    assert metrics["steps"] == 2 * round(1437 / 256)
    assert metrics["delta"] == 1e-5 and metrics["noise_multiplier"] > 0
    # The whole planned run was spent, within the calibration's tolerance, never above it.
    assert 0.97 * 3.0 <= metrics["epsilon"] <= 3.0
    assert 0.1 < metrics["test_accuracy"] <= 1.0 and metrics["wall_time_s"] > 0
    rows = _read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert (
        float(rows[0]["epsilon"])
        < float(rows[1]["epsilon"])
        == pytest.approx(metrics["epsilon"], rel=1e-5)
    )
    assert float(rows[1]["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], rel=1e-5)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["engine"]["ledger"]["events"]
    assert "test accuracy" in proc.stdout and "ε = " in proc.stdout


def _interrupted_in_second_epoch(monkeypatch, *args):
    """``dpclip train *args`` stopped by Ctrl-C in its second epoch: one checkpoint written."""
    from dpclip.cli import _train_loop

    calls, evaluate = [], _train_loop.evaluate

    def interrupt_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(_train_loop, "evaluate", interrupt_in_second_epoch)
        proc = _train(*args)
    assert proc.returncode == 130, proc.stderr


def test_interrupted_run_resumes_to_the_same_epsilon_and_model(finished_run, tmp_path, monkeypatch):
    out_full, _ = finished_run
    out = tmp_path / "out"
    _interrupted_in_second_epoch(monkeypatch, *FAST, "--output", str(out))
    # An interrupted run leaves a resumable checkpoint but nothing that looks complete.
    assert not (out / "metrics.json").exists() and not (out / "curves.png").exists()
    assert len(_read_csv(out / "metrics.csv")) == 1

    proc = _train("--output", str(out), "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    full = json.loads((out_full / "metrics.json").read_text())
    assert resumed["steps"] == full["steps"]
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-9)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["config"] == full["config"]
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(out_full / "checkpoint.pt", weights_only=True)
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, rtol=1e-5, atol=1e-6)


def _main_error(argv, capsys):
    """Run the CLI in this process; return the stderr of a run that must fail with exit code 2."""
    with torch.random.fork_rng():
        code = main(["train", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpclip train: error: ")
    return err


def test_resume_with_different_options_is_refused(finished_run, capsys):
    out, _ = finished_run
    err = _main_error(["--output", str(out), "--resume", "--lr", "0.5", "--epochs", "3"], capsys)
    assert "cannot resume" in err and "--lr 0.5 (saved run: 0.15)" in err
    assert "--epochs 3 (saved run: 2)" in err


def test_resume_of_a_finished_run_is_refused(finished_run, capsys):
    out, _ = finished_run
    assert "already complete" in _main_error(["--output", str(out), "--resume"], capsys)


def test_fresh_run_into_an_existing_run_directory_is_refused(finished_run, capsys):
    out, _ = finished_run
    err = _main_error([*FAST, "--output", str(out)], capsys)
    assert "already holds a run" in err and "--resume" in err


def test_corrupt_checkpoint_gives_one_line_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00not a checkpoint")
    proc = _train("--output", str(tmp_path), "--resume")
    _assert_one_line_error(proc, "is corrupt or not a dpclip checkpoint", "another --output")
    assert "weights_only" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_checkpoint_of_another_program_gives_dpclip_words_not_torch_advice(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "checkpoint.pt")  # a pickled module
    proc = _train("--output", str(tmp_path), "--resume")
    _assert_one_line_error(proc, "is corrupt or not a dpclip checkpoint")
    assert "weights_only" not in proc.stderr


def test_nonpositive_epsilon_exits_2_without_output(tmp_path):
    proc = _train("--epsilon", "0", "--output", str(tmp_path / "out"))
    _assert_one_line_error(proc, "--epsilon must be > 0, got 0.0")
    assert not (tmp_path / "out").exists()


def _write_mnist(folder, seed=0, n_train=64, n_test=16, side=28):
    """MNIST-format files (gzipped IDX) of random images and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, shape in [
        ("train-images-idx3-ubyte", (n_train, side, side)),
        ("train-labels-idx1-ubyte", (n_train,)),
        ("t10k-images-idx3-ubyte", (n_test, side, side)),
        ("t10k-labels-idx1-ubyte", (n_test,)),
    ]:
        high = 10 if len(shape) == 1 else 256
        array = rng.integers(0, high, shape, dtype=np.uint8)
        header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        with gzip.open(folder / f"{stem}.gz", "wb") as fh:
            fh.write(header + array.tobytes())
    return folder


def test_mnist_idx_files_train_a_cnn_with_progress_bar(tmp_path):
    _write_mnist(tmp_path)
    args = ("--dataset", "mnist", "--data-dir", str(tmp_path), "--model", "cnn", "--epochs", "1")
    proc = _train(*args, "--batch-size", "16", "--physical-batch-size", "5", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert "loss=" in proc.stderr and "acc=" in proc.stderr and "ε=" in proc.stderr  # tqdm bar
    assert "epoch 1/1" in proc.stdout and "mnist / cnn" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--epsilon", "-1"], ["--epsilon must be > 0"]),
        (["--epsilon", "nan"], ["--epsilon must be > 0"]),
        (["--delta", "1"], ["--delta must be in (0, 1)"]),
        (["--delta", "0.001"], ["target_delta=0.001 is not below 1/sample_size", "no privacy"]),
        (["--batch-size", "2000"], ["--batch-size 2000 exceeds the 1437 training examples"]),
        (["--batch-size", "0"], ["--batch-size must be > 0"]),
        (["--epochs", "0"], ["--epochs must be > 0"]),
        (["--physical-batch-size", "0"], ["--physical-batch-size must be > 0"]),
        (["--lr", "0"], ["--lr must be > 0"]),
        (["--clip-norm", "0"], ["--clip-norm must be > 0"]),
        (["--output", "{tmp}/file"], ["is a file; give a folder"]),
        (["--output", "/proc/version/run"], ["--output /proc/version/run: cannot create"]),
        (["--resume"], ["--resume needs --output"]),
        (["--seed", str(2**70)], ["--seed must be an integer from -2**63 to 2**64 - 1, got 1180"]),
        (["--seed", str(-(2**63) - 1)], ["--seed must be an integer from -2**63 to 2**64 - 1"]),
        (["--dataset", "mnist", "--data-dir", "{tmp}"], ["missing", "--download"]),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], ["cifar-10-batches-py", "--download"]),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_code_2(argv, fragments, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    err = _main_error([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize(
    "argv",
    [["--dataset", "svhn"], ["--model", "resnet"], ["--optimizer", "rmsprop"], ["--epochs", "x"]],
)
def test_unknown_names_are_rejected_by_argparse_with_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid" in err


@pytest.mark.slow
def test_default_run_reaches_94_percent_on_digits(tmp_path):
    """The defaults, as the README promises: mean test accuracy of 3 seeds >= 94% at ε=3."""
    accuracies = []
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        proc = _train("--no-progress", "--seed", str(seed), "--output", str(out))
        assert proc.returncode == 0, proc.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["config"]["epsilon"] == 3.0 and metrics["delta"] == 1e-5
        assert metrics["epsilon"] <= 3.0
        assert metrics["wall_time_s"] > 0  # recorded (the time is measured, not asserted)
        accuracies.append(metrics["test_accuracy"])
    assert sum(accuracies) / 3 >= 0.94, accuracies


def test_clip_norm_reaches_the_engine_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    proc = _train("--epochs", "1", "--no-progress", "--seed", "0", "--clipping", "global",
                  "--clip-norm", "50", "--output", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["clipping"] == "global" and config["clip_norm"] == 50.0


def test_help_says_which_clippings_need_a_threshold():
    proc = subprocess.run([sys.executable, "-m", "dpclip.cli", "train", "--help"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    text = " ".join(proc.stdout.split())
    assert "--clip-norm R" in text and "abadi and global do" in text


def test_the_train_modules_do_not_import_each_other():
    import ast
    from pathlib import Path

    cli = Path(__file__).resolve().parents[2] / "src" / "dpclip" / "cli"

    def imports(name):
        tree = ast.parse((cli / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        return found

    assert not any(m.endswith("cli.train") for m in imports("_train_loop"))
    assert not any(m.endswith("cli.train") for m in imports("_train_config"))


def test_the_progress_bar_epsilon_is_current_from_the_first_step_and_not_recomputed_each_step():
    import dpclip
    from dpclip.cli import _train_loop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    engine = dpclip.PrivacyEngine(model, optimizer, sample_size=40, batch_size=8, epochs=2,
                                  noise_multiplier=1.0)  # fmt: skip
    calls, shown = [], []

    class Counting:
        def epsilon(self):
            calls.append(1)
            return engine.epsilon()

    class Bar:
        def __init__(self, it, **kw):
            self.it = it

        def __iter__(self):
            return iter(self.it)

        def set_postfix(self, **kw):
            shown.append(float(kw["ε"]))

    loader = engine.data_loader(data, generator=torch.Generator().manual_seed(0))
    _train_loop._train_epoch(model, optimizer, Counting(), loader, Bar, "epoch 1")
    assert shown and shown[0] > 0  # not the 0.00 of before the epoch
    assert len(calls) == 1  # steps well within the refresh interval: computed once


def _files(folder):
    """Every file under ``folder`` with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_on_other_data_of_the_same_size_is_refused_naming_both(tmp_path, monkeypatch):
    """Same sizes, other images: the ledger and the model are of the first data set."""
    first, other = _write_mnist(tmp_path / "a", seed=0), _write_mnist(tmp_path / "b", seed=1)
    out = tmp_path / "out"
    _interrupted_in_second_epoch(monkeypatch, *FAST, "--dataset", "mnist", "--data-dir",
                                 str(first), "--batch-size", "16", "--output", str(out))  # fmt: skip
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["data"]
    assert saved["source"] == str(first) and len(saved["fingerprint"]) == 16
    before = _files(out)

    proc = _train("--output", str(out), "--resume", "--no-progress", "--data-dir", str(other))
    _assert_one_line_error(proc, "cannot resume: the saved run trained on other data",
                           f"({first}, fingerprint {saved['fingerprint']}) than {other} "
                           "(fingerprint ", "--data-dir")  # fmt: skip
    assert _files(out) == before

    proc = _train("--output", str(out), "--resume", "--no-progress", "--data-dir", str(first))
    assert proc.returncode == 0, proc.stderr  # its own data resumes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["fingerprint"] == saved["fingerprint"]


def test_an_empty_test_set_is_refused_before_training(tmp_path):
    """It used to end the whole run in a ZeroDivisionError when first scoring the model."""
    data = _write_mnist(tmp_path / "data", n_test=0)
    out = tmp_path / "out"
    proc = _train(*FAST, "--dataset", "mnist", "--data-dir", str(data), "--output", str(out))
    _assert_one_line_error(
        proc, f"the test set of mnist in {data} is empty", "give files with both"
    )
    assert "epoch 1" not in proc.stdout and not any(out.iterdir())


def test_a_run_that_died_before_writing_its_results_is_finished_by_resume(finished_run, tmp_path):
    """Killed after the last checkpoint, before metrics.json: neither --resume ("already
    complete") nor a fresh run ("already holds a run") used to work in that folder."""
    full, _ = finished_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((full / "checkpoint.pt").read_bytes())
    rows = (full / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_text("\n".join(rows[:2]) + "\n")  # died before the last row, too
    proc = _train("--output", str(out), "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "finished training; writing its results" in proc.stdout and "epoch 1/" not in proc.stdout
    finished = json.loads((out / "metrics.json").read_text())
    expected = json.loads((full / "metrics.json").read_text())
    assert finished == {**expected, "dataset": finished["dataset"]}
    assert (out / "metrics.csv").read_text() == (full / "metrics.csv").read_text()
    assert (out / "curves.png").is_file()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2  # not retrained


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"epoch": "2"}, "its epoch '2' is not a whole number in 1..2"),
        ({"epoch": 2.0}, "its epoch 2.0 is not a whole number in 1..2"),
        ({"epoch": True}, "its epoch True is not a whole number in 1..2"),
        ({"epoch": 0}, "its epoch 0 is not a whole number in 1..2"),
        ({"epoch": -5}, "its epoch -5 is not a whole number in 1..2"),
        ({"epoch": 7}, "its epoch 7 is not a whole number in 1..2"),
        ({"epoch": 1}, "its history does not match its 1 epochs"),
        ({"history": "x"}, "its history does not match its 2 epochs"),
        ({"elapsed": None}, "its history does not match its 2 epochs"),
        ({"config": [1]}, "is damaged (its config is not a table)"),
    ],
)
def test_a_tampered_checkpoint_is_a_one_line_error_and_left_alone(finished_run, tmp_path, change,
                                                                  fragment):  # fmt: skip
    full, _ = finished_run
    state = torch.load(full / "checkpoint.pt", weights_only=True)
    state.update(change)
    torch.save(state, tmp_path / "checkpoint.pt")
    before = _files(tmp_path)
    proc = _train("--output", str(tmp_path), "--resume", "--no-progress")
    _assert_one_line_error(proc, f"{tmp_path / 'checkpoint.pt'} is damaged", fragment,
                           "start a fresh run with another --output")  # fmt: skip
    assert _files(tmp_path) == before


def test_a_checkpoint_whose_epoch_disagrees_with_its_ledger_is_refused(finished_run, tmp_path):
    full, _ = finished_run
    state = torch.load(full / "checkpoint.pt", weights_only=True)
    state.update(epoch=1, history=state["history"][:1])  # one epoch, but the ledger holds two
    torch.save(state, tmp_path / "checkpoint.pt")
    before = _files(tmp_path)
    proc = _train("--output", str(tmp_path), "--resume", "--no-progress")
    _assert_one_line_error(proc, "it says 1 epochs but its privacy ledger holds 12 steps, not 6",
                           "another --output")  # fmt: skip
    assert _files(tmp_path) == before


def _cifar_with_ragged_labels(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        labels = [[1], [1, 2]] if name == "test_batch" else [1, 2]
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _idx_header(*dims):
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("bad magic", ["not an IDX file (bad magic number)"]),
        ("truncated header", ["truncated IDX header"]),
        ("overflowing dims", ["= 18446744073709551616 values, file holds 0"]),
        ("bad deflate", ["cannot read IDX file"]),
        ("0x0 images", ["train images of 0×0 pixels"]),
    ],
)
def test_odd_idx_files_are_a_one_line_error_with_the_fix(tmp_path, damage, fragments):
    data = _write_mnist(tmp_path / "data")
    target = data / "train-images-idx3-ubyte.gz"
    raw = {
        "bad magic": b"\x01\x02\x08\x03" + bytes(16),
        "truncated header": _idx_header(64, 28)[:9],
        "overflowing dims": _idx_header(65536, 65536, 65536, 65536),  # 2⁶⁴ wrapped to 0 in int64
        "0x0 images": _idx_header(64, 0, 0),
        "bad deflate": _idx_header(64, 28, 28) + bytes(64 * 28 * 28),
    }[damage]
    packed = gzip.compress(raw)
    if damage == "bad deflate":  # the gzip header is intact, the compressed stream is not
        packed = packed[:10] + b"\xff" * 10 + packed[20:]  # zlib.error, which is no OSError
    target.write_bytes(packed)
    proc = _train(*FAST, "--dataset", "mnist", "--data-dir", str(data))
    _assert_one_line_error(proc, *fragments, str(target), "replace the file", "--download")


def test_odd_cifar_batch_is_a_one_line_error_with_the_fix(tmp_path):
    _cifar_with_ragged_labels(tmp_path)
    proc = _train(*FAST, "--dataset", "cifar10", "--data-dir", str(tmp_path))
    _assert_one_line_error(proc, "test_batch: CIFAR-10 labels are not a list of integers",
                           "replace the file", "--download")  # fmt: skip


def test_images_too_small_for_the_model_are_a_one_line_error(tmp_path):
    data = _write_mnist(tmp_path / "data", side=4)
    proc = _train(*FAST, "--dataset", "mnist", "--data-dir", str(data), "--model", "cnn",
                  "--batch-size", "16")  # fmt: skip
    _assert_one_line_error(proc, "--model cnn: cnn needs images of at least 8×8, got 4×4",
                           "choose another --model")  # fmt: skip
