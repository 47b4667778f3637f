"""The services and processes of a chaos run, each its own so that breaking it hurts nobody.

- ``OwnDatabase``: a PostgreSQL database created for the run and dropped after it;
- ``OwnRedis``: a ``redis-server`` on a free loopback port, restartable;
- ``SandboxProcess``: ``billing sandbox`` in a subprocess, with a small control client;
- ``Processes``: workers and beats started with the commands a user runs, each in its own
  process group so that SIGKILL takes a prefork worker's children with it.

Every process writes to a log file in the run's folder, which the secrets scan reads later.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import psycopg
import redis
import requests

from billing import migrate
from billing.db import dispose_all

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")
BILLING = str(BIN / "billing")


class HarnessError(Exception):
    """A service of the run could not be started or driven; the message says which."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise HarnessError(f"{what}: not ready within {timeout:g} s")


# --- PostgreSQL -------------------------------------------------------------------------


@dataclass
class OwnDatabase:
    """``chaos_<random>`` on the server of ``admin_url``, at the newest schema revision."""

    admin_url: str
    name: str = field(default_factory=lambda: f"chaos_{uuid.uuid4().hex[:10]}")

    @property
    def url(self) -> str:
        return f"{self.admin_url.rsplit('/', 1)[0]}/{self.name}"

    def create(self) -> str:
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
        except psycopg.Error as exc:
            raise HarnessError(f"cannot create database {self.name}: {exc}") from None
        migrate.upgrade(self.url)
        return self.url

    def cut_connections(self) -> int:
        """``pg_terminate_backend`` every connection to the database but this one."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            ).fetchall()
        return sum(1 for (done,) in rows if done)

    def drop(self) -> None:
        dispose_all()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# --- Redis ------------------------------------------------------------------------------


@dataclass
class OwnRedis:
    """A Redis server of the run's own, without persistence: a restart loses every message."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError("redis-server is not installed")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self._ping, 10, f"redis-server on port {self.port}", step=0.05)

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def restart(self, down_for: float = 1.0) -> None:
        """Kill the server (SIGKILL: nothing is saved) and start it again on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- the sandbox ------------------------------------------------------------------------


@dataclass
class SandboxProcess:
    """``billing sandbox --port 0`` with the given accounts; its URL is read from its log."""

    workdir: Path
    accounts: Mapping[str, str]
    latency_ms: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    http: requests.Session = field(default_factory=requests.Session)

    def start(self, timeout: float = 20.0) -> None:
        args = [BILLING, "sandbox", "--port", "0", "--latency-ms", str(self.latency_ms)]
        for merchant_id, key in self.accounts.items():
            args += ["--account", f"{merchant_id}={key}"]
        log_path = self.workdir / "sandbox.log"
        log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the sandbox)
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"billing sandbox exited: {log_path.read_text()[-500:]}")
            for line in log_path.read_text(errors="replace").splitlines():
                if "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].strip()
                    return True
            return False

        wait_for(listening, timeout, "billing sandbox")

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(
            method, f"{self.url}/_sandbox/{path}", timeout=kwargs.pop("timeout", 30), **kwargs
        )
        if response.status_code != 200:
            raise HarnessError(f"sandbox {method} /_sandbox/{path}: HTTP {response.status_code}")
        return response.json()

    def seed_aliases(self, merchant_id: str, count: int) -> list[str]:
        aliases: list[str] = self.control(
            "POST", "aliases", json={"merchant_id": merchant_id, "count": count}
        )["aliases"]
        return aliases

    def set_faults(self, rates: Mapping[str, float], seed: int) -> dict[str, Any]:
        faults: dict[str, Any] = self.control("POST", "faults", json={**rates, "seed": seed})[
            "faults"
        ]
        return faults

    def outage(self, seconds: float) -> None:
        """Stop listening for ``seconds``: connections are refused meanwhile."""
        self.control("POST", "outage", json={"seconds": seconds})

    def totals(self) -> dict[str, Decimal]:
        merchants = self.control("GET", "totals")["merchants"]
        return {m: Decimal(v["collected"]) - Decimal(v["refunded"]) for m, v in merchants.items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- workers and beats ------------------------------------------------------------------


@dataclass
class Managed:
    """A worker or beat: how to start it again, and the running process."""

    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    starts: int = 1


@dataclass
class Processes:
    """Workers and beats sharing one environment, each logging to ``<logdir>/<name>.log``."""

    env: dict[str, str]
    logdir: Path
    managed: dict[str, Managed] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self._logs.append(log)
        return subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def worker(self, name: str, *, pool: str, concurrency: int) -> Managed:
        args = [
            CELERY, "-A", "tasks", "worker", "-Q", self.env["BILLING_QUEUE"],
            f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
            "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        return self._start(name, args)

    def beat(self, name: str) -> Managed:
        schedule = self.logdir / f"{name}-schedule"
        args = [CELERY, "-A", "tasks", "beat", "--loglevel=INFO", "-s", str(schedule)]
        return self._start(name, args)

    def _start(self, name: str, args: list[str]) -> Managed:
        managed = Managed(name, args, self._spawn(name, args))
        self.managed[name] = managed
        return managed

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, names: Sequence[str], needle: str, timeout: float) -> None:
        for name in names:
            managed = self.managed[name]

            def logged(managed: Managed = managed) -> bool:
                if managed.proc.poll() is not None:
                    raise HarnessError(
                        f"{managed.name} exited ({managed.proc.returncode}):\n"
                        f"{self.log(managed.name)[-2000:]}"
                    )
                return needle in self.log(managed.name)

            wait_for(logged, timeout, f"{name} ({needle!r} in its log)")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process group of ``name`` and wait for it to end."""
        proc = self.managed[name].proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self, name: str) -> None:
        managed = self.managed[name]
        managed.proc = self._spawn(name, managed.args)
        managed.starts += 1

    def alive(self, name: str) -> bool:
        return self.managed[name].proc.poll() is None

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM (a warm shutdown) to every group, then SIGKILL whatever is left."""
        for managed in self.managed.values():
            if managed.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(managed.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for managed in self.managed.values():
            try:
                managed.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(managed.proc.pid, signal.SIGKILL)
                managed.proc.wait()
            # A prefork worker's children may outlive a parent killed hard.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(managed.proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()
        self._logs.clear()
