"""A free TCP port on loopback, for the process groups and servers tests start (no dependencies: the GPU image
runs the tests that use it)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
