"""``billing metrics``: worker counters plus the failed-charge queue read at scrape time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from billing.db import session_scope
from billing.harness.ports import free_port
from billing.metrics import FailedQueueCollector, build_registry
from billing.models import ChargeState
from tests.test_ops import add_charge, add_subscription

ROOT = Path(__file__).resolve().parents[1]
BILLING = str(Path(sys.executable).with_name("billing"))


def _seed(url: str, unknown_age: timedelta) -> None:
    now = datetime.now(UTC)
    with session_scope(url) as session:
        a = add_subscription(session, "m-failed")
        add_charge(session, a, state=ChargeState.FAILED, reason="hard_decline", updated_at=now)
        b = add_subscription(session, "m-unknown")
        add_charge(
            session,
            b,
            state=ChargeState.UNKNOWN,
            reason="unknown_outcome",
            updated_at=now - unknown_age,
        )
        c = add_subscription(session, "m-paid")
        add_charge(session, c, state=ChargeState.APPROVED)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, "BILLING_DATABASE_URL": url, **extra}


def _serve(env: dict[str, str], port: int, *args: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [BILLING, "metrics", "--port", str(port), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"billing metrics exited: {proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_collector_reads_the_queue(db_url: str) -> None:
    _seed(db_url, timedelta(minutes=5))
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    clock_now = datetime.now(UTC)
    registry.register(FailedQueueCollector(db_url, clock=lambda: clock_now))
    value = registry.get_sample_value
    assert value("billing_failed_queue_depth", {"reason": "hard_decline"}) == 1
    assert value("billing_failed_queue_depth", {"reason": "unknown_outcome"}) == 1
    assert value("billing_failed_queue_depth", {"reason": "velocity_guard"}) == 0
    age = value("billing_oldest_unknown_charge_age_seconds")
    assert age is not None and 299 <= age <= 301
    assert value("billing_metrics_database_up") == 1


def test_collector_with_an_empty_queue_and_with_no_database(sqlite_url: str) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(FailedQueueCollector(sqlite_url))
    assert registry.get_sample_value("billing_oldest_unknown_charge_age_seconds") == 0
    assert registry.get_sample_value("billing_failed_queue_depth", {"reason": "hard_decline"}) == 0

    down = CollectorRegistry()
    down.register(FailedQueueCollector("postgresql://postgres@127.0.0.1:1/nothing"))
    assert down.get_sample_value("billing_metrics_database_up") == 0


def test_build_registry_names_a_missing_multiprocess_dir(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing.errors import ConfigError

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"PROMETHEUS_MULTIPROC_DIR: .*missing is not a dir"):
        build_registry(sqlite_url)


def test_endpoint_serves_queue_gauges_and_worker_counters(sqlite_url: str, tmp_path: Path) -> None:
    _seed(sqlite_url, timedelta(hours=2))
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = _env(sqlite_url, PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    # A "worker": another process counting charges into the shared directory.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from billing import metrics\n"
            "metrics.count_charge('monthly', 'approved')\n"
            "metrics.count_charge('monthly', 'approved')\n"
            "metrics.observe_gateway_call('duplicate', 'approved', 0.3)\n",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )

    port = free_port()
    for url in _serve(env, port):
        text = requests.get(url, timeout=5).text
        samples = _samples(text)
        assert samples[("billing_failed_queue_depth", (("reason", "hard_decline"),))] == 1
        assert samples[("billing_failed_queue_depth", (("reason", "unknown_outcome"),))] == 1
        assert samples[("billing_failed_queue_depth", (("reason", "ladder_exhausted"),))] == 0
        age = samples[("billing_oldest_unknown_charge_age_seconds", ())]
        assert 7200 <= age < 7300
        counted = ("billing_charges_total", (("outcome", "approved"), ("plan", "monthly")))
        assert samples[counted] == 2
        calls = (
            "billing_gateway_call_seconds_count",
            (("operation", "duplicate"), ("outcome", "approved")),
        )
        assert samples[calls] == 1


def test_endpoint_without_multiprocess_dir_serves_its_own_registry(sqlite_url: str) -> None:
    port = free_port()
    for url in _serve(_env(sqlite_url), port, "--host", "localhost"):
        samples = _samples(requests.get(url, timeout=5).text)
        assert samples[("billing_oldest_unknown_charge_age_seconds", ())] == 0
        assert ("billing_metrics_database_up", ()) in samples
        assert any(name.startswith("python_gc") for name, _ in samples)  # in-process registry


def test_endpoint_refuses_a_public_address(sqlite_url: str) -> None:
    done = subprocess.run(
        [BILLING, "metrics", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT,
        env=_env(sqlite_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--allow-public" in done.stderr
