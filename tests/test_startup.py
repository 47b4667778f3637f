"""Start-up refuses what it cannot run with: a bad setting or an invalid plans file stops
the worker and beat with the named problem, before Celery starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from billing.errors import ConfigError
from billing.settings import load_settings

BILLING = str(Path(sys.executable).with_name("billing"))
DATA = Path(__file__).parent / "data"


def test_a_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_READ_TIMEOUT", "soon")
    monkeypatch.setenv("BILLING_DATABASE_URL", "mysql://nope")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "BILLING_READ_TIMEOUT" in str(caught.value)
    assert "BILLING_DATABASE_URL" in str(caught.value)


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_worker_and_beat_refuse_an_invalid_plans_file(command: str, tmp_path: Path) -> None:
    env = {**os.environ, "BILLING_PLANS_FILE": str(DATA / "plans_many_errors.toml")}
    done = subprocess.run(
        [BILLING, command], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert "plans_many_errors.toml" in done.stderr and "Traceback" not in done.stderr
    assert "celery@" not in done.stdout  # Celery never started


def test_a_bad_setting_stops_a_command_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "BILLING_MAX_IN_FLIGHT": "-3"}
    done = subprocess.run(
        [BILLING, "plans", "check", str(DATA / "engine_plans.toml")],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "BILLING_MAX_IN_FLIGHT" in done.stderr and "Traceback" not in done.stderr
