"""Dispatching on PostgreSQL: its cost does not grow with the charges waiting, and a
dispatch that meets another one waits for it instead of leaving its room unfilled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import create_engine, select

from billing import broker
from billing.charging import dispatch
from billing.charging.dispatch import DISPATCH_LOCK, due_charges
from billing.db import session_scope
from billing.models import Charge, ChargeState, utcnow
from billing.settings import Settings


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _fill(url: str, count: int, due: datetime) -> None:
    """``count`` active subscriptions, each with a pending charge due at one moment (what
    a sweep leaves: every charge of a plan's period shares its ``next_attempt_at``)."""
    with psycopg.connect(_plain(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO subscriptions (external_ref, plan, alias, customer_ip, anchor_at,"
            " next_period, next_charge_at, status, created_at, updated_at)"
            " SELECT 'ref-' || g, 'monthly', 'alias' || g, '203.0.113.7', %s, 1, %s,"
            " 'active', %s, %s FROM generate_series(1, %s) g",
            (due, due, due, due, count),
        )
        conn.execute(
            "INSERT INTO charges (subscription_id, period, due_at, plan, plan_version, amount,"
            " currency, merchant_id, deferred, manual, state, attempts, declines, created_at,"
            " updated_at, next_attempt_at) SELECT id, 0, %s, 'monthly', 1, 29.90, 'EUR',"
            " '1234567', false, false, 'pending', 0, 0, %s, %s, %s FROM subscriptions",
            (due, due, due, due),
        )
        conn.execute("ANALYZE")


def test_a_dispatch_reads_its_charges_in_index_order_however_many_wait(pg_url):
    due = datetime(2026, 12, 1, 12, tzinfo=UTC)
    _fill(pg_url, 30_000, due)
    statement = due_charges(due + timedelta(hours=1), 16)
    sql = str(statement.compile(create_engine(pg_url), compile_kwargs={"literal_binds": True}))
    with psycopg.connect(_plain(pg_url)) as conn:
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql))
    assert "ix_charges_dispatch" in plan, plan
    assert "Sort" not in plan, plan  # no sort of every waiting charge per dispatch


def test_a_dispatch_waits_for_another_and_then_fills_the_room(pg_url, gateway, make_harness):
    """A refill that finds another dispatch under way used to give up (a *try* of the
    advisory lock): the other had counted the room before this charge finished, so the slot
    stayed empty — with no beat, the last refills giving up left charges pending for ever
    (``make bench-scale`` at N = 100,000 stalled so after 582 charges)."""
    h = make_harness(pg_url, max_in_flight=4)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 6)):
        h.subscribe(f"shop-{i}", alias)
    h.engine.sweep_plan("monthly")
    assert h.engine.dispatch_due() == 0 and len(h.take_sent()) == 4
    with session_scope(pg_url) as session:  # two of the four finish
        session.query(Charge).filter(Charge.state == ChargeState.QUEUED).filter(
            Charge.id.in_(
                session.query(Charge.id).filter(Charge.state == ChargeState.QUEUED).limit(2)
            )
        ).update({"state": ChargeState.APPROVED}, synchronize_session=False)

    results: list[int] = []
    with psycopg.connect(_plain(pg_url)) as holder:  # another dispatcher's transaction
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (DISPATCH_LOCK,))
        worker = threading.Thread(target=lambda: results.append(h.engine.dispatch_due()))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive(), "the dispatch gave up instead of waiting"
        holder.rollback()
    worker.join(10)
    assert results == [2] and len(h.take_sent()) == 2


