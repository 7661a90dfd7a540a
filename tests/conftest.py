"""Under ``pytest -n N`` (pytest-xdist) each worker gets its share of the cores for torch's
threads: N workers with a thread per core each would oversubscribe them and run slower."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // int(workers)))
