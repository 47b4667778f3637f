"""The "ours" column: the real worker charging N due subscriptions, as in production.

N due subscriptions are loaded, ``billing worker`` is started exactly as a user starts it
(no options: a supervisor and one Celery process per core, each a pool of threads;
``BENCH_WORKER_ARGS`` adds options) on a queue of its own, with ``BILLING_MAX_IN_FLIGHT`` =
2C, through the harness (``billing.harness.workers``). The bench sends the
``billing.sweep_plan`` message beat sends at month start and waits until every charge has
settled. Throughput, CPU (the supervisor and all its children, from ``/proc``), sweep speed,
the broker's memory (Redis's ``used_memory``, or on RabbitMQ the memory of the run's
queues: ``bench.measure``) and PostgreSQL's counters are measured meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from bench import profiling
from bench.config import (
    KEY_ENV,
    MIN_APPROVED,
    PLAN,
    PRIVATE_KEY,
    ROOT,
    BenchFailed,
    Config,
    console,
)
from bench.context import Context
from bench.floor import Meter, process_tree
from bench.measure import (
    RABBIT_EVERY,
    PgStats,
    RabbitSampler,
    RedisSampler,
    db_figures,
    idle_memory,
    rabbit_idle_memory,
    settle_stats,
    table_writes,
)
from billing import broker
from billing.harness.databases import plain_url
from billing.harness.workers import Processes
from billing.models import OPEN_STATES, ChargeState
from billing.settings import Settings

#: The name the worker command goes by in the harness and its log (``worker.log``).
WORKER = "worker"


def worker_env(ctx: Context, queue: str) -> dict[str, str]:
    """The worker's environment: the run's services, its own queue, the in-flight bound.

    On RabbitMQ no Redis: ``BILLING_REDIS_URL`` is left out (and not inherited), as a user
    of RabbitMQ with the bench's plans (no ``max_charges_per_second``) runs the worker; one
    that needed Redis would refuse to start (``billing.ratelimit.require_redis``)."""
    env = {
        **os.environ,
        KEY_ENV: PRIVATE_KEY,
        "BILLING_DATABASE_URL": ctx.url,
        "BILLING_BROKER_URL": ctx.broker_url,
        "BILLING_QUEUE": queue,
        "BILLING_GATEWAY_URL": ctx.sandbox.url,
        "BILLING_PLANS_FILE": str(ctx.plans),
        "BILLING_MAX_IN_FLIGHT": str(ctx.config.max_in_flight),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("BILLING_REDIS_URL", None)
    if ctx.redis_url is not None:
        env["BILLING_REDIS_URL"] = ctx.redis_url
    return env


def start_worker(
    ctx: Context, queue: str, extra_env: Mapping[str, str] | None = None, name: str = WORKER
) -> Processes:
    """``billing worker`` as a user starts it (plus ``BENCH_WORKER_ARGS``), on ``queue``,
    once every one of its Celery processes is ready.

    Each start needs a ``name`` of its own: readiness is counted in ``<name>.log``, and a log
    that already holds an earlier worker's "ready." lines would be believed at once."""
    config = ctx.config
    shown = " ".join(("billing worker", *config.worker_args))
    console.log(
        f"starting {shown}: {config.worker_processes} process(es) x {config.worker_pool_size} "
        f"({config.pool})"
    )
    processes = Processes({**worker_env(ctx, queue), **(extra_env or {})}, ctx.workdir, cwd=ROOT)
    try:
        processes.billing_worker(name, *config.worker_args, processes=config.worker_processes)
    except BaseException:
        processes.stop_all()
        raise
    return processes


def send_sweep(broker_url: str, queue: str) -> None:
    """The message beat sends when the plan's sweep is due, with the project's Celery
    configuration (on RabbitMQ a plain app would declare the quorum queue as a classic one
    and be refused)."""
    from schedules.beat import SWEEP_PLAN

    app = broker.sending_app(Settings(broker_url=broker_url, queue=queue))
    app.send_task(SWEEP_PLAN, args=[PLAN], queue=queue)


@dataclass
class Progress:
    """When the sweep's rows were all committed, and when every charge had settled."""

    rows_at: float | None = None
    settled_at: float | None = None
    polls: int = 0


