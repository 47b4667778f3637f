"""The engine against a real database and the gateway over real HTTP, one step at a time."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from billing import broker, dates
from billing.charging import context
from billing.db import session_scope
from billing.engine import Engine
from billing.errors import ConfigError
from billing.models import Charge, ChargeState, LedgerEntry, SubscriptionStatus, utcnow
from billing.plans import load_plans
from billing.settings import Settings
from tests.fixtures.engine import ENGINE_PLANS


def test_sweep_creates_one_charge_per_due_subscription_and_a_second_sweep_nothing(
    db_url, gateway, make_harness
):
    h = make_harness(db_url)
    aliases = gateway.seed_aliases("1234567", 3)
    subs = [h.subscribe(f"shop-{i}", alias) for i, alias in enumerate(aliases)]
    h.subscribe("not-yet", aliases[0], next_charge_at=utcnow() + timedelta(days=3))

    first = h.engine.sweep_plan("monthly")
    second = h.engine.sweep_plan("monthly")

    assert (first.created, first.dispatched) == (3, 3)
    assert (second.created, second.dispatched) == (0, 0)
    assert sorted(h.take_sent()) == sorted(h.charge(s).id for s in subs)
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(Charge)) == 3


def test_approved_charge_moves_the_subscription_to_its_next_period(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")

    assert h.run_sent() == ["done"]

    charge = h.charge(sub_id)
    sub = h.sub(sub_id)
    plan = h.plans.plan("monthly")
    assert charge.state == ChargeState.APPROVED
    assert charge.collected_amount == Decimal("29.90") and charge.tx
    assert sub.next_period == 1 and sub.status == SubscriptionStatus.ACTIVE
    assert sub.next_charge_at == dates.due_at(sub.anchor_at, plan.every, 1, plan.timezone)
    (entry,) = h.ledger(sub_id)
    assert (entry.outcome, entry.amount, entry.currency, entry.merchant_id) == (
        "approved", Decimal("29.90"), "EUR", "1234567",
    )  # fmt: skip
    assert entry.tx == charge.tx and alias not in (entry.alias_masked or "")
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1


def test_an_approved_charge_is_one_log_line_with_its_transaction(
    db_url, gateway, make_harness, caplog
):
    """The README's promise, one line per charge outcome: the charge's line carries what
    the gateway's own line said (TX, HTTP status), and the gateway's line of an answered
    call is DEBUG (an unanswered one stays a warning of its own)."""
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    caplog.set_level(logging.DEBUG, logger="billing")
    caplog.clear()

    assert h.run_sent() == ["done"]

    charge = h.charge(sub_id)
    lines = [r for r in caplog.records if r.name.startswith("billing") and r.levelno >= 20]
    [line] = [r for r in lines if "charge outcome" in r.getMessage()]
    assert lines == [line], [r.getMessage() for r in lines]
    assert f"tx={charge.tx}" in line.getMessage() and "http=200" in line.getMessage()
    assert (line.tx, line.http_status) == (charge.tx, 200)  # type: ignore[attr-defined]
    assert alias not in line.getMessage()
    [call] = [r for r in caplog.records if r.name == "billing.gateway"]
    assert call.levelno == logging.DEBUG


def test_an_approval_whose_record_fails_still_leaves_its_tx_in_the_logs(
    db_url, gateway, make_harness, caplog, monkeypatch
):
    """Since the gateway's line of an answered call is DEBUG, the charge's line is the one
    that names the TX; when the record fails (the database stays away) that line is never
    written, and the TX was in no log at all (found by review)."""
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    monkeypatch.setattr(context, "RECORD_RETRY_PAUSES", ())

    def database_down(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("UPDATE charges", {}, Exception("database down"))

    monkeypatch.setattr(h.engine.calls, "record", database_down)
    caplog.set_level(logging.INFO, logger="billing")
    with pytest.raises(OperationalError):
        h.engine.charge(charge_id)
    [call] = gateway.calls(alias=alias, script="duplicate")
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"tx={call['tx']}" in line and "outcome=approved" in line for line in said), said


def test_soft_decline_waits_on_the_ladder_then_recovers(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="51", times=1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    assert charge.state == ChargeState.PENDING and charge.declines == 1
    assert h.sub(sub_id).status == SubscriptionStatus.PAST_DUE
    assert charge.next_attempt_at is not None
    # The ladder's first step is 2 seconds: not due before, due after.
    assert h.engine.dispatch_due(charge.next_attempt_at - timedelta(seconds=1)) == 0
    assert h.engine.dispatch_due(charge.next_attempt_at + timedelta(seconds=1)) == 1
    h.run_sent()

    assert h.charge(sub_id).state == ChargeState.APPROVED
    assert h.sub(sub_id).status == SubscriptionStatus.ACTIVE
    assert [e.outcome for e in h.ledger(sub_id)] == ["declined", "approved"]
    assert len(gateway.calls(alias=alias, script="duplicate")) == 2


def test_spent_ladder_fails_the_charge_and_suspends(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="05")
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    for _ in range(2):  # the ladder has two steps
        h.engine.dispatch_due(utcnow() + timedelta(seconds=5))
        h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason, charge.declines) == (
        ChargeState.FAILED, "ladder_exhausted", 3,
    )  # fmt: skip
    assert h.sub(sub_id).status == SubscriptionStatus.SUSPENDED
    assert h.engine.dispatch_due(utcnow() + timedelta(days=30)) == 0


def test_hard_decline_fails_at_once_and_the_plan_cancels(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="54")
    sub_id = h.subscribe("shop-1", alias, plan="strict")
    h.engine.sweep_plan("strict")
    h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason, charge.last_code) == (
        ChargeState.FAILED, "hard_decline", "54",
    )  # fmt: skip
    assert h.sub(sub_id).status == SubscriptionStatus.CANCELLED


def test_not_sent_is_retried_and_charged_once(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, unavailable=2)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()

    results = [h.engine.charge(charge_id, retries=n) for n in range(3)]

    assert [r.status for r in results] == ["retry", "retry", "done"]
    assert all(0 < (r.retry_in or 0) <= 600 for r in results[:2])
    assert h.charge(sub_id).state == ChargeState.APPROVED
    recorded = [c for c in gateway.calls(alias=alias, script="duplicate") if c["recorded"]]
    assert len(recorded) == 1
    assert [e.outcome for e in h.ledger(sub_id)] == ["not_sent", "not_sent", "approved"]


def test_not_sent_retries_are_bounded(pg_url, gateway, make_harness):
    h = make_harness(pg_url, not_sent_max_retries=1)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, unavailable=5)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()

    assert h.engine.charge(charge_id, retries=0).status == "retry"
    assert h.engine.charge(charge_id, retries=1).status == "done"
    assert (h.charge(sub_id).state, h.charge(sub_id).reason) == (
        ChargeState.FAILED, "not_sent_exhausted",
    )  # fmt: skip


def test_lost_answer_is_unknown_and_never_retried(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, drop_after_record=True)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason) == (ChargeState.UNKNOWN, "unknown_outcome")
    later = utcnow() + timedelta(days=62)
    # Neither the engine sweep nor later plan sweeps send anything for this subscription.
    assert h.engine.engine_sweep(later).dispatched == 0
    assert h.engine.sweep_plan("monthly", later).created == 0
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    assert [e.outcome for e in h.ledger(sub_id)] == ["unknown"]


def test_a_charge_stuck_in_flight_becomes_unknown_and_is_not_sent_again(
    pg_url, gateway, make_harness
):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    # A worker claimed it and died before recording anything.
    with session_scope(pg_url) as session:
        session.execute(
            update(Charge)
            .where(Charge.id == charge_id)
            .values(state=ChargeState.IN_FLIGHT, claimed_at=utcnow() - timedelta(minutes=5))
        )

    assert h.engine.engine_sweep().stuck == 1
    assert h.charge(sub_id).state == ChargeState.UNKNOWN
    assert h.engine.charge(charge_id).status == "not_claimed"
    assert gateway.calls(alias=alias, script="duplicate") == []


def test_a_redelivered_or_requeued_message_charges_once(pg_url, gateway, make_harness):
    h = make_harness(pg_url, requeue_after_seconds=30)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    # The broker "lost" the message: the engine sweep sends it again after the timeout.
    assert h.engine.requeue_lost(utcnow() + timedelta(seconds=10)) == 0
    assert h.engine.requeue_lost(utcnow() + timedelta(seconds=31)) == 1
    assert h.take_sent() == [charge_id]

    first = h.engine.charge(charge_id)
    second = h.engine.charge(charge_id)  # the original message after all

    assert (first.status, second.status) == ("done", "not_claimed")
    assert h.charge(sub_id).state == ChargeState.APPROVED
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1


def test_dispatch_never_exceeds_the_in_flight_bound(pg_url, gateway, make_harness):
    h = make_harness(pg_url, max_in_flight=4)
    aliases = gateway.seed_aliases("1234567", 10)
    for i, alias in enumerate(aliases):
        h.subscribe(f"shop-{i}", alias)

    assert h.engine.sweep_plan("monthly").dispatched == 4
    assert h.engine.dispatch_due() == 0
    statuses = h.run_sent()  # each finished charge refills one slot

    assert statuses.count("done") == 10
    with session_scope(pg_url) as session:
        states = session.scalars(select(Charge.state)).all()
    assert states.count(ChargeState.APPROVED) == 10


def test_overdue_latest_charges_once_and_skips_older_periods(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    plan = h.plans.plan("monthly")
    now = utcnow()
    anchor = now - timedelta(days=70)  # periods 0, 1 and 2 are all due
    sub_id = h.subscribe("shop-1", alias, next_charge_at=anchor)

    result = h.engine.sweep_plan("monthly", now)
    h.run_sent()

    assert (result.created, result.skipped_periods) == (1, 2)
    assert h.charge(sub_id, period=2).state == ChargeState.APPROVED
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    entries = h.ledger(sub_id)
    assert [e.outcome for e in entries] == ["skipped", "skipped", "approved"]
    assert all(e.amount == 0 for e in entries[:2])
    assert "catch_up=latest" in (entries[0].reason or "")
    assert h.sub(sub_id).next_charge_at == dates.due_at(anchor, plan.every, 3, plan.timezone)


def test_overdue_all_charges_each_period_spaced_apart(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("7654321", 1)
    now = utcnow()
    sub_id = h.subscribe(
        "shop-1", alias, plan="weekly-all", next_charge_at=now - timedelta(days=15)
    )

    for k in range(3):
        moment = now + k * timedelta(days=1, minutes=1)
        if k:  # two hours too early: the period is due but a day has not passed
            with freeze_time(moment - timedelta(hours=2), tick=True):
                early = h.engine.sweep_plan("weekly-all")
            assert (early.created, early.dispatched) == (1, 0)
        with freeze_time(moment, tick=True):
            h.engine.sweep_plan("weekly-all")
            assert len(h.sent) == 1
            h.run_sent()

    assert len(gateway.calls(alias=alias, script="duplicate")) == 3
    assert [c.state for c in (h.charge(sub_id, p) for p in range(3))] == [ChargeState.APPROVED] * 3


def test_velocity_guard_holds_a_second_charge_within_the_gap(pg_url, gateway, make_harness):
    h = make_harness(pg_url, min_charge_gap_hours=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias, last_charged_at=utcnow() - timedelta(hours=3))
    h.engine.sweep_plan("monthly")
    statuses = h.run_sent()

    charge = h.charge(sub_id)
    assert statuses == ["held"]
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "velocity_guard")
    assert gateway.calls(alias=alias, script="duplicate") == []
    assert [e.outcome for e in h.ledger(sub_id)] == ["held"]


def test_ledger_rows_never_hold_the_alias_or_the_private_key(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, garbage=True)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    with session_scope(db_url) as session:
        rows = session.scalars(select(LedgerEntry)).all()
    text = " ".join(str(vars(r)) for r in rows)
    assert rows and "test-key-eur" not in text and alias not in text
    assert h.charge(sub_id).state == ChargeState.UNKNOWN


def test_a_charge_of_a_plan_no_longer_in_the_file_is_held_not_sent(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    del h.plans.plans["monthly"]  # someone removed the plan between sweep and charge

    assert h.engine.charge(charge_id).status == "held"

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "unknown_plan")
    assert "no longer in the plans file" in (charge.last_message or "")
    assert gateway.calls(alias=alias) == []


def test_an_outcome_is_recorded_even_if_the_database_connection_drops_once(
    pg_url, gateway, make_harness
):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    # Cut every pooled connection of this database while the call is in the sandbox.
    gateway.set_behaviour(alias, slow=0.5)
    from threading import Timer

    from billing.db import get_engine

    def cut() -> None:
        with get_engine(pg_url).connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )

    Timer(0.2, cut).start()
    assert h.engine.charge(charge_id).status == "done"

    assert h.charge(sub_id).state == ChargeState.APPROVED
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1


def _cut_every_connection(url: str) -> int:
    """``pg_terminate_backend`` every other connection to the database (a restart, as the
    pooled connections see it); how many were cut."""
    import psycopg

    from billing.harness.databases import plain_url

    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_a_charge_after_every_pooled_connection_was_cut_is_claimed_and_recorded_once(
    pg_url, gateway, make_harness
):
    # The hot path checks connections out without a ping: a pool whose connections all
    # died between two charges (PostgreSQL restarted) must still claim, call and record.
    h = make_harness(pg_url)
    first, second = gateway.seed_aliases("1234567", 2)
    subs = [h.subscribe("shop-1", first), h.subscribe("shop-2", second)]
    h.engine.sweep_plan("monthly")
    one, two = sorted(h.take_sent())
    assert h.engine.charge(one).status == "done"  # the pool now holds a used connection
    assert _cut_every_connection(pg_url) >= 1

    assert h.engine.charge(two).status == "done"

    assert [h.charge(sub).state for sub in subs] == [ChargeState.APPROVED] * 2
    assert len(gateway.calls(alias=second, script="duplicate")) == 1


def test_the_hot_path_pings_no_connection(pg_url, gateway, make_harness, monkeypatch):
    # A ping is a PostgreSQL transaction of its own; the claim and the approval are
    # retried on a broken connection instead (billing.charging.calls).
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    h = make_harness(pg_url)
    aliases = gateway.seed_aliases("1234567", 3)
    for index, alias in enumerate(aliases):
        h.subscribe(f"shop-{index}", alias)
    h.engine.sweep_plan("monthly")
    ids = sorted(h.take_sent())
    assert h.engine.charge(ids[0]).status == "done"  # warm: the pool's connection is reused
    pings: list[object] = []
    original = PGDialect_psycopg.do_ping

    def counted(self: PGDialect_psycopg, dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        return bool(original(self, dbapi_connection))

    monkeypatch.setattr(PGDialect_psycopg, "do_ping", counted)

    assert [h.engine.charge(i).status for i in ids[1:]] == ["done", "done"]

    assert pings == []
    with session_scope(pg_url) as session:  # every other checkout still pings
        session.execute(select(1))
    assert len(pings) == 1


def test_an_amount_change_applies_from_the_next_period_not_yet_charged(
    pg_url, gateway, make_harness, tmp_path
):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")  # period 0's charge is created at 29.90, not yet sent
    repriced = tmp_path / "plans.toml"
    repriced.write_text(ENGINE_PLANS.read_text().replace('amount = "29.90"', 'amount = "34.90"'))
    h.engine.ctx.fixed_plans = load_plans(repriced)

    h.run_sent()
    with freeze_time(utcnow() + timedelta(days=32), tick=True):
        h.engine.sweep_plan("monthly")
        h.run_sent()

    first, second = h.charge(sub_id, 0), h.charge(sub_id, 1)
    assert (first.amount, first.plan_version) == (Decimal("29.90"), 1)
    assert (second.amount, second.plan_version) == (Decimal("34.90"), 2)
    assert [c["amount"] for c in gateway.calls(alias=alias, script="duplicate")] == [
        "29.90", "34.90",
    ]  # fmt: skip


def test_a_missing_private_key_claims_nothing_and_sends_nothing(
    pg_url, gateway, make_harness, monkeypatch
):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    monkeypatch.delenv("KLIKANDPAY_KEY_EUR")

    with pytest.raises(ConfigError, match="KLIKANDPAY_KEY_EUR"):
        h.engine.charge(charge_id)

    charge = h.charge(sub_id)
    assert (charge.state, charge.attempts) == (ChargeState.QUEUED, 0)
    assert gateway.calls(alias=alias) == []


def test_a_refill_that_cannot_reach_the_broker_leaves_the_charge_done(
    pg_url, gateway, make_harness
):
    """The refill after a charge is an optimisation (the engine sweep dispatches anyway):
    a broker it cannot reach must not turn a recorded charge into a task error, which
    would dead-letter a message whose charge was made."""
    h = make_harness(pg_url, max_in_flight=1)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 2)):
        h.subscribe(f"shop-{i}", alias)
    assert h.engine.sweep_plan("monthly").dispatched == 1
    (first,) = h.take_sent()
    # From now on sends go to a broker nobody runs: Kombu raises its OperationalError.
    dead = broker.sending_app(Settings(broker_url="redis://127.0.0.1:1/0", queue="nowhere"))
    h.engine.ctx.dispatcher = lambda ids: broker.send_charges(dead, ids, 8)

    result = h.engine.charge(first)

    assert result.status == "done"
    with session_scope(pg_url) as session:
        states = sorted(session.scalars(select(Charge.state)))
    # The second charge, queued for the failed send, is due again for the next dispatch.
    assert states == sorted([ChargeState.APPROVED, ChargeState.PENDING])


def test_many_processes_never_leave_the_pipeline_dry(pg_url, gateway, make_harness):
    """Each process refilled after a count of its own finished charges: with a quarter of
    the bound as the count, five processes could each finish just short of it while every
    charge in flight finished, and with no beat the charges still due waited for ever
    (found by review: ``make bench`` on a 5-core machine would stall after one wave). A
    message of several charges now refills once it is done."""
    h = make_harness(pg_url, max_in_flight=20)
    for i, alias in enumerate(gateway.seed_aliases("1234567", 25)):
        h.subscribe(f"shop-{i}", alias)
    h.engine.sweep_plan("monthly")
    wave = h.take_sent()
    assert len(wave) == 20
    processes = [
        Engine(
            h.engine.settings, plans=h.plans, client=h.engine.ctx.client,
            dispatcher=h.sent.extend, limiter=None, actor=f"process-{n}",
        )
        for n in range(5)
    ]  # fmt: skip
    for n, process in enumerate(processes):  # one message of 4 charges each, as Redis deals
        results = process.charge_many(wave[n * 4 : (n + 1) * 4])
        assert [r.status for r in results] == ["done"] * 4
    assert len(h.take_sent()) == 5, "the 5 charges still due were left for beat"
