"""Subscription changes (issue 18): a new card, another plan, a new price, through each door.

The Python function (``billing.changes.update_subscription``), the CLI (``billing.cli.main``
in this process, and the installed ``billing`` end to end) and the Celery task (run by
``apply``, through ``BillingTask`` and its dead letters) against a real database, both
PostgreSQL and SQLite; scheduled terms are applied by the real sweep and charged through
the sandbox over HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from billing import changes, dates, subscriptions
from billing.cli import main
from billing.db import session_scope
from billing.errors import BillingError, InvalidInput, NotFound, StateError
from billing.models import (
    Charge,
    ChargeState,
    DeadLetter,
    Event,
    LedgerEntry,
    SubscriptionChange,
    SubscriptionStatus,
    utcnow,
)
from billing.redact import mask_alias
from billing.settings import get_settings
from tests.fixtures.engine import Harness

ROOT = Path(__file__).resolve().parents[1]
CHANGE_PLANS = ROOT / "tests" / "data" / "change_plans.toml"
BILLING = str(Path(sys.executable).with_name("billing"))
DEAD_BROKER = "redis://127.0.0.1:1/0"
OLD = "ab12cd34ef56gh78"
NEW = "zz98yy76xx54ww32"
CARD = "4012888888881881"


@pytest.fixture
def h(db_url: str, make_harness: Callable[..., Harness]) -> Harness:
    return make_harness(db_url, plans_file=CHANGE_PLANS)


def update(h: Harness, ref: str, **fields: Any) -> changes.Updated:
    fields.setdefault("by", "alice")
    fields.setdefault("reason", "customer asked")
    with session_scope(h.url) as session:
        return changes.update_subscription(session, h.plans, ref, **fields)


def written(url: str) -> tuple[int, int, int]:
    """(ledger rows, events, scheduled changes): what a refused change must leave as it was."""
    with session_scope(url) as session:
        return (
            session.scalar(select(func.count()).select_from(LedgerEntry)) or 0,
            session.scalar(select(func.count()).select_from(Event)) or 0,
            session.scalar(select(func.count()).select_from(SubscriptionChange)) or 0,
        )


def rows(url: str, outcome: str) -> list[LedgerEntry]:
    with session_scope(url) as session:
        return list(
            session.scalars(
                select(LedgerEntry).where(LedgerEntry.outcome == outcome).order_by(LedgerEntry.id)
            )
        )


def events(url: str, type_: str | None = None) -> list[Event]:
    query = select(Event).order_by(Event.id)
    if type_ is not None:
        query = query.where(Event.type == type_)
    with session_scope(url) as session:
        return list(session.scalars(query))


LATER = timedelta(days=10)


def later(days: float = 3) -> datetime:
    return utcnow() + timedelta(days=days)


# --------------------------------------------------------------------------- a new card


def test_a_new_card_replaces_alias_and_ip_with_one_ledger_row_and_one_event(h: Harness) -> None:
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later())

    done = update(h, "shop-1", alias=NEW, customer_ip="2001:db8::1", reason="card expired")

    sub = h.sub(sub_id)
    assert (sub.alias, sub.customer_ip) == (NEW, "2001:db8::1")
    assert done.changed and done.card is not None and done.card.retried is None
    (row,) = h.ledger(sub_id)
    assert (row.outcome, row.operation, row.actor, row.reason) == (
        "subscription_card_updated", "person", "alice", "card expired",
    )  # fmt: skip
    assert row.alias_masked == mask_alias(NEW)
    assert row.details is not None
    assert row.details["previous_alias"] == mask_alias(OLD)
    assert row.details["previous_customer_ip"] == "203.0.113.7"
    (event,) = events(h.url)
    assert event.type == "subscription.card_updated"
    assert event.payload["data"] == {
        "by": "alice", "reason": "card expired", "customer_ip_changed": True, "retry": None,
    }  # fmt: skip
    stored = json.dumps([row.details, row.alias_masked, event.payload])
    assert OLD not in stored and NEW not in stored  # masked, or not there at all


def test_the_same_change_twice_writes_once(h: Harness) -> None:
    """A redelivered message, a double click: the second finds it already so."""
    h.subscribe("shop-1", OLD, next_charge_at=later())
    first = update(h, "shop-1", alias=NEW, amount="24.90")
    second = update(h, "shop-1", alias=NEW, amount="24.90")

    assert first.changed and not second.changed
    assert second.lines() == ["subscription shop-1: nothing changed (it is already as asked)"]
    assert written(h.url) == (2, 2, 1)


def test_the_ip_alone_follows_the_alias_only(h: Harness) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    sub_id = h.sub(1).id
    update(h, "shop-1", alias=OLD, customer_ip="198.51.100.4")  # the same card, its real IP
    assert h.sub(sub_id).customer_ip == "198.51.100.4"
    with pytest.raises(InvalidInput, match="customer_ip goes with alias"):
        update(h, "shop-1", customer_ip="198.51.100.5")


# --------------------------------------------------------------------------- plan and price


def test_a_new_price_counts_from_the_next_period_the_current_keeps_its_amount(
    h: Harness, gateway: Any
) -> None:
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)  # period 0 is due now
    h.engine.sweep_plan("monthly")  # its charge exists: the current period

    done = update(h, "shop-1", amount="24.90", reason="loyalty discount")

    assert done.scheduled is not None and done.scheduled.first_period == 1
    assert h.run_sent() == ["done"]
    assert h.charge(sub_id, 0).collected_amount == Decimal("29.90")
    sub = h.sub(sub_id)
    assert (sub.next_period, sub.amount_override) == (1, None)  # not yet: period 1 is ahead
    (row,) = rows(h.url, "subscription_price_changed")
    assert row.details is not None and row.period == 1
    assert (row.details["previous_amount"], row.details["amount"]) == ("29.90", "24.90")
    (event,) = events(h.url, "subscription.price_changed")
    assert event.payload["data"]["first_period"] == 1
    assert event.payload["data"]["effective_at"] == event.payload["data"]["first_due_at"]

    h.engine.sweep_plan("monthly", sub.next_charge_at + timedelta(minutes=1))
    assert h.run_sent() == ["done"]

    second = h.charge(sub_id, 1)
    assert (second.amount, second.collected_amount) == (Decimal("24.90"), Decimal("24.90"))
    assert h.sub(sub_id).amount_override == Decimal("24.90")
    with session_scope(h.url) as session:
        change = session.scalars(select(SubscriptionChange)).one()
        assert (change.applied_period, change.applied_at is not None) == (1, True)
    amounts = [c["amount"] for c in gateway.calls(alias=alias, script="duplicate")]
    assert amounts == ["29.90", "24.90"]


def test_a_price_from_a_given_date_skips_the_periods_before_it(h: Harness, gateway: Any) -> None:
    (alias,) = gateway.seed_aliases("1234567", 1)
    start = datetime(2031, 1, 15, 8, tzinfo=UTC)
    sub_id = h.subscribe("shop-1", alias, next_charge_at=start)

    done = update(h, "shop-1", amount="19.90", effective_from="2031-03-01", now=start - LATER)

    assert done.scheduled is not None
    assert done.scheduled.effective_at == datetime(2031, 2, 28, 23, tzinfo=UTC)  # Paris midnight
    assert done.scheduled.first_period == 2  # Jan 15 and Feb 15 keep 29.90; Mar 15 on
    for _ in range(3):  # each period swept when due, and paid
        h.engine.sweep_plan("monthly", h.sub(sub_id).next_charge_at + timedelta(minutes=1))
        assert h.run_sent() == ["done"]
    assert [h.charge(sub_id, p).amount for p in range(3)] == [
        Decimal("29.90"), Decimal("29.90"), Decimal("19.90"),
    ]  # fmt: skip


def test_another_interval_re_anchors_from_the_next_due_date_and_says_so(
    h: Harness, gateway: Any
) -> None:
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()  # period 0 paid, monthly
    first_due = h.sub(sub_id).next_charge_at

    done = update(h, "shop-1", plan="yearly", reason="moved to yearly")

    assert done.scheduled is not None and done.scheduled.re_anchored
    assert (done.scheduled.first_period, done.scheduled.first_due_at) == (1, first_due)
    assert "re-anchored: billed every 1 year from" in done.lines()[0]
    (event,) = events(h.url, "subscription.plan_changed")
    data = event.payload["data"]
    assert (data["previous_plan"], data["plan"], data["re_anchored"], data["every"]) == (
        "monthly", "yearly", True, "1 year",
    )  # fmt: skip
    assert (data["previous_amount"], data["amount"]) == ("29.90", "299.00")

    h.engine.sweep_plan("monthly", first_due + timedelta(minutes=1))
    assert h.run_sent() == ["done"]

    yearly = h.plans.plan("yearly")
    charge = h.charge(sub_id, 1)
    sub = h.sub(sub_id)
    assert (charge.plan, charge.amount, charge.state) == ("yearly", Decimal("299.00"), "approved")
    assert (sub.plan, sub.anchor_at, sub.anchor_period) == ("yearly", first_due, 1)
    assert sub.next_period == 2
    assert sub.next_charge_at == dates.due_at(first_due, yearly.every, 1, yearly.timezone)
    assert sub.next_charge_at.year == first_due.year + 1


def test_another_plan_in_the_same_interval_keeps_the_anchor(h: Harness) -> None:
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later(), amount_override=Decimal("25.00"))
    anchor = h.sub(sub_id).anchor_at
    done = update(h, "shop-1", plan="premium")
    assert done.scheduled is not None and not done.scheduled.re_anchored
    assert done.scheduled.terms.amount == Decimal("49.90")  # the override goes with the plan
    h.engine.sweep_plan("monthly", anchor + timedelta(minutes=1))
    charge = h.charge(sub_id, 0)
    sub = h.sub(sub_id)
    assert (charge.plan, charge.amount) == ("premium", Decimal("49.90"))
    assert (sub.plan, sub.amount_override, sub.anchor_at, sub.anchor_period) == (
        "premium", None, anchor, 0,
    )  # fmt: skip


def test_a_change_of_currency_is_refused(h: Harness) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    with pytest.raises(StateError, match="a change of currency is refused"):
        update(h, "shop-1", plan="monthly-usd")
    assert written(h.url) == (0, 0, 0)
    assert h.sub(1).plan == "monthly"


def test_the_hot_path_leaves_a_subscription_with_a_change_to_the_per_row_path(
    h: Harness,
) -> None:
    """Many subscriptions due at once: the set-based insert charges the plain ones, the
    one with a change due gets its new price, none is charged twice."""
    due = utcnow() + timedelta(hours=1)
    ids = [h.subscribe(f"shop-{i}", f"{OLD}{i:03d}", next_charge_at=due) for i in range(30)]
    update(h, "shop-7", amount="9.90")
    update(h, "shop-8", plan="premium")

    result = h.engine.sweep_plan("monthly", due + timedelta(minutes=1))

    assert result.created == 30
    amounts = {h.sub(i).external_ref: h.charge(i, 0).amount for i in ids}
    assert amounts.pop("shop-7") == Decimal("9.90")
    assert amounts.pop("shop-8") == Decimal("49.90")
    assert set(amounts.values()) == {Decimal("29.90")}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"plan": "gold"}, InvalidInput, 'plan "gold" is not in the plans file'),
        ({"plan": "monthly-usd"}, StateError, "a change of currency is refused"),
        ({"alias": NEW, "customer_ip": "300.1.1.1"}, InvalidInput,
         'customer_ip "300.1.1.1" is not an IP address'),
        ({"alias": "ab12 cd34"}, InvalidInput, "alias contains white space"),
        ({"alias": CARD}, InvalidInput, "alias is a card number, not an alias"),
        ({"alias": "a" * 129}, InvalidInput, "alias is longer than 128 characters"),
        ({"alias": "ab\x00cd"}, InvalidInput, "alias contains a control character"),
        ({"amount": "29.999"}, InvalidInput, "more than two decimal places"),
        ({"amount": "-5"}, InvalidInput, "must be a positive amount"),
        ({"amount": "abc"}, InvalidInput, "is not a decimal amount"),
        ({"amount": 9.9}, InvalidInput, "not a float"),
        ({"amount": "2990"}, InvalidInput, "was it written in cents"),
        ({"amount": "24.90", "effective_from": "2020-01-01"}, InvalidInput, "is in the past"),
        ({"amount": "24.90", "effective_from": "2999-01-01"}, InvalidInput,
         "more than 5 years ahead"),
        ({"amount": "24.90", "effective_from": "2031-02-30"}, InvalidInput,
         'effective_from "2031-02-30" is not a date'),
        ({"amount": "24.90", "effective_from": "next tuesday"}, InvalidInput,
         "is not an ISO 8601 time"),
        ({"amount": "24.90", "effective_from": "2031-01-01T00:00:00"}, InvalidInput,
         "without offset"),
        ({"alias": NEW, "effective_from": "2031-01-01"}, InvalidInput,
         "effective_from goes with plan or amount"),
        ({}, InvalidInput, "nothing to change"),
        ({"plan": " ", "amount": ""}, InvalidInput, "nothing to change"),
        ({"amount": "24.90", "reason": None}, InvalidInput, "reason is required"),
        ({"amount": "24.90", "reason": "   "}, InvalidInput, "reason is required"),
        ({"amount": "24.90", "by": ""}, InvalidInput, "by must name who"),
    ],
    ids=lambda v: repr(v)[:40],
)  # fmt: skip
def test_bad_input_names_the_field_and_writes_nothing(
    h: Harness, fields: dict[str, Any], error: type[BillingError], message: str
) -> None:
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later())
    before = h.sub(sub_id)

    with pytest.raises(error, match=message) as raised:
        update(h, "shop-1", **fields)

    assert CARD not in str(raised.value)
    assert written(h.url) == (0, 0, 0)
    after = h.sub(sub_id)
    assert (after.alias, after.customer_ip, after.plan, after.amount_override) == (
        before.alias, before.customer_ip, before.plan, before.amount_override,
    )  # fmt: skip


def test_every_problem_is_named_at_once(h: Harness) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    with pytest.raises(InvalidInput) as raised:
        update(h, "shop-1", alias="a b", amount="1.001", plan="gold", reason="")
    message = str(raised.value)
    for part in ("alias contains white space", 'plan "gold"', "two decimal", "reason is"):
        assert part in message, message


def test_an_unknown_or_cancelled_subscription_is_refused(h: Harness) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    with session_scope(h.url) as session:
        subscriptions.cancel(session, "shop-1", by="alice", reason="moved away")
    before = written(h.url)
    with pytest.raises(NotFound, match='no subscription with reference or id "nope"'):
        update(h, "nope", amount="24.90")
    with pytest.raises(StateError, match="shop-1 is cancelled"):
        update(h, "shop-1", alias=NEW)
    assert written(h.url) == before


# --------------------------------------------------------------------------- the CLI


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(h: Harness, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Ran]]:
    """``billing ARGS`` through ``billing.cli.main``, the console script's own function."""
    env = {
        "BILLING_DATABASE_URL": h.url,
        "BILLING_PLANS_FILE": str(CHANGE_PLANS),
        "BILLING_BROKER_URL": DEAD_BROKER,
        "COLUMNS": "200",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)

        def run(*args: str) -> Ran:
            root = logging.getLogger()
            handlers, level = list(root.handlers), root.level
            argv, sys.argv = sys.argv, ["billing", *args]
            get_settings.cache_clear()
            capsys.readouterr()
            code, crash = 0, ""
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0
            except Exception:
                code, crash = 1, traceback.format_exc()
            finally:
                sys.argv = argv
                root.handlers[:] = handlers
                root.setLevel(level)
                get_settings.cache_clear()
            out, err = capsys.readouterr()
            return Ran(code, out, err + crash)

        yield run
    get_settings.cache_clear()


