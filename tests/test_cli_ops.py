"""The operations commands, end to end.

What only a real process shows (one line on stderr and status 2 for bad input; a retry or
requeue arriving on the broker, or not when it is down) runs ``.venv/bin/billing`` with its
own queue on the test Redis. The rest runs in-process through ``billing.cli.app`` with
``CliRunner``, which is the same code without the half second of start-up per command.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select
from typer.testing import CliRunner, Result

from billing import deadletters, ledger
from billing.cli import app
from billing.db import session_scope
from billing.errors import BillingError, InvalidInput, NotFound, StateError
from billing.models import Charge, ChargeState, DeadLetter, LedgerEntry, SubscriptionStatus
from billing.settings import get_settings
from tests.fixtures.engine import ENGINE_PLANS
from tests.test_ops import ALIAS, add_charge, add_subscription, seed

ROOT = Path(__file__).resolve().parents[1]
BILLING = str(Path(sys.executable).with_name("billing"))
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DEAD_BROKER = "redis://127.0.0.1:1/0"


class Cli:
    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BILLING_")},
            "BILLING_DATABASE_URL": url,
            "BILLING_PLANS_FILE": str(ENGINE_PLANS),
            "BILLING_BROKER_URL": REDIS_URL,
            "BILLING_QUEUE": queue,
            "KLIKANDPAY_KEY_EUR": "test-key-eur",
            "COLUMNS": "200",
        }

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BILLING, *args],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        done = self(*args, **env)
        assert done.returncode == 0, done.stderr
        return done

    def refused(self, *args: str, needle: str) -> str:
        """Exit status 2 and one line on stderr naming the problem."""
        done = self(*args)
        assert done.returncode == 2, (done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert needle in lines[0], lines[0]
        return lines[0]

    def messages(self) -> list[dict[str, Any]]:
        """Task messages waiting on this test's queue: name, args, kwargs."""
        found = []
        for raw in redis.Redis.from_url(REDIS_URL).lrange(self.queue, 0, -1):
            envelope = json.loads(raw)
            args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
            found.append({"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs})
        return found


@pytest.fixture
def cli(sqlite_url: str) -> Iterator[Cli]:
    queue = f"test-ops-{uuid.uuid4().hex[:8]}"
    yield Cli(sqlite_url, queue)
    redis.Redis.from_url(REDIS_URL).delete(queue)


class Run:
    """``billing ...`` in this process, on the test's database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, list(args))

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.exit_code == 0, (result.output, result.exception)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def fails(self, *args: str, error: type[BillingError], needle: str) -> None:
        result = self(*args)
        assert isinstance(result.exception, error), (result.output, result.exception)
        assert result.exception.exit_code == 2
        assert needle in str(result.exception)


@pytest.fixture
def run(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    monkeypatch.setenv("BILLING_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("BILLING_PLANS_FILE", str(ENGINE_PLANS))
    monkeypatch.setenv("COLUMNS", "250")  # tables as wide as they want
    get_settings.cache_clear()
    yield Run(sqlite_url)
    get_settings.cache_clear()


def _charge(url: str, charge_id: int) -> Charge:
    with session_scope(url) as session:
        return session.get_one(Charge, charge_id)


def _ledger(url: str, charge_id: int) -> list[LedgerEntry]:
    with session_scope(url) as session:
        return list(session.scalars(select(LedgerEntry).where(LedgerEntry.charge_id == charge_id)))


# --- failed ---------------------------------------------------------------------------


def test_failed_list_and_show(run: Run) -> None:
    old = datetime.now(UTC) - timedelta(days=3)
    hard = seed(
        run.url,
        "c-hard",
        state=ChargeState.FAILED,
        reason="hard_decline",
        last_code="05",
        updated_at=old,
    )
    unknown = seed(
        run.url,
        "c-unk",
        state=ChargeState.UNKNOWN,
        reason="unknown_outcome",
        updated_at=datetime.now(UTC),
    )

    rows = run.json("failed", "list")
    assert [r["charge_id"] for r in rows] == [hard, unknown]
    assert rows[0]["amount"] == "29.90" and rows[0]["external_ref"] == "c-hard"
    older = run.json("failed", "list", "--older-than", "2 days")
    assert [r["charge_id"] for r in older] == [hard]
    by_reason = run.json("failed", "list", "--reason", "unknown_outcome")
    assert [r["charge_id"] for r in by_reason] == [unknown]
    assert run.json("failed", "list", "--plan", "strict") == []
    table = run.ok("failed", "list").stdout
    assert "hard_decline" in table and "2 charge(s)" in table
    run.fails(
        "failed", "list", "--older-than", "2 fortnights", error=InvalidInput, needle="--older-than"
    )

    story = run.json("failed", "show", str(hard))
    assert story["charge"]["state"] == "failed"
    assert story["subscription"]["alias"] == "ab12…78"
    shown = run.ok("failed", "show", str(hard)).stdout
    assert "ab12…78" in shown
    assert ALIAS not in shown + json.dumps(story)
    run.fails("failed", "show", "999", error=NotFound, needle="charge 999 does not exist")


def test_failed_retry_unknown_needs_confirmation_then_dispatches(cli: Cli) -> None:
    charge_id = seed(
        cli.url,
        "c-retry",
        state=ChargeState.UNKNOWN,
        reason="stuck_in_flight",
        status=SubscriptionStatus.PAST_DUE,
    )
    line = cli.refused("failed", "retry", str(charge_id), needle="has an unknown outcome")
    assert line.endswith("check the Klik & Pay back office, then pass --confirm-not-charged")
    assert _charge(cli.url, charge_id).state == ChargeState.UNKNOWN

    done = cli.ok("failed", "retry", str(charge_id), "--confirm-not-charged", "--by", "alice")
    assert "sent to the workers" in done.stdout
    charge = _charge(cli.url, charge_id)
    assert charge.state == ChargeState.QUEUED
    assert charge.manual is True
    assert cli.messages() == [{"task": "billing.charge", "args": [charge_id], "kwargs": {}}]
    [row] = _ledger(cli.url, charge_id)
    assert (row.outcome, row.actor, row.operation) == ("retry_requested", "alice", "person")


def test_failed_retry_with_the_broker_down_leaves_it_to_the_sweep(cli: Cli) -> None:
    charge_id = seed(cli.url, "c-down", state=ChargeState.FAILED, reason="hard_decline")
    done = cli.ok("failed", "retry", str(charge_id), BILLING_BROKER_URL=DEAD_BROKER)
    assert "the engine sweep will send it within a minute" in done.stdout
    assert _charge(cli.url, charge_id).state == ChargeState.PENDING
    assert _ledger(cli.url, charge_id)[0].actor  # the OS user by default


def test_failed_resolve_and_discard(run: Run) -> None:
    paid = seed(run.url, "c-paid", state=ChargeState.UNKNOWN, reason="unknown_outcome")
    lost = seed(run.url, "c-lost", state=ChargeState.FAILED, reason="hard_decline")
    gone = seed(run.url, "c-gone", state=ChargeState.FAILED, reason="ladder_exhausted")

    run.fails(
        "failed",
        "resolve",
        str(paid),
        error=InvalidInput,
        needle="give either --approved --tx TX or --declined",
    )
    run.fails(
        "failed",
        "resolve",
        str(paid),
        "--approved",
        "--declined",
        error=InvalidInput,
        needle="give either",
    )
    run.fails("failed", "resolve", "777", "--declined", error=NotFound, needle="charge 777")
    done = run.ok(
        "failed",
        "resolve",
        str(paid),
        "--approved",
        "--tx",
        "TX-42",
        "--by",
        "carol",
        "--reason",
        "seen in back office",
    )
    assert "approved" in done.stdout and "period 2" in done.stdout
    charge = _charge(run.url, paid)
    assert (charge.state, charge.tx, charge.collected_amount) == (
        "approved",
        "TX-42",
        Decimal("29.90"),
    )
    [row] = _ledger(run.url, paid)
    assert (row.outcome, row.actor, row.reason) == (
        "resolved_approved",
        "carol",
        "seen in back office",
    )
    run.fails(
        "failed",
        "resolve",
        str(paid),
        "--declined",
        error=StateError,
        needle=f"charge {paid} is approved",
    )

    run.ok("failed", "resolve", str(lost), "--declined", "--by", "dave")
    assert _charge(run.url, lost).state == ChargeState.DECLINED
    assert _ledger(run.url, lost)[0].actor == "dave"

    run.fails(
        "failed",
        "discard",
        str(gone),
        "--reason",
        " ",
        error=InvalidInput,
        needle="--reason is required",
    )
    run.ok("failed", "discard", str(gone), "--reason", "customer left", "--by", "erin")
    assert _charge(run.url, gone).state == ChargeState.DISCARDED
    [row] = _ledger(run.url, gone)
    assert (row.outcome, row.reason, row.actor) == ("discarded", "customer left", "erin")


def test_bad_input_answers_one_line_and_status_2(cli: Cli) -> None:
    charge_id = seed(cli.url, "c-bad", state=ChargeState.FAILED, reason="hard_decline")
    cli.refused("failed", "show", "999", needle="charge 999 does not exist")
    cli.refused("failed", "show", "abc", needle='charge id "abc" must be a whole number')
    cli.refused("failed", "resolve", str(charge_id), "--approved", needle="--approved needs --tx")
    cli.refused("failed", "discard", str(charge_id), needle="--reason is required")
    assert _charge(cli.url, charge_id).state == ChargeState.FAILED


def test_failed_actions_on_postgresql(pg_url: str) -> None:
    cli = Cli(pg_url, f"test-ops-{uuid.uuid4().hex[:8]}")
    charge_id = seed(pg_url, "c-pg", state=ChargeState.FAILED, reason="hard_decline")
    cli.ok("failed", "discard", str(charge_id), "--reason", "written off")
    assert _charge(pg_url, charge_id).state == ChargeState.DISCARDED
    cli.refused("failed", "retry", str(charge_id), needle=f"charge {charge_id} is discarded")


# --- dead letters ---------------------------------------------------------------------


def test_deadletters_list_and_show(run: Run) -> None:
    letter = deadletters.record(
        run.url,
        task_name="billing.charge",
        task_id="t-1",
        args=[17],
        kwargs={},
        exc=RuntimeError("boom 4012888888881881"),
    )
    rows = run.json("deadletters", "list")
    assert [(r["id"], r["task_name"], r["args"]) for r in rows] == [
        (letter, "billing.charge", [17])
    ]
    assert "4012888888881881" not in json.dumps(rows)
    assert (rows[0]["source"], rows[0]["from"]) == ("task", "the task raised")
    assert "billing.charge" in run.ok("deadletters", "list").stdout
    shown = run.ok("deadletters", "show", str(letter)).stdout
    assert "RuntimeError: boom [redacted-pan]" in shown
    assert run.json("deadletters", "show", str(letter))["task_id"] == "t-1"
    run.fails("deadletters", "show", "55", error=NotFound, needle="dead letter 55 does not exist")
    run.fails("deadletters", "show", "x", error=InvalidInput, needle="must be a whole number")


def test_deadletters_requeue(cli: Cli) -> None:
    letter = deadletters.record(
        cli.url,
        task_name="billing.charge",
        task_id="t-1",
        args=[17],
        kwargs={},
        exc=RuntimeError("boom"),
    )
    # Broker down: not sent, so not marked either.
    down = cli("deadletters", "requeue", str(letter), BILLING_BROKER_URL=DEAD_BROKER)
    assert down.returncode == 1 and "was not requeued" in down.stderr
    with session_scope(cli.url) as session:
        assert session.get_one(DeadLetter, letter).requeued_at is None

    cli.ok("deadletters", "requeue", str(letter), "--by", "bob")
    assert cli.messages() == [{"task": "billing.charge", "args": [17], "kwargs": {}}]
    with session_scope(cli.url) as session:
        assert session.get_one(DeadLetter, letter).requeued_by == "bob"
    cli.refused("deadletters", "requeue", str(letter), needle="already requeued")
    assert len(cli.messages()) == 1


def test_deadletters_list_says_when_rabbitmq_s_dead_letter_queue_was_not_read(cli: Cli) -> None:
    letter = deadletters.record(
        cli.url, task_name="billing.charge", task_id="t-2", args=[18], kwargs={},
        exc=RuntimeError("boom"),
    )  # fmt: skip
    listed = cli(
        "deadletters", "list", "--json", BILLING_BROKER_URL="amqp://guest:guest@127.0.0.1:1//"
    )
    assert listed.returncode == 0, listed.stderr
    assert "warning: RabbitMQ's dead-letter queue was not read" in listed.stderr
    assert "Traceback" not in listed.stderr
    assert [row["id"] for row in json.loads(listed.stdout)] == [letter]


# --- ledger and report ----------------------------------------------------------------


def _book(url: str) -> None:
    with session_scope(url) as session:
        a = add_subscription(session, "l-a")
        b = add_subscription(session, "l-b", plan="strict")
        ca = add_charge(session, a, state=ChargeState.APPROVED)
        cb = add_charge(session, b, state=ChargeState.FAILED)
        for charge, outcome, amount, at in (
            (ca, "approved", "29.90", datetime(2025, 1, 1, 10, tzinfo=UTC)),
            (cb, "declined", "0.00", datetime(2025, 1, 2, 10, tzinfo=UTC)),
            (ca, "refunded", "0.10", datetime(2025, 1, 31, 23, tzinfo=UTC)),
            (cb, "approved", "9.99", datetime(2025, 2, 1, 0, tzinfo=UTC)),
        ):
            ledger.append(
                session,
                outcome=outcome,
                operation="duplicate",
                actor="engine",
                charge=charge,
                amount=Decimal(amount),
                at=at,
            )


def test_ledger_list_and_report(run: Run) -> None:
    _book(run.url)
    rows = run.json("ledger", "list")
    assert [r["outcome"] for r in rows] == ["approved", "declined", "refunded", "approved"]
    assert {r["alias_masked"] for r in rows} == {"ab12…78"}
    only_a = run.json("ledger", "list", "--subscription", "l-a")
    assert [r["amount"] for r in only_a] == ["29.90", "0.10"]
    january = run.json("ledger", "list", "--from", "2025-01-01", "--to", "2025-01-31")
    assert len(january) == 3  # --to includes the whole day
    assert [r["amount"] for r in run.json("ledger", "list", "--limit", "1")] == ["9.99"]
    assert "declined" in run.ok("ledger", "list", "--outcome", "declined").stdout
    run.fails(
        "ledger",
        "list",
        "--subscription",
        "zzz",
        error=NotFound,
        needle="no subscription with reference",
    )
    run.fails(
        "ledger",
        "list",
        "--from",
        "01/02/2025",
        error=InvalidInput,
        needle='--from: "01/02/2025" is not',
    )
    lines = run.ok("ledger", "export", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(x)["amount"] for x in lines] == ["29.90", "0.00", "0.10", "9.99"]
    run.fails(
        "ledger",
        "export",
        "--format",
        "xml",
        error=InvalidInput,
        needle='--format: "xml" is not one of',
    )

    report = run.json("report", "--from", "2025-01-01", "--to", "2025-01-31")
    by_plan = {line["plan"]: line for line in report["lines"]}
    assert by_plan["monthly"]["collected"] == "29.90"
    assert by_plan["monthly"]["refunded"] == "0.10"
    assert by_plan["strict"]["declined_count"] == 1
    assert by_plan["strict"]["declined_amount"] == "9.99"
    assert by_plan["strict"]["collected"] == "0.00"  # its approval is in February
    assert "29.90" in run.ok("report", "--from", "2025-01-01", "--to", "2025-01-31").stdout
    run.fails(
        "report",
        "--from",
        "2025-02-01",
        "--to",
        "2025-01-01",
        error=InvalidInput,
        needle="period is empty",
    )


def test_ledger_export_to_a_file(cli: Cli, tmp_path: Path) -> None:
    _book(cli.url)
    out = tmp_path / "ledger.csv"
    done = cli.ok("ledger", "export", "--format", "csv", "--output", str(out), "--plan", "monthly")
    assert "2 ledger row(s) written" in done.stderr
    parsed = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [(r["outcome"], r["amount"]) for r in parsed] == [
        ("approved", "29.90"),
        ("refunded", "0.10"),
    ]
    assert datetime.fromisoformat(parsed[0]["at"]) == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert not (tmp_path / "ledger.csv.partial").exists()
