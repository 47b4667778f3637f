"""Managing subscriptions: list, show, pause, resume (skipping the paused periods), cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from billing import dates
from billing import subscriptions as subs
from billing.db import session_scope
from billing.errors import InvalidInput, NotFound, StateError
from billing.intake import add_subscription
from billing.models import Charge, LedgerEntry, Subscription
from billing.plans import PlanSet, load_plans

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
PLANS_FILE = DATA / "intake_plans.toml"
ALIAS = "ab12cd34ef56gh78"
CREATED = datetime(2029, 12, 1, tzinfo=UTC)


@pytest.fixture
def plans() -> PlanSet:
    return load_plans(PLANS_FILE)


def make(
    url: str,
    plans: PlanSet,
    ref: str,
    *,
    plan: str = "basic-weekly",
    at: datetime = datetime(2030, 1, 7, 9, tzinfo=UTC),
    **fields: object,
) -> int:
    """A subscription, with ``fields`` set afterwards as the engine would have left them."""
    with session_scope(url) as session:
        sub = add_subscription(
            session,
            plans,
            external_ref=ref,
            plan=plan,
            alias=ALIAS,
            customer_ip="203.0.113.7",
            next_charge_at=at,
            now=CREATED,
        )
        for name, value in fields.items():
            setattr(sub, name, value)
        return sub.id


def load(url: str, ref: str) -> Subscription:
    with session_scope(url) as session:
        return subs.get_subscription(session, ref)


def ledger_rows(url: str, outcome: str | None = "skipped") -> list[LedgerEntry]:
    """The ledger's rows of ``outcome`` (every row with None), in order."""
    query = select(LedgerEntry).order_by(LedgerEntry.id)
    if outcome is not None:
        query = query.where(LedgerEntry.outcome == outcome)
    with session_scope(url) as session:
        return list(session.scalars(query))


# --------------------------------------------------------------------------- reading


def test_get_by_reference_or_id(db_url: str, plans: PlanSet) -> None:
    sub_id = make(db_url, plans, "shop-17")

    assert load(db_url, "shop-17").id == sub_id
    assert load(db_url, str(sub_id)).external_ref == "shop-17"
    with pytest.raises(NotFound, match='"shop-99"'):
        load(db_url, "shop-99")


def test_list_filters_by_plan_and_status(db_url: str, plans: PlanSet) -> None:
    make(db_url, plans, "a")
    make(db_url, plans, "b", plan="pro-monthly")
    make(db_url, plans, "c", status="paused")

    with session_scope(db_url) as session:
        assert [s.external_ref for s in subs.list_subscriptions(session)] == ["a", "b", "c"]
        weekly = subs.list_subscriptions(session, plan="basic-weekly")
        assert [s.external_ref for s in weekly] == ["a", "c"]
        active = subs.list_subscriptions(session, status="active")
        assert [s.external_ref for s in active] == ["a", "b"]
        assert [s.external_ref for s in subs.list_subscriptions(session, limit=1)] == ["a"]
        with pytest.raises(InvalidInput, match='status "paus" is not one of'):
            subs.list_subscriptions(session, status="paus")


# --------------------------------------------------------------------------- pause / resume


def test_pause_then_resume_skips_the_paused_periods(db_url: str, plans: PlanSet) -> None:
    # Weekly from Mon 2030-01-07 09:00 UTC; period 0 was charged, period 1 is next.
    make(
        db_url, plans, "shop-17", next_period=1, next_charge_at=datetime(2030, 1, 14, 9, tzinfo=UTC)
    )
    paused_at = datetime(2030, 1, 8, 12, tzinfo=UTC)
    resumed_at = datetime(2030, 2, 1, 12, tzinfo=UTC)

    with session_scope(db_url) as session:
        sub = subs.pause(session, "shop-17", now=paused_at, by="alice")
        assert sub.status == "paused"
    assert load(db_url, "shop-17").paused_at == paused_at

    with session_scope(db_url) as session:
        subs.resume(session, "shop-17", plans, now=resumed_at, by="bob")

    sub = load(db_url, "shop-17")
    assert sub.status == "active"
    assert sub.paused_at is None
    # Periods 1-3 (Jan 14, 21, 28) fell in the pause; period 4 is Feb 4, after the resume.
    assert sub.next_period == 4
    assert sub.next_charge_at == datetime(2030, 2, 4, 9, tzinfo=UTC)
    rows = ledger_rows(db_url)
    assert [r.period for r in rows] == [1, 2, 3]
    for row in rows:
        assert row.outcome == "skipped"
        assert row.operation == "engine"
        assert row.amount == Decimal("0")
        assert row.currency == "EUR"
        assert row.merchant_id == "1234567"
        assert row.alias_masked == "ab12…78"
        assert row.actor == "bob"
        assert row.subscription_id == sub.id
        assert row.external_ref == "shop-17"
        assert row.plan == "basic-weekly"
        assert row.charge_id is None
        assert row.reason == ("paused from 2030-01-08T12:00:00+00:00 to 2030-02-01T12:00:00+00:00")


