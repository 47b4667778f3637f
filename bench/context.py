"""What every measurement of one bench run shares: its settings, folder and services.

A run starts its own broker — its own Redis (so that nobody else's keys are in the memory
figures), or with ``BENCH_BROKER=amqp`` a virtual host of its own on the machine's RabbitMQ
(``billing.harness.rabbitmq``: starting a RabbitMQ takes seconds and a node name; a vhost
holds every queue the run declares, and deleting it removes them) — its own PostgreSQL
database at the head revision (so that its counters are its own) and the
sandbox with the run's latency, all from the shared harness (``billing.harness``), and
hands them to each measurement as one ``Context``. Whatever happens, each is stopped or
dropped when the run ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from bench.config import (
    CUSTOMER_IP,
    MERCHANT_ID,
    PLANS_TOML,
    PRIVATE_KEY,
    BenchFailed,
    Config,
)
from billing.harness import rabbitmq
from billing.harness.databases import PostgresDatabase, plain_url
from billing.harness.rabbitmq import RabbitVhost
from billing.harness.redis import RedisServer
from billing.harness.sandbox import SandboxControl, SandboxProcess

#: Seconds a control call of the sandbox may take: seeding 100,000 aliases is one call.
CONTROL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Context:
    """The run's settings, its folder (logs, the plans file) and the services it started:
    one broker, ``redis`` or ``rabbit`` (the other is None)."""

    config: Config
    workdir: Path
    database: PostgresDatabase
    redis: RedisServer | None
    rabbit: RabbitVhost | None
    sandbox: SandboxProcess
    plans: Path

    @property
    def url(self) -> str:
        """The bench database's URL."""
        return self.database.url

    @property
    def broker_url(self) -> str:
        if self.rabbit is not None:
            return self.rabbit.url
        assert self.redis is not None
        return self.redis.url

    @property
    def redis_url(self) -> str | None:
        """The Redis of the run: its broker's; none on RabbitMQ (see ``bench/README.md``:
        the bench's plans set no rate limit and RabbitMQ counts deliveries itself)."""
        return self.redis.url if self.redis is not None else None

    @property
    def gateway(self) -> SandboxControl:
        return self.sandbox.control

    def load_due(self, plan: str, n: int) -> None:
        """``n`` due subscriptions of ``plan``, on fresh aliases of the sandbox's merchant."""
        load_subscriptions(self.url, plan, self.gateway.seed_aliases(MERCHANT_ID, n))


@contextlib.contextmanager
def started(config: Config, workdir: Path) -> Iterator[Context]:
    """Start the broker, create the database, start the sandbox; stop them all afterwards."""
    with contextlib.ExitStack() as stack:
        redis: RedisServer | None = None
        rabbit: RabbitVhost | None = None
        if config.broker == "amqp":
            if not rabbitmq.available():
                raise BenchFailed(
                    f"BENCH_BROKER=amqp: no RabbitMQ answers on {rabbitmq.PORT}, or "
                    f"{rabbitmq.RABBITMQCTL} is not installed (the bench creates a vhost on "
                    "the machine's RabbitMQ)"
                )
            rabbit = stack.enter_context(RabbitVhost())
        else:
            redis = stack.enter_context(RedisServer(workdir))
        database = stack.enter_context(PostgresDatabase(config.pg_admin_url, prefix="bench"))
        sandbox = stack.enter_context(
            SandboxProcess(
                {MERCHANT_ID: PRIVATE_KEY},
                latency_ms=config.latency_ms,
                log=workdir / "sandbox.log",
                control_timeout=CONTROL_TIMEOUT,
            )
        )
        plans = workdir / "plans.toml"
        plans.write_text(PLANS_TOML)
        yield Context(config, workdir, database, redis, rabbit, sandbox, plans)


def load_subscriptions(url: str, plan: str, aliases: list[str]) -> None:
    """Due subscriptions, one per alias, by COPY (the bench measures charging, not loading)."""
    now = datetime.now(UTC)
    due = now - timedelta(minutes=1)
    columns = "external_ref, plan, alias, customer_ip, anchor_at, next_period, next_charge_at, "
    columns += "status, created_at, updated_at"
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY subscriptions ({columns}) FROM STDIN") as copy:
            for i, alias in enumerate(aliases):
                copy.write_row(
                    (f"{plan}-{i}", plan, alias, CUSTOMER_IP, due, 0, due, "active", now, now)
                )
        conn.execute("ANALYZE subscriptions")
