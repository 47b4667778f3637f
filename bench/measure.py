"""What the machine did during a measurement: PostgreSQL's counters and Redis's memory.

The figures come from the servers themselves (``pg_stat_database``, ``pg_stat_user_tables``,
Redis ``INFO``), not from the program measured, so that the worker and the yardsticks are
counted the same way. CPU time per process is ``bench.floor.Meter``'s (``/proc``).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
import redis

from bench.config import BenchFailed
from billing.harness.databases import plain_url


@dataclass
class PgStats:
    """Counters of one database from ``pg_stat_database`` (flushed when backends exit)."""

    xact_commit: int = 0
    xact_rollback: int = 0
    tup_inserted: int = 0
    tup_updated: int = 0
    tup_deleted: int = 0
    sessions: int = 0

    @classmethod
    def read(cls, admin_url: str, database: str) -> PgStats:
        names = ", ".join(cls.__dataclass_fields__)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT {names} FROM pg_stat_database WHERE datname = %s", (database,)
            ).fetchone()
        if row is None:
            raise BenchFailed(f"pg_stat_database has no row for {database}")
        return cls(*(int(value or 0) for value in row))

    def minus(self, other: PgStats) -> PgStats:
        return PgStats(*(getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__))


def table_writes(url: str) -> dict[str, tuple[int, int]]:
    """table -> (rows inserted, rows updated), as flushed so far."""
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        rows = conn.execute("SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables")
        return {name: (int(ins), int(upd)) for name, ins, upd in rows}


def settle_stats(seconds: float = 1.5) -> None:
    """Backends flush their counters when they exit; give the exits a moment."""
    time.sleep(seconds)


class RedisSampler(threading.Thread):
    """``used_memory``, the queue's length and unacked messages, every 100 ms."""

    def __init__(self, url: str, queue: str, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.queue = queue
        self.every = every
        self.samples: list[tuple[float, int, int, int]] = []
        #: Redis's own high-water mark since it started (``used_memory_peak``).
        self.server_peak = 0
        self._done = threading.Event()

    def sample(self) -> tuple[float, int, int, int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.info("memory")
        pipe.llen(self.queue)
        pipe.hlen("unacked")
        memory, queued, unacked = pipe.execute()
        return time.time(), int(memory["used_memory"]), int(queued), int(unacked)

    def run(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(redis.RedisError):
                self.samples.append(self.sample())
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self.join()
        with contextlib.suppress(redis.RedisError):
            self.server_peak = int(self.client.info("memory")["used_memory_peak"])
        self.client.close()


def idle_memory(url: str, seconds: float = 1.0) -> int:
    """Median ``used_memory`` of an idle Redis (the worker connected, nothing sent)."""
    client = redis.Redis.from_url(url)
    values = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        values.append(int(client.info("memory")["used_memory"]))
        time.sleep(0.1)
    client.close()
    return int(statistics.median(values))


def db_figures(
    stats: PgStats, n: int, tables: dict[str, tuple[int, int]] | None = None
) -> dict[str, Any]:
    return {
        **asdict(stats),
        "commits_per_charge": stats.xact_commit / n,
        "rows_written_per_charge": (stats.tup_inserted + stats.tup_updated) / n,
        "rows_inserted_per_charge": stats.tup_inserted / n,
        "rows_updated_per_charge": stats.tup_updated / n,
        "connections_per_charge": stats.sessions / n,
        "tables": {
            name: {"inserted_per_charge": ins / n, "updated_per_charge": upd / n}
            for name, (ins, upd) in sorted((tables or {}).items())
            if ins or upd
        },
    }
