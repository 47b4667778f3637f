"""One command that runs as many workers as the machine can use, and stops them well.

Why: a charge is an HTTP call that waits 50 to 500 ms on the gateway. One Celery process
with a prefork pool of one child per core makes two calls at a time on a 2-core machine
(40 charges a second at 50 ms, whatever the hardware); one process with a thread pool is
held to one core by Python's interpreter lock. So ``billing worker`` starts one Celery
process per core, each with a pool of threads (``tasks/`` is started as ``celery -A tasks
worker``, exactly as a user would), and stays in front of them:

- every signal it receives (SIGTERM from a deploy, SIGINT from Ctrl-C, SIGQUIT) is passed
  on to each worker: SIGTERM is Celery's warm shutdown, so calls in flight finish and are
  recorded before the workers exit, and the supervisor exits when they all have;
- a worker that exits while nobody asked it to is started again, after a pause that grows
  with each quick exit (a crash loop does not spin);
- the workers run in a process group of their own and are told (``PR_SET_PDEATHSIG``) to be
  killed if the supervisor itself dies: a ``kill -9`` of the supervisor cuts their calls
  short as a machine loss would (the stuck sweep then marks those calls unknown), but never
  leaves workers running on, unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("billing.supervisor")

#: Signals passed on to every worker.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: Seconds between two looks at the workers.
POLL_SECONDS = 0.2
#: A worker that ran at least this long before exiting by itself was not crash-looping.
STEADY_SECONDS = 60.0
#: Pauses (seconds) before starting again a worker that exited by itself, one per quick exit
#: in a row; the last repeats.
RESTART_PAUSES = (1.0, 2.0, 5.0, 10.0, 30.0)
#: Threads per worker process by default: enough concurrent calls for a gateway answering
#: in 50 to 500 ms (each thread makes 2 to 20 calls a second) without spending a core on
#: thread switches; ``make bench`` compares it with other sizes.
DEFAULT_THREADS = 32

_PR_SET_PDEATHSIG = 1


def default_processes() -> int:
    """One worker process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_shape(
    processes: int = 0, pool: str = "threads", concurrency: int = 0
) -> tuple[int, int]:
    """(worker processes, pool size of each) that ``billing worker`` starts for its options.

    0 means the default: one process per core (one in all with ``prefork``, whose pool is
    the processes), each with ``DEFAULT_THREADS`` threads or greenlets (prefork: a child per
    core). The bench reads the same answer to know what the default command runs.
    """
    count = processes or (1 if pool == "prefork" else default_processes())
    size = concurrency or (DEFAULT_THREADS if pool in ("threads", "gevent") else 0)
    return count, size or default_processes()


def _die_with_parent() -> None:
    """In the child before exec: be killed when the supervisor dies (Linux)."""
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the process group still lets an operator stop them
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process to keep running: its name (for logs) and its command."""

    name: str
    argv: tuple[str, ...]


def celery_worker_specs(
    processes: int,
    *,
    pool: str,
    concurrency: int,
    queue: str,
    loglevel: str,
    extra: Sequence[str] = (),
) -> list[WorkerSpec]:
    """The ``celery -A tasks worker`` command of each worker process."""
    base = (sys.executable, "-m", "celery", "-A", "tasks", "worker")
    return [
        WorkerSpec(
            f"worker-{n}",
            (
                *base,
                f"--pool={pool}",
                f"--concurrency={concurrency}",
                f"--queues={queue}",
                f"--loglevel={loglevel}",
                f"--hostname=billing-{n}@%h",
                *extra,
            ),
        )
        for n in range(1, processes + 1)
    ]


@dataclass
class _Running:
    spec: WorkerSpec
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Keeps ``specs`` running until a signal asks them to stop; see the module docstring."""

    specs: Sequence[WorkerSpec]
    env: Mapping[str, str] | None = None
    _running: list[_Running] = field(default_factory=list)
    _stopping: int | None = None

    def run(self) -> int:
        """Start the workers and wait; returns the exit status (0 after a clean stop)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        try:
            self._running = [_Running(spec) for spec in self.specs]
            for worker in self._running:
                self._start(worker)
            return self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping is None:
            log.info("supervisor: %s received, stopping the workers", signal.Signals(signum).name)
        self._stopping = signum
        for worker in self._running:
            if worker.process is not None and worker.process.poll() is None:
                try:
                    worker.process.send_signal(signum)
                except ProcessLookupError:
                    continue

    def _start(self, worker: _Running) -> None:
        worker.process = subprocess.Popen(
            worker.spec.argv,
            env=dict(self.env) if self.env is not None else None,
            preexec_fn=_die_with_parent,
        )
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("supervisor: %s started (pid %d)", worker.spec.name, worker.process.pid)

    def _wait(self) -> int:
        status = 0
        while True:
            alive = 0
            now = time.monotonic()
            for worker in self._running:
                process = worker.process
                if process is not None and process.poll() is None:
                    alive += 1
                    continue
                if self._stopping is not None:
                    if process is not None:
                        status = max(status, abs(process.returncode or 0))
                    continue
                if worker.restart_at is None and process is not None:
                    self._schedule_restart(worker, process.returncode, now)
                if worker.restart_at is not None and now >= worker.restart_at:
                    self._start(worker)
                    alive += 1
            if self._stopping is not None and alive == 0:
                return status
            time.sleep(POLL_SECONDS)

    def _schedule_restart(self, worker: _Running, code: int | None, now: float) -> None:
        ran = now - worker.started
        worker.quick_exits = 0 if ran >= STEADY_SECONDS else worker.quick_exits + 1
        pause = RESTART_PAUSES[min(worker.quick_exits, len(RESTART_PAUSES) - 1)]
        worker.restart_at = now + pause
        log.warning(
            "supervisor: %s exited by itself (status %s after %.0f s); starting it again in %g s",
            worker.spec.name, code, ran, pause,
        )  # fmt: skip


__all__ = [
    "DEFAULT_THREADS",
    "Supervisor",
    "WorkerSpec",
    "celery_worker_specs",
    "default_processes",
    "worker_shape",
]
