"""Two settings that make the suite faster and change no test's outcome."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    """Under ``pytest -n N`` (pytest-xdist) each worker gets its share of the cores for torch's
    threads: N workers with a thread per core each would oversubscribe them and run slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // int(workers)))


def pytest_collection_finish(session) -> None:
    """Everything imported by collection (torch, transformers, ...) lives for the whole run:
    frozen out of the garbage collector's reach, so a full collection (transformers' Trainer
    asks for one per run, Python makes its own) scans only what the tests create."""
    import gc

    gc.collect()
    gc.freeze()
