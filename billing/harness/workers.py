"""Worker and beat processes, started with the commands a user runs, and stopped for real.

Each process runs in a process group of its own and writes to ``<logdir>/<name>.log``
(appended, so that a restarted process keeps one log): a SIGKILL to the group takes a
prefork worker's children with it, SIGTERM to the group is the warm shutdown a deploy
sends, and the logs stay behind for the secrets scan and for the error that quotes them.
Readiness is a line in the log (``ready.`` for a worker, ``beat: Starting`` for beat),
checked while the process is alive: one that exits is reported at once, with its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from billing.harness.base import (
    STOP_TIMEOUT,
    HarnessError,
    reap,
    signal_group,
    tail,
    wait_for,
)

#: The ``celery`` program of this interpreter's environment.
CELERY = str(Path(sys.executable).with_name("celery"))
#: What a worker logs once it consumes, and what beat logs once it schedules.
WORKER_READY = "ready."
BEAT_READY = "beat: Starting"
#: Seconds a process gets to log that it is ready (a loaded 2-core machine is slow).
READY_TIMEOUT = 60.0
#: Pool and size of a worker unless told otherwise: a few threads, enough for a test.
POOL, CONCURRENCY = "threads", 4
#: Settings under which a run recovers in seconds instead of the defaults' minutes: short
#: gateway timeouts, a stuck call given up after 1 s past its read timeout, a lost message
#: re-sent after 8 s, the engine sweep every second, a short back-off for calls not sent,
#: and no minimum gap between two charges of one subscription.
FAST_RECOVERY = {
    "BILLING_CONNECT_TIMEOUT": "2",
    "BILLING_READ_TIMEOUT": "3",
    "BILLING_STUCK_MARGIN_SECONDS": "1",
    "BILLING_REQUEUE_AFTER_SECONDS": "8",
    "BILLING_ENGINE_SWEEP_SECONDS": "1",
    "BILLING_NOT_SENT_BACKOFF_BASE": "0.5",
    "BILLING_NOT_SENT_BACKOFF_CAP": "2",
    "BILLING_MIN_CHARGE_GAP_HOURS": "0",
}


def celery_worker_command(queue: str, node: str, pool: str, concurrency: int) -> list[str]:
    """``celery -A tasks worker`` on ``queue``, without the chatter a single run does not need
    (gossip, mingle and heartbeat events are for remote control of many nodes)."""
    return [
        CELERY, "-A", "tasks", "worker", "-Q", queue, f"--pool={pool}",
        f"--concurrency={concurrency}", "--loglevel=INFO", "-n", node,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def billing_worker_command(*extra: str) -> list[str]:
    """``billing worker``: what a user starts (with no options, a worker process per core
    under a supervisor; see ``billing.supervisor``)."""
    return [sys.executable, "-m", "billing.cli", "worker", *extra]


def celery_beat_command(schedule: Path) -> list[str]:
    """``celery -A tasks beat`` with its schedule file at ``schedule``."""
    return [CELERY, "-A", "tasks", "beat", "--loglevel=INFO", "-s", str(schedule)]


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL, timeout: float = 60.0) -> None:
    """``sig`` to the process group and wait for the process to end (SIGKILL after ``timeout``)."""
    signal_group(proc, sig)
    reap(proc, timeout)


@dataclass
class Managed:
    """One named process: the command that starts it again, the running process, its log."""

    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    starts: int = 1

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Processes:
    """Named processes sharing one environment (read when each starts) and one log folder."""

    env: dict[str, str]
    logdir: Path
    cwd: Path | None = None
    managed: dict[str, Managed] = field(default_factory=dict)

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                args, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def start(self, name: str, args: Sequence[str]) -> Managed:
        """Start ``args`` as ``name``, logging to ``<logdir>/<name>.log``; no waiting."""
        log = self.logdir / f"{name}.log"
        managed = Managed(name, list(args), self._spawn(list(args), log), log)
        self.managed[name] = managed
        return managed

    def worker(
        self, name: str, *, pool: str = POOL, concurrency: int = CONCURRENCY, wait: bool = True
    ) -> Managed:
        """A Celery worker on the environment's ``BILLING_QUEUE``; with ``wait``, once ready."""
        node = f"{name}-{uuid.uuid4().hex[:6]}@%h"
        args = celery_worker_command(self.env["BILLING_QUEUE"], node, pool, concurrency)
        managed = self.start(name, args)
        if wait:
            self.wait_log(name, WORKER_READY)
        return managed

    def billing_worker(
        self, name: str, *extra: str, processes: int | None = None, wait: bool = True
    ) -> Managed:
        """``billing worker`` (the default command unless ``extra`` says otherwise); with
        ``wait``, once each of its ``processes`` workers (default: one per core) is ready."""
        from billing.supervisor import default_processes

        managed = self.start(name, billing_worker_command(*extra))
        if wait:
            wanted = processes if processes is not None else default_processes()
            wait_for(
                lambda: self._ready_count(name, managed) >= wanted,
                READY_TIMEOUT,
                f"{name} ({wanted} workers ready)",
            )
        return managed

    def _ready_count(self, name: str, managed: Managed) -> int:
        if managed.proc.poll() is not None:
            raise HarnessError(
                f"{name} exited ({managed.proc.returncode}) before its workers were ready:\n"
                f"{self.tail(name)}"
            )
        return self.log(name).count(f" {WORKER_READY}")

    def beat(self, name: str, *, wait: bool = True) -> Managed:
        """Celery beat with a schedule file of its own; with ``wait``, once it schedules."""
        managed = self.start(name, celery_beat_command(self.logdir / f"{name}-schedule"))
        if wait:
            self.wait_log(name, BEAT_READY)
        return managed

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str) -> str:
        return tail(self.logdir / f"{name}.log")

    def wait_log(self, name: str, needle: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``needle`` is in the log of ``name``; an exit first is an error."""
        managed = self.managed[name]

        def logged() -> bool:
            if needle in self.log(name):
                return True
            if managed.proc.poll() is not None:
                raise HarnessError(
                    f"{name} exited ({managed.proc.returncode}) before logging {needle!r}:\n"
                    f"{self.tail(name)}"
                )
            return False

        try:
            wait_for(logged, timeout, f"{name} ({needle!r} in its log)")
        except HarnessError as exc:
            if managed.proc.poll() is None:
                raise HarnessError(f"{exc}:\n{self.tail(name)}") from None
            raise

    def alive(self, name: str) -> bool:
        return self.managed[name].proc.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process group of ``name`` and wait for it to end."""
        kill(self.managed[name].proc, sig)

    def restart(self, name: str) -> Managed:
        """Start ``name`` again with the same command (after a kill); no waiting."""
        managed = self.managed[name]
        managed.proc = self._spawn(managed.args, managed.log)
        managed.starts += 1
        return managed

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (a warm shutdown) to every group at once, then wait; SIGKILL what is left."""
        for managed in self.managed.values():
            if managed.proc.poll() is None:
                signal_group(managed.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for managed in self.managed.values():
            reap(managed.proc, max(0.1, deadline - time.monotonic()))
