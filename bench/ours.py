"""The "ours" column: the real worker charging N due subscriptions, as in production.

N due subscriptions are loaded, one Celery worker (``celery -A tasks worker --pool threads
-c C``, ``BILLING_MAX_IN_FLIGHT`` = 2C) is started on a queue of its own with the
harness (``billing.harness.workers``), the bench sends the ``billing.sweep_plan`` message
beat sends at month start, and waits until every charge has settled. Throughput, CPU,
sweep speed, Redis memory and PostgreSQL's counters are measured meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

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
from bench.floor import Meter
from bench.measure import (
    PgStats,
    RedisSampler,
    db_figures,
    idle_memory,
    settle_stats,
    table_writes,
)
from billing.harness.databases import plain_url
from billing.harness.workers import Processes
from billing.models import OPEN_STATES, ChargeState


def start_workers(ctx: Context, queue: str) -> tuple[Processes, list[str]]:
    """``BENCH_WORKERS`` workers sharing the C threads on ``queue``, each once it is ready."""
    config = ctx.config
    env = {
        **os.environ,
        KEY_ENV: PRIVATE_KEY,
        "BILLING_DATABASE_URL": ctx.url,
        "BILLING_BROKER_URL": ctx.broker_url,
        "BILLING_REDIS_URL": ctx.broker_url,
        "BILLING_QUEUE": queue,
        "BILLING_GATEWAY_URL": ctx.sandbox.url,
        "BILLING_PLANS_FILE": str(ctx.plans),
        "BILLING_MAX_IN_FLIGHT": str(config.max_in_flight),
        "PYTHONUNBUFFERED": "1",
    }
    console.log(
        f"starting {config.workers} worker process(es) (pool {config.pool}, "
        f"C={config.concurrency} in all)"
    )
    processes = Processes(env, ctx.workdir, cwd=ROOT)
    concurrency = -(-config.concurrency // config.workers)  # C shared out, rounded up
    names = [f"worker-{number}" for number in range(1, config.workers + 1)]
    try:
        for name in names:
            processes.worker(name, pool=config.pool, concurrency=concurrency)
    except BaseException:
        processes.stop_all()
        raise
    return processes, names


def send_sweep(broker_url: str, queue: str) -> None:
    """The message beat sends when the plan's sweep is due."""
    from celery import Celery

    from schedules.beat import SWEEP_PLAN

    app = Celery(broker=broker_url)
    try:
        app.send_task(SWEEP_PLAN, args=[PLAN], queue=queue)
    finally:
        app.close()


@dataclass
class Progress:
    """When the sweep's rows were all committed, and when every charge had settled."""

    rows_at: float | None = None
    settled_at: float | None = None
    polls: int = 0


def wait_for_charges(config: Config, url: str, processes: Processes, names: list[str]) -> Progress:
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
            for name in names:
                if not processes.alive(name):
                    raise BenchFailed(f"a worker exited during the run:\n{processes.tail(name)}")
            if time.monotonic() - last_change > 60:
                raise BenchFailed(
                    f"no charge settled for 60 s ({settled} of {config.n} settled, "
                    f"{created} created):\n{processes.tail(names[0])}"
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
    processes, names = start_workers(ctx, queue)
    try:
        idle = idle_memory(broker_url)
        tables0 = table_writes(url)
        settle_stats()
        stats0 = PgStats.read(config.pg_admin_url, database)
        sampler = RedisSampler(broker_url, queue)
        meters = [Meter(processes.managed[name].pid) for name in names]
        sandbox_meter = Meter(ctx.sandbox.pid)
        sampler.start()
        for meter in [*meters, sandbox_meter]:
            meter.start()
        pids = ", ".join(str(processes.managed[name].pid) for name in names)
        console.log(f"worker pid(s) {pids}: sweep sent, charging {config.n}")
        sent_at = time.time()
        send_sweep(broker_url, queue)
        try:
            progress = wait_for_charges(config, url, processes, names)
        finally:
            for meter in [*meters, sandbox_meter]:
                meter.stop()
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
    logs = "".join(processes.log(name) for name in names)
    cpu = sum(meter.cpu for meter in meters)
    peak = max((sample[1] for sample in sampler.samples), default=idle)
    return {
        "charges": n,
        "approved": approved,
        "states": timings["states"],
        "seconds": seconds,
        "throughput": n / seconds,
        "cpu_seconds": cpu,
        "cpu_per_charge_ms": cpu / n * 1000,
        "machine_busy": meters[0].busy_share,
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
        "redis": {
            "idle_bytes": idle,
            "peak_bytes": peak,
            "peak_above_idle_bytes": peak - idle,
            "server_peak_bytes": sampler.server_peak,
            "max_queue_length": max((sample[2] for sample in sampler.samples), default=0),
            "max_unacked": max((sample[3] for sample in sampler.samples), default=0),
            "samples": len(sampler.samples),
        },
        "db": db_figures(stats, n, tables),
    }


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
