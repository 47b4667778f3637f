"""Attack review: a person's subscription changes racing a charge in flight.

``subscriptions.cancel`` discards the charges not yet sent and leaves the one in flight to
"end as its answer says". The claim holds a charge of a cancelled subscription back
(``discarded``); the record of an answer does not look at the subscription at all.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from billing import ops, subscriptions
from billing.db import session_scope
from billing.models import ChargeState, Event, utcnow
from tests.test_charge_races import Background


# SHOWS (misleading ops view): a soft decline answered after the subscription was cancelled
# schedules a ladder step: the charge is ``pending`` with a next_attempt_at, for ever (the
# dispatch never sends a cancelled subscription's charge, nothing discards it, it is not in
# the failed queue), and the shop's ``charge.declined`` announces a retry, naming the
# subscription ``active``.
# FAILS today on PostgreSQL and SQLite.
def test_a_soft_decline_after_cancel_leaves_nothing_waiting(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, hold=True, times=1, decline="51")
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    worker = Background(lambda: h.engine.charge(charge_id), "worker")
    gateway.wait_held(alias)
    with session_scope(db_url) as session:
        subscriptions.cancel(session, "shop-1", by="alice", reason="customer left")
    gateway.release(alias)
    worker.join()

    h.engine.engine_sweep(utcnow() + timedelta(days=3))
    h.run_sent()
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1  # never sent again: good
    charge = h.charge(sub_id)
    with session_scope(db_url) as session:
        queued = {r.charge_id for r in ops.list_failed(session)}
        (declined,) = session.scalars(
            select(Event.payload).where(
                Event.charge_id == charge_id, Event.type == "charge.declined"
            )
        )
    assert charge.state != ChargeState.PENDING or charge.id in queued, (
        f"charge {charge.id} of a cancelled subscription waits for a retry that never comes "
        f"(next_attempt_at {charge.next_attempt_at}); the shop was told "
        f"next_attempt_at={declined['data']['next_attempt_at']}"
    )
