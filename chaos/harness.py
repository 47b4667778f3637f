"""What only a chaos run does with the shared harness (``billing.harness``).

The services themselves (its own database, its own Redis, the sandbox process, workers and
beats in process groups) are the harness's, as in the tests and the bench. What is left
here is chaos's own: cutting every PostgreSQL connection of the run's database, and the
environment its workers and beats run in (short timeouts so that each fault is recovered
from within seconds, and a visibility timeout short enough for a lost message to come back
within the run).
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from billing.harness.databases import PostgresDatabase
from billing.harness.workers import FAST_RECOVERY

#: The queue of every chaos worker and beat.
QUEUE = "chaos"
#: Settings of a chaos run beyond the harness's fast recovery: a message a killed worker
#: held comes back after 20 s, and at most 120 charges are queued or in flight at once.
CHAOS_SETTINGS = {
    **FAST_RECOVERY,
    "BILLING_VISIBILITY_TIMEOUT": "20",
    "BILLING_MAX_IN_FLIGHT": "120",
    # Six worker processes (four prefork children, two thread pools) beside two beats and
    # the run itself share PostgreSQL's 100 connections: a process holds up to one per call
    # it makes at once (README, BILLING_CALLS_PER_PROCESS), so 32 each would not fit. With
    # messages of 8 charges a prefork child never made more than 8; with 32 it does (CI
    # ran out of connections when the batch grew).
    "BILLING_CALLS_PER_PROCESS": "10",
}


def cut_connections(database: PostgresDatabase) -> int:
    """``pg_terminate_backend`` every connection to the run's database but this one's."""
    with psycopg.connect(database.admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database.name,),
        ).fetchall()
    return sum(1 for (done,) in rows if done)


def worker_env(
    database_url: str, broker_url: str, gateway_url: str, plans: Path, keys: dict[str, str]
) -> dict[str, str]:
    """The environment of the run's workers and beats; ``keys`` maps key variables to keys."""
    return {
        **os.environ,
        "BILLING_DATABASE_URL": database_url,
        "BILLING_BROKER_URL": broker_url,
        "BILLING_QUEUE": QUEUE,
        "BILLING_PLANS_FILE": str(plans),
        "BILLING_GATEWAY_URL": gateway_url,
        **CHAOS_SETTINGS,
        **keys,
        "PYTHONUNBUFFERED": "1",
    }