def test_resume_follows_the_plan_time_zone(db_url: str, plans: PlanSet) -> None:
    # Monthly at 09:00 Paris from Jan 31; period 2 is Mar 31, the day summer time starts.
    anchor = datetime(2030, 1, 31, 8, tzinfo=UTC)
    make(db_url, plans, "paris", plan="pro-monthly", at=anchor, next_period=1, status="paused")

    with session_scope(db_url) as session:
        subs.resume(session, "paris", plans, now=datetime(2030, 3, 15, tzinfo=UTC), by="bob")

    sub = load(db_url, "paris")
    assert sub.next_period == 2
    assert sub.next_charge_at == datetime(2030, 3, 31, 7, tzinfo=UTC)  # 09:00 CEST
    plan = plans.plan("pro-monthly")
    assert sub.next_charge_at == dates.due_at(anchor, plan.every, 2, plan.timezone)
    assert [r.period for r in ledger_rows(db_url)] == [1]


def test_resume_within_the_same_period_skips_nothing(db_url: str, plans: PlanSet) -> None:
    make(db_url, plans, "short", next_period=1, next_charge_at=datetime(2030, 1, 14, 9, tzinfo=UTC))
    with session_scope(db_url) as session:
        subs.pause(session, "short", now=datetime(2030, 1, 8, tzinfo=UTC), by="alice")
        subs.resume(session, "short", plans, now=datetime(2030, 1, 10, tzinfo=UTC), by="alice")

    sub = load(db_url, "short")
    assert (sub.status, sub.next_period) == ("active", 1)
    assert sub.next_charge_at == datetime(2030, 1, 14, 9, tzinfo=UTC)
    assert ledger_rows(db_url) == []


def test_resume_never_goes_back_to_a_period_already_taken(db_url: str, plans: PlanSet) -> None:
    # The engine had already created the charge of period 5 (due Feb 11) when it was paused.
    make(
        db_url,
        plans,
        "ahead",
        next_period=6,
        status="paused",
        next_charge_at=datetime(2030, 2, 18, 9, tzinfo=UTC),
    )
    with session_scope(db_url) as session:
        subs.resume(session, "ahead", plans, now=datetime(2030, 1, 20, tzinfo=UTC), by="x")

    sub = load(db_url, "ahead")
    assert sub.next_period == 6
    assert sub.next_charge_at == datetime(2030, 2, 18, 9, tzinfo=UTC)
    assert ledger_rows(db_url) == []


def test_past_due_can_be_paused(db_url: str, plans: PlanSet) -> None:
    make(db_url, plans, "late", status="past_due")
    with session_scope(db_url) as session:
        assert subs.pause(session, "late", by="alice").status == "paused"


@pytest.mark.parametrize("status", ["paused", "suspended", "cancelled"])
def test_pause_refuses_other_states(db_url: str, plans: PlanSet, status: str) -> None:
    make(db_url, plans, "shop-17", status=status)
    with pytest.raises(StateError) as caught, session_scope(db_url) as session:
        subs.pause(session, "shop-17", by="alice")
    assert str(caught.value) == (
        f"subscription shop-17 is {status}; only active or past_due subscriptions can be paused"
    )
    assert load(db_url, "shop-17").status == status


