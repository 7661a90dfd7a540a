"""``dpclip bench``: run the benchmark harness (``benchmarks/run.py`` of a repository checkout).

With no options it runs a short check (the CNN, non-private against dpclip, one round of three
steps: about a minute) into ``./dpclip-bench/``, leaving the repository's RESULTS.md alone;
``--full`` runs the harness's own defaults (every configuration, three rounds, more than ten
minutes) and updates ``benchmarks/RESULTS.md``. Options given explicitly win in both.

The harness is not part of the installed package, so this command works from a checkout only: it
looks for ``benchmarks/run.py`` in the current folder and above it, then beside the ``src/``
folder that holds an editable install. It never settles for any other top-level ``benchmarks``
package (Opacus installs one of that name).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from dpclip.cli import CliError

# `dpclip bench` with no options: short, and into a folder of its own
_QUICK = {
    "models": "cnn", "configs": "non-private,dpclip-mixed", "rounds": 1, "steps": 3,
    "live_memory": False, "out": Path("dpclip-bench"), "results": None,
}  # fmt: skip

_NOT_FOUND = (
    "the benchmark harness lives in the repository's benchmarks/ folder, which is not installed "
    "with the package; run `dpclip bench` from a checkout of the dpclip repository "
    "(or `python -m benchmarks.run` in its root)"
)


def _candidate_roots() -> list[Path]:
    cwd = Path.cwd().resolve()
    roots = [cwd, *cwd.parents]
    roots.append(Path(__file__).resolve().parents[3])  # <root>/src/dpclip/cli/bench.py
    return list(dict.fromkeys(roots))


def find_harness() -> ModuleType | None:
    """Import the checkout's ``benchmarks.run`` (sys.path untouched), or None when not found."""
    root = next((r for r in _candidate_roots() if (r / "benchmarks" / "run.py").is_file()), None)
    if root is None:
        return None
    package_dir = root / "benchmarks"
    loaded = sys.modules.get("benchmarks")
    if loaded is None:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
        )
        if spec is None or spec.loader is None:
            return None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = loaded
        spec.loader.exec_module(loaded)
    elif Path(loaded.__file__ or "").resolve().parent != package_dir:
        return None  # another top-level `benchmarks` is already imported; never mix the two
    return importlib.import_module("benchmarks.run")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench``: the harness's own options when a checkout is found."""
    harness = find_harness()
    description = (
        "Measure samples/s and peak memory of non-private training, dpclip and Opacus, each "
        "configuration in its own process. Without options, a short check into ./dpclip-bench/; "
        "--full for the whole benchmark, written to benchmarks/RESULTS.md."
    )
    help_text = "benchmark non-private vs dpclip vs Opacus (needs a repository checkout)"
    if harness is None:
        # Swallow every argument (no option prefix) so that any use ends in run()'s clear error.
        p = subparsers.add_parser(
            "bench", help=help_text, description=description, prefix_chars="+", add_help=False
        )
        p.add_argument("ignored", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        p = subparsers.add_parser("bench", help=help_text, description=description)
        harness.add_arguments(p)
        p.add_argument(
            "--full",
            action="store_true",
            help="the full benchmark (harness defaults: all configurations, 3 rounds, > 10 "
            "minutes), written to benchmarks/RESULTS.md; without it a one-minute check of the "
            "CNN is written to ./dpclip-bench/",
        )
        p.set_defaults(**dict.fromkeys(_QUICK))  # None: not given, filled in by run()
    p.set_defaults(run=run, harness=harness)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the harness with the parsed options."""
    if args.harness is None:
        raise CliError(_NOT_FOUND)
    fill_defaults(args)
    try:
        return int(args.harness.run(args))
    except args.harness.HarnessError as err:
        raise CliError(str(err)) from None


def fill_defaults(args: argparse.Namespace) -> None:
    """Options not given: the short check's values, or the harness's own with ``--full``."""
    full = argparse.ArgumentParser()
    args.harness.add_arguments(full)
    harness_defaults = vars(full.parse_args([]))
    for key, quick in _QUICK.items():
        if getattr(args, key) is None:
            setattr(args, key, harness_defaults[key] if args.full else quick)
    if args.results is None:
        args.results = Path(args.out) / "RESULTS.md"