def test_cli_update_changes_card_and_price(h: Harness, cli: Callable[..., Ran]) -> None:
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later())

    ran = cli(
        "subscriptions", "update", "shop-1", "--alias", NEW, "--ip", "198.51.100.4",
        "--amount", "24.90", "--reason", "new card, loyalty price", "--by", "bob",
    )  # fmt: skip

    assert ran.code == 0, ran
    assert f"card updated to {mask_alias(NEW)} (was {mask_alias(OLD)})" in ran.out
    assert "price, 29.90 -> 24.90 EUR, from period 0" in ran.out
    assert OLD not in ran.out + ran.err and NEW not in ran.out + ran.err
    assert h.sub(sub_id).alias == NEW
    assert {r.actor for r in h.ledger(sub_id)} == {"bob"}
    shown = cli("subscriptions", "show", "shop-1", "--json")
    data = json.loads(shown.out)
    assert data["alias"] == mask_alias(NEW)
    assert [(c["amount_override"], c["applied_at"]) for c in data["changes"]] == [("24.90", None)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plan", "gold"], 'plan "gold" is not in the plans file'),
        (["--plan", "monthly-usd"], "a change of currency is refused"),
        (["--alias", NEW, "--ip", "1.2.3"], 'customer_ip "1.2.3" is not an IP address'),
        (["--alias", CARD], "alias is a card number"),
        (["--amount", "12.345"], "more than two decimal places"),
        (["--amount", "24.90", "--from", "2001-01-01"], "is in the past"),
        (["--amount", "24.90", "--from", "9999-12-31"], "years ahead"),
        ([], "nothing to change"),
    ],
    ids=lambda v: " ".join(v)[:30] if isinstance(v, list) else v[:20],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    h: Harness, cli: Callable[..., Ran], args: list[str], message: str
) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    ran = cli("subscriptions", "update", "shop-1", *args, "--reason", "test")
    lines = [line for line in ran.err.splitlines() if line.strip()]
    assert ran.code == 2 and len(lines) == 1 and "Traceback" not in ran.err, ran
    assert message in lines[0] and CARD not in lines[0]
    assert written(h.url) == (0, 0, 0)


