"""A free loopback port for a test's process group: tests may run in parallel (pytest -n), so no
two launches may share torchrun's default port."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
