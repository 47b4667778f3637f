"""``billing demo``: the whole product on one machine, in under a minute.

It starts the sandbox gateway, a worker and beat as real processes (the same commands a
user runs), imports sample subscriptions that are due now, waits until every one is
settled, prints the ledger, the failed-charge queue and the events the shop would get,
and stops everything it started. Redis at ``BILLING_BROKER_URL`` is used when it answers;
otherwise an embedded broker (kombu's SQLAlchemy transport on a SQLite file) needs no server.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import redis
import requests
from rich.console import Console
from sqlalchemy import func, select

from billing.db import session_scope
from billing.models import Charge, ChargeState, utcnow
from billing.settings import get_settings

DEMO_PLANS = Path(__file__).resolve().parents[1] / "schedules" / "demo.toml"
KEYS = {"1234567": "demo-key-eur", "7654321": "demo-key-usd"}
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_broker(workdir: Path) -> str:
    """Redis when it answers, else an embedded broker on a SQLite file."""
    url = get_settings().broker_url
    if url.startswith("redis"):
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                return url
        except redis.RedisError:
            pass
    return f"sqla+sqlite:///{workdir / 'broker.db'}"


class Processes:
    """The processes the demo started, stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "billing.cli", *args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, show: bool = False, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "billing.cli", *args], env=self.env, text=True,
            capture_output=not show, input=stdin,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"demo: `billing {' '.join(args)}` failed:\n{done.stderr or ''}")
        return done

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def processes(workdir: Path, env: dict[str, str]) -> Iterator[Processes]:
    procs = Processes(workdir, env)
    try:
        yield procs
    finally:
        procs.stop()


def _wait(what: str, predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.25)
    raise SystemExit(f"demo: {what} did not happen within {timeout:g} s (logs in the work folder)")


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
    port = _free_port()
    sandbox_url = f"http://127.0.0.1:{port}"
    broker = pick_broker(workdir)
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": db_url,
        "BILLING_BROKER_URL": broker,
        "BILLING_QUEUE": f"demo-{uuid.uuid4().hex[:8]}",
        "BILLING_PLANS_FILE": str(DEMO_PLANS),
        "BILLING_GATEWAY_URL": sandbox_url,
        "BILLING_ENGINE_SWEEP_SECONDS": "1",
        "BILLING_READ_TIMEOUT": "3",
        "BILLING_STUCK_MARGIN_SECONDS": "1",
        "KLIKANDPAY_KEY_EUR": KEYS["1234567"],
        "KLIKANDPAY_KEY_USD": KEYS["7654321"],
        # Tables printed by the commands below are wide; an 80-column pipe would squeeze them.
        "COLUMNS": os.environ.get("COLUMNS", str(max(console.width, 160))),
    }
    console.rule("[bold]klikandpay-billing demo")
    console.print(
        f"database {db_url}\nbroker   {broker.split('@')[-1]}\ngateway  {sandbox_url} (sandbox)"
    )
    with processes(workdir, env) as procs:
        accounts = [f"--account={mid}={key}" for mid, key in KEYS.items()]
        procs.start("sandbox", "sandbox", f"--port={port}", *accounts)
        _wait("the sandbox starting", lambda: _answers(sandbox_url), 15)
        procs.run("db", "upgrade")
        rows = _customers(sandbox_url)
        import_file = workdir / "subscriptions.csv"
        with import_file.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["external_ref", "plan", "alias", "customer_ip", "next_charge_at"])
            writer.writerows(rows)
        procs.run("subscriptions", "import", str(import_file), show=True)
        procs.start(
            "worker", "worker", "--pool=threads", "--concurrency=4", "--without-mingle",
            "--without-gossip",
        )  # fmt: skip
        procs.start("beat", "beat", f"--schedule={workdir / 'beat-schedule'}")
        console.print("worker and beat started; waiting for every charge to settle…")
        _wait("every charge settling", lambda: _settled(db_url, len(rows)), timeout)
        console.rule("ledger")
        procs.run("ledger", "list", show=True)
        console.rule("failed-charge queue")
        procs.run("failed", "list", show=True)
        console.rule("events for the shop (BILLING_WEBHOOK_URL unset: recorded, not sent)")
        procs.run("events", "list", show=True)
        if serve:
            console.rule(f"demo done in {time.monotonic() - started:.0f} s")
            return _serve(procs, sandbox_url, console_port)
    console.rule(f"done in {time.monotonic() - started:.0f} s; logs in {workdir}")
    return 0


#: The console account ``billing demo --serve`` creates (its password is new each run).
DEMO_USER = "demo"


def _port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return _free_port()
    return port


def _serve(procs: Processes, sandbox_url: str, console_port: int) -> int:
    """Keep everything running with the console beside it until Ctrl-C or SIGTERM."""
    password = secrets.token_urlsafe(12)
    procs.run(
        "users", "add", DEMO_USER, "--role", "admin", "--password-stdin", stdin=password + "\n"
    )
    port = _port_or_free(console_port)
    procs.env["BILLING_CONSOLE_SECRET_KEY"] = secrets.token_urlsafe(32)
    web = procs.start("web", "web", f"--port={port}")
    url = f"http://127.0.0.1:{port}"
    _wait("the console starting", lambda: _answers_health(url), 20)
    console.print(
        f"\n[bold]console[/bold]  {url}/login\n"
        f"user     {DEMO_USER}\npassword {password}\n"
        f"back office (the sandbox's call log stands in for Klik & Pay's): "
        f"{sandbox_url}/_sandbox/calls\n\n"
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


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/_sandbox/health", timeout=0.5).ok
    except requests.RequestException:
        return False


def _customers(sandbox_url: str) -> list[list[str]]:
    """Aliases issued by the sandbox (as first payments would), each with its behaviour."""
    due = (utcnow() - timedelta(minutes=1)).isoformat()
    rows = []
    for i, (ref, plan, merchant, behaviour) in enumerate(CUSTOMERS):
        answer = requests.post(
            f"{sandbox_url}/_sandbox/aliases", json={"merchant_id": merchant, "count": 1}, timeout=5
        )
        answer.raise_for_status()
        alias = answer.json()["aliases"][0]
        if behaviour:
            requests.post(
                f"{sandbox_url}/_sandbox/behaviours",
                json={"alias": alias, "behaviour": behaviour},
                timeout=5,
            ).raise_for_status()
        rows.append([ref, plan, alias, f"198.51.100.{10 + i}", due])
    return rows


def _settled(db_url: str, expected: int) -> bool:
    with session_scope(db_url) as session:
        total = session.scalar(select(func.count()).select_from(Charge))
        moving = session.scalar(
            select(func.count()).select_from(Charge).where(Charge.state.in_(MOVING))
        )
    return total == expected and moving == 0