def wait_for_charges(config: Config, url: str, processes: Processes) -> Progress:
    """Poll the counts until all N charges have settled; fail on a stall or a dead worker."""
    progress = Progress()
    query = "SELECT count(*), count(*) FILTER (WHERE state <> ALL(%s)) FROM charges WHERE plan = %s"
    open_states = [str(state) for state in OPEN_STATES]
    started = last_change = time.monotonic()
    last_settled = -1
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        while True:
            row = conn.execute(query, (open_states, PLAN)).fetchone()
            progress.polls += 1
            now = time.time()
            created, settled = (int(v) for v in row) if row else (0, 0)
            if progress.rows_at is None and created >= config.n:
                progress.rows_at = now
            if settled != last_settled:
                last_settled, last_change = settled, time.monotonic()
            if settled >= config.n:
                progress.settled_at = now
                return progress
            if not processes.alive(WORKER):
                raise BenchFailed(f"the worker exited during the run:\n{processes.tail(WORKER)}")
            if time.monotonic() - last_change > 60:
                states: dict[str, int] = dict(
                    conn.execute(
                        "SELECT state, count(*) FROM charges WHERE plan = %s GROUP BY state",
                        (PLAN,),
                    ).fetchall()
                )
                raise BenchFailed(
                    f"no charge settled for 60 s ({settled} of {config.n} settled, "
                    f"{created} created; by state {states}; no beat runs in the bench, so "
                    f"a pending charge waits for a worker's refill):\n{processes.tail(WORKER)}"
                )
            if time.monotonic() - started > config.timeout:
                raise BenchFailed(
                    f"BENCH_TIMEOUT ({config.timeout:g} s) passed with {settled} of "
                    f"{config.n} charges settled"
                )
            # Fine-grained while the sweep writes rows (its speed is timed by these polls);
            # then coarse: a count over N rows is PostgreSQL work the worker competes with.
            time.sleep(0.025 if progress.rows_at is None else 0.5)


_SWEEP_TASK = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*Task billing\.sweep_plan\[[^\]]+\] "
    r"(received|succeeded in (\S+)s)"
)


def sweep_task_seconds(logs: str) -> float | None:
    """The sweep task's run time as Celery logged it (received -> succeeded).

    Celery's own figure is used when readable; the log filter may mask it (a float's
    16 digits look like a card number), so the two lines' timestamps are the fallback.
    """
    stamps: dict[str, datetime] = {}
    for match in _SWEEP_TASK.finditer(logs):
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if match.group(2) == "received":
            stamps.setdefault("received", when)
            continue
        with contextlib.suppress(ValueError):
            return float(match.group(3))
        if "received" in stamps:
            return (when - stamps["received"]).total_seconds()
    return None


