"""The shared harness (``billing.harness``) itself: each service really starts, answers,
and really stops, and a failure says what failed instead of waiting out a timeout."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import psycopg
import pytest
import redis

from billing import migrate
from billing.harness import rabbitmq
from billing.harness import redis as redis_server
from billing.harness.base import HarnessError, wait_for
from billing.harness.databases import PostgresDatabase
from billing.harness.ports import port_or_free
from billing.harness.redis import RedisServer
from billing.harness.sandbox import SandboxProcess
from billing.harness.workers import Processes
from tests.fixtures.db import PG_ADMIN_URL
from tests.fixtures.sandbox import ACCOUNTS, EUR_KEY, EUR_MERCHANT


def test_a_taken_port_is_replaced_by_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = port_or_free(port)
    assert other != port
    assert port_or_free(other) == other


@pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")
def test_a_restarted_redis_has_lost_every_key_and_keeps_its_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        url = server.url
        redis.Redis.from_url(url).set("message", "1")
        server.restart(down_for=0.1)
        assert server.url == url
        assert redis.Redis.from_url(url).get("message") is None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def _exists(name: str) -> bool:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return found is not None


def test_a_run_database_is_at_the_head_revision_and_dropped_afterwards() -> None:
    with PostgresDatabase(PG_ADMIN_URL, prefix="kpb_harness") as database:
        assert database.name.startswith("kpb_harness_")
        assert migrate.current(database.url) is not None
        assert _exists(database.name)
    assert not _exists(database.name)


def test_the_sandbox_process_logs_to_its_file_and_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "sandbox.log"
    with SandboxProcess(ACCOUNTS, latency_ms=1, log=log) as sandbox:
        assert sandbox.url.startswith("http://127.0.0.1:")
        [alias] = sandbox.control.seed_aliases(EUR_MERCHANT, 1)
        assert alias
        assert sandbox.stop() == 0
    text = log.read_text()
    assert "listening on" in text and "sandbox stopped" in text
    assert EUR_KEY not in text


def test_a_sandbox_started_again_on_the_same_log_is_found_at_its_new_url(tmp_path: Path) -> None:
    log = tmp_path / "sandbox.log"
    with SandboxProcess(ACCOUNTS, log=log) as first:
        first.control.seed_aliases(EUR_MERCHANT, 1)
    # The first sandbox's "listening on" line is still in the log; its URL answers no more.
    with SandboxProcess(ACCOUNTS, log=log).start(timeout=20) as second:  # started once
        assert second.control.seed_aliases(EUR_MERCHANT, 1)
        with pytest.raises(HarnessError, match="running already"):
            second.start()
    assert second.process.poll() is not None


def test_a_sandbox_that_cannot_start_says_why_at_once(tmp_path: Path) -> None:
    log = tmp_path / "sandbox.log"
    started = time.monotonic()
    with pytest.raises(HarnessError, match="--allow-public"):
        SandboxProcess(ACCOUNTS, extra=["--host", "0.0.0.0"], log=log).start(timeout=60)
    assert time.monotonic() - started < 30


def test_a_process_that_exits_before_it_is_ready_is_reported_with_its_log(
    tmp_path: Path,
) -> None:
    processes = Processes(dict(os.environ), tmp_path)
    processes.start("early", [sys.executable, "-c", "print('cannot start'); raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(HarnessError, match=r"exited \(3\)[\s\S]*cannot start"):
        processes.wait_log("early", "ready.", timeout=60)
    assert time.monotonic() - started < 10


#: A parent that dies on SIGTERM, leaving a child that ignores it (as a prefork worker's
#: children may outlive a parent killed hard).
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print("child", child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # a zombie has ended; only its parent's reaping is left


def test_stopping_a_process_group_leaves_no_child_behind(tmp_path: Path) -> None:
    processes = Processes(dict(os.environ), tmp_path)
    processes.start("parent", [sys.executable, "-c", PARENT])
    processes.wait_log("parent", "child ", timeout=30)
    child = int(processes.log("parent").split("child ", 1)[1].split()[0])
    assert not _gone(child)

    processes.stop_all(timeout=5)

    wait_for(lambda: _gone(child), 10, f"child {child} ending")


def _node_processes(name: str) -> list[int]:
    """Every process started with RabbitMQ node ``name`` in its environment."""
    wanted = f"RABBITMQ_NODENAME={name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


needs_nodes = pytest.mark.skipif(
    not rabbitmq.can_start_nodes(), reason="a RabbitMQ node of its own needs root"
)


@pytest.mark.slow
@needs_nodes
def test_a_killed_rabbitmq_node_was_killed_not_stopped(tmp_path: Path) -> None:
    """``kill`` is a crash of the node's own VM, and says so when there is nothing to kill
    (it used to fall back to a SIGTERM of the starting script: a clean stop)."""
    node = rabbitmq.RabbitNode(tmp_path).start()
    try:
        vm = node.vm
        assert vm is not None and vm in _node_processes(node.name)
        node.kill()
        assert not rabbitmq.answers(port=node.port) and vm not in _node_processes(node.name)
        with pytest.raises(HarnessError, match="not running"):
            node.kill()
        node.start()  # the same data and ports: it comes back
        assert rabbitmq.answers(port=node.port)
    finally:
        node.stop()
    assert not _node_processes(node.name) and node.home is None


@pytest.mark.slow
@needs_nodes
def test_a_rabbitmq_node_that_cannot_start_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = rabbitmq.RabbitNode(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(HarnessError):
            node.start(timeout=30)
    assert not _node_processes(node.name)
    assert node.home is None
