"""The state machine's promise under interleavings (issue 13): every numbered case there.

Each test drives the real engine, a real database (PostgreSQL and SQLite) and the sandbox
over HTTP. The sandbox's ``hold`` behaviour keeps a call's answer until the test releases
it, so "the answer of attempt 1 arrives while attempt 2 is in flight" happens exactly then,
not by timing luck.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, select

from billing import ops, reports, subscriptions
from billing.db import get_engine, session_scope
from billing.errors import BillingError, ConfigError, StateError
from billing.gateway import KlikAndPayClient
from billing.models import Attempt, ChargeState, LedgerEntry, utcnow

LATER = timedelta(hours=1)


class Background:
    """Run a call in a thread and keep what it returned or raised."""

    def __init__(self, fn: Callable[[], Any], name: str = "background") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _attempts(url: str, charge_id: int) -> list[Attempt]:
    with session_scope(url) as session:
        return list(
            session.scalars(
                select(Attempt).where(Attempt.charge_id == charge_id).order_by(Attempt.id)
            )
        )


def _rows(url: str, charge_id: int) -> list[LedgerEntry]:
    with session_scope(url) as session:
        return list(
            session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.charge_id == charge_id)
                .order_by(LedgerEntry.id)
            )
        )


def _unknown_with_a_held_call(h: Any, gateway: Any, alias: str, **first: Any) -> tuple[int, Any]:
    """A charge whose first call is held at the gateway past the stuck cutoff: the engine
    sweep has marked it unknown while its worker still waits for the answer."""
    gateway.set_behaviour(alias, hold=True, times=1, **first)
    h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    worker = Background(lambda: h.engine.charge(charge_id), "attempt-1")
    gateway.wait_held(alias)
    assert h.engine.mark_stuck(utcnow() + LATER) == 1
    return charge_id, worker


def _person_retries(url: str, charge_id: int) -> None:
    with session_scope(url) as session:
        ops.retry(session, charge_id, by="alice", confirm_not_charged=True)


def _approved_calls(gateway: Any, alias: str) -> list[dict[str, Any]]:
    return [c for c in gateway.calls(alias=alias, script="duplicate") if c["result"] == "approved"]


# --- 1 ----------------------------------------------------------------------------------


def test_1_a_late_decline_of_an_old_attempt_does_not_drive_the_new_one(
    db_url, gateway, make_harness
):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias, decline="51")
    _person_retries(db_url, charge_id)
    gateway.set_behaviour(alias, hold=True, times=1)  # attempt 2: held, then approved
    h.engine.dispatch_due()
    assert h.take_sent() == [charge_id]
    second = Background(lambda: h.engine.charge(charge_id), "attempt-2")
    gateway.wait_held(alias, 2)

    gateway.release(alias)  # attempt 1's soft decline arrives while attempt 2 is in flight
    first.join()
    gateway.release(alias)  # then attempt 2's approval
    second.join()

    charge = h.charge(h.charge_sub(charge_id))
    (approval,) = _approved_calls(gateway, alias)
    assert (charge.state, charge.tx, charge.collected_amount) == (
        ChargeState.APPROVED, approval["tx"], Decimal("29.90"),
    )  # fmt: skip
    one, two = _attempts(db_url, charge_id)
    money = [(e.outcome, e.amount, e.attempt_id) for e in _rows(db_url, charge_id) if e.amount]
    assert money == [("approved", Decimal("29.90"), two.id)]
    late = [e for e in _rows(db_url, charge_id) if e.attempt_id == one.id and e.actor != "alice"]
    assert [e.outcome for e in late if e.operation == "duplicate"] == ["late_answer"]
    # No ladder step was scheduled by the old attempt's decline: nothing is charged again.
    assert h.engine.dispatch_due(utcnow() + timedelta(days=30)) == 0
    assert len(gateway.calls(alias=alias, script="duplicate")) == 2


# --- 2 ----------------------------------------------------------------------------------


def test_2_a_late_approval_while_a_retry_is_queued_stops_the_retry(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)
    _person_retries(db_url, charge_id)
    h.engine.dispatch_due()
    assert h.take_sent() == [charge_id]  # the retry's message is on its way

    gateway.release(alias)  # attempt 1's approval arrives now
    first.join()
    result = h.engine.charge(charge_id)  # the retry's message is delivered

    assert result.status == "not_claimed"
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    charge = h.charge(h.charge_sub(charge_id))
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "late_approval")
    (approval,) = _approved_calls(gateway, alias)
    (late,) = [e for e in _rows(db_url, charge_id) if e.outcome == "late_answer"]
    assert (late.tx, late.amount, late.details["answer"]) == (approval["tx"], 0, "approved")
    with session_scope(db_url) as session:
        queued = {r.charge_id: r.reason for r in ops.list_failed(session)}
    assert queued == {charge_id: "late_approval"}


# --- 3 ----------------------------------------------------------------------------------


def test_3_a_persons_retry_racing_a_late_approval_never_reopens_a_paid_charge(
    db_url, gateway, make_harness
):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)

    with session_scope(db_url) as session:
        ops.retry(session, charge_id, by="alice", confirm_not_charged=True)
        gateway.release(alias)  # the late approval is recorded while the retry is open
        first.thread.join(2.0)  # on PostgreSQL it waits for the retry's row lock
    first.join()

    h.engine.dispatch_due(utcnow() + timedelta(days=1))
    h.run_sent()
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    charge = h.charge(h.charge_sub(charge_id))
    assert charge.state in (ChargeState.APPROVED, ChargeState.FAILED)
    assert charge.state != ChargeState.PENDING


# --- 4 ----------------------------------------------------------------------------------


@pytest.fixture
def pause_before(request: pytest.FixtureRequest) -> Iterator[Callable[..., threading.Event]]:
    """Hold one thread just before it runs an UPDATE of ``charges`` (at most a few seconds),
    so another thread's whole operation runs in between."""
    installed: list[tuple[Any, Any]] = []

    def install(url: str, thread_name: str, *, limit: float = 3.0) -> threading.Event:
        go = threading.Event()

        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if (
                threading.current_thread().name == thread_name
                and statement.lstrip().upper().startswith("UPDATE CHARGES")
                and not go.is_set()
            ):
                go.wait(limit)
                go.set()

        engine = get_engine(url)
        event.listen(engine, "before_cursor_execute", before)
        installed.append((engine, before))
        return go

    yield install
    for engine, fn in installed:
        event.remove(engine, "before_cursor_execute", fn)


