"""Attack review: the shop's events.

``billing.events.emit`` promises "the subscription and charge as they are *after* the
change". The engine's ``_approved`` keeps it (it passes ``advanced.after``); these tests
look at the paths that pass an older snapshot, and at a move that tells the shop nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from billing import ops, subscriptions
from billing.db import session_scope
from billing.models import ChargeState, Event, utcnow
from tests.test_charge_races import Background


def _events(url: str, charge_id: int | None = None, sub_id: int | None = None) -> list[Any]:
    with session_scope(url) as session:
        query = select(Event.type, Event.payload).order_by(Event.id)
        if charge_id is not None:
            query = query.where(Event.charge_id == charge_id)
        if sub_id is not None:
            query = query.where(Event.subscription_id == sub_id)
        return list(session.execute(query))


# SHOWS (misleading shop view): calls._declined falls back to ``claim.subscription`` (read
# at claim time) when the subscription's status did not move; a person paused the
# subscription while the call was in flight, and ``charge.declined`` tells the shop the
# subscription is ``active`` although it is ``paused`` when the event commits.
# Same fallback in _not_sent, _unknown, record_unknown and settlement._events.
# FAILS today on PostgreSQL and SQLite.
def test_a_declined_event_names_the_subscription_as_it_is_after_the_change(
    db_url, gateway, make_harness
):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, hold=True, times=1, decline="51")
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    worker = Background(lambda: h.engine.charge(charge_id), "worker")
    gateway.wait_held(alias)
    with session_scope(db_url) as session:
        subscriptions.pause(session, "shop-1", by="alice")
    gateway.release(alias)
    worker.join()

    assert h.sub(sub_id).status == "paused"
    (declined,) = [p for t, p in _events(db_url, charge_id) if t == "charge.declined"]
    assert declined["subscription"]["status"] == "paused", declined["subscription"]


# SHOWS (misleading shop view): ops.resolve writes ``charge.resolved`` before it moves the
# subscription, so the event names the status from before the resolution (``suspended``)
# while the same transaction makes it ``active``.
# FAILS today on PostgreSQL and SQLite.
def test_a_resolved_event_names_the_subscription_after_the_resolution(
    db_url, gateway, make_harness
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="54", times=1)  # hard decline: suspended
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    charge = h.charge(sub_id)
    assert (charge.state, h.sub(sub_id).status) == (ChargeState.FAILED, "suspended")

    with session_scope(db_url) as session:
        ops.resolve(
            session, charge.id, approved=True, tx="T-BO-1", by="alice",
            reason="the back office shows it paid", plans=h.plans,
        )  # fmt: skip

    assert h.sub(sub_id).status == "active"
    (resolved,) = [p for t, p in _events(db_url, charge.id) if t == "charge.resolved"]
    assert resolved["subscription"]["status"] == "active", resolved["subscription"]


# SHOWS (misleading shop view): resume moves a waiting charge to ``skipped`` and writes no
# event for it. The shop was last told ``charge.declined`` with a ``next_attempt_at``; it is
# never told that retry will not happen.
# FAILS today on PostgreSQL and SQLite.
def test_a_charge_skipped_by_resume_is_told_to_the_shop(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="51", times=1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    charge = h.charge(sub_id)
    assert charge.state == ChargeState.PENDING
    with session_scope(db_url) as session:
        subscriptions.pause(session, "shop-1", by="alice")
    with session_scope(db_url) as session:
        subscriptions.resume(
            session, "shop-1", h.plans, now=utcnow() + timedelta(days=65), by="alice"
        )

    assert h.charge(sub_id).state == ChargeState.SKIPPED
    last = _events(db_url, charge.id)[-1]
    assert last[1]["charge"]["state"] == "skipped", [t for t, _ in _events(db_url, charge.id)]
