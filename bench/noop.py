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
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from bench.config import BenchFailed, console
from bench.context import Context
from bench.floor import Meter
from bench.ours import start_worker
from billing import broker
from billing.settings import Settings

#: Seconds between two looks at the queue.
POLL = 0.02
#: The no-op worker's name in the harness (its log: ``noop-worker.log``).
WORKER = "noop-worker"
#: kombu's Redis transport keeps unacknowledged messages in this hash.
UNACKED = "unacked"


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
    seconds = max(done - began, 1e-6)
    return {
        "messages": n,
        "seconds": seconds,
        "messages_per_second": n / seconds,
        "cpu_seconds": meter.cpu,
        "cpu_per_message_ms": meter.cpu / n * 1000,
        "machine_busy": meter.busy_share,
        "send_seconds": send_seconds,
        "how": "billing.noop sent N times to a staging queue, renamed onto the worker's "
        "queue at once; until the queue is empty and nothing is unacked; CPU of the "
        "supervisor and all its children",
    }
