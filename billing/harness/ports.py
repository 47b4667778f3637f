"""A free TCP port on loopback, for a server that must be told its port in advance.

Servers that can report the port they bound (``billing sandbox --port 0`` prints its URL)
should be started on port 0 instead: a port found free here can be taken by another
process before the server binds it. Redis, the metrics endpoint and the web console take
a port number, so they need this.
"""

from __future__ import annotations

import socket

from billing.defaults import BIND_HOST


def free_port(host: str = BIND_HOST) -> int:
    """A port nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_or_free(port: int, host: str = BIND_HOST) -> int:
    """``port`` when it can be bound now, else a free one (a preferred port that is taken)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return free_port(host)
    return port
