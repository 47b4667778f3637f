"""``billing worker`` with no options, as a user starts it: one Celery process per core,
each with a thread pool, under one supervisor (real processes, Redis, PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from billing.db import session_scope
from billing.models import ChargeState, LedgerEntry
from billing.supervisor import default_processes
from tests.fixtures.engine import ENGINE_PLANS
from tests.fixtures.processes import Cluster, wait_until
from tests.test_invariants import _states, _subscribe

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    """The supervisor's worker processes (its direct children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _start(cluster: Cluster, gateway) -> subprocess.Popen[bytes]:
    cluster.env.update(BILLING_GATEWAY_URL=gateway.url, BILLING_PLANS_FILE=str(ENGINE_PLANS))
    return cluster.billing_worker("bw")


def test_the_default_worker_runs_a_process_per_core_and_sigterm_lets_calls_finish(
    cluster, gateway, pg_url, tmp_path
):
    supervisor = _start(cluster, gateway)
    assert len(_children(supervisor.pid)) == default_processes()
    aliases = gateway.seed_aliases("1234567", 4)
    for alias in aliases:
        gateway.set_behaviour(alias, slow=2.0)
    _subscribe(pg_url, aliases)
    cluster.beat("b1")
    wait_until(lambda: len(gateway.calls(script="duplicate")) == 4, timeout=30, step=0.05)

    # A deploy: SIGTERM to the supervisor only, as Docker and systemd (KillMode=mixed) do.
    os.kill(supervisor.pid, signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0

    with session_scope(pg_url) as session:
        outcomes = Counter(session.scalars(select(LedgerEntry.outcome)))
    assert outcomes == Counter({"approved": 4})
    assert _states(pg_url) == Counter({ChargeState.APPROVED: 4})


def test_a_worker_that_dies_is_started_again_and_a_killed_supervisor_takes_them_along(
    cluster, gateway, pg_url, tmp_path
):
    supervisor = _start(cluster, gateway)
    first = _children(supervisor.pid)
    os.kill(first[0], signal.SIGKILL)
    wait_until(
        lambda: (
            len(_children(supervisor.pid)) == len(first)
            and first[0] not in _children(supervisor.pid)
        ),
        timeout=30,
    )
    assert "exited by itself" in cluster.log("bw")

    workers = _children(supervisor.pid)
    os.kill(supervisor.pid, signal.SIGKILL)  # the supervisor lost: no worker runs on
    supervisor.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
