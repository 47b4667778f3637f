"""Celery's own cost per message: ``billing.noop`` N times through the default worker.

The same command as the "ours" column (``billing worker`` plus ``BENCH_WORKER_ARGS``: same
processes, same pool, same concurrency, same in-flight bound) is started on a fresh queue.
N ``billing.noop`` messages (one integer argument, like a charge's) are written to a
staging queue the worker does not read, then handed to it at once with an atomic Redis
``RENAME``: the worker starts on a full queue, and the bench's own sending (kombu, in this
process) is neither in the time nor competing for the CPU while the worker drains it.

Done is: the queue empty and nothing unacknowledged (``task_acks_late``: a message leaves
``unacked`` once its task has finished), polled every 20 ms; the worker's log must then
hold N "succeeded" lines for the task. CPU is the supervisor's and all its children's.

RabbitMQ has no ``RENAME``, and a quorum queue cannot be moved. There the worker is told
to stop consuming its queue (Celery's remote control, ``cancel_consumer``, answered by
each of its processes; each answers before it cancels, so the bench then waits until
each logged its cancel), the N messages are sent to that queue, and ``add_consumer`` hands
them over at once: again the worker starts on a full queue. A look at the queue is a
``rabbitmqctl`` call (0.3 s, an Erlang VM), too slow to time a drain by; done is the
worker's log holding N "succeeded" lines for the task (read as it grows, every 20 ms; a
message is acknowledged right after, ``task_acks_late``), then checked: the queue empty and
nothing unacknowledged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench.config import BenchFailed, console
from bench.context import Context
from bench.floor import Meter
from bench.measure import rabbit_queues
from bench.ours import start_worker
from billing import broker
from billing.harness.rabbitmq import RabbitVhost
from billing.harness.workers import Processes
from billing.settings import Settings

#: Seconds between two looks at the queue.
POLL = 0.02
#: The no-op worker's name in the harness (its log: ``noop-worker.log``).
WORKER = "noop-worker"
#: kombu's Redis transport keeps unacknowledged messages in this hash.
UNACKED = "unacked"
#: Seconds the worker's processes have to answer a remote-control command (RabbitMQ).
CONTROL_TIMEOUT = 10.0
#: Seconds given to a worker process's cancel once it logged it (one round trip).
CANCEL_SETTLE = 0.5
#: Seconds RabbitMQ's queue figures may lag behind the worker's log (RabbitMQ).
SETTLE_TIMEOUT = 15.0


def task_line(task: str) -> str:
    """What Celery's log lines of a task start with: once when it is received and once
    when it succeeded (``Task NAME[ID] succeeded in ...``): 2N lines for N tasks done."""
    return f"Task {task}["


class LogCounter:
    """How often ``needle`` occurs in a growing log, reading only what was added since.

    A needle cut by the end of what was written so far is counted once the rest arrives:
    the last ``len(needle) - 1`` characters are kept for the next read."""

    def __init__(self, path: Path, needle: str) -> None:
        self.path = path
        self.needle = needle
        self.count = 0
        self._offset = 0
        self._tail = ""

    def read(self) -> int:
        """Count the needles in what was appended since the last read; the total so far."""
        if not self.path.exists():
            return self.count
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        return self.feed(data.decode(errors="replace"))

    def feed(self, text: str) -> int:
        """Count the needles of ``text``, the log's next characters; the total so far."""
        joined = self._tail + text
        self.count += joined.count(self.needle)
        keep = len(self.needle) - 1
        # Shorter than a needle: never one already counted, maybe the start of the next.
        self._tail = joined[-keep:] if keep else ""
        return self.count


def send_noops(broker_url: str, queue: str, n: int) -> float:
    """``n`` no-op messages on ``queue``, over one producer connection; seconds taken."""
    app = broker.sending_app(Settings(broker_url=broker_url, queue=queue))
    began = time.monotonic()
    broker.send_many(app, broker.NOOP_TASK, range(n))
    return time.monotonic() - began


def wait_drained(client: redis.Redis, queue: str, n: int, timeout: float, alive: Any) -> float:
    """Poll until ``queue`` is empty and nothing is unacked; the time it became so."""
    deadline = time.monotonic() + timeout
    while True:
        queued, unacked = client.llen(queue), client.hlen(UNACKED)
        if queued == 0 and unacked == 0:
            return time.time()
        if not alive():
            raise BenchFailed("the worker exited while it drained the no-op messages")
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"no-op: {queued} of {n} messages still queued, {unacked} unacked after "
                f"{timeout:g} s"
            )
        time.sleep(POLL)


