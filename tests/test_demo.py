"""`billing demo` end to end: real sandbox, worker and beat processes, under a minute."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
