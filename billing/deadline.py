"""A total deadline for an HTTP call, whatever the server does.

requests' read timeout bounds each socket read, not the call: a server that sends one byte
a second keeps a call with a 1-second read timeout alive for as long as it likes, past the
stuck-call cutoff, after which the engine has declared the charge unknown while its worker
still waits. Every gateway call and every webhook post therefore runs under
:func:`deadline`: one watchdog thread per process shuts down the call's socket when the
deadline passes, the blocked read returns at once, and the caller learns that the deadline
(not the network) ended the call.

The connection classes below register the connection a call uses (a fresh one or one
reused from the pool) with the call's deadline; :class:`DeadlineAdapter` mounts them on a
``requests.Session``. A name lookup (``getaddrinfo``) cannot be interrupted this way; it
happens before any byte is sent, so at worst it delays a call that was never sent.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: Seconds the watchdog may be late: it wakes at each deadline, this is only its slack.
WATCHDOG_SLACK = 0.05


@dataclass
class CallDeadline:
    """One call's deadline, the connections it used, and what the deadline did."""

    at: float
    seconds: float
    connections: list[Any] = field(default_factory=list)
    #: Whether a request was (or may have been) written: after that, a cut call is unknown.
    may_have_sent: bool = False
    fired: bool = False
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fire(self) -> None:
        """The deadline passed: shut every socket of the call, so its reads end now.

        Under the lock: :meth:`finish` waits for it, so a socket is never shut once its call
        has finished (and the connection may serve another call from the pool).
        """
        with self.lock:
            if self.finished:
                return
            self.fired = True
            for connection in self.connections:
                sock = getattr(connection, "sock", None)
                if sock is None:
                    continue
                with contextlib.suppress(OSError):  # already closed: nothing to wait on
                    sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """The call is over: the deadline can no longer touch its connections. Call it
        before the connection goes back to the pool (before the response is closed)."""
        with self.lock:
            self.finished = True


_local = threading.local()


def current() -> CallDeadline | None:
    """The deadline of the call this thread is making, if any."""
    found: CallDeadline | None = getattr(_local, "call", None)
    return found


class _Watchdog:
    """One thread per process that fires deadlines as they pass."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, CallDeadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, call: CallDeadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (call.at, next(self._seq), call))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="http-deadline-watchdog", daemon=True
                )
                self._thread.start()
            # Woken only when this deadline comes first: the watchdog already waits for the
            # first one and looks at the heap again when it passes, so a later deadline
            # needs no wake-up. Every call's deadline is the same length, so that is almost
            # never: waking it for each call cost a thread switch per call for nothing.
            if self._heap[0][2] is call:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                at, _, call = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait + WATCHDOG_SLACK)
                    continue
                heapq.heappop(self._heap)
            call.fire()


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog._reset)


@contextmanager
def deadline(seconds: float) -> Iterator[CallDeadline]:
    """Run the HTTP call made in this block for at most ``seconds`` in all.

    Read the whole answer inside the block and call ``finish()`` (or leave the block)
    before closing the response, so the connection is out of the deadline's reach when it
    returns to the pool.
    """
    call = CallDeadline(at=time.monotonic() + seconds, seconds=seconds)
    previous = current()
    _local.call = call
    _watchdog.watch(call)
    try:
        yield call
    finally:
        call.finish()
        _local.call = previous


def _register(connection: Any) -> None:
    call = current()
    if call is None:
        return
    with call.lock:
        call.connections.append(connection)
        if connection.sock is not None:  # a pooled connection: the request goes out now
            call.may_have_sent = True
        fired = call.fired
    if fired:  # the deadline passed before this connection was handed over
        call.fire()


def _connected() -> None:
    call = current()
    if call is not None:
        with call.lock:
            call.may_have_sent = True


class _Watched:
    """Mixed into a connection class: its call's deadline can shut it down."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _connected()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class DeadlineHTTPConnection(_Watched, HTTPConnection):
    """A plain connection whose call's deadline can shut it down."""


class DeadlineHTTPSConnection(_Watched, HTTPSConnection):
    """The same over TLS: a deadline during the handshake ends the call unsent."""


class DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = DeadlineHTTPConnection


class DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = DeadlineHTTPSConnection


_POOLS = {"http": DeadlineHTTPConnectionPool, "https": DeadlineHTTPSConnectionPool}


class DeadlineAdapter(HTTPAdapter):
    """``HTTPAdapter`` whose connections obey :func:`deadline` (proxied ones too)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


__all__ = ["CallDeadline", "DeadlineAdapter", "current", "deadline"]
