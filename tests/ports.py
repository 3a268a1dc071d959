"""Free TCP ports on 127.0.0.1, for servers a test starts."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; it may be taken again before use, rarely)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on now: all are held open together while the OS picks
    them, so no two are the same (each may still be taken by another process before use, rarely)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
