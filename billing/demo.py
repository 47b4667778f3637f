"""``billing demo``: the whole product on one machine, in under a minute.

It starts the sandbox gateway, a worker and beat as real processes (the same commands a
user runs), imports sample subscriptions that are due now, waits until every one is
settled, prints the ledger, the failed-charge queue and the events the shop would get,
and stops everything it started. The broker at ``BILLING_BROKER_URL`` (Redis or RabbitMQ)
is used when it answers, on a queue of the demo's own (on RabbitMQ deleted at the end);
otherwise an embedded broker (kombu's SQLAlchemy transport on a SQLite file) needs no server.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import redis
import requests
from rich.console import Console
from sqlalchemy import func, select

from billing import broker as brokers
from billing.db import session_scope
from billing.harness.base import HarnessError, billing_command, wait_for
from billing.harness.ports import port_or_free
from billing.harness.sandbox import SandboxControl, SandboxProcess
from billing.harness.workers import Managed, Processes
from billing.models import Charge, ChargeState, utcnow
from billing.settings import get_settings

DEMO_PLANS = Path(__file__).resolve().parents[1] / "schedules" / "demo.toml"
KEYS = {"1234567": "demo-key-eur", "7654321": "demo-key-usd"}
#: Seconds the worker, beat and console get to stop after SIGTERM (then SIGKILL).
STOP_SECONDS = 20.0
#: Charge states that still move without a person.
MOVING = (ChargeState.PENDING, ChargeState.QUEUED, ChargeState.IN_FLIGHT, ChargeState.AUTHORIZED)

#: (reference, plan, merchant, what the sandbox does with that card)
CUSTOMERS: list[tuple[str, str, str, dict[str, object]]] = [
    ("shop-1001", "pro-monthly", "1234567", {}),
    ("shop-1002", "pro-monthly", "1234567", {}),
    ("shop-1003", "pro-monthly", "1234567", {"decline": "51", "times": 1}),
    ("shop-1004", "pro-monthly", "1234567", {"decline": "05", "times": 1}),
    ("shop-1005", "pro-monthly", "1234567", {"decline": "54"}),
    ("shop-1006", "pro-monthly", "1234567", {"drop_after_record": True}),
    ("shop-2001", "team-yearly", "1234567", {}),
    ("shop-3001", "starter-weekly", "7654321", {}),
    ("shop-3002", "starter-weekly", "7654321", {}),
]

console = Console()


def pick_broker(workdir: Path) -> str:
    """The configured Redis or RabbitMQ when it answers, else an embedded broker on a
    SQLite file."""
    settings = get_settings()
    url = settings.broker_url
    if url.startswith("redis"):
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                return url
        except redis.RedisError:
            pass
    elif brokers.is_amqp(url) and brokers.is_reachable(settings):
        return url
    return f"sqla+sqlite:///{workdir / 'broker.db'}"


def remove_queues(broker_url: str, queue: str) -> None:
    """RabbitMQ: delete the demo's own queue and its dead-letter queue (a quorum queue
    outlives its consumers; Redis and the embedded broker leave nothing behind)."""
    if not brokers.is_amqp(broker_url):
        return
    asked = get_settings().model_copy(update={"broker_url": broker_url, "queue": queue})
    problem = brokers.delete_queues(asked)
    if problem is not None:
        console.print(f"[yellow]the demo's queue {queue} was not deleted: {problem}[/yellow]")


class Demo:
    """The processes the demo started (stopped together, SIGTERM then SIGKILL) and its commands."""

    def __init__(self, workdir: Path, env: dict[str, str], sandbox: SandboxProcess) -> None:
        self.workdir, self.sandbox = workdir, sandbox
        self.processes = Processes(env, workdir)

    @property
    def env(self) -> dict[str, str]:
        return self.processes.env

    def start(self, name: str, *args: str) -> Managed:
        """``billing ARGS`` in the background, logging to ``<workdir>/<name>.log``."""
        return self.processes.start(name, billing_command(*args))

    def run(
        self, *args: str, show: bool = False, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``billing ARGS`` to the end; its output is shown with ``show``, else kept."""
        done = subprocess.run(
            billing_command(*args), env=self.env, text=True, capture_output=not show,
            input=stdin,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"demo: `billing {' '.join(args)}` failed:\n{done.stderr or ''}")
        return done

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        try:
            wait_for(predicate, timeout, what, step=0.25)
        except HarnessError as exc:
            raise SystemExit(f"demo: {exc} (logs in {self.workdir})") from None


