"""Attack review: what a person can still do to a charge whose earlier attempt was approved late.

The late approval is evidence that the card was charged for the period. The engine guards
its own moves with it (``NOT_LATE_APPROVED``), and ``ops`` refuses ``retry``/``discard`` when
``charge.reason == late_approval``; these tests look at the other ways the same evidence is
carried (the ``review`` flag) and at the action that is not guarded at all (``resolve``).
Each test states the promise and fails while it is broken.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import select

from billing import ops
from billing.db import session_scope
from billing.errors import BillingError
from billing.models import ChargeState, LedgerEntry, utcnow
from billing.vocabulary import COLLECTED
from tests.test_charge_races import (
    _approved_calls,
    _person_retries,
    _unknown_with_a_held_call,
)


def _queue(url: str) -> dict[int, tuple[str, str | None, str | None]]:
    with session_scope(url) as session:
        return {r.charge_id: (r.state, r.reason, r.review) for r in ops.list_failed(session)}


def _collected_in_books(url: str, charge_id: int) -> Decimal:
    with session_scope(url) as session:
        rows = session.scalars(
            select(LedgerEntry.amount).where(
                LedgerEntry.charge_id == charge_id,
                LedgerEntry.outcome.in_([o.value for o in COLLECTED]),
            )
        )
        return sum(rows, Decimal("0.00"))


def _late_approved_after_a_hard_decline(h, gateway, alias, url):  # type: ignore[no-untyped-def]
    """Attempt 1 stuck (its approval held), a person retries, attempt 2 is hard-declined,
    then attempt 1's approval arrives: the charge is ``failed/hard_decline`` and carries
    ``review = late_approval``."""
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)
    _person_retries(url, charge_id)
    gateway.set_behaviour(alias, decline="54", times=1)  # attempt 2: expired card (hard)
    h.engine.dispatch_due()
    h.run_sent()
    gateway.release(alias)  # attempt 1's approval arrives now: the card WAS charged
    first.join()
    charge = h.charge(h.charge_sub(charge_id))
    assert (charge.state, charge.reason, charge.review) == (
        ChargeState.FAILED, "hard_decline", "late_approval",
    )  # fmt: skip
    return charge_id


# SHOWS (double charge): ops._refuse_late_approval only looks at charge.reason; a charge whose
# late approval was recorded as the *review flag* (it was failed, not pending/queued, when the
# approval came) is retried, sent and approved a second time for the same period.
# FAILS today on PostgreSQL and SQLite.
def test_retry_of_a_failed_charge_flagged_late_approval_never_charges_again(
    db_url, gateway, make_harness
):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id = _late_approved_after_a_hard_decline(h, gateway, alias, db_url)

    # A person retries the hard-declined charge (the customer says the card was renewed).
    with contextlib.suppress(BillingError), session_scope(db_url) as session:
        ops.retry(session, charge_id, by="bob", reason="customer renewed the card")
    h.engine.dispatch_due(utcnow() + timedelta(seconds=5))
    h.run_sent()

    assert len(_approved_calls(gateway, alias)) == 1, "the card was charged twice for period 0"


# SHOWS (wrong books): discard is guarded the same way (reason only): the paid period is
# written off as discarded and the subscription moves past it, the collected money is in no
# money row of the books. (The review flag keeps it in the queue, so it stays visible.)
# FAILS today on PostgreSQL and SQLite.
def test_discard_of_a_charge_flagged_late_approval_is_refused(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id = _late_approved_after_a_hard_decline(h, gateway, alias, db_url)

    with contextlib.suppress(BillingError), session_scope(db_url) as session:
        ops.discard(session, charge_id, by="bob", reason="card expired", plans=h.plans)

    charge = h.charge(h.charge_sub(charge_id))
    assert charge.state != ChargeState.DISCARDED, "a period the card paid was written off"


# SHOWS (lost outcome / wrong books): ops.resolve has no late-approval guard at all. A charge
# whose retry was stopped by a late approval (failed/late_approval, review NULL) can be
# resolved --declined: state ``declined`` (not an attention state), review NULL, so it leaves
# the failed-charge queue; the subscription is suspended and the books hold no collected
# money although the gateway collected 29.90. Nothing is left flagged for a person.
# FAILS today on PostgreSQL and SQLite.
def test_resolve_declined_of_a_late_approved_charge_keeps_it_flagged(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)
    _person_retries(db_url, charge_id)
    h.engine.dispatch_due()
    h.take_sent()
    gateway.release(alias)
    first.join()
    assert _queue(db_url)[charge_id][1] == "late_approval"

    with contextlib.suppress(BillingError), session_scope(db_url) as session:
        ops.resolve(
            session, charge_id, approved=False, tx=None, by="bob", reason="nothing in BO yet",
            plans=h.plans,
        )  # fmt: skip

    assert len(_approved_calls(gateway, alias)) == 1  # the gateway collected 29.90
    still_flagged = charge_id in _queue(db_url)
    booked = _collected_in_books(db_url, charge_id) == Decimal("29.90")
    assert still_flagged or booked, (
        "an approved charge left the queue as declined: its money is in no book and no queue"
    )


# A person resolved an unknown charge as approved (the back office seemed to say so); then
# the gateway's own answer for that very attempt arrives, and it is a decline. The books
# hold money the gateway says it never took: a person must be told, not a silent row.
def test_a_late_decline_contradicting_a_persons_approved_resolution_is_flagged(
    db_url, gateway, make_harness
):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias, decline="51")
    with session_scope(db_url) as session:
        ops.resolve(
            session, charge_id, approved=True, tx="1234567890", by="bob",
            reason="the back office shows a payment", plans=h.plans,
        )  # fmt: skip
    assert charge_id not in _queue(db_url)

    gateway.release(alias)  # attempt 1's answer: declined (51, insufficient funds)
    first.join()

    assert _approved_calls(gateway, alias) == []
    state, _, review = _queue(db_url)[charge_id]
    assert state == ChargeState.APPROVED and review == "resolution_contradicted"
    # An older attempt's decline after a person's retry was approved contradicts nothing.
