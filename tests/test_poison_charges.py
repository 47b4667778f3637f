"""A charge whose message was dead-lettered as poison is not sent again by itself (issue 17).

A poison message kills its worker on every delivery; the delivery limit (RabbitMQ's quorum
queue, or the workers' count on Redis) turns it into a dead letter. Before the charge was
claimed it is still ``queued``, and the engine sweep would send it again every
``requeue_after_seconds`` for ever. Both brokers' paths end in ``broker.record_poison``:
the letter is stored and the charges still queued move to the failed-charge queue
(``poison``) in the same transaction. Real engine, real database (PostgreSQL and SQLite),
the sandbox over HTTP.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from billing import broker, deadletters, ops
from billing.db import session_scope
from billing.deliveries import PoisonMessage
from billing.models import Charge, ChargeState, DeadLetter, Event, LedgerEntry, utcnow
from billing.vocabulary import LedgerOutcome

LATER = timedelta(hours=1)


def _poisoned(url: str, task: str, args: list[object], source: str) -> broker.Poisoned:
    """What a delivery limit does with a message of ``task`` that killed 6 workers."""
    return broker.record_poison(
        url, task_name=task, task_id=f"task-{task}-{args}", args=args, kwargs={},
        poison=PoisonMessage(6, 5, "the test"), source=source,
    )  # fmt: skip


def _charge(url: str, charge_id: int) -> Charge:
    with session_scope(url) as session:
        return session.get_one(Charge, charge_id)


def _queued(h: object, gateway: object, n: int) -> list[int]:
    """``n`` charges dispatched (``queued``), their messages not yet run."""
    for i, alias in enumerate(gateway.seed_aliases("1234567", n)):  # type: ignore[attr-defined]
        h.subscribe(f"shop-{i}", alias)  # type: ignore[attr-defined]
    h.engine.sweep_plan("monthly")  # type: ignore[attr-defined]
    ids: list[int] = h.take_sent()  # type: ignore[attr-defined]
    assert len(ids) == n
    return sorted(ids)


def test_a_queued_charge_whose_message_is_poison_ends_failed_and_is_not_re_sent(
    db_url: str, make_harness: object, gateway: object
) -> None:
    h = make_harness(db_url)  # type: ignore[operator]
    (charge_id,) = _queued(h, gateway, 1)

    done = _poisoned(db_url, broker.CHARGE_TASK, [charge_id], deadletters.SOURCE_REDIS)

    charge = _charge(db_url, charge_id)
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "poison")
    assert f"dead letter {done.letter}" in (charge.last_message or "")
    assert "6 times" in (charge.last_message or "")
    assert done.failed == [charge_id] and done.untouched == []
    with session_scope(db_url) as session:
        letter = session.get_one(DeadLetter, done.letter)
        assert (letter.task_name, letter.source) == (broker.CHARGE_TASK, "redis")
        outcomes = list(
            session.scalars(select(LedgerEntry.outcome).where(LedgerEntry.charge_id == charge_id))
        )
        assert outcomes == [LedgerOutcome.HELD]
        events = list(session.scalars(select(Event).where(Event.charge_id == charge_id)))
        assert [e.type for e in events] == ["charge.failed"]
        assert events[0].payload["data"]["failure"] == "poison"
        listed = ops.list_failed(session, reason="poison")
        assert [c.charge_id for c in listed] == [charge_id]

    # The engine sweep no longer sends it again, however long it waits.
    assert h.engine.requeue_lost(utcnow() + LATER) == 0
    assert h.take_sent() == []
    # A message that arrives anyway (a requeued letter) meets a failed charge: nothing sent;
    # the requeue says so, and what to do instead.
    note = broker.requeued_charges(db_url, done.letter) or ""
    assert f"charge {charge_id} is failed (poison)" in note
    assert f"billing failed retry {charge_id}" in note
    assert h.engine.charge(charge_id).status == "not_claimed"
    assert gateway.calls() == []  # type: ignore[attr-defined]
    assert _charge(db_url, charge_id).state == ChargeState.FAILED

    # A person's retry sends it as before.
    with session_scope(db_url) as session:
        ops.retry(session, charge_id, by="ops@example.test")
    h.engine.dispatch_due()
    assert h.run_sent() == ["done"]
    assert _charge(db_url, charge_id).state == ChargeState.APPROVED


def test_a_charge_claimed_meanwhile_is_untouched_and_the_move_says_it_lost(
    db_url: str, make_harness: object, gateway: object
) -> None:
    h = make_harness(db_url)  # type: ignore[operator]
    (charge_id,) = _queued(h, gateway, 1)
    assert h.engine.charge(charge_id).outcome == "approved"

    done = _poisoned(db_url, broker.CHARGE_TASK, [charge_id], deadletters.SOURCE_RABBITMQ)

    assert done.failed == [] and done.untouched == [charge_id]
    charge = _charge(db_url, charge_id)
    assert (charge.state, charge.reason) == (ChargeState.APPROVED, None)
    with session_scope(db_url) as session:  # the letter is kept all the same
        assert session.get_one(DeadLetter, done.letter).source == "rabbitmq"


def test_a_poison_batch_fails_only_its_charges_still_queued(
    db_url: str, make_harness: object, gateway: object
) -> None:
    h = make_harness(db_url)  # type: ignore[operator]
    first, second, third = _queued(h, gateway, 3)
    assert h.engine.charge(second).outcome == "approved"  # made before the worker died

    done = _poisoned(
        db_url, broker.CHARGE_BATCH_TASK, [[first, second, third]], deadletters.SOURCE_REDIS
    )

    assert done.failed == [first, third] and done.untouched == [second]
    states = {n: _charge(db_url, n) for n in (first, second, third)}
    assert [states[n].state for n in (first, second, third)] == [
        ChargeState.FAILED, ChargeState.APPROVED, ChargeState.FAILED,
    ]  # fmt: skip
    assert "3 charges" in (states[first].last_message or "")
    note = broker.requeued_charges(db_url, done.letter) or ""
    assert f"charge {first} is failed (poison), {second} is approved" in note
    assert h.engine.requeue_lost(utcnow() + LATER) == 0


def test_a_poison_message_of_another_task_fails_no_charge(
    db_url: str, make_harness: object, gateway: object
) -> None:
    h = make_harness(db_url)  # type: ignore[operator]
    (charge_id,) = _queued(h, gateway, 1)

    done = _poisoned(db_url, broker.CAPTURE_TASK, [charge_id], deadletters.SOURCE_REDIS)

    assert done.failed == [] and done.untouched == []
    assert _charge(db_url, charge_id).state == ChargeState.QUEUED
    assert broker.requeued_charges(db_url, done.letter) is None