def run_demo(
    workdir: Path, *, timeout: float = 45.0, serve: bool = False, console_port: int = 8080
) -> int:
    """Run the demo in ``workdir`` (emptied first); return the exit status.

    With ``serve`` the sandbox, worker and beat keep running after the demo, with the web
    console beside them on ``console_port`` (any free port if it is taken) and a demo
    account, until Ctrl-C or SIGTERM stops everything.
    """
    started = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    db_url = f"sqlite:///{workdir / 'billing.db'}"
    broker = pick_broker(workdir)
    queue = f"demo-{uuid.uuid4().hex[:8]}"
    console.rule("[bold]klikandpay-billing demo")
    with SandboxProcess(KEYS, log=workdir / "sandbox.log") as sandbox:
        env = {
            **os.environ,
            "BILLING_DATABASE_URL": db_url,
            "BILLING_BROKER_URL": broker,
            "BILLING_QUEUE": queue,
            "BILLING_PLANS_FILE": str(DEMO_PLANS),
            "BILLING_GATEWAY_URL": sandbox.url,
            "BILLING_ENGINE_SWEEP_SECONDS": "1",
            "BILLING_READ_TIMEOUT": "3",
            "BILLING_STUCK_MARGIN_SECONDS": "1",
            "KLIKANDPAY_KEY_EUR": KEYS["1234567"],
            "KLIKANDPAY_KEY_USD": KEYS["7654321"],
            # Tables printed by the commands below are wide; an 80-column pipe would squeeze
            # them.
            "COLUMNS": os.environ.get("COLUMNS", str(max(console.width, 160))),
        }
        console.print(
            f"database {db_url}\nbroker   {broker.split('@')[-1]}\ngateway  {sandbox.url} (sandbox)"
        )
        demo = Demo(workdir, env, sandbox)
        try:
            return _run(demo, started, timeout=timeout, serve=serve, console_port=console_port)
        finally:
            # Workers first: their calls in flight finish against a sandbox still there.
            demo.processes.stop_all(STOP_SECONDS)
            remove_queues(broker, queue)


def _run(demo: Demo, started: float, *, timeout: float, serve: bool, console_port: int) -> int:
    demo.run("db", "upgrade")
    rows = _customers(demo.sandbox.control)
    import_file = demo.workdir / "subscriptions.csv"
    with import_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["external_ref", "plan", "alias", "customer_ip", "next_charge_at"])
        writer.writerows(rows)
    demo.run("subscriptions", "import", str(import_file), show=True)
    demo.start(
        "worker", "worker", "--pool=threads", "--concurrency=4", "--without-mingle",
        "--without-gossip",
    )  # fmt: skip
    demo.start("beat", "beat", f"--schedule={demo.workdir / 'beat-schedule'}")
    console.print("worker and beat started; waiting for every charge to settle…")
    db_url = demo.env["BILLING_DATABASE_URL"]
    demo.wait("every charge settling", lambda: _settled(db_url, len(rows)), timeout)
    console.rule("ledger")
    demo.run("ledger", "list", show=True)
    console.rule("failed-charge queue")
    demo.run("failed", "list", show=True)
    console.rule("events for the shop (BILLING_WEBHOOK_URL unset: recorded, not sent)")
    demo.run("events", "list", show=True)
    if serve:
        console.rule(f"demo done in {time.monotonic() - started:.0f} s")
        return _serve(demo, console_port)
    console.rule(f"done in {time.monotonic() - started:.0f} s; logs in {demo.workdir}")
    return 0


#: The console account ``billing demo --serve`` creates (its password is new each run).
DEMO_USER = "demo"


def _serve(demo: Demo, console_port: int) -> int:
    """Keep everything running with the console beside it until Ctrl-C or SIGTERM."""
    password = secrets.token_urlsafe(12)
    demo.run(
        "users", "add", DEMO_USER, "--role", "admin", "--password-stdin", stdin=password + "\n"
    )
    port = port_or_free(console_port)
    demo.env["BILLING_CONSOLE_SECRET_KEY"] = secrets.token_urlsafe(32)
    web = demo.start("web", "web", f"--port={port}").proc
    url = f"http://127.0.0.1:{port}"
    demo.wait("the console starting", lambda: _answers_health(url), 20)
    console.print(
        f"\n[bold]console[/bold]  {url}/login\n"
        f"user     {DEMO_USER}\npassword {password}\n"
        f"back office (the sandbox's call log stands in for Klik & Pay's): "
        f"{demo.sandbox.url}/_sandbox/calls\n\n"
        "sandbox, worker, beat and console keep running; Ctrl-C stops them all.",
        highlight=False,
    )
    stop = {"now": False}

    def _stop(_signum: int, _frame: object) -> None:
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"]:
            if web.poll() is not None:
                console.print(f"the console stopped (exit {web.returncode}); see web.log")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print("stopping the sandbox, worker, beat and console…")
    return 0


def _answers_health(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=0.5).ok
    except requests.RequestException:
        return False


def _customers(control: SandboxControl) -> list[list[str]]:
    """Aliases issued by the sandbox (as first payments would), each with its behaviour."""
    due = (utcnow() - timedelta(minutes=1)).isoformat()
    rows = []
    for i, (ref, plan, merchant, behaviour) in enumerate(CUSTOMERS):
        (alias,) = control.seed_aliases(merchant, 1)
        if behaviour:
            control.set_behaviour(alias, **behaviour)
        rows.append([ref, plan, alias, f"198.51.100.{10 + i}", due])
    return rows


def _settled(db_url: str, expected: int) -> bool:
    with session_scope(db_url) as session:
        total = session.scalar(select(func.count()).select_from(Charge))
        moving = session.scalar(
            select(func.count()).select_from(Charge).where(Charge.state.in_(MOVING))
        )
    return total == expected and moving == 0
