"""The benchmark harness keeps running: one tiny round end to end, plus its reporting pieces.

No timing is asserted anywhere: a benchmark is not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's `benchmarks`, not Opacus's package of that name

from benchmarks import report, run  # noqa: E402

HAS_OPACUS = importlib.util.find_spec("opacus") is not None


def _harness(tmp_path: Path, *extra: str) -> int:
    """The harness in this process; its workers stay real subprocesses unless patched."""
    argv = ["--out", str(tmp_path / "out"), "--results", str(tmp_path / "RESULTS.md"), "--quiet"]
    return run.main([*argv, *extra])


@pytest.fixture
def workers_in_process(monkeypatch):
    """Run each worker's ``main`` in this process instead of a fresh interpreter: the harness's
    bookkeeping and every framework's step, without an interpreter start and torch import each."""
    import torch
    from benchmarks import _worker

    def in_process(cmd, **kwargs):
        assert cmd[1:3] == ["-m", "benchmarks._worker"]
        with torch.random.fork_rng():
            code = _worker.main(cmd[3:])
        return subprocess.CompletedProcess(cmd, code, "", "")

    monkeypatch.setattr(run.subprocess, "run", in_process)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the suite's threads stay


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # drop the header row


def test_one_round_in_worker_subprocesses_writes_finite_ratios(tmp_path: Path) -> None:
    configs = ["non-private", "dpclip-mixed"]  # real worker interpreters, as a user's run
    code = _harness(tmp_path, "--models", "cnn", "--configs", ",".join(configs), "--rounds", "1",
                    "--steps", "2", "--warmup", "1", "--batch-size", "8", "--no-live-memory")  # fmt: skip
    assert code == 0

    rows = _table_rows((tmp_path / "RESULTS.md").read_text())
    assert [row[3] for row in rows] == configs
    for row in rows:
        assert row[:3] == ["cnn", "8", "-"]
        # speed, best step, peak RSS of the timed steps, of the build and warm-up
        for ratio in (row[5], row[6], row[8], row[9]):
            assert math.isfinite(float(ratio.rstrip("×"))) and float(ratio.rstrip("×")) > 0

    payload = json.loads((tmp_path / "out" / "results-models-cpu.json").read_text())
    assert payload["configs"] == configs
    assert all(rec["ok"] and rec["peak_mem_bytes"] > 0 for rec in payload["records"])
    assert all(rec["warmup_peak_mem_bytes"] > 0 for rec in payload["records"])
    assert payload["machine"]["mem_method"].startswith("VmHWM over the timed steps")
    assert len({rec["pid"] for rec in payload["records"]}) == 2  # one interpreter each
    assert payload["machine"]["torch_threads"] == 2
    lines = (tmp_path / "out" / "records-models-cpu.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["header"]["names"] == configs
    assert [json.loads(line)["record"]["name"] for line in lines[1:]] == configs


def test_a_failing_configuration_is_reported_and_sets_the_exit_status(tmp_path: Path) -> None:
    code = _harness(tmp_path, "--models", "cnn", "--configs", "non-private", "--rounds", "1",
                    "--steps", "1", "--warmup", "0", "--batch-size", "2", "--timeout", "0.05")  # fmt: skip
    assert code == 1
    rows = _table_rows((tmp_path / "RESULTS.md").read_text())
    assert rows[0][3] == "non-private" and "failed: timed out after 0.05 s" in rows[0][4]


@pytest.mark.skipif(not HAS_OPACUS, reason="needs opacus")
def test_every_configuration_trains_and_has_a_live_memory_pass(tmp_path, workers_in_process):
    names = ["non-private", *(n for n in run.CONFIGS if n != "non-private")]
    if not HAS_OPACUS:
        names = [n for n in names if run.CONFIGS[n].method != "opacus"]
    code = _harness(tmp_path, "--models", "cnn", "--configs", ",".join(names), "--rounds", "1",
                    "--steps", "1", "--warmup", "1", "--batch-size", "4")  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "out" / "results-models-cpu.json").read_text())
    for rec in payload["records"]:
        assert rec["ok"] and math.isfinite(rec["final_loss"]), rec.get("error")
    assert [r["name"] for r in payload["records"] if "pass" not in r] == names
    assert [r["name"] for r in payload["records"] if r.get("pass") == "live-memory"] == names
    for row in _table_rows((tmp_path / "RESULTS.md").read_text()):  # the live-memory column;
        assert math.isfinite(float(row[10].rstrip("×")))  # in one process not a measurement


