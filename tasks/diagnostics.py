"""Tasks that measure the workers rather than charge: ``billing.noop``.

``make bench`` sends ``billing.noop`` N times to the same default worker that charges, at
the same concurrency, and divides the workers' CPU by N: what Celery itself spends per
message (receive, decode, dispatch to a thread, log, acknowledge) with no engine work.
That figure decides whether handing several charge IDs to one message is worth it. The
message has the shape of a charge's (one integer argument) and the task the same base.
"""

from __future__ import annotations

from billing.broker import NOOP_TASK
from tasks.app import app
from tasks.base import BillingTask


@app.task(base=BillingTask, bind=True, name=NOOP_TASK)
def noop(self: BillingTask, charge_id: int) -> None:
    """Nothing: the message is the whole cost."""
