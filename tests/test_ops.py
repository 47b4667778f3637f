"""The failed-charge queue and what a person does with it, on PostgreSQL and SQLite.

Charges are written straight into the database in the states under test: nothing here
depends on the gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import ledger, ops
from billing.dates import due_at
from billing.db import session_scope
from billing.errors import InvalidInput, NotFound, StateError
from billing.models import (
    Attempt,
    Charge,
    ChargeState,
    LedgerEntry,
    Subscription,
    SubscriptionStatus,
)
from billing.plans import load_plans
from tests.fixtures.engine import ENGINE_PLANS

PLANS = load_plans(ENGINE_PLANS)
ALIAS = "ab12cd34ef56gh78"
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
ANCHOR = datetime(2025, 1, 31, 8, 30, tzinfo=UTC)


# --- building rows (also used by the report, metrics and CLI tests) -------------------


def add_subscription(
    session: Session,
    ref: str,
    *,
    plan: str = "monthly",
    status: str = SubscriptionStatus.PAST_DUE,
    next_period: int = 1,
    anchor: datetime = ANCHOR,
    alias: str = ALIAS,
) -> Subscription:
    p = PLANS.plan(plan)
    sub = Subscription(
        external_ref=ref,
        plan=plan,
        alias=alias,
        customer_ip="203.0.113.7",
        anchor_at=anchor,
        next_period=next_period,
        next_charge_at=due_at(anchor, p.every, next_period, p.timezone),
        status=status,
    )
    session.add(sub)
    session.flush()
    return sub


def add_charge(
    session: Session,
    sub: Subscription,
    *,
    state: str,
    reason: str | None = None,
    period: int | None = None,
    amount: str | None = None,
    declines: int = 0,
    attempts: int = 1,
    updated_at: datetime = NOW - timedelta(hours=1),
    last_code: str | None = None,
    review: str | None = None,
) -> Charge:
    p = PLANS.plan(sub.plan)
    period = sub.next_period if period is None else period
    charge = Charge(
        subscription_id=sub.id,
        period=period,
        due_at=due_at(sub.anchor_at, p.every, period, p.timezone),
        plan=sub.plan,
        plan_version=1,
        amount=Decimal(amount) if amount is not None else p.amount,
        currency=p.currency,
        merchant_id=PLANS.account_for(p).merchant_id,
        deferred=p.deferred,
        manual=False,
        state=state,
        attempts=attempts,
        declines=declines,
        reason=reason,
        review=review,
        last_code=last_code,
        last_message="Refusée" if last_code else None,
        created_at=updated_at,
        updated_at=updated_at,
    )
    session.add(charge)
    session.flush()
    return charge


def seed(url: str, ref: str, **charge: Any) -> int:
    """One subscription with one charge; returns the charge id."""
    sub_fields = {k: charge.pop(k) for k in ("plan", "status", "next_period") if k in charge}
    with session_scope(url) as session:
        sub = add_subscription(session, ref, **sub_fields)
        return add_charge(session, sub, **charge).id


def load(url: str, charge_id: int) -> tuple[Charge, Subscription, list[LedgerEntry]]:
    with session_scope(url) as session:
        charge = session.get_one(Charge, charge_id)
        sub = charge.subscription
        rows = list(
            session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.charge_id == charge_id)
                .order_by(LedgerEntry.id)
            )
        )
        return charge, sub, rows


# --- listing --------------------------------------------------------------------------


def test_list_failed_filters_and_fields(db_url: str) -> None:
    hard = seed(
        db_url,
        "r-hard",
        state=ChargeState.FAILED,
        reason="hard_decline",
        last_code="05",
        updated_at=NOW - timedelta(days=3),
        attempts=2,
    )
    unknown = seed(
        db_url,
        "r-unknown",
        state=ChargeState.UNKNOWN,
        reason="unknown_outcome",
        plan="strict",
        updated_at=NOW - timedelta(hours=2),
    )
    seed(db_url, "r-pending", state=ChargeState.PENDING, declines=1)
    seed(db_url, "r-paid", state=ChargeState.APPROVED)

    with session_scope(db_url) as session:
        rows = ops.list_failed(session, now=NOW)
        assert [r.charge_id for r in rows] == [hard, unknown]  # oldest first
        first = rows[0]
        assert first.external_ref == "r-hard"
        assert (first.plan, first.amount, first.currency) == ("monthly", Decimal("29.90"), "EUR")
        assert (first.attempts, first.last_code, first.last_message) == (2, "05", "Refusée")
        assert first.age == timedelta(days=3)
        assert (first.reason, first.state) == ("hard_decline", "failed")
        assert first.as_dict()["amount"] == "29.90"
        assert first.as_dict()["age_seconds"] == 3 * 86400

        assert [r.charge_id for r in ops.list_failed(session, plan="strict", now=NOW)] == [unknown]
        by_reason = ops.list_failed(session, reason="hard_decline", now=NOW)
        assert [r.charge_id for r in by_reason] == [hard]
        older = ops.list_failed(session, older_than=timedelta(days=1), now=NOW)
        assert [r.charge_id for r in older] == [hard]


def test_charge_story_has_everything_in_order_and_masks_the_alias(db_url: str) -> None:
    with session_scope(db_url) as session:
        sub = add_subscription(session, "r-story")
        charge = add_charge(session, sub, state=ChargeState.FAILED, reason="hard_decline")
        for number in (1, 2):
            session.add(
                Attempt(
                    charge_id=charge.id,
                    number=number,
                    operation="duplicate",
                    amount=charge.amount,
                    worker="w1",
                    started_at=NOW,
                    outcome="declined",
                    code="05",
                )
            )
        ledger.append(session, outcome="declined", operation="duplicate", actor="w1", charge=charge)
        ledger.append(session, outcome="declined", operation="duplicate", actor="w1", charge=charge)
        charge_id = charge.id

    with session_scope(db_url) as session:
        story = ops.charge_story(session, charge_id)
    assert story.charge.id == charge_id
    assert [a.number for a in story.attempts] == [1, 2]
    assert [e.outcome for e in story.ledger] == ["declined", "declined"]
    assert story.ledger[0].id < story.ledger[1].id
    assert story.subscription.alias == "ab12…78"
    assert ALIAS not in repr(story.as_dict())
    assert story.as_dict()["charge"]["amount"] == "29.90"

    with session_scope(db_url) as session, pytest.raises(NotFound, match="charge 999 does not"):
        ops.charge_story(session, 999)


# --- retry ----------------------------------------------------------------------------


def test_retry_puts_a_failed_charge_back_in_line(db_url: str) -> None:
    charge_id = seed(
        db_url,
        "r-retry",
        state=ChargeState.FAILED,
        reason="ladder_exhausted",
        declines=2,
        status=SubscriptionStatus.SUSPENDED,
    )
    with session_scope(db_url) as session:
        ops.retry(session, charge_id, by="alice", reason="customer updated the card", now=NOW)

    charge, sub, rows = load(db_url, charge_id)
    assert charge.state == ChargeState.PENDING
    assert charge.next_attempt_at == NOW
    assert charge.manual is True
    assert charge.reason is None
    assert charge.declines == 0
    assert sub.status == SubscriptionStatus.PAST_DUE
    [row] = rows
    assert (row.outcome, row.operation, row.actor, row.amount) == (
        "retry_requested",
        "person",
        "alice",
        Decimal("0.00"),
    )
    assert row.reason is not None
    assert "ladder_exhausted" in row.reason and "customer updated the card" in row.reason
    assert row.alias_masked == "ab12…78"


def test_retry_of_an_unknown_outcome_needs_the_back_office_check(db_url: str) -> None:
    charge_id = seed(db_url, "r-unk", state=ChargeState.UNKNOWN, reason="stuck_in_flight")
    with session_scope(db_url) as session, pytest.raises(StateError) as refused:
        ops.retry(session, charge_id, by="alice", now=NOW)
    assert str(refused.value) == (
        f"charge {charge_id} has an unknown outcome: check the Klik & Pay back office, "
        "then pass --confirm-not-charged"
    )
    charge, sub, rows = load(db_url, charge_id)
    assert (charge.state, rows) == (ChargeState.UNKNOWN, [])

    with session_scope(db_url) as session:
        ops.retry(session, charge_id, by="bob", confirm_not_charged=True, now=NOW)
    charge, sub, rows = load(db_url, charge_id)
    assert charge.state == ChargeState.PENDING
    assert sub.status == SubscriptionStatus.PAST_DUE
    assert rows[0].actor == "bob"
    assert rows[0].reason is not None and "not charged" in rows[0].reason
    assert rows[0].details is not None and rows[0].details["confirm_not_charged"] is True


def test_retry_keeps_an_active_subscription_active(db_url: str) -> None:
    charge_id = seed(
        db_url,
        "r-act",
        state=ChargeState.FAILED,
        reason="velocity_guard",
        status=SubscriptionStatus.ACTIVE,
    )
    with session_scope(db_url) as session:
        ops.retry(session, charge_id, by="alice", now=NOW)
    charge, sub, _ = load(db_url, charge_id)
    assert (charge.state, charge.manual, sub.status) == ("pending", True, "active")


@pytest.mark.parametrize("state", [ChargeState.APPROVED, ChargeState.PENDING, ChargeState.DECLINED])
def test_actions_refuse_charges_outside_the_queue(sqlite_url: str, state: str) -> None:
    charge_id = seed(sqlite_url, "r-state", state=state)
    actions: list[Callable[[Session], Charge]] = [
        lambda s: ops.retry(s, charge_id, by="a", confirm_not_charged=True),
        lambda s: ops.resolve(
            s, charge_id, approved=False, tx=None, by="a", reason=None, plans=PLANS
        ),
        lambda s: ops.discard(s, charge_id, by="a", reason="gone", plans=PLANS),
    ]
    for action in actions:
        with session_scope(sqlite_url) as session, pytest.raises(StateError) as refused:
            action(session)
        assert f"charge {charge_id} is {state}" in str(refused.value)
    assert load(sqlite_url, charge_id)[2] == []


def test_retry_refuses_a_cancelled_subscription(db_url: str) -> None:
    charge_id = seed(
        db_url,
        "r-cxl",
        state=ChargeState.FAILED,
        reason="hard_decline",
        status=SubscriptionStatus.CANCELLED,
    )
    with session_scope(db_url) as session, pytest.raises(StateError, match="is cancelled"):
        ops.retry(session, charge_id, by="alice")
    assert load(db_url, charge_id)[0].state == ChargeState.FAILED


def test_every_action_names_a_missing_charge(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        actions: tuple[Callable[[], Charge], ...] = (
            lambda: ops.retry(session, 404, by="a"),
            lambda: ops.resolve(
                session, 404, approved=True, tx="T1", by="a", reason=None, plans=PLANS
            ),
            lambda: ops.discard(session, 404, by="a", reason="x", plans=PLANS),
        )
        for action in actions:
            with pytest.raises(NotFound, match="charge 404 does not exist"):
                action()


# --- resolve --------------------------------------------------------------------------


def test_resolve_approved_collects_and_advances_the_subscription(db_url: str) -> None:
    charge_id = seed(
        db_url, "r-ok", state=ChargeState.UNKNOWN, reason="unknown_outcome", next_period=1
    )
    with session_scope(db_url) as session:
        ops.resolve(
            session,
            charge_id,
            approved=True,
            tx="TX-778899",
            by="carol",
            reason="seen in back office",
            plans=PLANS,
            now=NOW,
        )

    charge, sub, rows = load(db_url, charge_id)
    plan = PLANS.plan("monthly")
    assert charge.state == ChargeState.APPROVED
    assert charge.tx == "TX-778899"
    assert charge.collected_amount == Decimal("29.90")
    assert sub.next_period == 2
    # From the anchor (Jan 31, Paris time), period 2 is Mar 31 again, not Mar 28.
    assert sub.next_charge_at == due_at(ANCHOR, plan.every, 2, plan.timezone)
    assert sub.next_charge_at.day == 31
    assert sub.status == SubscriptionStatus.ACTIVE
    assert sub.last_charged_at == NOW
    [row] = rows
    assert (row.outcome, row.operation, row.actor, row.amount, row.tx, row.reason) == (
        "resolved_approved",
        "person",
        "carol",
        Decimal("29.90"),
        "TX-778899",
        "seen in back office",
    )
    assert "resolved_approved" in ledger.COLLECTED


def test_resolve_approved_needs_a_tx(db_url: str) -> None:
    charge_id = seed(db_url, "r-notx", state=ChargeState.FAILED, reason="hard_decline")
    for tx in (None, "  "):
        with session_scope(db_url) as session, pytest.raises(InvalidInput, match="needs --tx"):
            ops.resolve(session, charge_id, approved=True, tx=tx, by="a", reason=None, plans=PLANS)
    with session_scope(db_url) as session, pytest.raises(InvalidInput, match="longer than 64"):
        ops.resolve(
            session, charge_id, approved=True, tx="9" * 65, by="a", reason=None, plans=PLANS
        )
    charge, _, rows = load(db_url, charge_id)
    assert (charge.state, rows) == (ChargeState.FAILED, [])


def test_resolve_approved_deferred_is_an_authorization(db_url: str) -> None:
    charge_id = seed(
        db_url,
        "r-def",
        plan="deferred",
        state=ChargeState.UNKNOWN,
        reason="unknown_outcome",
        next_period=0,
    )
    with session_scope(db_url) as session:
        ops.resolve(
            session, charge_id, approved=True, tx="TX-1", by="a", reason=None, plans=PLANS, now=NOW
        )
    charge, sub, rows = load(db_url, charge_id)
    assert charge.state == ChargeState.AUTHORIZED
    assert charge.authorized_amount == Decimal("120.00")
    assert charge.collected_amount is None
    assert [(r.outcome, r.amount) for r in rows] == [("resolved_authorized", Decimal("120.00"))]
    assert "resolved_authorized" not in ledger.COLLECTED
    assert sub.next_period == 1


def test_resolve_approved_brings_back_the_subscription_it_suspended(db_url: str) -> None:
    charge_id = seed(
        db_url,
        "r-susp",
        state=ChargeState.FAILED,
        reason="hard_decline",
        status=SubscriptionStatus.SUSPENDED,
    )
    with session_scope(db_url) as session:
        ops.resolve(
            session, charge_id, approved=True, tx="TX-2", by="a", reason=None, plans=PLANS, now=NOW
        )
    assert load(db_url, charge_id)[1].status == SubscriptionStatus.ACTIVE


@pytest.mark.parametrize(
    ("plan", "before", "after"),
    [
        ("monthly", SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED),
        ("strict", SubscriptionStatus.PAST_DUE, SubscriptionStatus.CANCELLED),
        ("monthly", SubscriptionStatus.CANCELLED, SubscriptionStatus.CANCELLED),
    ],
)
def test_resolve_declined(db_url: str, plan: str, before: str, after: str) -> None:
    charge_id = seed(
        db_url,
        "r-dec",
        plan=plan,
        status=before,
        state=ChargeState.UNKNOWN,
        reason="unknown_outcome",
    )
    with session_scope(db_url) as session:
        ops.resolve(
            session,
            charge_id,
            approved=False,
            tx=None,
            by="dave",
            reason="declined in back office",
            plans=PLANS,
            now=NOW,
        )
    charge, sub, rows = load(db_url, charge_id)
    assert charge.state == ChargeState.DECLINED
    assert sub.status == after
    assert sub.next_period == 1  # a declined period is not paid: nothing advances
    [row] = rows
    assert (row.outcome, row.actor, row.amount, row.reason) == (
        "resolved_declined",
        "dave",
        Decimal("0.00"),
        "declined in back office",
    )


def test_resolve_declined_refuses_a_tx(sqlite_url: str) -> None:
    charge_id = seed(sqlite_url, "r-dtx", state=ChargeState.FAILED, reason="hard_decline")
    with session_scope(sqlite_url) as session, pytest.raises(InvalidInput, match="--approved"):
        ops.resolve(session, charge_id, approved=False, tx="TX", by="a", reason=None, plans=PLANS)


# --- discard --------------------------------------------------------------------------


def test_discard_gives_up_the_period(db_url: str) -> None:
    charge_id = seed(
        db_url,
        "r-disc",
        state=ChargeState.FAILED,
        reason="hard_decline",
        status=SubscriptionStatus.SUSPENDED,
        next_period=1,
    )
    with session_scope(db_url) as session:
        ops.discard(session, charge_id, by="erin", reason="customer left", plans=PLANS, now=NOW)
    charge, sub, rows = load(db_url, charge_id)
    plan = PLANS.plan("monthly")
    assert charge.state == ChargeState.DISCARDED
    assert sub.next_period == 2
    assert sub.next_charge_at == due_at(ANCHOR, plan.every, 2, plan.timezone)
    assert sub.status == SubscriptionStatus.SUSPENDED  # unchanged
    [row] = rows
    assert (row.outcome, row.operation, row.actor, row.amount, row.reason) == (
        "discarded",
        "person",
        "erin",
        Decimal("0.00"),
        "customer left",
    )


def test_discard_of_an_older_period_leaves_the_subscription_where_it_is(db_url: str) -> None:
    with session_scope(db_url) as session:
        sub = add_subscription(session, "r-old", next_period=3)
        charge_id = add_charge(session, sub, state=ChargeState.FAILED, period=1).id
    with session_scope(db_url) as session:
        ops.discard(session, charge_id, by="erin", reason="old", plans=PLANS, now=NOW)
    assert load(db_url, charge_id)[1].next_period == 3


def test_discard_needs_a_reason(db_url: str) -> None:
    charge_id = seed(db_url, "r-why", state=ChargeState.FAILED, reason="hard_decline")
    for reason in ("", "   "):
        with session_scope(db_url) as session, pytest.raises(InvalidInput, match="--reason"):
            ops.discard(session, charge_id, by="erin", reason=reason, plans=PLANS)
    charge, _, rows = load(db_url, charge_id)
    assert (charge.state, rows) == (ChargeState.FAILED, [])


# --- lost validation / cancellation answers -------------------------------------------


def _lost_validation(url: str) -> int:
    with session_scope(url) as session:
        sub = add_subscription(session, "r-val", plan="deferred", next_period=1)
        charge = add_charge(
            session, sub, state=ChargeState.UNKNOWN, reason="validate_unknown", period=0,
            attempts=2,  # the authorization, then the validation whose answer was lost
        )  # fmt: skip
        charge.tx = "TX-AUTH"
        charge.authorized_amount = Decimal("120.00")
        session.add(
            Attempt(
                charge_id=charge.id,
                number=2,
                operation="validate",
                amount=Decimal("120.00"),
                worker="w1",
                started_at=NOW,
            )
        )
        return charge.id


def test_a_lost_validation_is_never_sent_again_or_discarded(db_url: str) -> None:
    charge_id = _lost_validation(db_url)
    with session_scope(db_url) as session, pytest.raises(StateError, match="lost validate"):
        ops.retry(session, charge_id, by="a", confirm_not_charged=True)
    with session_scope(db_url) as session, pytest.raises(StateError, match="cannot be discarded"):
        ops.discard(session, charge_id, by="a", reason="x", plans=PLANS)
    with session_scope(db_url) as session, pytest.raises(InvalidInput, match="without --tx"):
        ops.resolve(
            session, charge_id, approved=True, tx="TX-NEW", by="a", reason=None, plans=PLANS
        )
    assert load(db_url, charge_id)[0].state == ChargeState.UNKNOWN


def test_resolving_a_lost_validation_settles_it_without_advancing(db_url: str) -> None:
    charge_id = _lost_validation(db_url)
    with session_scope(db_url) as session:
        ops.resolve(
            session,
            charge_id,
            approved=True,
            tx=None,
            by="frank",
            reason="seen",
            plans=PLANS,
            now=NOW,
        )
    charge, sub, rows = load(db_url, charge_id)
    assert charge.state == ChargeState.APPROVED
    assert charge.collected_amount == Decimal("120.00")
    assert charge.tx == "TX-AUTH"
    assert sub.next_period == 1  # the period was advanced when it was authorized
    [row] = rows
    assert (row.outcome, row.actor, row.amount) == (
        "resolved_validated",
        "frank",
        Decimal("120.00"),
    )
