"""Webhook delivery tasks: beat sends ``billing.deliver_events`` every few seconds."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from billing import webhooks
from billing.db import session_scope
from billing.errors import PlanFileError
from billing.events import DEFAULT_ENDPOINT
from billing.models import EventStatus
from billing.plans import PlanSet, get_plans
from billing.settings import Settings, get_settings
from schedules.beat import DELIVER_EVENTS
from tasks.app import app
from tasks.base import BillingTask

log = logging.getLogger("billing.webhooks")


def _plans(settings: Settings) -> PlanSet | None:
    """The plans file's endpoints; None (``default`` only) while the file is broken.

    A broken edit must not stop the shop's own endpoint, nor dead-letter every run: the
    plans-file endpoints wait (unregistered changes, pending deliveries) until it is fixed.
    """
    try:
        return get_plans(settings)
    except PlanFileError as exc:
        log.error("plans file unreadable, posting to the default endpoint only: %s", exc)
        return None


@app.task(base=BillingTask, bind=True, name=DELIVER_EVENTS)
def deliver_events(self: BillingTask) -> dict[str, Any]:
    settings = get_settings()
    return asdict(webhooks.deliver_due(settings.database_url, settings, plans=_plans(settings)))


@app.task(base=BillingTask, bind=True, name=webhooks.REDELIVER_TASK)
def redeliver_event(
    self: BillingTask, event_id: str, endpoint: str = DEFAULT_ENDPOINT
) -> dict[str, Any]:
    """What ``billing deadletters requeue`` sends for a dead delivery: post it again."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        delivery = webhooks.get_delivery(session, event_id, endpoint)
        if delivery.status != EventStatus.PENDING:  # not already redelivered by hand
            webhooks.redeliver(
                session, event_id, by="billing deadletters requeue", endpoint=endpoint
            )
    result = webhooks.deliver_due(
        settings.database_url, settings, plans=_plans(settings), endpoint=endpoint
    )
    return asdict(result)
