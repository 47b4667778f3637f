"""What every module of the harness shares: its error, the ``billing`` command, waiting,
and stopping a process.

Each harness process is started in a session (and so a process group) of its own:
a signal meant for one group (a SIGKILL for a prefork worker and its children) reaches
nobody else, and a Ctrl-C in the terminal does not reach the services before the run
that started them has stopped its workers. Stopping is therefore always by group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from billing.errors import BillingError

#: Seconds a process gets to exit after SIGTERM before SIGKILL (a worker finishing its
#: calls in flight needs a read timeout's worth; the defaults are 5 s connect, 30 s read).
STOP_TIMEOUT = 30.0
#: Seconds between two looks at a condition being waited for.
POLL_STEP = 0.1
#: Lines of a log quoted in an error.
TAIL_LINES = 40


class HarnessError(BillingError):
    """A service of a run could not be started or driven; the message says which and why."""


def billing_command(*args: str) -> list[str]:
    """``billing ARGS``, run by this interpreter (the same code as the installed script)."""
    return [sys.executable, "-m", "billing.cli", *args]


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, step: float = POLL_STEP
) -> None:
    """Return once ``predicate()`` is true; ``HarnessError`` naming ``what`` after ``timeout``.

    The predicate may raise to give up early (a process that exited will never be ready).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise HarnessError(f"{what}: not ready within {timeout:g} s")
        time.sleep(step)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` of a log file, for an error message."""
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads; a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(
    proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM
) -> int:
    """``sig`` (SIGTERM: a clean stop) to the group, SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        signal_group(proc, sig)
    return reap(proc, timeout)


def reap(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int:
    """Wait ``timeout`` for a process already told to stop, then SIGKILL; the exit status.

    Whatever is left of its group afterwards (a prefork worker's children outliving a
    parent that was killed hard) is killed too.
    """
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        code = proc.wait()
    signal_group(proc, signal.SIGKILL)
    return code
