"""The probe: the engine in the bench process, one thread, counting its SQL statements.

The same engine code the worker runs, without Celery and at sandbox latency 0, sweeps and
charges ``BENCH_PROBE_N`` subscriptions while SQLAlchemy events count statements by verb,
commits, pool checkouts and new connections; PostgreSQL's own count of transactions is
read beside them. It answers what the worker's figures cannot: how many round trips one
charge costs, and how much CPU the engine alone spends.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.config import KEY_ENV, PRIVATE_KEY, PROBE_PLAN, BenchFailed
from bench.context import Context
from bench.measure import PgStats, settle_stats
from billing.db import dispose_all, get_engine
from billing.engine import Engine
from billing.plans import load_plans
from billing.settings import Settings


@dataclass
class SqlCount:
    """What SQLAlchemy sent while a block ran."""

    statements: Counter[str] = field(default_factory=Counter)
    commits: int = 0
    checkouts: int = 0
    connects: int = 0
    cpu_seconds: float = 0.0
    seconds: float = 0.0


@contextlib.contextmanager
def count_sql(url: str) -> Iterator[SqlCount]:
    """Count statements by verb, commits, pool checkouts (a ping each, but for the hot path's:
    ``billing.db.connect_unpinged``) and new connections."""
    from sqlalchemy import event

    engine = get_engine(url)
    count = SqlCount()

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "?"
        count.statements[verb] += 1

    def commit(_conn: Any) -> None:
        count.commits += 1

    def checkout(*_args: Any) -> None:
        count.checkouts += 1

    def connect(*_args: Any) -> None:
        count.connects += 1

    hooks: list[tuple[Any, str, Callable[..., None]]] = [
        (engine, "before_cursor_execute", statement),
        (engine, "commit", commit),
        (engine.pool, "checkout", checkout),
        (engine.pool, "connect", connect),
    ]
    for target, name, fn in hooks:
        event.listen(target, name, fn)
    cpu, began = time.process_time(), time.monotonic()
    try:
        yield count
    finally:
        count.cpu_seconds = time.process_time() - cpu
        count.seconds = time.monotonic() - began
        for target, name, fn in hooks:
            event.remove(target, name, fn)


def _per(count: SqlCount, n: int) -> dict[str, Any]:
    return {
        "statements": sum(count.statements.values()) / n,
        "by_verb": {verb: k / n for verb, k in count.statements.most_common()},
        "commits": count.commits / n,
        "pool_checkouts": count.checkouts / n,
        "new_connections": count.connects / n,
        "cpu_ms": count.cpu_seconds / n * 1000,
    }


def measure(ctx: Context) -> dict[str, Any]:
    """The engine in this process, one thread, sandbox latency 0: statements per charge.

    The same engine code the worker runs, without Celery; the dispatcher only collects IDs
    and the test plays the worker, one charge after another.
    """
    config, url, broker_url, plans, gateway = (
        ctx.config, ctx.url, ctx.broker_url, ctx.plans, ctx.gateway
    )  # fmt: skip
    n = config.probe_n
    ctx.load_due(PROBE_PLAN, n)
    os.environ[KEY_ENV] = PRIVATE_KEY
    settings = Settings(
        database_url=url,
        broker_url=broker_url,
        redis_url=ctx.redis_url,
        gateway_url=gateway.url,
        plans_file=plans,
        max_in_flight=n,
    )
    sent: list[int] = []
    engine = Engine(settings, plans=load_plans(plans), dispatcher=sent.extend)
    database = ctx.database.name
    gateway.set_latency(0)
    try:
        with count_sql(url) as sweep:
            engine.sweep_plan(PROBE_PLAN)
        dispose_all()
        settle_stats()
        stats0 = PgStats.read(config.pg_admin_url, database)
        with count_sql(url) as charges:
            outcomes = Counter(engine.charge(charge_id).outcome for charge_id in sent)
    finally:
        gateway.set_latency(config.latency_ms)
        dispose_all()
    settle_stats()
    # PostgreSQL's count: a checkout's ping is a transaction of its own (not the hot path's).
    server = PgStats.read(config.pg_admin_url, database).minus(stats0)
    if len(sent) != n or outcomes["approved"] != n:
        raise BenchFailed(f"probe: {len(sent)} of {n} charges sent, outcomes {dict(outcomes)}")
    return {
        "charges": n,
        "how": "billing.engine.Engine in the bench process, one thread, sandbox latency 0; "
        "SQLAlchemy events count statements, commits and pool checkouts",
        "sweep_per_subscription": _per(sweep, n),
        "sweep_seconds": sweep.seconds,
        "charge": {**_per(charges, n), "server_transactions": server.xact_commit / n},
    }
