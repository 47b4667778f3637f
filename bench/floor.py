"""The two yardsticks ``make bench`` sets beside the worker, against the same sandbox.

- The raw floor: the least a program must do per charge and nothing more. One insert
  committed before the call (so that a crash leaves evidence, as the worker's attempt row
  does), one POST to ``duplicate.pl`` over a pooled keep-alive connection, one update
  committed after. C threads, each with its own psycopg connection and requests session:
  no ORM, no broker, no ledger, no retry logic, no state machine.
- The sequential script: what the guide's PHP example does, one charge after another,
  a new HTTP connection per call (``curl_init`` per charge) and one database connection,
  with the same insert before and update after.

Each runs in a process of its own (``python -m bench.floor floor|sequential ...``, started by
``bench.run``) so that the CPU time it reports is its own, and prints one JSON object.
The private key comes from ``BENCH_PRIVATE_KEY``, never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import psycopg
import requests
from requests.adapters import HTTPAdapter

from billing.harness.sandbox import SandboxControl

#: The yardsticks' own table: the worker's schema is not theirs to use.
TABLE_DDL = """
CREATE TABLE IF NOT EXISTS bench_floor_charges (
    id bigserial PRIMARY KEY,
    script text NOT NULL,
    alias text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    state text NOT NULL,
    tx text,
    code text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = (
    "INSERT INTO bench_floor_charges (script, alias, amount, state)"
    " VALUES (%s, %s, %s, 'in_flight') RETURNING id"
)
UPDATE = (
    "UPDATE bench_floor_charges SET state = %s, tx = %s, code = %s, updated_at = now()"
    " WHERE id = %s"
)
#: Same (connect, read) timeouts as the worker's defaults.
TIMEOUT = (5.0, 30.0)
#: Errors kept verbatim in the result; the rest are only counted.
MAX_ERRORS = 5
#: Seconds the sandbox may take to seed the aliases (100,000 of them at N = 100,000).
SEED_TIMEOUT = 120.0

Post = Callable[..., requests.Response]


@dataclass(frozen=True)
class Target:
    """Where and what to charge: the sandbox's ``duplicate.pl`` and one merchant account."""

    gateway_url: str
    merchant_id: str
    private_key: str
    amount: str = "29.90"
    ip: str = "203.0.113.9"

    @property
    def url(self) -> str:
        return f"{self.gateway_url.rstrip('/')}/duplicate.pl"

    def form(self, alias: str) -> dict[str, str]:
        return {
            "ID": self.merchant_id,
            "IP": self.ip,
            "MONTANT": self.amount,
            "ALIAS": alias,
            "PRIVATE_KEY": self.private_key,
        }


def cpu_seconds() -> float:
    """User plus system time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- what the machine did: /proc, since psutil is not a dependency ----------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` (all its threads) and of children it has reaped."""
    return sum(int(value) for value in stat_fields(pid)[11:15]) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant of it alive now (``billing worker``: the supervisor and
    its Celery processes, and a prefork pool's children under those)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and its descendants, each with the children it has reaped.

    Summed at two moments, the difference is the tree's CPU in between, even when a child
    exits meanwhile: its time moves into its parent's reaped-children counters.
    """
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += process_cpu_seconds(member)
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; idle and iowait count as not busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


@dataclass
class Meter:
    """CPU of a process (optional; with ``tree``, summed over it and its descendants) and
    the machine's busy share between start and stop."""

    pid: int | None = None
    tree: bool = False
    cpu: float = 0.0
    busy_share: float = 0.0
    _cpu0: float = 0.0
    _ticks0: tuple[int, int] = (0, 0)

    def _cpu(self) -> float:
        if self.pid is None:
            return 0.0
        return tree_cpu_seconds(self.pid) if self.tree else process_cpu_seconds(self.pid)

    def start(self) -> Meter:
        self._cpu0, self._ticks0 = self._cpu(), machine_ticks()
        return self

    def stop(self) -> Meter:
        with contextlib.suppress(OSError):
            self.cpu = self._cpu() - self._cpu0
        busy, total = machine_ticks()
        self.busy_share = (busy - self._ticks0[0]) / max(1, total - self._ticks0[1])
        return self


@dataclass
class YardstickResult:
    """What one yardstick did, timed from its first charge to its last."""

    script: str
    concurrency: int
    charges: int = 0
    approved: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    #: Share of all CPUs busy (any process) while it ran, and the sandbox's CPU time.
    machine_busy: float = 0.0
    sandbox_cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    @contextlib.contextmanager
    def timed(self, sandbox_pid: int | None) -> Iterator[None]:
        """Wall time, this process's CPU, the sandbox's CPU and the machine's, for the block."""
        meter = Meter(sandbox_pid).start()
        cpu, began = cpu_seconds(), time.monotonic()
        yield
        self.seconds = time.monotonic() - began
        self.cpu_seconds = cpu_seconds() - cpu
        meter.stop()
        self.machine_busy, self.sandbox_cpu_seconds = meter.busy_share, meter.cpu

    def failed(self, exc: BaseException) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"{type(exc).__name__}: {exc}")


def charge_once(
    conn: psycopg.Connection[Any], post: Post, target: Target, script: str, alias: str
) -> bool:
    """Insert, POST, update: the floor of what charging one card must cost."""
    row = conn.execute(INSERT, (script, alias, target.amount)).fetchone()
    assert row is not None
    response = post(target.url, data=target.form(alias), timeout=TIMEOUT)
    answer = parse_qs(response.text)
    code = answer.get("RESPONSE", [""])[0]
    tx = answer.get("TX", [None])[0]
    approved = response.status_code == 200 and code == "00"
    conn.execute(UPDATE, ("approved" if approved else "declined", tx, code, row[0]))
    return approved


def pooled_session() -> requests.Session:
    """A session keeping its connection alive between calls, retries off like the worker's."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


#: One charge of a threaded yardstick: its connection, its session, what to charge.
ChargeFn = Callable[[psycopg.Connection[Any], requests.Session, Any], bool]


def run_threads(
    script: str,
    database_url: str,
    gateway_url: str,
    items: Sequence[Any],
    concurrency: int,
    charge: ChargeFn,
    sandbox_pid: int | None = None,
) -> YardstickResult:
    """C threads sharing ``items``, each charging with its own database connection and
    keep-alive HTTP session; connections are opened before the clock starts."""
    result = YardstickResult(script, concurrency)
    lock = threading.Lock()
    indexes = itertools.count()
    start = threading.Barrier(concurrency + 1)
    conns = [psycopg.connect(database_url, autocommit=True) for _ in range(concurrency)]
    sessions = [pooled_session() for _ in range(concurrency)]
    for session in sessions:
        # Open each pooled connection now, one at a time: a pool is warm in steady state,
        # and the sandbox's short listen backlog resets a burst of simultaneous connects.
        session.get(f"{gateway_url.rstrip('/')}/_sandbox/health", timeout=TIMEOUT)

    def work(conn: psycopg.Connection[Any], session: requests.Session) -> None:
        charges = approved = 0
        start.wait()
        while (index := next(indexes)) < len(items):
            charges += 1
            try:
                approved += charge(conn, session, items[index])
            except Exception as exc:
                with lock:
                    result.failed(exc)
        with lock:
            result.charges += charges
            result.approved += approved

    threads = [
        threading.Thread(target=work, args=pair, daemon=True)
        for pair in zip(conns, sessions, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        with result.timed(sandbox_pid):
            start.wait()
            for thread in threads:
                thread.join()
    finally:
        for conn in conns:
            conn.close()
        for session in sessions:
            session.close()
    return result


def run_floor(
    database_url: str,
    target: Target,
    aliases: Sequence[str],
    concurrency: int,
    sandbox_pid: int | None = None,
) -> YardstickResult:
    """The raw floor: insert, POST, update per alias, C threads."""

    def charge(conn: psycopg.Connection[Any], session: requests.Session, alias: Any) -> bool:
        return charge_once(conn, session.post, target, "floor", alias)

    return run_threads(
        "floor", database_url, target.gateway_url, aliases, concurrency, charge, sandbox_pid
    )


def run_sequential(
    database_url: str, target: Target, aliases: Sequence[str], sandbox_pid: int | None = None
) -> YardstickResult:
    """One charge after another; ``requests.post`` opens a new connection each time."""
    result = YardstickResult("sequential", 1)
    with psycopg.connect(database_url, autocommit=True) as conn, result.timed(sandbox_pid):
        for alias in aliases:
            result.charges += 1
            try:
                result.approved += charge_once(conn, requests.post, target, "sequential", alias)
            except Exception as exc:
                result.failed(exc)
    return result


def seed_aliases(target: Target, count: int) -> list[str]:
    """Fresh aliases of the merchant, so no yardstick charges a card the worker charged."""
    control = SandboxControl(target.gateway_url, timeout=SEED_TIMEOUT)
    return control.seed_aliases(target.merchant_id, count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("script", choices=("floor", "sequential", "writes"))
    parser.add_argument("--database-url", required=True, help="postgresql://... (psycopg)")
    parser.add_argument("--gateway-url", required=True, help="the sandbox's base URL")
    parser.add_argument("--merchant-id", required=True)
    parser.add_argument("--n", type=int, required=True, help="charges to make")
    parser.add_argument("--concurrency", type=int, default=1, help="threads (floor only)")
    parser.add_argument("--sandbox-pid", type=int, help="sandbox process whose CPU to report")
    parser.add_argument("--plan", help="writes: the plan whose queued charges to charge")
    args = parser.parse_args(argv)
    private_key = os.environ.get("BENCH_PRIVATE_KEY", "")
    if not private_key:
        parser.error("BENCH_PRIVATE_KEY must hold the sandbox merchant's private key")
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and --concurrency must be at least 1")
    target = Target(args.gateway_url, args.merchant_id, private_key)
    if args.script == "writes":
        from bench import samewrites

        if not args.plan:
            parser.error("writes needs --plan")
        result = samewrites.run(
            args.database_url, target, args.plan, args.n, args.concurrency, args.sandbox_pid
        )
    else:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(TABLE_DDL)
        aliases = seed_aliases(target, args.n)
        if args.script == "floor":
            result = run_floor(
                args.database_url, target, aliases, args.concurrency, args.sandbox_pid
            )
        else:
            result = run_sequential(args.database_url, target, aliases, args.sandbox_pid)
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
