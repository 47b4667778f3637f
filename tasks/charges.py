"""The tasks beat and the sweeps send. Each only unpacks arguments and calls the engine."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from kombu.exceptions import OperationalError

from billing import broker
from billing.changes import update_subscription_from_dict
from billing.intake import add_subscription_from_dict
from billing.settings import get_settings
from schedules.beat import ENGINE_SWEEP, SWEEP_PLAN
from tasks.app import app
from tasks.base import BillingTask

log = logging.getLogger("billing.tasks")


@app.task(base=BillingTask, bind=True, name=SWEEP_PLAN)
def sweep_plan(self: BillingTask, plan: str) -> dict[str, Any]:
    return asdict(self.engine.sweep_plan(plan))


@app.task(base=BillingTask, bind=True, name=ENGINE_SWEEP)
def engine_sweep(self: BillingTask) -> dict[str, Any]:
    result = asdict(self.engine.engine_sweep())
    drain_dead_letters()
    return result


def drain_dead_letters() -> None:
    """RabbitMQ: move poison messages from the dead-letter queue into the dead-letter
    table, where ``billing deadletters`` lists them (nothing to do on Redis)."""
    try:
        moved = broker.drain_dead_letters(get_settings(), app)
    except (OperationalError, OSError) as exc:
        log.warning("dead-letter queue not read: %s; the next engine sweep tries again", exc)
        return
    for letter in moved:
        log.error("poison message dead-lettered by RabbitMQ: billing deadletters show %d", letter)


@app.task(base=BillingTask, bind=True, name=broker.CHARGE_TASK, max_retries=None)
def charge(self: BillingTask, charge_id: int) -> str:
    result = self.engine.charge(charge_id, retries=self.request.retries)
    if result.status != "retry":
        return result.status
    try:
        # Safe to send again: the engine asks for a retry only when the request provably
        # never reached the gateway, and the charge is back to ``queued`` for the next claim.
        raise self.retry(countdown=broker.countdown(result.retry_in or 0), max_retries=None)
    except OperationalError:
        # The broker is down: the charge stays ``queued`` and the engine sweep re-sends it.
        log.warning("charge %s: broker unavailable for the retry; the engine sweep will", charge_id)
        return "retry_deferred"


@app.task(base=BillingTask, bind=True, name=broker.CHARGE_BATCH_TASK)
def charge_batch(self: BillingTask, charge_ids: list[int]) -> dict[str, int]:
    """Several charges of one message, each claimed, called and recorded on its own."""
    statuses: dict[str, int] = {}
    for result in self.engine.charge_many(charge_ids):
        status: str = result.status
        if status == "retry":
            # Safe to send again: the request provably never reached the gateway, and the
            # charge is back to ``queued``; it goes on alone, its retries counted from 1.
            try:
                self.app.send_task(
                    broker.CHARGE_TASK, args=(result.charge_id,),
                    countdown=broker.countdown(result.retry_in or 0), retries=1,
                )  # fmt: skip
            except OperationalError:
                # The broker is down: the charge stays ``queued``; the engine sweep re-sends.
                status = "retry_deferred"
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


@app.task(base=BillingTask, bind=True, name=broker.CAPTURE_TASK, max_retries=None)
def capture(self: BillingTask, charge_id: int) -> str:
    """Validate a deferred charge once its plan's ``capture_after`` has passed."""
    result = self.engine.settlement.capture(
        charge_id, automatic=True, retries=self.request.retries, reason="capture_after passed"
    )
    if result.retry_in is None:
        return result.outcome
    try:
        # Safe to send again: the validation request never reached the gateway.
        raise self.retry(countdown=broker.countdown(result.retry_in or 0), max_retries=None)
    except OperationalError:
        # The broker is down: the lease on the charge expires and the engine sweep re-sends.
        return "retry_deferred"


@app.task(base=BillingTask, bind=True, name="billing.add_subscription")
def add_subscription(self: BillingTask, data: dict[str, Any]) -> int:
    """Intake for shops that would rather send a message than call the CLI or Python."""
    return add_subscription_from_dict(get_settings().database_url, data)


@app.task(base=BillingTask, bind=True, name="billing.update_subscription")
def update_subscription(self: BillingTask, data: dict[str, Any]) -> dict[str, Any]:
    """A new card, plan or price from the shop (the fields of ``billing.changes.FIELDS``).

    A charge the new card retries is handed to the workers at once; if the broker cannot be
    reached, the engine sweep sends it (the change itself is committed either way).
    """
    result = update_subscription_from_dict(get_settings().database_url, data)
    if result["card"] and result["card"]["retried_charge"]:
        try:
            self.engine.dispatch_due()
        except (OperationalError, OSError) as exc:
            log.warning("update_subscription: dispatch deferred to the engine sweep: %s", exc)
    return result
