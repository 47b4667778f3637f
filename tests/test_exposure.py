"""Nothing listens on an address other machines can reach unless someone asked for it.

The sandbox approves anything with a test card and its control API has no password; the
metrics say how much a merchant bills. Both bind 127.0.0.1 by default and refuse a public
address without an explicit ``--allow-public``. What a process really listens on is read
from the kernel (``/proc/net/tcp``), not from what it prints.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from billing import defaults
from billing.errors import ConfigError
from billing.harness.ports import free_port
from billing.sandbox import Sandbox
from billing.settings import Settings
from chaos import sockets
from tests.fixtures.sandbox import start_sandbox_process, stop_sandbox_process

BILLING = str(Path(sys.executable).with_name("billing"))
needs_proc = pytest.mark.skipif(not sockets.available(), reason="needs Linux /proc/net/tcp")


def _wait_listening(pid: int, timeout: float = 60.0) -> list[sockets.Listener]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sockets.listeners([pid])
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} listens on nothing after {timeout} s")


def test_the_defaults_are_loopback() -> None:
    assert defaults.BIND_HOST == "127.0.0.1"
    assert Settings().metrics_host == "127.0.0.1"
    assert Sandbox().host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com", "10.1.2.3"])
def test_the_sandbox_class_refuses_a_public_host(host: str) -> None:
    with pytest.raises(ConfigError, match="--allow-public"):
        Sandbox(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_the_sandbox_class_takes_any_loopback_host(host: str) -> None:
    assert Sandbox(host).host == host


@needs_proc
def test_the_sandbox_listens_on_loopback_only_by_default() -> None:
    running = start_sandbox_process(timeout=60)
    try:
        assert running.url.startswith("http://127.0.0.1:")
        found = _wait_listening(running.process.pid)
        port = int(running.url.rsplit(":", 1)[1])
        assert [(item.address, item.port) for item in found] == [("127.0.0.1", port)]
    finally:
        stop_sandbox_process(running)


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def metrics_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from billing import migrate

    url = f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'billing.db'}"
    migrate.upgrade(url)
    return {"BILLING_DATABASE_URL": url, "BILLING_METRICS_PORT": str(free_port())}


def test_a_public_address_is_refused_without_the_flag(metrics_env: dict[str, str]) -> None:
    """Each answers one line naming ``--allow-public`` and exit 2; nothing was bound."""
    cases = [
        (["sandbox", "--port", "0", "--host", "0.0.0.0"], {}),
        (["sandbox", "--port", "0", "--host", "::"], {}),
        (["metrics", "--host", "0.0.0.0"], metrics_env),
        (["metrics"], {**metrics_env, "BILLING_METRICS_HOST": "0.0.0.0"}),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: _run(*case), cases))
    for (args, _), result in zip(cases, results, strict=True):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result)
        assert len(lines) == 1 and "--allow-public" in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert "listening on" not in result.stdout


@pytest.fixture
def metrics_process(metrics_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [BILLING, "metrics"], env={**os.environ, **metrics_env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@needs_proc
def test_the_metrics_endpoint_listens_on_loopback_only_by_default(
    metrics_process: subprocess.Popen[str], metrics_env: dict[str, str]
) -> None:
    found = _wait_listening(metrics_process.pid)
    port = int(metrics_env["BILLING_METRICS_PORT"])
    assert {(item.address, item.port) for item in found} == {("127.0.0.1", port)}


@needs_proc
def test_allow_public_is_what_opens_the_sandbox() -> None:
    """The flag works (so that refusing without it is a choice, not an accident)."""
    running = start_sandbox_process(extra=["--host", "0.0.0.0", "--allow-public"], timeout=60)
    try:
        found = _wait_listening(running.process.pid)
        assert [item.address for item in found] == ["0.0.0.0"]
        assert sockets.public_listeners([running.process.pid]) == found
    finally:
        stop_sandbox_process(running)


@needs_proc
def test_the_socket_reader_sees_ipv4_and_ipv6_listeners() -> None:
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        found = sockets.listeners([os.getpid()])
        assert ("127.0.0.1", v4.getsockname()[1]) in {(i.address, i.port) for i in found}
        if socket.has_ipv6:
            try:
                v6 = socket.socket(socket.AF_INET6)
                v6.bind(("::1", 0))
            except OSError:
                return
            with v6:
                v6.listen()
                found = sockets.listeners([os.getpid()])
                assert ("::1", v6.getsockname()[1]) in {(i.address, i.port) for i in found}
                assert all(item.loopback for item in found)
