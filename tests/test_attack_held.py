"""Attack review: interleavings that HELD (these pass today; kept as evidence of what was tried).

- The stuck sweep fires while the worker is recording its answer, and a person retries the
  now-unknown charge before the worker's charge UPDATE runs: the answer loses its move, is
  a late approval, and stops the retry (PostgreSQL); on SQLite the worker's write lock
  serialises all three.
- Two workers holding the same message: one call.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import event

from billing import ops
from billing.db import get_engine, session_scope
from billing.errors import BillingError
from billing.models import ChargeState, utcnow
from tests.test_charge_races import Background


def test_stuck_sweep_and_retry_between_attempt_and_charge_update(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()

    engine = get_engine(db_url)
    seen = {"n": 0}
    reached, go = threading.Event(), threading.Event()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name != "worker":
            return
        # A move of the charge: the general path's UPDATE, or the hot path's one statement
        # (``billing.charging.hotpath``: WITH locked … / WITH moved …), on PostgreSQL.
        if statement.lstrip().upper().startswith(("UPDATE CHARGES", "WITH LOCKED", "WITH MOVED")):
            seen["n"] += 1
            if seen["n"] == 2:  # the record's move (the first one is the claim)
                reached.set()
                go.wait(3)

    event.listen(engine, "before_cursor_execute", before)
    try:
        worker = Background(lambda: h.engine.charge(charge_id), "worker")
        assert reached.wait(10)
        sweeper = Background(lambda: h.engine.mark_stuck(utcnow() + timedelta(hours=1)), "sweep")
        sweeper.thread.join(1.0)
        with contextlib.suppress(BillingError), session_scope(db_url) as session:
            ops.retry(session, charge_id, by="alice", confirm_not_charged=True)
        go.set()
        worker.join()
        sweeper.join()
    finally:
        event.remove(engine, "before_cursor_execute", before)

    h.engine.dispatch_due(utcnow() + timedelta(days=1))
    h.run_sent()
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    assert h.charge(sub_id).state in (ChargeState.APPROVED, ChargeState.FAILED)


def test_two_workers_with_one_message_make_one_call(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    a = Background(lambda: h.engine.charge(charge_id), "worker-a")
    b = Background(lambda: h.engine.charge(charge_id), "worker-b")
    statuses = sorted([a.join().status, b.join().status])
    assert statuses == ["done", "not_claimed"]
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    assert h.charge(sub_id).state == ChargeState.APPROVED