@pytest.mark.parametrize("status", ["active", "past_due", "suspended", "cancelled"])
def test_resume_refuses_what_is_not_paused(db_url: str, plans: PlanSet, status: str) -> None:
    make(db_url, plans, "shop-17", status=status)
    with (
        pytest.raises(StateError, match=f"shop-17 is {status}; only paused subscriptions"),
        session_scope(db_url) as session,
    ):
        subs.resume(session, "shop-17", plans, by="alice")
    assert ledger_rows(db_url) == []


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("status", ["active", "past_due", "suspended", "paused"])
def test_cancel_from_any_open_state(db_url: str, plans: PlanSet, status: str) -> None:
    make(db_url, plans, "shop-17", status=status)
    with session_scope(db_url) as session:
        subs.cancel(session, "shop-17", by="alice", reason="customer asked")

    assert load(db_url, "shop-17").status == "cancelled"
    (row,) = ledger_rows(db_url, outcome=None)  # who cancelled it and why, nothing else
    assert (row.outcome, row.actor, row.reason) == (
        "subscription_cancelled", "alice", "customer asked",
    )  # fmt: skip


def test_cancel_twice_is_a_state_error(db_url: str, plans: PlanSet) -> None:
    make(db_url, plans, "shop-17", status="cancelled")
    with (
        pytest.raises(StateError, match="shop-17 is already cancelled"),
        session_scope(db_url) as session,
    ):
        subs.cancel(session, "shop-17", by="alice")


# --------------------------------------------------------------------------- the command


def _billing(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": url,
        "BILLING_PLANS_FILE": str(PLANS_FILE),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "billing"), "subscriptions", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def test_cli_list_and_show_mask_the_alias(sqlite_url: str, plans: PlanSet) -> None:
    sub_id = make(sqlite_url, plans, "shop-17")
    with session_scope(sqlite_url) as session:
        session.add(
            Charge(
                subscription_id=sub_id,
                period=0,
                due_at=datetime(2030, 1, 7, 9, tzinfo=UTC),
                plan="basic-weekly",
                plan_version=1,
                amount=Decimal("4.99"),
                currency="EUR",
                merchant_id="1234567",
                state="approved",
                tx="TX-0001",
            )
        )

    listed = _billing(sqlite_url, "list")
    assert listed.returncode == 0, listed.stderr
    assert "shop-17" in listed.stdout
    assert "ab12…78" in listed.stdout
    assert ALIAS not in listed.stdout

    as_json = _billing(sqlite_url, "list", "--json", "--status", "active")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [(r["external_ref"], r["alias"]) for r in rows] == [("shop-17", "ab12…78")]

    shown = _billing(sqlite_url, "show", "shop-17")
    assert shown.returncode == 0, shown.stderr
    assert ALIAS not in shown.stdout
    for text in ("ab12…78", "203.0.113.7", "2030-01-07T09:00:00+00:00", "TX-0001", "approved"):
        assert text in shown.stdout

    missing = _billing(sqlite_url, "show", "shop-99")
    assert missing.returncode == 2
    assert 'no subscription with reference or id "shop-99"' in missing.stderr


def test_cli_pause_resume_cancel(sqlite_url: str, plans: PlanSet) -> None:
    make(sqlite_url, plans, "shop-17", at=datetime.now(UTC) - timedelta(days=30))

    done = _billing(sqlite_url, "pause", "shop-17", "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert load(sqlite_url, "shop-17").status == "paused"

    again = _billing(sqlite_url, "pause", "shop-17")
    assert again.returncode == 2
    assert "shop-17 is paused; only active or past_due subscriptions can be paused" in again.stderr

    done = _billing(sqlite_url, "resume", "shop-17", "--by", "bob")
    assert done.returncode == 0, done.stderr
    sub = load(sqlite_url, "shop-17")
    assert sub.status == "active"
    assert sub.next_charge_at > datetime.now(UTC)
    skipped = ledger_rows(sqlite_url)
    # Periods 0-4 fell due in the 30 days before the resume, while it was paused.
    assert [r.period for r in skipped] == [0, 1, 2, 3, 4]
    assert {r.actor for r in skipped} == {"bob"}

    done = _billing(sqlite_url, "cancel", "shop-17", "--reason", "moved away")
    assert done.returncode == 0, done.stderr
    assert load(sqlite_url, "shop-17").status == "cancelled"
    again = _billing(sqlite_url, "cancel", "shop-17")
    assert again.returncode == 2
    assert "already cancelled" in again.stderr
