"""``python -m chaos.run``: charge thousands of due subscriptions while everything breaks.

Three worker processes and two beats charge ``CHAOS_N`` due subscriptions (two plans, two
merchants) through the sandbox, which refuses 3 % of calls (HTTP 503), answers HTTP 500
after recording 2 % of charges, drops the connection after recording 2 %, answers garbage
to 1 % and soft-declines 5 %; and it answers hostile answers (issue 14): the real answer
behind an HTTP 503 or 429 to 2 % (a third of them declines), a message wider than its
column to 1 %, a TX that is no transaction number to 1 % and another MONTANT than the
amount charged to 1 % of approvals. Meanwhile a random worker is killed with SIGKILL every few
seconds and restarted, the broker is restarted once (Redis: killed, losing every message;
RabbitMQ: its node killed with SIGKILL, keeping what it confirmed), every PostgreSQL
connection is cut once, and the sandbox stops listening once for a second.

``CHAOS_BROKER=rabbitmq`` runs the same on a RabbitMQ node of the run's own (quorum queue,
publisher confirms, broker dead-lettering: ``billing.broker``) instead of a Redis of its own.

Then the chaos stops, the system settles (every charge approved, failed or unknown, soft
declines through their short ladder), the processes stop, and ``chaos.reconcile`` sets the
sandbox's call log beside the ledger. The run fails (exit status 1) when any of the five
counts is not 0 or when the secrets scan finds anything in the logs or the database.

Environment:
  CHAOS_N          due subscriptions (default 5000)
  CHAOS_SEED       seed of every random choice: fault draws, kills (default: random)
  CHAOS_DURATION   longest chaos phase in seconds (default 300)
  CHAOS_SETTLE     longest wait for the system to settle afterwards (default 600, and
                   never past CHAOS_DEADLINE less 20 s for stopping and judging)
  CHAOS_DEADLINE   the whole run must end within this many seconds (default: none)
  CHAOS_LOGDIR     where logs go (default: a new temporary folder, removed on success)
  CHAOS_KEEP_LOGS  1 to keep the logs after a successful run
  CHAOS_PG_ADMIN_URL  PostgreSQL server to create the run's database on
  CHAOS_BROKER     redis (default) or rabbitmq
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from sqlalchemy import func, insert, select
from sqlalchemy.exc import DBAPIError

from billing.db import dispose_all, session_scope
from billing.harness.base import HarnessError
from billing.harness.databases import DEFAULT_ADMIN_URL, PostgresDatabase
from billing.harness.rabbitmq import RabbitNode
from billing.harness.redis import RedisServer
from billing.harness.sandbox import SandboxProcess
from billing.harness.workers import BEAT_READY, WORKER_READY, Processes
from billing.models import (
    OPEN_STATES,
    Charge,
    DeadLetter,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from chaos import harness, reconcile, scan, sockets

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]

#: The run's merchant accounts: (plan, currency, merchant ID, private key, amount).
MERCHANTS = (
    ("chaos-eur", "EUR", "1234567", "chaos-key-eur", "29.90"),
    ("chaos-usd", "USD", "7654321", "chaos-key-usd", "4.99"),
)
#: The issue's fault rates, by the sandbox's fault names.
FAULTS = {
    "refuse": 0.03,
    "error_500_after_record": 0.02,
    "drop_after_record": 0.02,
    "garbage": 0.01,
    "soft_decline": 0.05,
    # Hostile answers (issue 14), each with the outcome chaos.reconcile holds it to.
    "answer_in_503": 0.02,
    "long_message": 0.01,
    "bad_tx": 0.01,
    "amount_lie": 0.01,
}
#: (pool, concurrency) of each worker: one prefork (SIGKILL must take its children), two
#: thread pools.
WORKERS = (("prefork", 4), ("threads", 8), ("threads", 8))
BEATS = 2
#: Seconds between two worker kills, drawn uniformly.
KILL_EVERY = (2.0, 5.0)
#: The brokers a run can use (``CHAOS_BROKER``), the first the default.
BROKERS = ("redis", "rabbitmq")


class RunError(Exception):
    """The run could not go on (bad setting, deadline passed, a service would not start)."""


@dataclass(frozen=True)
class Config:
    n: int
    seed: int
    duration: float
    settle: float
    deadline: float | None
    logdir: Path | None
    keep_logs: bool
    pg_admin_url: str
    latency_ms: float = 20.0
    broker: str = BROKERS[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise RunError(f"{name}: {raw!r} is not a number") from None
            if not 0 < value < float("inf"):
                raise RunError(f"{name}: {raw!r} must be a number of seconds above 0")
            return value

        n_raw = env.get("CHAOS_N", "").strip() or "5000"
        seed_raw = env.get("CHAOS_SEED", "").strip()
        try:
            n = int(n_raw)
            seed = int(seed_raw) if seed_raw else random.SystemRandom().randrange(2**31)
        except ValueError:
            raise RunError(
                f"CHAOS_N / CHAOS_SEED: {n_raw!r} / {seed_raw!r} must be whole numbers"
            ) from None
        if n < 1:
            raise RunError(f"CHAOS_N: {n} must be at least 1")
        logdir = env.get("CHAOS_LOGDIR", "").strip()
        broker = env.get("CHAOS_BROKER", "").strip().lower() or BROKERS[0]
        if broker not in BROKERS:
            raise RunError(f"CHAOS_BROKER: {broker!r} is not one of {', '.join(BROKERS)}")
        return cls(
            broker=broker,
            n=n,
            seed=seed,
            duration=number("CHAOS_DURATION", 300),
            settle=number("CHAOS_SETTLE", 600),
            deadline=number("CHAOS_DEADLINE", 0) if env.get("CHAOS_DEADLINE", "").strip() else None,
            logdir=Path(logdir) if logdir else None,
            keep_logs=env.get("CHAOS_KEEP_LOGS", "") not in ("", "0"),
            pg_admin_url=env.get("CHAOS_PG_ADMIN_URL")
            or env.get("TEST_PG_ADMIN_URL")
            or DEFAULT_ADMIN_URL,
        )


def plans_toml() -> str:
    """Two plans on two merchants, swept every two seconds, with a short retry ladder."""
    parts = []
    for plan, currency, merchant_id, _, amount in MERCHANTS:
        parts.append(
            f'[accounts.{currency}]\nmerchant_id = "{merchant_id}"\n'
            f'private_key_env = "KLIKANDPAY_KEY_{currency}"\n\n'
            f'[plans.{plan}]\namount = "{amount}"\ncurrency = "{currency}"\n'
            'every = "1 month"\nsweep = "2 seconds"\ntimezone = "UTC"\n'
            'retry_ladder = ["2 seconds", "3 seconds"]\nafter_ladder = "suspend"\n'
        )
    return "\n".join(parts)


@dataclass
class Stats:
    """What the chaos did, for the report."""

    kills: Counter[str] = field(default_factory=Counter)
    broker_restarts: int = 0
    #: RabbitMQ: the clean stop and start at set-up (see ``RabbitNode.settle``).
    clean_restarts: int = 0
    pg_connections_cut: int = 0
    pg_cuts: int = 0
    outages: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class Run:
    """One chaos run: set up, break things, settle, reconcile, tear down."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.started = time.monotonic()
        self.stats = Stats()
        self.workdir = config.logdir or Path(tempfile.mkdtemp(prefix="chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = PostgresDatabase(config.pg_admin_url, prefix="chaos")
        self.broker: RedisServer | RabbitNode = (
            RabbitNode(self.workdir) if config.broker == "rabbitmq" else RedisServer(self.workdir)
        )
        self.sandbox = SandboxProcess(
            {merchant_id: key for _, _, merchant_id, key, _ in MERCHANTS},
            latency_ms=config.latency_ms,
            log=self.workdir / "sandbox.log",
            control_timeout=30,
        )
        self.processes: Processes | None = None
        self.due: list[tuple[int, int]] = []
        self.listeners: list[sockets.Listener] = []

    # --- helpers ------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", flush=True)

    def check_deadline(self) -> None:
        limit = self.config.deadline
        if limit is not None and time.monotonic() - self.started > limit:
            raise RunError(f"CHAOS_DEADLINE: the run took longer than {limit:g} s")

    def retrying(self, what: Callable[[], T]) -> T:
        """Run a database read; our own connections are cut by the chaos too."""
        for attempt in range(20):
            try:
                return what()
            except DBAPIError:
                if attempt == 19:
                    raise
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def states(self) -> Counter[str]:
        def read() -> Counter[str]:
            with session_scope(self.db.url) as session:
                rows = session.execute(select(Charge.state, func.count()).group_by(Charge.state))
                return Counter({str(state): int(count) for state, count in rows})

        return self.retrying(read)

    def settled(self, states: Counter[str]) -> bool:
        """Every due subscription has a charge and none is still open."""
        total = sum(states.values())
        return total >= len(self.due) and not any(states[s] for s in OPEN_STATES)

    # --- set up -------------------------------------------------------------------------

    def set_up(self) -> None:
        config = self.config
        t0 = time.monotonic()
        self.db.create()
        self.say(f"database {self.db.name} created at the newest revision")
        self.broker.start()
        self.sandbox.start()
        self.say(f"{config.broker} on port {self.broker.port}; sandbox at {self.sandbox.url}")

        plans = self.workdir / "plans.toml"
        plans.write_text(plans_toml())
        now = utcnow()
        due_at = now - timedelta(minutes=1)
        rows: list[dict[str, Any]] = []
        share = [config.n // 2, config.n - config.n // 2]
        for (plan, _, merchant_id, _, _), count in zip(MERCHANTS, share, strict=True):
            for alias in self.sandbox.control.seed_aliases(merchant_id, count):
                rows.append(
                    {
                        "external_ref": f"chaos-{len(rows) + 1}",
                        "plan": plan,
                        "alias": alias,
                        "customer_ip": "203.0.113.9",
                        "anchor_at": due_at,
                        "next_period": 0,
                        "next_charge_at": due_at,
                        "status": SubscriptionStatus.ACTIVE,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
        self.rng.shuffle(rows)  # the two plans interleaved in id order
        with session_scope(self.db.url) as session:
            for start in range(0, len(rows), 1000):
                session.execute(insert(Subscription), rows[start : start + 1000])
            ids = list(session.scalars(select(Subscription.id)))
        self.due = [(sub_id, 0) for sub_id in ids]
        faults = self.sandbox.control.faults(seed=config.seed, **FAULTS)
        self.say(f"{len(ids)} due subscriptions; sandbox faults {faults}")

        keys = {f"KLIKANDPAY_KEY_{currency}": key for _, currency, _, key, _ in MERCHANTS}
        env = harness.worker_env(self.db.url, self.broker.url, self.sandbox.url, plans, keys)
        self.processes = Processes(env, self.workdir, cwd=ROOT)
        # Started side by side, then waited for: three workers start in the time of one.
        for number, (pool, concurrency) in enumerate(WORKERS, start=1):
            self.processes.worker(
                f"worker-{number}", pool=pool, concurrency=concurrency, wait=False
            )
        for name in self.worker_names:
            self.processes.wait_log(name, WORKER_READY)
        for name in self.beat_names:
            self.processes.beat(name, wait=False)
        for name in self.beat_names:
            self.processes.wait_log(name, BEAT_READY)
        if isinstance(self.broker, RabbitNode):
            # The workers have declared the queues; a clean stop and start writes their
            # registrations down as a long-running broker's are (rabbitmq/ra#443), so that
            # the crash below tests this project, not a young node's lost queue.
            self.broker.settle()
            self.stats.clean_restarts += 1
            self.say("rabbitmq stopped and started cleanly once: the queues are on disk")
        self.stats.phases["set up"] = time.monotonic() - t0
        self.say(f"{len(WORKERS)} workers and {BEATS} beats running")
        self.listeners = self.check_listeners()

    def check_listeners(self) -> list[sockets.Listener]:
        """Every TCP socket the run's processes listen on (each must be loopback)."""
        assert self.processes is not None
        if not sockets.available():
            self.say("no /proc/net/tcp: listening addresses not checked")
            return []
        groups = [m.pid for m in self.processes.managed.values()]
        groups += [self.sandbox.pid, *self.broker.process_groups()]
        found = sockets.listeners(sockets.group_members(groups))
        self.say("listening: " + (", ".join(str(item) for item in found) or "nothing"))
        return found

    @property
    def worker_names(self) -> list[str]:
        return [f"worker-{number}" for number in range(1, len(WORKERS) + 1)]

    @property
    def beat_names(self) -> list[str]:
        return [f"beat-{number}" for number in range(1, BEATS + 1)]

    # --- chaos --------------------------------------------------------------------------

    def chaos(self) -> None:
        """Kill workers, restart the broker, cut PostgreSQL, stop the sandbox once, until the
        work is done (and every scripted fault has happened) or CHAOS_DURATION passes."""
        assert self.processes is not None
        t0 = time.monotonic()
        n = len(self.due)
        next_kill = t0 + self.rng.uniform(*KILL_EVERY)
        done_broker = done_pg = done_outage = False
        last_report = t0
        while True:
            self.check_deadline()
            now = time.monotonic()
            elapsed = now - t0
            states = self.states()
            final = sum(states.values()) - sum(states[s] for s in OPEN_STATES)
            progress = final / n if n else 1.0
            if now >= next_kill:
                victim = self.rng.choice(self.worker_names)
                self.processes.kill(victim)
                self.processes.restart(victim)
                self.stats.kills[victim] += 1
                self.say(f"SIGKILL {victim} (progress {progress:.0%}); restarted")
                next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY)
            if not done_broker and (progress >= 0.25 or elapsed >= 0.3 * self.config.duration):
                self.broker.restart()
                self.stats.broker_restarts += 1
                done_broker = True
                lost = (
                    "node killed with SIGKILL and started again"
                    if isinstance(self.broker, RabbitNode)
                    else "restarted: every message lost"
                )
                self.say(f"{self.config.broker} {lost} (progress {progress:.0%})")
            if not done_outage and (progress >= 0.4 or elapsed >= 0.4 * self.config.duration):
                self.sandbox.control.outage(1.0)
                self.stats.outages += 1
                done_outage = True
                self.say(f"sandbox stopped listening for 1 s (progress {progress:.0%})")
            if not done_pg and (progress >= 0.5 or elapsed >= 0.5 * self.config.duration):
                cut = harness.cut_connections(self.db)
                self.stats.pg_connections_cut += cut
                self.stats.pg_cuts += 1
                done_pg = True
                self.say(f"pg_terminate_backend: {cut} connections cut (progress {progress:.0%})")
            if now - last_report >= 5:
                self.say(f"progress {final}/{n}: {dict(sorted(states.items()))}")
                last_report = now
            if done_broker and done_pg and done_outage and self.settled(states):
                break
            if elapsed >= self.config.duration:
                self.say(f"CHAOS_DURATION ({self.config.duration:g} s) reached")
                break
            time.sleep(0.5)
        self.stats.phases["chaos"] = time.monotonic() - t0

    def settle(self) -> Counter[str]:
        """No more faults from us: restart dead workers and wait until nothing is open."""
        assert self.processes is not None
        t0 = time.monotonic()
        for name in self.worker_names + self.beat_names:
            if not self.processes.alive(name):
                self.processes.restart(name)
        deadline = t0 + self.config.settle
        if self.config.deadline is not None:
            # Keep time to stop the processes, judge and tear down within the deadline.
            deadline = min(deadline, self.started + self.config.deadline - 20)
        states = self.states()
        while not self.settled(states):
            self.check_deadline()
            if time.monotonic() > deadline:
                self.say(f"not settled in time (CHAOS_SETTLE, CHAOS_DEADLINE): {states}")
                break
            time.sleep(0.5)
            states = self.states()
        # Anything still in the broker (a redelivered message, a requeue) meets a final
        # charge; give it a moment to prove it does nothing.
        time.sleep(2)
        states = self.states()
        self.stats.phases["settle"] = time.monotonic() - t0
        self.say(f"settled: {dict(sorted(states.items()))}")
        # Listening sockets again, after every restart (a restarted broker or worker binds
        # anew), before anything is stopped.
        seen = {str(item) for item in self.listeners}
        self.listeners += [item for item in self.check_listeners() if str(item) not in seen]
        self.processes.stop_all()
        self.say("workers and beats stopped")
        return states

    # --- judging ------------------------------------------------------------------------

    def judge(self) -> bool:
        calls, totals = reconcile.load_gateway(self.sandbox.url)
        charges, ledger, attempts = self.retrying(lambda: reconcile.load_database(self.db.url))
        result = reconcile.reconcile(calls, totals, charges, ledger, self.due, attempts)
        print(result.render(), flush=True)

        with session_scope(self.db.url) as session:
            letters = session.scalar(select(func.count()).select_from(DeadLetter)) or 0
        print(
            f"\nchaos: {sum(self.stats.kills.values())} worker kills "
            f"({dict(sorted(self.stats.kills.items()))}), {self.stats.broker_restarts} "
            f"{self.config.broker} restart"
            + (
                f" (and {self.stats.clean_restarts} clean one at set-up)"
                if self.stats.clean_restarts
                else ""
            )
            + f", {self.stats.pg_cuts} PostgreSQL cut "
            f"({self.stats.pg_connections_cut} connections), {self.stats.outages} sandbox "
            f"outage; {letters} dead letter(s)",
            flush=True,
        )
        findings = scan.scan([self.workdir], self.db.url)
        print(scan.report(findings), flush=True)
        exposed = [item for item in self.listeners if not item.loopback]
        print(
            f"non-loopback listeners: {len(exposed)}" + "".join(f"\n  {item}" for item in exposed),
            flush=True,
        )
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in self.stats.phases.items())
        print(f"time: {phases}; total {time.monotonic() - self.started:.1f}s", flush=True)
        return result.ok and not findings and not exposed

    # --- tear down ----------------------------------------------------------------------

    def tear_down(self, ok: bool) -> None:
        if self.processes is not None:
            self.processes.stop_all(timeout=10)
        if self.sandbox.started:
            self.sandbox.stop()
        self.broker.stop()
        dispose_all()
        if self.db.created:
            try:
                self.db.drop()
            except Exception as exc:  # the verdict stands; say what was left behind
                print(f"could not drop database {self.db.name}: {exc}", file=sys.stderr)
        if ok and not self.config.keep_logs and self.config.logdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"logs: {self.workdir}", flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    try:
        config = Config.from_env()
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    run = Run(config)
    run.say(
        f"chaos run: N={config.n} broker={config.broker} seed={config.seed}"
        f" (CHAOS_SEED={config.seed} repeats the fault draws)"
        f" duration<={config.duration:g}s settle<={config.settle:g}s"
        + (f" deadline {config.deadline:g}s" if config.deadline else "")
    )
    ok = False
    try:
        run.set_up()
        run.chaos()
        run.settle()
        ok = run.judge()
    except (RunError, HarnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        run.tear_down(ok)
    print("CHAOS PASSED" if ok else "CHAOS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