def test_cli_without_reason_is_refused(h: Harness, cli: Callable[..., Ran]) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    ran = cli("subscriptions", "update", "shop-1", "--amount", "24.90")
    assert ran.code == 2 and "reason is required" in ran.err, ran
    assert written(h.url) == (0, 0, 0)


def test_the_installed_command(h: Harness) -> None:
    h.subscribe("shop-1", OLD, next_charge_at=later())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BILLING_")},
        "BILLING_DATABASE_URL": h.url,
        "BILLING_PLANS_FILE": str(CHANGE_PLANS),
        "BILLING_BROKER_URL": DEAD_BROKER,
    }

    def billing(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BILLING, "subscriptions", "update", "shop-1", *args], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    ok = billing("--plan", "premium", "--reason", "upgrade")
    bad = billing("--amount", "1.001", "--reason", "typo")
    assert ok.returncode == 0, ok.stderr
    assert "plan monthly -> premium, 29.90 -> 49.90 EUR" in ok.stdout
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        'error: amount: "1.001" has more than two decimal places'
    ]


# --------------------------------------------------------------------------- the task


@pytest.fixture
def task_env(h: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    monkeypatch.setenv("BILLING_DATABASE_URL", h.url)
    monkeypatch.setenv("BILLING_PLANS_FILE", str(CHANGE_PLANS))
    monkeypatch.setenv("BILLING_BROKER_URL", DEAD_BROKER)
    get_settings.cache_clear()
    yield h
    get_settings.cache_clear()


def _letters(url: str) -> list[DeadLetter]:
    with session_scope(url) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def test_the_task_changes_the_card_and_the_plan(task_env: Harness) -> None:
    from tasks.charges import update_subscription

    h = task_env
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later())
    data = {
        "external_ref": "shop-1", "alias": NEW, "plan": "premium", "amount": "45.00",
        "effective_from": (date.today() + timedelta(days=40)).isoformat(),
        "reason": "upgrade with a new card",
    }  # fmt: skip

    result = update_subscription.apply(args=[data]).get()
    again = update_subscription.apply(args=[data]).get()

    assert result["changed"] and not again["changed"]
    assert result["card"]["alias"] == mask_alias(NEW) and NEW not in json.dumps(result)
    assert result["terms"]["plan"] == "premium" and result["terms"]["amount"] == "45.00"
    assert h.sub(sub_id).alias == NEW
    assert {r.actor for r in h.ledger(sub_id)} == {changes.TASK_ACTOR}
    assert [e.type for e in events(h.url)] == [
        "subscription.card_updated", "subscription.plan_changed",
    ]  # fmt: skip
    assert _letters(h.url) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"amount": 24.9}, "not a float"),
        ({"plan": "gold"}, 'plan "gold"'),
        ({"alias": CARD}, "alias is a card number"),
        ({"alias": NEW, "customer_ip": "999.1.1.1"}, "is not an IP address"),
        ({"amount": "24.90", "effective_from": "1999-12-31"}, "in the past"),
        ({"amount": "24.90", "card_number": CARD, "cvv": "987"}, "unknown field(s)"),
        ({"external_ref": None, "amount": "24.90"}, "external_ref is missing"),
        ({"reason": None, "amount": "24.90"}, "reason is required"),
        ({"external_ref": "nope", "amount": "24.90"}, "no subscription"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_a_bad_message_is_a_dead_letter_holding_no_secret(
    task_env: Harness, data: dict[str, Any], message: str
) -> None:
    from tasks.charges import update_subscription

    h = task_env
    h.subscribe("shop-1", OLD, next_charge_at=later())
    sent = {"external_ref": "shop-1", "reason": "shop sync", **data}

    update_subscription.apply(args=[sent])

    (letter,) = _letters(h.url)
    assert letter.task_name == "billing.update_subscription"
    assert message in letter.exc_message, letter.exc_message
    stored = json.dumps(letter.args) + letter.exc_message + letter.traceback
    assert CARD not in stored and "987" not in stored
    assert written(h.url)[1:] == (0, 0) and h.sub(1).alias == OLD


def test_a_dead_letter_keeps_the_alias_masked(task_env: Harness) -> None:
    from tasks.charges import update_subscription

    h = task_env
    h.subscribe("shop-1", OLD, next_charge_at=later())
    update_subscription.apply(args=[{"external_ref": "shop-1", "alias": NEW, "reason": ""}])
    (letter,) = _letters(h.url)
    (kept,) = letter.args["args"]
    assert kept["alias"] == mask_alias(NEW) and "args[0].alias" in letter.args["masked"]
    assert NEW not in json.dumps(letter.args) + letter.exc_message + letter.traceback
    assert ChargeState.PENDING  # the vocabulary is importable beside the task
    assert written(h.url) == (0, 0, 0)


def test_an_unchanged_charge_row_stays_as_it_was(h: Harness) -> None:
    """A change never rewrites an existing charge: the current period keeps its amount."""
    sub_id = h.subscribe("shop-1", OLD)
    h.engine.sweep_plan("monthly")
    with session_scope(h.url) as session:
        before = session.scalars(select(Charge)).one()
        before_amount, before_updated = before.amount, before.updated_at
    update(h, "shop-1", plan="premium")
    charge = h.charge(sub_id, 0)
    assert (charge.amount, charge.plan, charge.updated_at) == (
        before_amount, "monthly", before_updated,
    )  # fmt: skip


# --------------------------------------------------------------------------- careless shops


def test_a_card_number_in_the_reason_is_stored_nowhere(h: Harness) -> None:
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later())
    update(h, "shop-1", alias=NEW, amount="24.90", reason=f"customer typed {CARD} in chat")
    with session_scope(h.url) as session:
        change = session.scalars(select(SubscriptionChange)).one()
    stored = [change.reason, *(r.reason or "" for r in h.ledger(sub_id))]
    stored += [json.dumps(e.payload) for e in events(h.url)]
    assert all(CARD not in text for text in stored) and "[redacted-pan]" in stored[0]