def measure(ctx: Context) -> dict[str, Any]:
    """Load N due subscriptions, sweep, charge them all with the real worker, measure."""
    config, url, broker_url = ctx.config, ctx.url, ctx.broker_url
    console.log(f"seeding {config.n} aliases and loading {config.n} due subscriptions")
    ctx.load_due(PLAN, config.n)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    database = ctx.database.name
    profiler = profiling.WorkerProfile(ctx.workdir) if config.profile else None
    processes = start_worker(ctx, queue, profiler.env() if profiler else None)
    try:
        idle = rabbit_idle_memory(ctx.rabbit) if ctx.rabbit else idle_memory(broker_url)
        tables0 = table_writes(url)
        settle_stats()
        stats0 = PgStats.read(config.pg_admin_url, database)
        sampler: RabbitSampler | RedisSampler = (
            RabbitSampler(ctx.rabbit, queue) if ctx.rabbit else RedisSampler(broker_url, queue)
        )
        supervisor = processes.managed[WORKER].pid
        meter = Meter(supervisor, tree=True)
        sandbox_meter = Meter(ctx.sandbox.pid)
        if profiler:
            profiler.start()
        sampler.start()
        for each in (meter, sandbox_meter):
            each.start()
        pids = ", ".join(str(pid) for pid in process_tree(supervisor)[1:])
        console.log(f"worker pid {supervisor} (workers {pids}): sweep sent, charging {config.n}")
        sent_at = time.time()
        send_sweep(broker_url, queue)
        try:
            progress = wait_for_charges(config, url, processes)
        finally:
            for each in (meter, sandbox_meter):
                each.stop()
            sampler.stop()
        timings = _worker_timings(url)
    finally:
        processes.stop_all()
    settle_stats()
    stats = PgStats.read(config.pg_admin_url, database).minus(stats0)
    stats.xact_commit -= progress.polls + 2  # the bench's own polls and timing queries
    stats.sessions -= 2  # the poller's connection and the timing queries'
    tables = {
        name: (ins - tables0.get(name, (0, 0))[0], upd - tables0.get(name, (0, 0))[1])
        for name, (ins, upd) in table_writes(url).items()
    }
    n = config.n
    approved = timings["states"].get(ChargeState.APPROVED, 0)
    if approved < MIN_APPROVED * n:
        raise BenchFailed(f"only {approved} of {n} charges were approved: {timings['states']}")
    assert progress.rows_at is not None
    seconds = timings["last_ledger"] - timings["sweep_start"]
    sweep_seconds = max(progress.rows_at - timings["sweep_start"], 1e-6)
    logs = processes.log(WORKER)
    cpu = meter.cpu
    peak = max((sample[1] for sample in sampler.samples), default=idle)
    return {
        "charges": n,
        "approved": approved,
        "states": timings["states"],
        "seconds": seconds,
        "throughput": n / seconds,
        "cpu_seconds": cpu,
        "cpu_per_charge_ms": cpu / n * 1000,
        "machine_busy": meter.busy_share,
        "sandbox_cpu_per_charge_ms": sandbox_meter.cpu / n * 1000,
        "sweep": {
            "seconds": sweep_seconds,
            "per_second": n / sweep_seconds,
            "how": "from the sweep's start (its charge rows' created_at) to the first poll "
            "(every 25 ms) that saw all N charge rows committed, in the real worker",
            "task_seconds_from_log": sweep_task_seconds(logs),
            "first_attempt_after_s": timings["first_attempt"] - timings["sweep_start"],
        },
        "charging_seconds": timings["last_ledger"] - progress.rows_at,
        "sweep_message_delay_s": timings["sweep_start"] - sent_at,
        **broker_memory(ctx, sampler, idle, peak),
        "db": db_figures(stats, n, tables),
        "worker": {
            "command": " ".join(("billing worker", *config.worker_args)),
            "processes": config.worker_processes,
            "pool": config.pool,
            "pool_size": config.worker_pool_size,
            "cpu_how": "user + system time of the supervisor and all its children "
            "(/proc/<pid>/stat of the process tree, reaped children included)",
        },
        **({"profile": profiler.report(config.results_dir, n)} if profiler else {}),
    }


def broker_memory(
    ctx: Context, sampler: RedisSampler | RabbitSampler, idle: int, peak: int
) -> dict[str, Any]:
    """The broker's memory during the run: ``redis`` (``used_memory``) or ``rabbitmq``
    (the run's queues), under the key the report reads it by."""
    figures: dict[str, Any] = {
        "idle_bytes": idle,
        "peak_bytes": peak,
        "peak_above_idle_bytes": peak - idle,
        "max_queue_length": max((sample[2] for sample in sampler.samples), default=0),
        "max_unacked": max((sample[3] for sample in sampler.samples), default=0),
        "samples": len(sampler.samples),
    }
    if isinstance(sampler, RabbitSampler):
        assert ctx.rabbit is not None
        return {
            "rabbitmq": {
                **figures,
                "vhost": ctx.rabbit.name,
                "every_s": RABBIT_EVERY,
                "sampler_cpu_seconds": sampler.cpu_seconds,
                "how": "sum of the memory of every queue of the run's vhost (rabbitmqctl "
                "list_queues name messages_ready messages_unacknowledged memory), every "
                f"{RABBIT_EVERY:g} s; idle: the median of 3 looks with the worker connected; "
                "queued and unacked: the worker's queue",
            }
        }
    return {"redis": {**figures, "server_peak_bytes": sampler.server_peak}}


def _worker_timings(url: str) -> dict[str, Any]:
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT min(created_at) FROM charges WHERE plan = %(p)s),"
            " (SELECT min(started_at) FROM attempts),"
            " (SELECT max(at) FROM ledger WHERE plan = %(p)s),"
            " (SELECT count(*) FROM ledger WHERE plan = %(p)s)",
            {"p": PLAN},
        ).fetchone()
        states: dict[str, int] = dict(
            conn.execute(
                "SELECT state, count(*) FROM charges WHERE plan = %s GROUP BY state", (PLAN,)
            ).fetchall()
        )
    assert row is not None
    return {
        "sweep_start": row[0].timestamp(),
        "first_attempt": row[1].timestamp(),
        "last_ledger": row[2].timestamp(),
        "ledger_rows": int(row[3]),
        "states": {str(k): int(v) for k, v in states.items()},
    }