def test_4_concurrent_refunds_never_exceed_what_was_collected(
    db_url, gateway, make_harness, pause_before
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    charge_id = h.charge(sub_id).id

    go = pause_before(db_url, "refund-b")
    second = Background(
        lambda: h.engine.settlement.cancel(charge_id, amount="15.00", reason="b", actor="bob"),
        "refund-b",
    )
    time.sleep(0.3)  # refund B has read the charge and waits just before claiming it
    # On SQLite B holds the write lock, so A waits and then finds too little left.
    with contextlib.suppress(BillingError):
        h.engine.settlement.cancel(charge_id, amount="20.00", reason="a", actor="alice")
    go.set()
    with contextlib.suppress(BillingError):
        second.join()

    refunds = gateway.calls(script="cancel_transaction")
    assert len(refunds) == 1, refunds  # the second refund is refused here, never sent
    charge = h.charge(sub_id)
    assert charge.refunded_amount is not None and charge.refunded_amount <= Decimal("29.90")


# --- 5 ----------------------------------------------------------------------------------


def test_5_resume_never_charges_a_period_it_wrote_off(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="51", times=1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    assert h.charge(sub_id).state == ChargeState.PENDING  # on the retry ladder
    ref = "shop-1"
    with session_scope(db_url) as session:
        subscriptions.pause(session, ref, by="alice")
    later = utcnow() + timedelta(days=65)
    with session_scope(db_url) as session:
        subscriptions.resume(session, ref, h.plans, now=later, by="alice")

    skipped = {e.period for e in h.ledger(sub_id) if e.outcome == "skipped"}
    assert 0 in skipped
    assert h.engine.dispatch_due(later + timedelta(minutes=1)) == 0
    assert h.charge(sub_id).state == ChargeState.SKIPPED
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1


# --- 6 ----------------------------------------------------------------------------------


def test_6_retrying_a_failed_validation_validates_again_and_never_reauthorizes(
    db_url, gateway, make_harness
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias, plan="deferred")
    h.engine.sweep_plan("deferred")
    h.run_sent()
    authorized = h.charge(sub_id)
    gateway.set_behaviour(alias, decline="05", times=1)
    result = h.engine.settlement.capture(authorized.id, automatic=True)
    assert result.outcome == "declined"
    assert (h.charge(sub_id).state, h.charge(sub_id).reason) == (
        ChargeState.FAILED, "validate_declined",
    )  # fmt: skip

    with session_scope(db_url) as session:
        ops.retry(session, authorized.id, by="alice")
    h.engine.engine_sweep(utcnow() + timedelta(seconds=5))
    h.run_sent()
    for charge_id in h.captures:
        h.engine.settlement.capture(charge_id, automatic=True)

    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    assert len(gateway.calls(alias=alias, script="validedifferee")) == 2
    charge = h.charge(sub_id)
    assert (charge.state, charge.tx) == (ChargeState.APPROVED, authorized.tx)


# --- 7 ----------------------------------------------------------------------------------


def test_7_a_missing_private_key_claims_nothing_and_is_never_called_unknown(
    db_url, gateway, make_harness, monkeypatch
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias, plan="deferred")
    h.engine.sweep_plan("deferred")
    h.run_sent()
    charge_id = h.charge(sub_id).id
    monkeypatch.delenv("KLIKANDPAY_KEY_EUR")

    with pytest.raises(ConfigError, match="KLIKANDPAY_KEY_EUR"):
        h.engine.settlement.capture(charge_id, amount="120.00", actor="alice")

    assert h.engine.mark_stuck(utcnow() + LATER) == 0
    charge = h.charge(sub_id)
    assert (charge.state, charge.operation) == (ChargeState.AUTHORIZED, None)
    assert [a.operation for a in _attempts(db_url, charge_id)] == ["duplicate"]
    assert gateway.calls(script="validedifferee") == []


# --- 8 ----------------------------------------------------------------------------------


def test_8_a_gateway_dripping_its_answer_is_cut_at_the_total_deadline(gateway):
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, drip=0.25)  # about a minute for the whole answer
    client = KlikAndPayClient(gateway.url, connect_timeout=1, read_timeout=1)

    started = time.monotonic()
    outcome = client.duplicate(
        merchant_id="1234567", alias=alias, ip="203.0.113.7", amount=Decimal("29.90"),
        private_key="test-key-eur",
    )  # fmt: skip
    elapsed = time.monotonic() - started

    assert outcome.kind == "unknown"
    assert "deadline" in outcome.reason
    assert elapsed < 4.0  # connect + read timeout (2 s), plus the watchdog's slack


def test_8_the_worker_records_a_call_cut_at_its_deadline_as_unknown(db_url, gateway, make_harness):
    h = make_harness(db_url, connect_timeout=1, read_timeout=1)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, drip=0.25)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")

    h.run_sent()

    charge = h.charge(sub_id)
    assert charge.state == ChargeState.UNKNOWN
    assert "deadline" in (charge.last_message or "")
    (row,) = [e for e in h.ledger(sub_id) if e.outcome == "unknown"]
    assert "deadline" in (row.message or "")