def test_a_huge_reason_is_cut_not_refused_by_the_database(h: Harness) -> None:
    sub_id = h.subscribe("shop-1", OLD, next_charge_at=later())
    update(h, "shop-1", amount="24.90", reason="x" * 100_000, by="b" * 500)
    (row,) = h.ledger(sub_id)
    assert row.reason is not None and len(row.reason) <= 4000 and len(row.actor) <= 128


def test_the_cli_hands_a_retried_charge_to_the_workers_or_says_why_not(
    h: Harness, gateway: Any, cli: Callable[..., Ran]
) -> None:
    old, new = gateway.seed_aliases("1234567", 2)
    gateway.set_behaviour(old, decline="51")
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    h.run_sent()  # on the ladder, next try in a day

    ran = cli("subscriptions", "update", "shop-1", "--alias", new, "--reason", "new card")

    assert ran.code == 0, ran
    charge = h.charge(sub_id)
    assert f"charge {charge.id} (period 0) tried with it now" in ran.out
    assert "the broker is unreachable" in ran.out and "engine sweep" in ran.out
    assert charge.next_attempt_at is not None and charge.next_attempt_at <= utcnow()


def test_the_task_hands_a_retried_charge_to_the_workers(
    task_env: Harness, gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a worker the broker is up; here it is not: the change is kept, the charge waits
    for the engine sweep, and no dead letter is written."""
    import tasks.base
    from tasks.charges import update_subscription

    monkeypatch.setattr(tasks.base, "_engine", None)  # an engine for this test's database
    h = task_env
    old, new = gateway.seed_aliases("1234567", 2)
    gateway.set_behaviour(old, decline="54")
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    h.run_sent()  # hard decline: failed, suspended

    result = update_subscription.apply(
        args=[{"external_ref": "shop-1", "alias": new, "reason": "new card"}]
    ).get()

    charge = h.charge(sub_id)
    assert result["card"]["retried_charge"] == charge.id
    assert charge.state in (ChargeState.PENDING, ChargeState.QUEUED)
    assert h.sub(sub_id).status == SubscriptionStatus.PAST_DUE
    assert _letters(h.url) == []


def test_a_price_is_checked_against_the_plan_it_will_be_charged_on(h: Harness) -> None:
    """Cents for euros on the plan a pending change moves to: 400.00 fits the yearly plan
    the subscription is on now (299.00), not the monthly one it is moving to (29.90)."""
    h.subscribe("shop-1", OLD, plan="yearly", next_charge_at=later())
    update(h, "shop-1", plan="monthly")
    before = written(h.url)
    with pytest.raises(InvalidInput, match="more than 10 times the price of plan monthly"):
        update(h, "shop-1", amount="400.00")
    assert written(h.url) == before