def test_a_dispatch_whose_send_fails_leaves_its_charges_to_the_next_one(
    db_url, gateway, make_harness
):
    """A send that fails (the broker is down) used to leave its charges ``queued``: no
    message anywhere, yet counted in flight until ``BILLING_REQUEUE_AFTER_SECONDS`` (10
    minutes) — a broker blip froze dispatching that long. They go back to ``pending``, and
    the next dispatch sends them at once."""
    h = make_harness(db_url, max_in_flight=10)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 3)):
        h.subscribe(f"shop-{i}", alias)
    dead = broker.sending_app(Settings(broker_url="redis://127.0.0.1:1/0", queue="nowhere"))
    working = h.engine.ctx.dispatcher
    h.engine.ctx.dispatcher = lambda ids: broker.send_charges(dead, ids, 8)

    with pytest.raises(OperationalError):
        h.engine.sweep_plan("monthly")

    with session_scope(db_url) as session:
        assert set(session.scalars(select(Charge.state))) == {ChargeState.PENDING}
    h.engine.ctx.dispatcher = working
    assert h.engine.dispatch_due() == 3 and len(h.take_sent()) == 3


def test_a_requeue_whose_send_fails_leaves_its_charges_to_the_next_dispatch(
    pg_url, gateway, make_harness
):
    """The engine sweep's re-send of lost messages used to leave its charges queued for
    another 10 minutes when the broker was down for it too."""
    h = make_harness(pg_url, max_in_flight=10)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 2)):
        h.subscribe(f"shop-{i}", alias)
    h.engine.sweep_plan("monthly")
    assert len(h.take_sent()) == 2  # their messages are lost
    dead = broker.sending_app(Settings(broker_url="redis://127.0.0.1:1/0", queue="nowhere"))
    working = h.engine.ctx.dispatcher
    h.engine.ctx.dispatcher = lambda ids: broker.send_charges(dead, ids, 8)
    later = utcnow() + timedelta(hours=1)

    with pytest.raises(OperationalError):
        h.engine.requeue_lost(later)

    h.engine.ctx.dispatcher = working
    assert h.engine.dispatch_due(later) == 2 and len(h.take_sent()) == 2


def _statements_of(url: str, block: Callable[[], object]) -> list[str]:
    from sqlalchemy import event

    from billing.db import get_engine

    seen: list[str] = []

    def count(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        seen.append(sql)

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        block()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return seen


def test_a_dispatch_is_two_round_trips(pg_url, gateway, make_harness):
    """A refill runs every few charges: its lock (bound, lock, bound lifted) used to take
    five statements with a savepoint, and the room a count of its own. Now the lock is one
    round trip and the room is counted by the move that sends."""
    h = make_harness(pg_url, max_in_flight=3)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 5)):
        h.subscribe(f"shop-{i}", alias)
    h.engine.sweep_plan("monthly")
    assert len(h.take_sent()) == 3
    with session_scope(pg_url) as session:  # one of the three finishes
        first = session.scalars(select(Charge).where(Charge.state == ChargeState.QUEUED)).first()
        assert first is not None
        first.state = ChargeState.APPROVED

    seen = _statements_of(pg_url, h.engine.dispatch_due)

    assert len(seen) == 2, seen
    assert len(h.take_sent()) == 1  # the room: 3 less the 2 still queued
    assert h.engine.dispatch_due() == 0  # and none beyond the bound


def test_a_dispatch_that_waits_too_long_gives_up_cleanly(
    pg_url, gateway, make_harness, monkeypatch
):
    """Past the lock's bound the dispatch sends nothing, leaves nothing half-done, and the
    next one, once the lock is free, fills the room."""
    monkeypatch.setattr(dispatch, "DISPATCH_LOCK_WAIT", "200ms")
    h = make_harness(pg_url, max_in_flight=4)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 2)):
        h.subscribe(f"shop-{i}", alias)
    with psycopg.connect(_plain(pg_url)) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (DISPATCH_LOCK,))
        assert h.engine.sweep_plan("monthly").dispatched == 0
        holder.rollback()
    with session_scope(pg_url) as session:
        assert set(session.scalars(select(Charge.state))) == {ChargeState.PENDING}
    assert h.engine.dispatch_due() == 2 and len(h.take_sent()) == 2
