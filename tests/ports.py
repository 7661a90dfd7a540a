"""A free loopback port for a test's process group: tests may run in parallel (pytest -n), so no
two launches may share torchrun's default port.

The port is drawn below Linux's ephemeral range (32768-60999 by default): a port the kernel hands
out as ephemeral can be taken, between this check and the launcher's bind, by any outgoing
connection, gloo's own among them (a suspected cause of one failed launch in a parallel suite).
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32767


def free_port() -> int:
    """A port in [20000, 32767] that nothing listens on now (an ephemeral one if none is found)."""
    draw = random.Random()  # own state: the tests seed the global generator alike in every worker
    for _ in range(100):
        port = draw.randint(_LOW, _HIGH)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
