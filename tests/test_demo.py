"""`billing demo` end to end: real sandbox, worker and beat processes, under a minute."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from billing.harness.rabbitmq import rabbitmqctl

pytestmark = pytest.mark.slow
BILLING = str(Path(sys.executable).with_name("billing"))


def test_demo_ends_with_the_hard_decline_and_the_unknown_in_the_failed_queue(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [BILLING, "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    elapsed = time.monotonic() - started

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    queue = done.stdout.split("failed-charge queue", 1)[1].split("events for the shop", 1)[0]
    assert "hard_decline" in queue and "unknown_outcome" in queue
    assert "shop-1005" in queue and "shop-1006" in queue
    assert "2 charge(s)" in queue  # the soft declines recovered on the short ladder
    assert "charge.approved" in done.stdout  # the events the shop would have been sent
    assert elapsed < 60


def test_the_demo_runs_on_rabbitmq_and_leaves_no_queue_behind(tmp_path, rabbit):
    """With ``BILLING_BROKER_URL=amqp://…`` the demo uses that RabbitMQ (not the embedded
    broker), and deletes the quorum queues it made for itself."""
    done = subprocess.run(
        [BILLING, "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "200", "BILLING_BROKER_URL": rabbit.url},
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"broker   127.0.0.1:5672/{rabbit.name}" in done.stdout
    assert "hard_decline" in done.stdout and "charge.approved" in done.stdout
    queues = rabbitmqctl("list_queues", "-p", rabbit.name, "--no-table-headers", "name")
    assert not [name for name in queues.split() if name.startswith("demo-")], queues
