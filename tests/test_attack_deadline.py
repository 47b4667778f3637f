"""Attack review: the total-deadline watchdog (billing/deadline.py).

``CallDeadline.fire`` checks ``finished`` under the call's lock, then lets the lock go and
shuts the sockets down *afterwards*. A call that finishes in between returns its
connection to the pool, the next call takes it, and the late shutdown lands on the
socket that call is now using: another call's answer is cut, and its charge is recorded
``unknown`` although the gateway approved it.

The window is a few bytecodes wide; the test widens it with a hook in the watchdog thread
(the same idea as ``pause_before``: timing only, nothing is replaced).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest
import requests

import billing.deadline
from billing.deadline import deadline
from billing.gateway import SCRIPT_DUPLICATE, _new_session
from tests.test_charge_races import Background


class _SlowWatchdog:
    """``contextlib`` as billing.deadline sees it: its ``suppress`` (entered just before
    ``sock.shutdown``) waits in the watchdog thread until the test lets it go."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.go = threading.Event()

    def suppress(self, *exceptions: Any) -> Any:
        if threading.current_thread().name == "http-deadline-watchdog" and not self.go.is_set():
            self.paused.set()
            self.go.wait(10)
        return contextlib.suppress(*exceptions)


# SHOWS (misleading outcome, flagged): call A's deadline fires as A's answer arrives; the
# watchdog's shutdown, decided while A was still running, hits call B's socket (the pooled
# connection A gave back). B was approved at the gateway; its caller gets a cut answer
# (the client records it ``unknown``).
# The client pairs the deadline with connect + read timeout, so with the sandbox a silent
# hold always ends by the read timeout first; a real gateway that writes its answer in
# pieces (each within the read timeout) reaches the deadline with the connection kept
# alive. Here the requests timeout is simply set above the deadline, on the client's own
# session (``_new_session``: the DeadlineAdapter, the pool).
# FAILS today.
def test_a_deadline_never_cuts_the_call_that_reuses_its_connection(gateway, monkeypatch):
    a_alias, b_alias = gateway.seed_aliases("1234567", 2)
    hook = _SlowWatchdog()
    monkeypatch.setattr(billing.deadline, "contextlib", hook)
    session = _new_session(gateway.url)

    def post(alias: str, seconds: float) -> Any:
        form = {
            "ID": "1234567", "IP": "203.0.113.7", "MONTANT": "29.90", "ALIAS": alias,
            "PRIVATE_KEY": "test-key-eur",
        }  # fmt: skip
        with deadline(seconds):
            response = session.post(f"{gateway.url}/{SCRIPT_DUPLICATE}", data=form, timeout=(2, 8))
            return response.status_code, response.text

    gateway.set_behaviour(a_alias, hold=True, times=1)
    a = Background(lambda: post(a_alias, 0.5), "call-a")
    gateway.wait_held(a_alias)
    assert hook.paused.wait(5)  # A's deadline fired; its shutdown is about to happen
    gateway.release(a_alias)  # ... and A's whole answer arrives just now
    status, body = a.join()
    assert status == 200 and "RESPONSE=00" in body  # A got its complete answer

    gateway.set_behaviour(b_alias, hold=True, times=1)
    b = Background(lambda: post(b_alias, 8.0), "call-b")  # reuses A's pooled connection
    gateway.wait_held(b_alias)
    hook.go.set()  # the watchdog completes A's deadline: on B's socket
    threading.Event().wait(0.3)
    gateway.release(b_alias)
    cut: requests.RequestException | None = None
    try:
        status, body = b.join()
    except requests.RequestException as exc:
        cut = exc
    assert [c["result"] for c in gateway.calls(alias=b_alias)] == ["approved"]  # money moved
    assert cut is None, f"call B was cut by call A's deadline: {cut!r}"
    assert "RESPONSE=00" in body


@pytest.fixture(autouse=True)
def _release_watchdog() -> Any:
    yield
    billing.deadline.contextlib = contextlib  # type: ignore[attr-defined]
