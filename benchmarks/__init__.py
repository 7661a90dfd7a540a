"""Benchmark harness: non-private vs dpclip vs Opacus, each configuration in its own process.

Run from a checkout of the repository: ``python -m benchmarks.run --help`` (or ``dpclip bench``).
Note that Opacus ships an unrelated top-level package also called ``benchmarks``; run the harness
from the repository root so that this one is found first.
"""