def measure(ctx: Context) -> dict[str, Any]:
    """N no-op messages through the default worker: messages/s and CPU per message."""
    if ctx.rabbit is not None:
        return measure_rabbit(ctx, ctx.rabbit)
    config = ctx.config
    n = config.noop_n
    queue = f"noop-{uuid.uuid4().hex[:8]}"
    staging = f"{queue}-staging"
    processes = start_worker(ctx, queue, name=WORKER)
    client = redis.Redis.from_url(ctx.broker_url)
    try:
        console.log(f"sending {n} no-op messages to a staging queue")
        send_seconds = send_noops(ctx.broker_url, staging, n)
        if client.llen(staging) != n:
            raise BenchFailed(f"no-op: {client.llen(staging)} of {n} messages staged")
        meter = Meter(processes.managed[WORKER].pid, tree=True).start()
        began = time.time()
        client.rename(staging, queue)
        done = wait_drained(client, queue, n, config.timeout, lambda: processes.alive(WORKER))
        meter.stop()
    finally:
        processes.stop_all()
        client.close()
    succeeded = processes.log(WORKER).count(f"Task {broker.NOOP_TASK}[")
    # Each task logs "received" and "succeeded": two lines with its name.
    if succeeded < 2 * n:
        raise BenchFailed(f"no-op: the worker logged {succeeded // 2} of {n} tasks")
    how = (
        "billing.noop sent N times to a staging queue, renamed onto the worker's queue at "
        "once; until the queue is empty and nothing is unacked; CPU of the supervisor and "
        "all its children"
    )
    return _figures(n, done - began, meter, send_seconds, how)


def _figures(n: int, seconds: float, meter: Meter, send_seconds: float, how: str) -> dict[str, Any]:
    """The no-op row: N messages drained in ``seconds`` with ``meter``'s CPU."""
    seconds = max(seconds, 1e-6)
    return {
        "messages": n,
        "seconds": seconds,
        "messages_per_second": n / seconds,
        "cpu_seconds": meter.cpu,
        "cpu_per_message_ms": meter.cpu / n * 1000,
        "machine_busy": meter.busy_share,
        "send_seconds": send_seconds,
        "how": how,
    }


def control(app: Celery, command: str, queue: str, processes: int, reply: bool = True) -> None:
    """``command`` (``cancel_consumer`` / ``add_consumer``) of ``queue`` to every Celery
    process of the worker; with ``reply``, each must answer that it will."""
    method: Callable[..., Any] = getattr(app.control, command)
    if not reply:
        method(queue, reply=False)
        return
    replies = method(queue, reply=True, timeout=CONTROL_TIMEOUT, limit=processes)
    answered = [reply for reply in replies or [] if isinstance(reply, dict)]
    if len(answered) < processes:
        raise BenchFailed(
            f"no-op: {len(answered)} of {processes} worker processes answered {command} "
            f"{queue!r} within {CONTROL_TIMEOUT:g} s: {replies}"
        )


def settled(vhost: RabbitVhost, queue: str) -> tuple[int, int]:
    """Ready and unacknowledged messages of ``queue`` once both are 0, or after
    ``SETTLE_TIMEOUT`` s of RabbitMQ's figures catching up."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        ready, unacked, _ = rabbit_queues(vhost).get(queue, (0, 0, 0))
        if (ready, unacked) == (0, 0) or time.monotonic() > deadline:
            return ready, unacked
        time.sleep(0.5)


def wait_logged(
    counter: LogCounter, n: int, timeout: float, alive: Callable[[], bool]
) -> tuple[float, float]:
    """Poll the log until it holds ``n`` needles more than ``counter`` has counted: the times
    the first was seen (the drain began: a process runs a deferred ``add_consumer`` within
    its 2 s wait for messages, and that wait is not Celery's cost) and the last."""
    deadline = time.monotonic() + timeout
    start = counter.count
    first: float | None = None
    while counter.read() < start + n:
        if first is None and counter.count > start:
            first = time.time()
        if not alive():
            raise BenchFailed("the worker exited while it drained the no-op messages")
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"no-op: {(counter.count - start) // 2} of {n // 2} tasks logged as finished "
                f"after {timeout:g} s"
            )
        time.sleep(POLL)
    done = time.time()
    return (done if first is None else first), done


