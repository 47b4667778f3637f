"""Webhook delivery tasks: beat sends ``billing.deliver_events`` every few seconds."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from billing import webhooks
from billing.db import session_scope
from billing.models import EventStatus
from billing.settings import get_settings
from schedules.beat import DELIVER_EVENTS
from tasks.app import app
from tasks.base import BillingTask


@app.task(base=BillingTask, bind=True, name=DELIVER_EVENTS)
def deliver_events(self: BillingTask) -> dict[str, Any]:
    settings = get_settings()
    return asdict(webhooks.deliver_due(settings.database_url, settings))


@app.task(base=BillingTask, bind=True, name=webhooks.REDELIVER_TASK)
def redeliver_event(self: BillingTask, event_id: str) -> dict[str, Any]:
    """What ``billing deadletters requeue`` sends for a dead event: post it again."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        event = webhooks.get_event(session, event_id)
        if event.status != EventStatus.PENDING:  # not already redelivered by hand
            webhooks.redeliver(session, event_id, by="billing deadletters requeue")
    return asdict(webhooks.deliver_due(settings.database_url, settings))