# --- 9 ----------------------------------------------------------------------------------


def test_9_a_late_approval_is_evidence_never_money_in_the_books(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    started = utcnow() - timedelta(minutes=1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)
    _person_retries(db_url, charge_id)
    gateway.release(alias)
    first.join()

    with session_scope(db_url) as session:
        (line,) = reports.report(session, since=started, until=utcnow() + LATER)
        story = ops.charge_story(session, charge_id).as_dict()
    assert (line.collected, line.collected_count) == (Decimal("0.00"), 0)
    assert (line.late_approved_count, line.late_approved_amount) == (1, Decimal("29.90"))
    assert [e["outcome"] for e in story["ledger"]].count("late_answer") == 1
    assert not [e for e in story["ledger"] if e["outcome"] == "approved"]


def test_9_a_late_refund_answer_is_not_shown_as_approved(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    charge_id = h.charge(sub_id).id
    gateway.set_behaviour(alias, hold=True, times=1)
    refund = Background(
        lambda: h.engine.settlement.cancel(charge_id, amount="10.00", reason="goodwill"),
        "refund",
    )
    gateway.wait_held(alias)
    assert h.engine.mark_stuck(utcnow() + LATER) == 1  # the refund's answer is lost
    with session_scope(db_url) as session:
        ops.resolve(
            session, charge_id, approved=False, tx=None, by="alice", reason="not in BO",
            plans=h.plans,
        )  # fmt: skip

    gateway.release(alias)
    refund.join()

    outcomes = [e.outcome for e in _rows(db_url, charge_id)]
    assert "approved" not in outcomes[1:]  # only the charge itself was approved
    assert outcomes[-1] == "late_answer"
    charge = h.charge(sub_id)
    assert charge.refunded_amount in (None, Decimal("0.00"))  # the books moved nothing
    assert charge.review == "late_approval"  # but a person is told the money moved


# --- the person's check names its attempt ----------------------------------------------


def test_a_retry_is_refused_when_the_charge_made_another_attempt_since_the_check(
    db_url, gateway, make_harness
):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)
    gateway.release(alias)
    first.join()  # attempt 1's approval came back after all: the charge is approved
    with session_scope(db_url) as session, pytest.raises(StateError):
        ops.retry(session, charge_id, by="alice", confirm_not_charged=True, attempt=1)

    charge_two, second = _unknown_with_a_second_attempt(h, gateway, db_url)
    with session_scope(db_url) as session, pytest.raises(StateError, match="attempt 2"):
        ops.retry(session, charge_two, by="alice", confirm_not_charged=True, attempt=1)
    gateway.release(second.alias)
    second.worker.join()


class _Second:
    def __init__(self, alias: str, worker: Background) -> None:
        self.alias, self.worker = alias, worker


def _unknown_with_a_second_attempt(h: Any, gateway: Any, url: str) -> tuple[int, _Second]:
    """A charge whose attempt 1 was given up on and retried, and whose attempt 2 is
    unknown too (its answer held)."""
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, decline="05", times=1)
    h.subscribe("shop-2", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    claim = h.engine.claim(charge_id)
    assert h.engine.mark_stuck(utcnow() + LATER) == 1
    with session_scope(url) as session:
        ops.retry(session, charge_id, by="alice", confirm_not_charged=True, attempt=1)
    h.engine.dispatch_due()
    h.take_sent()
    gateway.set_behaviour(alias, hold=True, times=1)
    worker = Background(lambda: h.engine.charge(charge_id), "attempt-2")
    gateway.wait_held(alias)
    assert h.engine.mark_stuck(utcnow() + LATER * 2) == 1
    del claim  # attempt 1's answer never comes
    return charge_id, _Second(alias, worker)