def measure_rabbit(ctx: Context, vhost: RabbitVhost) -> dict[str, Any]:
    """The no-op row on RabbitMQ: the worker's consumer cancelled, N messages sent to its
    queue, the consumer added again; until the log holds N tasks succeeded."""
    config = ctx.config
    n = config.noop_n
    queue = f"noop-{uuid.uuid4().hex[:8]}"
    processes: Processes = start_worker(ctx, queue, name=WORKER)
    app = broker.sending_app(Settings(broker_url=ctx.broker_url, queue=queue))
    try:
        control(app, "cancel_consumer", queue, config.worker_processes)
        # Each process answers before it cancels (Celery defers it to its event loop).
        log = ctx.workdir / f"{WORKER}.log"
        _wait_cancelled(log, queue, config.worker_processes, lambda: processes.alive(WORKER))
        console.log(f"sending {n} no-op messages to the worker's queue, its consumers cancelled")
        send_seconds = send_noops(ctx.broker_url, queue, n)
        staged = _staged(vhost, queue, n)
        if staged != n:
            raise BenchFailed(f"no-op: {staged} of {n} messages queued")
        # "Task billing.noop[...]" is logged at "received" and at "succeeded".
        counter = LogCounter(log, task_line(broker.NOOP_TASK))
        counter.read()
        meter = Meter(processes.managed[WORKER].pid, tree=True).start()
        # No waiting for the answers: the drain starts meanwhile (checked in the log below).
        control(app, "add_consumer", queue, config.worker_processes, reply=False)
        began, done = wait_logged(counter, 2 * n, config.timeout, lambda: processes.alive(WORKER))
        meter.stop()
        started = LogCounter(log, f"Started consuming from {queue}").read()
        left = settled(vhost, queue)
    finally:
        processes.stop_all()
    if left != (0, 0):
        raise BenchFailed(f"no-op: {left[0]} messages ready, {left[1]} unacked after the drain")
    if started < config.worker_processes:
        raise BenchFailed(
            f"no-op: {started} of {config.worker_processes} worker processes consumed again "
            "after add_consumer (the others' share was drained by fewer)"
        )
    how = (
        "RabbitMQ: the worker's consumers cancelled (remote control), billing.noop sent N "
        "times to its queue (publisher confirms), the consumers added again; from the first "
        "task in its log to N tasks succeeded (polled every 20 ms; the queue then checked "
        "empty, nothing unacked); CPU of the supervisor and all its children from the "
        "add_consumer on"
    )
    return _figures(n, done - began, meter, send_seconds, how)


def _wait_cancelled(log: Path, queue: str, processes: int, alive: Callable[[], bool]) -> None:
    """Until each of the worker's ``processes`` logged that it cancels ``queue``, then
    ``CANCEL_SETTLE`` s for the cancel itself (sent right after the line, one round trip).

    Not RabbitMQ's ``consumers`` figure: for a quorum queue it said 0 while a process
    still consumed. A process's loop runs the deferred cancel within its 2 s wait for
    messages (Celery's ``synloop``), so this takes at most about that."""
    counter = LogCounter(log, f"Canceling queue {queue}")
    deadline = time.monotonic() + CONTROL_TIMEOUT
    while counter.read() < processes:
        if not alive():
            raise BenchFailed("the no-op worker exited while it cancelled its consumers")
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"no-op: {counter.count} of {processes} worker processes cancelled "
                f"{queue!r} within {CONTROL_TIMEOUT:g} s of cancel_consumer"
            )
        time.sleep(POLL)
    time.sleep(CANCEL_SETTLE)


def _staged(vhost: RabbitVhost, queue: str, n: int) -> int:
    """Messages ready in ``queue``, given a few seconds to reach ``n`` (RabbitMQ's figures
    of a quorum queue may trail its confirms)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        ready = rabbit_queues(vhost).get(queue, (0, 0, 0))[0]
        if ready >= n or time.monotonic() > deadline:
            return ready
        time.sleep(0.5)