def test_unknown_model_is_an_error_naming_the_choices(capsys: pytest.CaptureFixture) -> None:
    assert run.main(["--models", "cnn,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model(s) ['nope']" in err and "gpt-like" in err


def _record(name: str, rnd: int, thr: float, mem: int, model: str = "m", b: int = 4, t=8) -> dict:
    point = {"model": model, "batch_size": b, "seq_len": t}
    return {"name": name, "round": rnd, "point": point, "ok": True, "samples_per_s": thr,
            "peak_mem_bytes": mem}  # fmt: skip


def test_ratio_is_median_of_same_round_ratios() -> None:
    recs = [_record("non-private", 0, 100.0, 10), _record("dp", 0, 50.0, 20),
            _record("non-private", 1, 10.0, 10), _record("dp", 1, 9.0, 30),
            _record("non-private", 2, 100.0, 10), _record("dp", 2, 80.0, 40)]  # fmt: skip
    (point,) = report.summarise(recs, ["non-private", "dp"])
    dp = point["rows"][1]
    assert dp["throughput_ratio"] == pytest.approx(0.8)  # median of 0.5, 0.9, 0.8
    assert dp["memory_ratio"] == pytest.approx(3.0)
    assert dp["samples_per_s"] == pytest.approx(50.0)


def test_best_step_ratio_is_median_of_same_round_fastest_step_ratios() -> None:
    def timed(name: str, rnd: int, steps: list[float]) -> dict:
        return {**_record(name, rnd, 4 / sorted(steps)[len(steps) // 2], 10), "step_times_s": steps}

    recs = [timed("non-private", 0, [1.0, 3.0, 1.2]), timed("dp", 0, [2.0, 2.5, 2.1]),
            timed("non-private", 1, [1.0, 1.1, 1.0]), timed("dp", 1, [1.25, 9.0, 9.0]),
            timed("non-private", 2, [2.0, 2.0, 2.0]), timed("dp", 2, [2.2, 2.0, 2.5])]  # fmt: skip
    dp = report.summarise(recs, ["non-private", "dp"])[0]["rows"][1]
    assert dp["best_step_ratio"] == pytest.approx(0.8)  # median of 0.5, 0.8, 1.0
    old = report.summarise([_record("non-private", 0, 1.0, 1), _record("dp", 0, 1.0, 1)],
                           ["non-private", "dp"])  # fmt: skip
    assert old[0]["rows"][1]["best_step_ratio"] is None  # records without step times
    body = report.markdown_section("models-cpu", _machine(), old, ["non-private", "dp"],
                                   False, None, Path("."))  # fmt: skip
    assert _table_rows(body)[1][6] == "n/a"


def _worker_env(monkeypatch, *argv: str, live_memory: bool = False) -> dict[str, str]:
    """The environment a worker would get (the subprocess is not started)."""
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 1, "", "not run")

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.build_parser().parse_args(list(argv))
    rec = run._run_worker(run.Point("cnn", 2, None), "non-private", args, live_memory=live_memory)
    assert not rec["ok"] and "not run" in rec["error"]
    return seen


def test_allocator_retain_reaches_timed_workers_but_not_live_memory_runs(monkeypatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert "GLIBC_TUNABLES" not in _worker_env(monkeypatch)
    assert _worker_env(monkeypatch, "--allocator", "retain")["GLIBC_TUNABLES"] == (
        "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
    )
    live = _worker_env(monkeypatch, "--allocator", "retain", live_memory=True)
    assert "GLIBC_TUNABLES" not in live and live["MALLOC_MMAP_THRESHOLD_"] == "65536"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")  # the user's own are kept
    assert _worker_env(monkeypatch, "--allocator", "retain")["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
    )


def test_allocator_is_named_in_the_section_title_and_machine_lines() -> None:
    summary = report.summarise([_record("non-private", 0, 1.0, 1)], ["non-private"])
    body = report.markdown_section("models-cpu-retain", {**_machine(), "allocator": "retain"},
                                   summary, ["non-private"], False, None, Path("."))  # fmt: skip
    assert body.startswith("### Models, CPU, glibc allocator retaining freed memory\n")
    assert "`--allocator retain`, GLIBC_TUNABLES mmap_max=0" in body
    plain = report.markdown_section("models-cpu", _machine(), summary, ["non-private"], False,
                                    None, Path("."))  # fmt: skip
    assert plain.startswith("### Models, CPU\n") and "glibc as configured" in plain


def test_failed_baseline_round_gives_no_ratio_for_that_round() -> None:
    base_failed = {**_record("non-private", 0, 0.0, 0), "ok": False, "error": "boom"}
    recs = [base_failed, _record("dp", 0, 50.0, 20)]
    rows = report.summarise(recs, ["non-private", "dp"])[0]["rows"]
    assert rows[0]["errors"] == ["boom"] and rows[0]["rounds_ok"] == 0
    assert rows[1]["throughput_ratio"] is None and rows[1]["samples_per_s"] == 50.0


def test_rewriting_a_section_keeps_hand_written_text(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    report.write_section(path, "models-cpu", "first\n")
    path.write_text(path.read_text() + "\n## Profile notes (by hand)\nkeep me\n")
    report.write_section(path, "sweep-cpu", "sweep\n")
    report.write_section(path, "models-cpu", "second\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "sweep" in text and "keep me" in text
    assert text.count("BEGIN bench:models-cpu") == 1


def test_sweep_plot_is_written(tmp_path: Path) -> None:
    names = ["non-private", "dp"]
    recs = []
    for b, t in [(4, 8), (8, 8), (4, 16)]:
        recs += [_record(n, 0, 10.0 * b / t * (i + 1), 1, b=b, t=t) for i, n in enumerate(names)]
    summary = report.summarise(recs, names)
    png = report.plot_sweep(summary, tmp_path / "sweep.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    body = report.markdown_section("sweep-cpu", _machine(), summary, names, True, png, tmp_path)
    assert "](sweep.png)" in body and "| 8 | 4 |" in body


def _machine() -> dict:
    return {"cpu": "x", "usable_cores": 1, "logical_cores": 1, "device": "cpu", "torch": "t",
            "torch_threads": 1, "python": "3", "opacus": "o", "dpclip": "d", "started": "s",
            "finished": "f", "rounds": 1, "warmup": 0, "steps": 1, "mem_method": "m",
            "load_average_before": None, "opacus_included": True}  # fmt: skip


def test_dpclip_bench_finds_the_checkout_harness_not_opacus_benchmarks() -> None:
    from dpclip.cli import bench

    harness = bench.find_harness()
    assert (
        harness is not None and Path(harness.__file__).resolve() == ROOT / "benchmarks" / "run.py"
    )


def test_dpclip_bench_without_checkout_is_a_clear_cli_error(monkeypatch, tmp_path) -> None:
    from dpclip.cli import CliError, bench

    monkeypatch.setattr(bench, "_candidate_roots", lambda: [tmp_path])
    parser = argparse.ArgumentParser(prog="dpclip")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--models", "cnn"])
    with pytest.raises(CliError, match="checkout of the dpclip repository"):
        args.run(args)


def test_dpclip_bench_reports_harness_errors_as_cli_errors() -> None:
    from dpclip.cli import CliError, bench

    parser = argparse.ArgumentParser(prog="dpclip")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--configs", "non-private,nope"])
    with pytest.raises(CliError, match=r"unknown configuration\(s\) \['nope'\]"):
        args.run(args)


def _records_file(path: Path, names: list[str], recs: list[dict], section="models-cuda") -> Path:
    header = {"section": section, "sweep": False, "names": names, "machine": _machine()}
    lines = [{"header": header}] + [{"record": r} for r in recs]
    path.write_text("\n".join(json.dumps(item) for item in lines) + "\n")
    return path


def test_records_of_runs_cut_short_merge_into_one_table(tmp_path: Path) -> None:
    a = _records_file(tmp_path / "a.jsonl", ["non-private", "dp"],
                      [_record("non-private", 0, 100.0, 10, model="m1"),
                       _record("dp", 0, 50.0, 20, model="m1")])  # fmt: skip
    b = _records_file(tmp_path / "b.jsonl", ["non-private", "dp", "other"],
                      [_record("non-private", 0, 10.0, 10, model="m1"),
                       _record("dp", 0, 8.0, 10, model="m1"),
                       _record("other", 0, 1.0, 10, model="m1")])  # fmt: skip
    results = tmp_path / "RESULTS.md"
    argv = ["--from-records", str(a), str(b), "--out", str(tmp_path / "out"),
            "--results", str(results), "--quiet"]  # fmt: skip
    assert run.main(argv) == 0
    payload = json.loads((tmp_path / "out" / "results-models-cuda.json").read_text())
    assert payload["configs"] == ["non-private", "dp", "other"]
    assert sorted({r["round"] for r in payload["records"]}) == [0, 1]  # files stay apart
    dp = payload["summary"][0]["rows"][1]
    assert dp["throughput_ratio"] == pytest.approx((0.5 + 0.8) / 2)
    assert "BEGIN bench:models-cuda" in results.read_text()
    assert "Merged from the records files `a.jsonl`, `b.jsonl`" in results.read_text()


def test_merged_table_ends_at_the_first_files_last_record_not_at_merge_time(tmp_path: Path):
    early = {**_record("non-private", 0, 100.0, 10), "finished_at": "2026-01-01 10:05 UTC"}
    late = {**_record("dp", 0, 50.0, 20), "finished_at": "2026-01-01 10:09 UTC"}
    a = _records_file(tmp_path / "a.jsonl", ["non-private", "dp"], [late, early])
    b = _records_file(tmp_path / "b.jsonl", ["non-private", "dp"],
                      [{**_record("dp", 0, 8.0, 10), "finished_at": "2026-02-02 00:00 UTC"}])  # fmt: skip
    c = _records_file(tmp_path / "c.jsonl", ["non-private"], [_record("non-private", 0, 1.0, 1)])
    d = tmp_path / "d.jsonl"  # no stamps and no end in the header either
    header = json.loads(c.read_text().splitlines()[0])
    del header["header"]["machine"]["finished"]
    d.write_text("\n".join([json.dumps(header), *c.read_text().splitlines()[1:]]) + "\n")
    results = tmp_path / "RESULTS.md"
    cases = [
        ((a, b), "to 2026-01-01 10:09 UTC;"),
        ((c,), "to f;"),
        ((d,), "to an unrecorded time;"),
    ]
    for files, end in cases:
        argv = ["--from-records", *map(str, files), "--out", str(tmp_path / "out"),
                "--results", str(results), "--quiet"]  # fmt: skip
        assert run.main(argv) == 0
        assert end in results.read_text()


def test_merging_records_of_different_sections_is_refused(tmp_path: Path, capsys) -> None:
    a = _records_file(tmp_path / "a.jsonl", ["non-private"], [_record("non-private", 0, 1.0, 1)])
    b = _records_file(tmp_path / "b.jsonl", ["non-private"], [_record("non-private", 0, 1.0, 1)],
                      section="sweep-cuda")  # fmt: skip
    results = tmp_path / "RESULTS.md"
    argv = ["--from-records", str(a), str(b), "--out", str(tmp_path / "out"),
            "--results", str(results)]  # fmt: skip
    assert run.main(argv) == 2
    assert "holds section 'sweep-cuda', not 'models-cuda'" in capsys.readouterr().err
    assert not results.exists()


def test_models_have_larger_default_batches_on_a_gpu() -> None:
    from benchmarks.models import MODELS

    for spec in MODELS.values():
        assert spec.default_batch_size("cuda") >= spec.default_batch_size("cpu")
    assert MODELS["cnn"].default_batch_size("cpu") == 1024


def test_live_memory_runs_give_their_own_columns_and_never_a_throughput() -> None:
    live = [{**_record("non-private", 0, 0.0, 100), "pass": "live-memory"},
            {**_record("dp", 0, 0.0, 150), "pass": "live-memory"}]  # fmt: skip
    timed = [_record("non-private", 0, 10.0, 400), _record("dp", 0, 8.0, 600)]
    (point,) = report.summarise(timed + live, ["non-private", "dp"])
    dp = point["rows"][1]
    assert dp["samples_per_s"] == 8.0 and dp["memory_ratio"] == pytest.approx(1.5)
    assert dp["live_mem_mib"] == pytest.approx(150 / 2**20)
    assert dp["live_memory_ratio"] == pytest.approx(1.5)
    body = report.markdown_section(
        "models-cpu", {**_machine(), "live_memory": True}, [point], ["non-private", "dp"],
        False, None, Path("."),
    )  # fmt: skip
    assert "live × non-private" in body and "MALLOC_MMAP_THRESHOLD_=65536" in body
    assert _table_rows(body)[1][10] == "1.50×" and _table_rows(body)[1][-1] == "n/a"  # no ops


@pytest.mark.parametrize("extra", [["--sweep"], ["--device", "cuda"]])
def test_live_memory_only_outside_cpu_model_tables_is_refused(extra, tmp_path, capsys) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--live-memory-only", *extra, "--out", str(tmp_path / "out"), "--results", str(results)]
    assert run.main(argv) == 2
    assert "--live-memory-only applies to CPU model tables" in capsys.readouterr().err
    out = tmp_path / "out"
    assert not results.exists() and not (out.exists() and any(out.iterdir()))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"record": {"round": 0}}'], "does not start with a header line"),
        (["HEADER", "{not json"], "line 2: not JSON"),
        (["HEADER", '{"recrod": {}}'], "line 2: neither a header nor a record line"),
        (["HEADER", "[1, 2]"], "line 2: neither a header nor a record line"),
    ],
)
def test_malformed_records_files_are_refused_naming_the_line(lines, message, tmp_path, capsys):
    good = _records_file(tmp_path / "good.jsonl", ["non-private"],
                         [_record("non-private", 0, 1.0, 1)])  # fmt: skip
    header = good.read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(header if line == "HEADER" else line for line in lines) + "\n")
    results = tmp_path / "RESULTS.md"
    argv = ["--from-records", str(good), str(bad), "--out", str(tmp_path / "out"),
            "--results", str(results)]  # fmt: skip
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    out = tmp_path / "out"
    assert not results.exists() and not (out.exists() and any(out.iterdir()))


def test_accumulation_takes_one_private_step_per_logical_batch() -> None:
    import torch
    from benchmarks import _worker

    from tests.counting import count_draws

    cfg = _worker.WorkerConfig(model="cnn", method="dpclip", batch_size=4, seq_len=None,
                               steps=1, warmup=0, accumulate=3)  # fmt: skip
    step, _, engine = _worker._build(cfg, torch.device("cpu"))
    draws = count_draws(engine._noise)
    passes = []
    engine.model.register_forward_pre_hook(lambda *a: passes.append(1))
    step()  # three physical batches of 4, and the self-check: the batch, then 3 examples alone
    assert len(passes) == 3 + 1 + 3
    step()
    assert len(passes) == 7 + 3
    assert engine.ledger.steps == 2 and engine.privacy.batch_size == 12
    assert len(draws) == 2  # one noise draw per logical batch of 12


def test_accumulation_is_its_own_section_counting_every_sample(tmp_path, workers_in_process):
    configs = ["non-private", "dpclip-mixed"] + (["opacus-hooks"] if HAS_OPACUS else [])
    code = _harness(tmp_path, "--models", "cnn", "--configs", ",".join(configs), "--rounds", "1",
                    "--steps", "1", "--warmup", "1", "--batch-size", "4", "--accumulate", "2",
                    "--no-live-memory")  # fmt: skip
    assert code == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "### Models, CPU, 2 physical batches per step\n" in text
    assert "`--accumulate 2`" in text
    payload = json.loads((tmp_path / "out" / "results-models-cpu-accumulate2.json").read_text())
    for rec in payload["records"]:
        assert rec["ok"] and rec["config"]["accumulate"] == 2
        assert rec["samples_per_s"] == pytest.approx(8 / rec["step_times_s"][0])


def test_dpclip_bench_without_options_is_short_and_leaves_results_md_alone() -> None:
    from dpclip.cli import bench, build_parser

    quick = build_parser().parse_args(["bench"])
    bench.fill_defaults(quick)
    assert (quick.models, quick.rounds, quick.steps) == ("cnn", 1, 3)
    assert quick.results == Path("dpclip-bench") / "RESULTS.md"
    full = build_parser().parse_args(["bench", "--full"])
    bench.fill_defaults(full)
    assert full.results == ROOT / "benchmarks" / "RESULTS.md" and full.rounds == 3
    given = build_parser().parse_args(["bench", "--rounds", "2", "--out", "x"])
    bench.fill_defaults(given)
    assert given.rounds == 2 and given.results == Path("x") / "RESULTS.md"


def test_profile_writes_a_table_for_each_configuration(tmp_path, workers_in_process) -> None:
    """--profile takes one step more than a timed run: the private plan must include it."""
    code = _harness(tmp_path, "--profile", "cnn", "--batch-size", "8", "--steps", "1",
                    "--warmup", "1")  # fmt: skip
    assert code == 0
    for config in ("non-private", "dpclip-mixed"):
        text = (tmp_path / "out" / f"profile-cpu-cnn-{config}.txt").read_text()
        assert "Self CPU" in text and "aten::" in text
