"""The yardstick columns: ``bench.floor``'s scripts, each run in a process of its own.

``bench.floor`` holds what each yardstick does (the raw floor, the sequential script;
``bench.samewrites`` the "same writes" floor); this
module starts one against the run's sandbox and database, reads the JSON it prints, and
adds PostgreSQL's counters for it. A new yardstick is a script in ``bench.floor`` and a
function here, like ``floor`` and ``sequential``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import psycopg

from bench import samewrites
from bench.config import (
    MERCHANT_ID,
    MIN_APPROVED,
    PRIVATE_KEY,
    ROOT,
    WRITES_PLAN,
    BenchFailed,
    console,
)
from bench.context import Context
from bench.floor import TABLE_DDL, Target
from bench.measure import PgStats, db_figures, settle_stats
from billing.harness.databases import plain_url


def floor(ctx: Context) -> dict[str, Any]:
    """The raw floor: N charges, C threads."""
    return run_yardstick(ctx, "floor", ctx.config.n, ctx.config.concurrency)


def sequential(ctx: Context) -> dict[str, Any]:
    """The sequential script: ``BENCH_SEQUENTIAL_N`` charges, one after another."""
    return run_yardstick(ctx, "sequential", ctx.config.sequential_n, 1)


def same_writes(ctx: Context) -> dict[str, Any]:
    """The "same writes" floor: N queued charges of the real schema, C threads, raw SQL."""
    n = ctx.config.n
    console.log(f"seeding {n} aliases and queueing {n} charges for the same-writes floor")
    ctx.load_due(WRITES_PLAN, n)
    samewrites.prepare(plain_url(ctx.url), WRITES_PLAN, Target.amount, MERCHANT_ID)
    # Its own query of the charge IDs: one connection, one transaction.
    return run_yardstick(
        ctx, "writes", n, ctx.config.concurrency, ("--plan", WRITES_PLAN), overhead=1
    )


def run_yardstick(
    ctx: Context,
    script: str,
    n: int,
    concurrency: int,
    extra: tuple[str, ...] = (),
    overhead: int = 0,
) -> dict[str, Any]:
    """``python -m bench.floor`` in a process of its own, so that its CPU is its own.

    ``overhead``: connections (each one transaction) the script opens besides its C
    charging ones, not counted as the yardstick's.
    """
    config, url, database = ctx.config, ctx.url, ctx.database.name
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        conn.execute(TABLE_DDL)  # before the baseline: its catalog rows are not the floor's
    settle_stats()
    stats0 = PgStats.read(config.pg_admin_url, database)
    options = {
        "--database-url": plain_url(url),
        "--gateway-url": ctx.sandbox.url,
        "--merchant-id": MERCHANT_ID,
        "--n": str(n),
        "--concurrency": str(concurrency),
        "--sandbox-pid": str(ctx.sandbox.pid),
    }
    args = [sys.executable, "-m", "bench.floor", script, *itertools.chain(*options.items())]
    args.extend(extra)
    done = subprocess.run(
        args,
        cwd=ROOT,
        env={**os.environ, "BENCH_PRIVATE_KEY": PRIVATE_KEY},
        capture_output=True,
        text=True,
        timeout=config.timeout,
        check=False,
    )
    if done.returncode != 0:
        raise BenchFailed(f"bench.floor {script} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["charges"] != n or result["approved"] < MIN_APPROVED * n:
        raise BenchFailed(
            f"bench.floor {script}: {result['approved']} of {n} charges approved;"
            f" errors: {result['errors']}"
        )
    settle_stats()
    stats = PgStats.read(config.pg_admin_url, database).minus(stats0)
    stats.xact_commit -= 1 + overhead  # the CREATE TABLE IF NOT EXISTS, and the overhead
    stats.sessions -= 1 + overhead  # the connection that ran it, and the overhead's
    seconds = result["seconds"]
    return {
        **result,
        "throughput": n / seconds,
        "cpu_per_charge_ms": result["cpu_seconds"] / n * 1000,
        "sandbox_cpu_per_charge_ms": result["sandbox_cpu_seconds"] / n * 1000,
        "seconds_for_n": config.n * seconds / n,
        "extrapolated": n < config.n,
        "db": db_figures(stats, n),
    }
