"""A new card against the worker and the sandbox, and a change of terms against the sweep.

Each test drives the real engine, a real database (PostgreSQL and SQLite) and the sandbox
over HTTP. The sandbox's ``hold`` behaviour keeps a call's answer until the test releases
it, so "a new alias is stored while a charge with the old one is in flight" happens exactly
then; a transaction left open on purpose decides which of two writers goes first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, select, update

from billing import changes
from billing.db import get_engine, session_scope
from billing.models import Charge, ChargeState, Event, SubscriptionStatus, utcnow
from billing.redact import mask_alias
from tests.fixtures.engine import Harness
from tests.test_changes import CHANGE_PLANS
from tests.test_charge_races import Background

MONTH = timedelta(days=31)


@pytest.fixture
def h(db_url: str, make_harness: Callable[..., Harness]) -> Harness:
    return make_harness(db_url, plans_file=CHANGE_PLANS, read_timeout=20)


def new_card(h: Harness, alias: str, ref: str = "shop-1") -> changes.Updated:
    with session_scope(h.url) as session:
        return changes.update_subscription(
            session, h.plans, ref, alias=alias, by="shop", reason="the customer's new card"
        )


def calls(gateway: Any, alias: str) -> list[str]:
    return [c["result"] for c in gateway.calls(alias=alias, script="duplicate")]


def types(url: str) -> list[str]:
    with session_scope(url) as session:
        return list(session.scalars(select(Event.type).order_by(Event.id)))


# --------------------------------------------------------------------------- on the ladder


def test_a_new_card_on_the_ladder_is_tried_now_not_at_the_next_step(
    h: Harness, gateway: Any
) -> None:
    old, new = gateway.seed_aliases("1234567", 2)
    gateway.set_behaviour(old, decline="51")
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    waiting = h.charge(sub_id)
    assert (waiting.state, h.sub(sub_id).status) == (ChargeState.PENDING, "past_due")
    assert waiting.next_attempt_at is not None and waiting.next_attempt_at > utcnow()

    done = new_card(h, new)

    assert done.card is not None and done.card.retried is not None
    assert done.card.retried.how == "now"
    assert h.engine.dispatch_due() == 1  # now, not in a day
    assert h.run_sent() == ["done"]
    charge = h.charge(sub_id)
    assert (charge.state, charge.collected_amount) == (ChargeState.APPROVED, Decimal("29.90"))
    assert h.sub(sub_id).status == SubscriptionStatus.ACTIVE
    assert (calls(gateway, old), calls(gateway, new)) == (["declined"], ["approved"])
    (row,) = [r for r in h.ledger(sub_id) if r.outcome == "subscription_card_updated"]
    assert row.details is not None and row.details["previous_alias"] == mask_alias(old)
    assert row.details["retry"]["how"] == "now" and row.charge_id == charge.id
    assert types(h.url) == [
        "charge.declined", "subscription.past_due", "subscription.card_updated",
        "charge.approved", "subscription.reactivated",
    ]  # fmt: skip


# --------------------------------------------------------------------------- suspended


def _suspended(h: Harness, gateway: Any, old: str, code: str) -> int:
    """A subscription suspended by declines of ``old``: hard at once, or the ladder spent."""
    gateway.set_behaviour(old, decline=code)
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    while h.charge(sub_id).state == ChargeState.PENDING:  # the ladder's steps
        h.engine.dispatch_due(utcnow() + timedelta(days=5))
        h.run_sent()
    assert h.sub(sub_id).status == SubscriptionStatus.SUSPENDED
    return sub_id


@pytest.mark.parametrize(("code", "reason"), [("54", "hard_decline"), ("05", "ladder_exhausted")])
def test_a_declined_charge_is_reopened_for_one_try_with_the_new_card(
    h: Harness, gateway: Any, code: str, reason: str
) -> None:
    old, new = gateway.seed_aliases("1234567", 2)
    sub_id = _suspended(h, gateway, old, code)
    assert (h.charge(sub_id).state, h.charge(sub_id).reason) == (ChargeState.FAILED, reason)

    done = new_card(h, new)

    assert done.card is not None and done.card.retried is not None
    assert done.card.retried.how == "reopened"
    reopened = h.charge(sub_id)
    assert (reopened.state, reopened.reason) == (ChargeState.PENDING, None)
    assert h.sub(sub_id).status == SubscriptionStatus.PAST_DUE
    assert types(h.url)[-2:] == ["subscription.card_updated", "subscription.past_due"]
    assert h.engine.dispatch_due() == 1
    h.run_sent()
    assert h.charge(sub_id).state == ChargeState.APPROVED
    assert h.sub(sub_id).status == SubscriptionStatus.ACTIVE
    assert calls(gateway, new) == ["approved"]


def test_the_reopened_charge_gets_one_try_only(h: Harness, gateway: Any) -> None:
    old, new = gateway.seed_aliases("1234567", 2)
    sub_id = _suspended(h, gateway, old, "54")
    gateway.set_behaviour(new, decline="51")  # soft: the ladder would try again

    new_card(h, new)
    h.engine.dispatch_due()
    h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "ladder_exhausted")
    assert h.sub(sub_id).status == SubscriptionStatus.SUSPENDED
    assert h.engine.dispatch_due(utcnow() + timedelta(days=30)) == 0
    assert calls(gateway, new) == ["declined"]


def test_an_unknown_charge_is_not_retried(h: Harness, gateway: Any) -> None:
    old, new = gateway.seed_aliases("1234567", 2)
    gateway.set_behaviour(old, decline="51", times=1)
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    gateway.set_behaviour(old, drop_after_record=True)  # the ladder's try: answer lost
    h.engine.dispatch_due(utcnow() + timedelta(days=2))
    h.run_sent()
    assert (h.charge(sub_id).state, h.sub(sub_id).status) == (ChargeState.UNKNOWN, "past_due")

    done = new_card(h, new)

    assert done.card is not None and done.card.retried is None
    assert done.card.note is not None and "outcome is unknown" in done.card.note
    assert h.charge(sub_id).state == ChargeState.UNKNOWN
    assert h.engine.dispatch_due(utcnow() + timedelta(days=30)) == 0
    assert calls(gateway, new) == []


@pytest.mark.parametrize(
    "flag",
    [{"reason": "late_approval"}, {"review": "late_approval"}, {"review": "amount_mismatch"}],
    ids=str,
)
def test_a_charge_flagged_for_a_person_is_not_reopened(
    h: Harness, gateway: Any, flag: dict[str, str]
) -> None:
    old, new = gateway.seed_aliases("1234567", 2)
    sub_id = _suspended(h, gateway, old, "54")
    with session_scope(h.url) as session:  # what a late answer could have left
        session.execute(update(Charge).where(Charge.subscription_id == sub_id).values(**flag))

    done = new_card(h, new)

    assert done.card is not None and done.card.retried is None
    assert done.card.note is not None and "a person decides" in done.card.note
    charge = h.charge(sub_id)
    assert (charge.state, h.sub(sub_id).status) == (ChargeState.FAILED, "suspended")
    assert h.engine.dispatch_due(utcnow() + timedelta(days=30)) == 0
    assert calls(gateway, new) == []


# --------------------------------------------------------------------------- racing the worker


def _in_flight(h: Harness, gateway: Any, old: str, **answer: Any) -> tuple[int, Background]:
    """A charge whose call with ``old`` is held at the gateway: the worker waits for it."""
    gateway.set_behaviour(old, hold=True, times=1, **answer)
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    worker = Background(lambda: h.engine.charge(charge_id), "worker")
    gateway.wait_held(old)
    return sub_id, worker


@pytest.mark.parametrize("answer", [{"decline": "51"}, {"decline": "54"}, {}], ids=str)
def test_a_new_card_while_the_old_one_is_in_flight(
    h: Harness, gateway: Any, answer: dict[str, str]
) -> None:
    """The old card's call keeps its attempt and its answer; the next try uses the new card
    (at once, when the answer was a decline); nothing is sent twice or called unknown."""
    old, new = gateway.seed_aliases("1234567", 2)
    sub_id, worker = _in_flight(h, gateway, old, **answer)

    done = new_card(h, new)

    assert done.card is not None and done.card.retried is None
    assert done.card.note is not None and "in flight with the previous card" in done.card.note
    flying = h.charge(sub_id)
    assert (flying.state, flying.attempts) == (ChargeState.IN_FLIGHT, 1)
    assert h.engine.mark_stuck() == 0 and h.engine.requeue_lost() == 0
    gateway.release(old)
    assert worker.join().status == "done"

    charge = h.charge(sub_id)
    if not answer:  # approved with the old card: that period is paid, once
        assert charge.state == ChargeState.APPROVED
        assert h.engine.dispatch_due(utcnow() + timedelta(days=5)) == 0
        assert (calls(gateway, old), calls(gateway, new)) == (["approved"], [])
        return
    assert (charge.state, charge.reason) == (ChargeState.PENDING, None)
    assert charge.next_attempt_at is not None and charge.next_attempt_at <= utcnow()
    (declined,) = [r for r in h.ledger(sub_id) if r.outcome == "declined"]
    assert declined.details is not None and declined.details["new_card"] is True
    assert declined.alias_masked == mask_alias(old)  # the attempt's card
    assert h.sub(sub_id).status == SubscriptionStatus.PAST_DUE
    assert h.engine.dispatch_due() == 1
    assert h.run_sent() == ["done"]
    assert h.charge(sub_id).state == ChargeState.APPROVED
    assert (calls(gateway, old), calls(gateway, new)) == (["declined"], ["approved"])
    assert "charge.failed" not in types(h.url)


def test_the_answer_arriving_while_the_card_change_holds_its_locks(
    h: Harness, gateway: Any
) -> None:
    """The worker records its decline while the change's transaction is still open: it
    waits for it (the charge's row lock on PostgreSQL, the write lock on SQLite), then
    finds the new card and gives it its try at once."""
    old, new = gateway.seed_aliases("1234567", 2)
    sub_id, worker = _in_flight(h, gateway, old, decline="54")

    with session_scope(h.url) as session:
        changes.update_subscription(session, h.plans, "shop-1", alias=new, by="shop", reason="x")
        gateway.release(old)
        worker.thread.join(1.0)
        assert worker.thread.is_alive()  # recording waits for the change to commit
    worker.join()

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason) == (ChargeState.PENDING, None)
    assert h.engine.dispatch_due() == 1
    h.run_sent()
    assert (calls(gateway, old), calls(gateway, new)) == (["declined"], ["approved"])


def test_the_claim_reads_the_alias_when_it_claims(h: Harness, gateway: Any) -> None:
    """A charge already queued (its message on the way) goes with the new card."""
    old, new = gateway.seed_aliases("1234567", 2)
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()

    done = new_card(h, new)
    assert done.card is not None and done.card.note is not None
    assert "being sent: with the new card" in done.card.note

    assert h.engine.charge(charge_id).status == "done"
    assert (calls(gateway, old), calls(gateway, new)) == ([], ["approved"])
    assert h.charge(sub_id).attempts == 1


# --------------------------------------------------------------------------- racing the sweep


Pause = tuple[threading.Event, threading.Event]


@pytest.fixture
def pause_after_insert() -> Iterator[Callable[[str, str], Pause]]:
    """Hold one thread just after it inserted charges, its transaction still open: returns
    (reached, go)."""
    installed: list[tuple[Any, Any]] = []

    def install(url: str, thread_name: str) -> Pause:
        reached, go = threading.Event(), threading.Event()

        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if (
                threading.current_thread().name == thread_name
                and statement.lstrip().upper().startswith("INSERT INTO CHARGES")
                and not go.is_set()
            ):
                reached.set()
                go.wait(5.0)
                go.set()

        engine = get_engine(url)
        event.listen(engine, "after_cursor_execute", after)
        installed.append((engine, after))
        return reached, go

    yield install
    for engine, fn in installed:
        event.remove(engine, "after_cursor_execute", fn)


def test_a_price_change_decided_while_the_sweep_waits_applies_to_that_period(
    h: Harness,
) -> None:
    """Before TERMS_LOCK, on PostgreSQL: the sweep's insert read the old price in its own
    snapshot and created period 0 at 29.90, though the change said period 0."""
    due = utcnow() + timedelta(hours=1)
    sub_id = h.subscribe("shop-1", "ab12cd34ef56gh78", next_charge_at=due)

    with session_scope(h.url) as session:
        done = changes.update_subscription(
            session, h.plans, "shop-1", amount="19.90", by="alice", reason="promotion"
        )
        assert done.scheduled is not None and done.scheduled.first_period == 0
        sweep = Background(lambda: h.engine.sweep_plan("monthly", due + timedelta(minutes=1)))
        sweep.thread.join(0.7)
        assert sweep.thread.is_alive()  # the sweep waits for the change
    assert sweep.join().created == 1

    assert h.charge(sub_id, 0).amount == Decimal("19.90")
    assert h.sub(sub_id).amount_override == Decimal("19.90")


def test_a_change_made_while_the_sweep_inserts_counts_from_the_next_period(
    h: Harness, pause_after_insert: Callable[[str, str], Pause]
) -> None:
    due = utcnow() - timedelta(minutes=1)
    sub_id = h.subscribe("shop-1", "ab12cd34ef56gh78", next_charge_at=due)
    today = due.astimezone(h.plans.plan("monthly").timezone).date().isoformat()
    reached, go = pause_after_insert(h.url, "sweep")
    sweep = Background(lambda: h.engine.sweep_plan("monthly"), "sweep")
    assert reached.wait(10.0)  # period 0's charge is inserted, not committed

    def change() -> changes.Updated:
        with session_scope(h.url) as session:
            return changes.update_subscription(
                session, h.plans, "shop-1", amount="19.90", effective_from=today,
                by="alice", reason="promotion",
            )  # fmt: skip

    changing = Background(change, "change")
    changing.thread.join(0.7)
    assert changing.thread.is_alive()  # it waits for the sweep's transaction
    go.set()
    sweep.join()
    done = changing.join()

    assert done.scheduled is not None and done.scheduled.first_period == 1
    assert h.charge(sub_id, 0).amount == Decimal("29.90")  # created first, keeps its price


def test_two_new_cards_at_once_are_applied_one_after_the_other(h: Harness) -> None:
    """The second waits for the first and replaces the alias the first stored: the ledger
    chains them (each row's previous alias is the one before), nothing is lost."""
    sub_id = h.subscribe("shop-1", "aaaa1111bbbb2222", next_charge_at=utcnow() + MONTH)

    with session_scope(h.url) as session:
        changes.update_subscription(
            session, h.plans, "shop-1", alias="cccc3333dddd4444", by="shop", reason="first"
        )
        second = Background(lambda: new_card(h, "eeee5555ffff6666"), "second")
        second.thread.join(0.7)
        assert second.thread.is_alive()  # it waits for the first to commit
    second.join()

    assert h.sub(sub_id).alias == "eeee5555ffff6666"
    chain = [
        (r.details or {}).get("previous_alias")
        for r in h.ledger(sub_id)
        if r.outcome == "subscription_card_updated"
    ]
    assert chain == [mask_alias("aaaa1111bbbb2222"), mask_alias("cccc3333dddd4444")]
