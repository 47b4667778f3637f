"""The outbox: events are written in the transaction of their change, from every writer."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from billing import ops, subscriptions
from billing.db import session_scope
from billing.errors import StateError
from billing.models import (
    Charge,
    ChargeState,
    Event,
    EventDelivery,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from billing.outcomes import Declined
from billing.plans import load_plans
from tests.fixtures.engine import ENGINE_PLANS

ALIAS = "ab12cd34ef56gh78"


def _sub_and_charge(
    url: str, ref: str = "shop-1", state: str = ChargeState.IN_FLIGHT, **charge: Any
) -> tuple[int, int]:
    now = utcnow()
    with session_scope(url) as session:
        sub = Subscription(
            external_ref=ref, plan="monthly", alias=ALIAS, customer_ip="203.0.113.7",
            anchor_at=now, next_period=0, next_charge_at=now, status=SubscriptionStatus.ACTIVE,
        )  # fmt: skip
        session.add(sub)
        session.flush()
        row = Charge(
            subscription_id=sub.id, period=0, due_at=now, plan="monthly", plan_version=1,
            amount=Decimal("29.90"), currency="EUR", merchant_id="1234567",
            state=state, attempts=1, **charge,
        )  # fmt: skip
        session.add(row)
        session.flush()
        return sub.id, row.id


def _events(url: str) -> list[Event]:
    with session_scope(url) as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


def _count(session: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(Event)) or 0)


def test_a_committed_approval_has_its_event_with_the_documented_payload(
    db_url, gateway, make_harness
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    (event,) = _events(db_url)
    with session_scope(db_url) as session:
        (delivery,) = session.scalars(select(EventDelivery))
    # Written with the event: the default endpoint's delivery, waiting for its first post.
    assert event.type == "charge.approved"
    assert (delivery.event_id, delivery.endpoint, delivery.status, delivery.attempts) == (
        event.id, "default", "pending", 0,
    )  # fmt: skip
    assert (event.subscription_id, event.charge_id, event.external_ref) == (
        sub_id, charge.id, "shop-1",
    )  # fmt: skip
    payload = event.payload
    assert payload["id"] == event.event_id and len(event.event_id) == 36
    assert payload["type"] == "charge.approved" and payload["created_at"].endswith("Z")
    assert payload["subscription"] == {"external_ref": "shop-1", "plan": "monthly",
                                       "status": "active"}  # fmt: skip
    assert payload["charge"] == {
        "id": charge.id, "period": 0, "amount": "29.90", "currency": "EUR",
        "state": "approved", "tx": charge.tx, "code": "00", "message": "Transaction acceptee",
    }  # fmt: skip
    assert payload["data"] == {"amount": "29.90", "reason": None}
    # Not even the masked alias travels to the shop.
    assert alias not in json.dumps(payload) and alias[:4] not in json.dumps(payload)


def test_a_change_rolled_back_takes_its_event_with_it(db_url):
    _, charge_id = _sub_and_charge(db_url, reason="hard_decline")
    with session_scope(db_url) as session:
        session.get_one(Charge, charge_id).state = ChargeState.FAILED
    seen_inside = None
    with pytest.raises(RuntimeError), session_scope(db_url) as session:
        ops.discard(
            session, charge_id, by="alice", reason="gave up", plans=load_plans(ENGINE_PLANS)
        )
        seen_inside = _count(session)  # the event is in the change's own transaction
        raise RuntimeError("the command failed before commit")

    assert seen_inside == 1
    assert _events(db_url) == []
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(EventDelivery)) == 0
        assert session.get_one(Charge, charge_id).state == ChargeState.FAILED


def test_held_by_the_velocity_guard_is_one_failed_event(db_url, gateway, make_harness):
    h = make_harness(db_url, min_charge_gap_hours=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias, last_charged_at=utcnow() - timedelta(hours=1))
    h.engine.sweep_plan("monthly")
    h.run_sent()

    (event,) = _events(db_url)
    assert event.type == "charge.failed"
    assert event.payload["data"]["failure"] == "velocity_guard"
    assert gateway.calls(alias=alias) == []
    assert h.charge(sub_id).state == ChargeState.FAILED


def test_a_late_decline_changes_nothing_and_tells_nothing(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    claim = h.engine.claim(charge_id)
    assert h.engine.mark_stuck(utcnow() + timedelta(hours=1)) == 1
    with session_scope(db_url) as session:
        ops.retry(session, charge_id, by="alice", confirm_not_charged=True)
    before = [e.type for e in _events(db_url)]

    result = h.engine.record(claim, Declined(code="51", message="late", soft=True))

    assert result.status == "late"
    assert [e.type for e in _events(db_url)] == before == ["charge.unknown"]


def test_subscription_changes_by_a_person_are_events_with_the_previous_status(db_url):
    plans = load_plans(ENGINE_PLANS)
    sub_id, _ = _sub_and_charge(db_url, state=ChargeState.PENDING)
    later = utcnow() + timedelta(days=3)
    with session_scope(db_url) as session:
        subscriptions.pause(session, "shop-1", by="ops")
    with session_scope(db_url) as session:
        subscriptions.resume(session, "shop-1", plans, now=later, by="ops")
    with session_scope(db_url) as session:
        subscriptions.cancel(session, "shop-1", by="ops", reason="customer left")

    events = _events(db_url)
    assert [e.type for e in events] == [
        "subscription.paused",
        "charge.skipped", "subscription.reactivated",  # period 0 fell due while paused
        "subscription.cancelled",
    ]  # fmt: skip
    changes = [e for e in events if e.type.startswith("subscription.")]
    assert [e.payload["data"]["previous_status"] for e in changes] == [
        "active", "paused", "active",
    ]  # fmt: skip
    assert events[1].payload["charge"]["state"] == "skipped"
    assert events[1].payload["subscription"]["status"] == "active"  # after the whole change
    assert events[-1].payload["subscription"]["status"] == "cancelled"
    assert events[-1].payload["charge"] is None
    assert all(e.subscription_id == sub_id for e in events)


def test_a_move_that_loses_its_race_tells_nothing(db_url):
    _, charge_id = _sub_and_charge(db_url, reason="hard_decline")
    with session_scope(db_url) as session:
        session.get_one(Charge, charge_id).state = ChargeState.FAILED
    plans = load_plans(ENGINE_PLANS)
    with session_scope(db_url) as session:
        ops.discard(session, charge_id, by="alice", reason="gave up", plans=plans)
    with pytest.raises(StateError), session_scope(db_url) as session:
        ops.discard(session, charge_id, by="bob", reason="me too", plans=plans)

    assert [e.type for e in _events(db_url)] == ["charge.discarded"]


# ------------------------------------------------------------- real engine runs


def _types(url: str, sub_id: int) -> list[str]:
    return [e.type for e in _events(url) if e.subscription_id == sub_id]


def test_an_engine_charge_against_the_sandbox_writes_charge_approved(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    (event,) = _events(db_url)
    assert event.type == "charge.approved" and event.charge_id == charge.id
    assert event.payload["charge"]["tx"] == charge.tx and charge.tx
    assert event.payload["charge"]["state"] == "approved"
    assert alias not in json.dumps(event.payload)


def test_a_soft_decline_then_approval_tells_past_due_then_reactivated(
    pg_url, gateway, make_harness
):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="51", times=1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    h.engine.dispatch_due(utcnow() + timedelta(seconds=5))
    h.run_sent()

    assert _types(pg_url, sub_id) == [
        "charge.declined", "subscription.past_due", "charge.approved", "subscription.reactivated",
    ]  # fmt: skip
    declined = _events(pg_url)[0].payload
    assert declined["data"]["soft"] is True and declined["data"]["call"] == "charge"
    assert declined["data"]["next_attempt_at"] and declined["charge"]["code"] == "51"
    assert declined["subscription"]["status"] == "past_due"


def test_a_hard_decline_tells_declined_failed_and_cancelled(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="54")
    sub_id = h.subscribe("shop-1", alias, plan="strict")
    h.engine.sweep_plan("strict")
    h.run_sent()

    assert _types(db_url, sub_id) == [
        "charge.declined", "charge.failed", "subscription.cancelled",
    ]  # fmt: skip
    failed = _events(db_url)[1].payload
    assert failed["data"]["failure"] == "hard_decline" and failed["charge"]["state"] == "failed"


def test_a_person_resolving_a_failed_charge_tells_resolved_then_reactivated(db_url):
    _, charge_id = _sub_and_charge(db_url)
    with session_scope(db_url) as session:
        charge = session.get_one(Charge, charge_id)
        charge.state, charge.reason = ChargeState.FAILED, "ladder_exhausted"
        charge.subscription.status = SubscriptionStatus.SUSPENDED
    with session_scope(db_url) as session:  # what the engine told the shop then
        from billing.charging.rows import load_charge, load_subscription
        from billing.events import charge_event, subscription_event
        from billing.vocabulary import EventType

        row = load_charge(session, charge_id)
        sub_row = load_subscription(session, row.subscription_id)
        charge_event(session, EventType.CHARGE_FAILED, row, sub_row, failure=row.reason)
        subscription_event(session, EventType.SUBSCRIPTION_SUSPENDED, sub_row, previous="active")
    with session_scope(db_url) as session:
        ops.resolve(session, charge_id, approved=True, tx="TX-77", by="alice",
                    reason="seen in the back office", plans=load_plans(ENGINE_PLANS))  # fmt: skip

    events = _events(db_url)
    assert [e.type for e in events] == [
        "charge.failed", "subscription.suspended", "charge.resolved", "subscription.reactivated",
    ]  # fmt: skip
    resolved = events[2].payload
    assert resolved["data"] == {"amount": "29.90", "reason": "seen in the back office",
                                "resolution": "approved", "by": "alice"}  # fmt: skip
    assert resolved["charge"]["state"] == "approved" and resolved["charge"]["tx"] == "TX-77"
    assert events[3].payload["data"] == {"previous_status": "suspended"}
