"""What the machine did during a measurement: PostgreSQL's counters and the broker's memory.

The figures come from the servers themselves (``pg_stat_database``, ``pg_stat_user_tables``,
Redis ``INFO``, RabbitMQ's ``rabbitmqctl list_queues``), not from the program measured, so
that the worker and the yardsticks are counted the same way. CPU time per process is
``bench.floor.Meter``'s (``/proc``).

RabbitMQ has no ``used_memory`` of a run's own: the machine's server holds other vhosts and
its own Erlang runtime. What a run makes it hold is its queues' memory (the ``memory`` of
each queue process of the run's vhost, summed), which is what ``RabbitSampler`` samples.
Each look is a ``rabbitmqctl`` call, an Erlang VM started for it (about 0.3 s and 0.5 s of
CPU), so it looks once a second, not every 100 ms, and says what its looks cost.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
import redis

from bench.config import BenchFailed
from billing.harness.base import HarnessError
from billing.harness.databases import plain_url
from billing.harness.rabbitmq import RabbitVhost, rabbitmqctl

#: Seconds between the starts of two looks at RabbitMQ's queues (each a ``rabbitmqctl``
#: call of about 0.3 s): Redis is sampled every 0.1 s, which here would take a core.
RABBIT_EVERY = 1.0
#: What each look asks ``rabbitmqctl list_queues`` for, in this order.
RABBIT_COLUMNS = ("name", "messages_ready", "messages_unacknowledged", "memory")


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


def parse_queues(text: str) -> dict[str, tuple[int, int, int]]:
    """``rabbitmqctl list_queues --no-table-headers`` of ``RABBIT_COLUMNS`` -> queue ->
    (messages ready, unacknowledged, memory in bytes). A figure RabbitMQ could not give (a
    queue being declared or deleted shows an empty or non-numeric one) counts as 0."""
    queues: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) != len(RABBIT_COLUMNS) or not fields[0].strip():
            continue
        ready, unacked, memory = (int(f) if f.strip().isdigit() else 0 for f in fields[1:])
        queues[fields[0].strip()] = (ready, unacked, memory)
    return queues


def rabbit_queues(vhost: RabbitVhost) -> dict[str, tuple[int, int, int]]:
    """Every queue of ``vhost`` now (``parse_queues``), from one ``rabbitmqctl`` call."""
    out = rabbitmqctl(
        "list_queues", "-p", vhost.name, "--no-table-headers",
        *RABBIT_COLUMNS,
    )  # fmt: skip
    return parse_queues(out)


class RabbitSampler(threading.Thread):
    """The memory of all the vhost's queues, and the queue's ready and unacked messages,
    every ``RABBIT_EVERY`` s; ``RedisSampler``'s samples, RabbitMQ's figures."""

    def __init__(self, vhost: RabbitVhost, queue: str, every: float = RABBIT_EVERY) -> None:
        super().__init__(daemon=True)
        self.vhost = vhost
        self.queue = queue
        self.every = every
        self.samples: list[tuple[float, int, int, int]] = []
        #: RabbitMQ keeps no high-water mark of a vhost: 0, for ``RedisSampler``'s field.
        self.server_peak = 0
        #: CPU of the ``rabbitmqctl`` calls (reaped children of this process meanwhile).
        self.cpu_seconds = 0.0
        self._done = threading.Event()

    def sample(self) -> tuple[float, int, int, int]:
        queues = rabbit_queues(self.vhost)
        ready, unacked, _ = queues.get(self.queue, (0, 0, 0))
        return time.time(), sum(q[2] for q in queues.values()), ready, unacked

    def run(self) -> None:
        before = _children_cpu()
        while not self._done.is_set():
            began = time.monotonic()
            with contextlib.suppress(HarnessError):
                self.samples.append(self.sample())
            self._done.wait(max(0.0, self.every - (time.monotonic() - began)))
        self.cpu_seconds = _children_cpu() - before

    def stop(self) -> None:
        self._done.set()
        self.join()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rabbit_idle_memory(vhost: RabbitVhost, looks: int = 3) -> int:
    """Median memory of the vhost's queues, the worker connected and nothing sent."""
    return int(
        statistics.median(sum(q[2] for q in rabbit_queues(vhost).values()) for _ in range(looks))
    )


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
