"""Handing work a person asked for to the workers at once: a retried charge, a requeued task.

The CLI (``billing failed retry``, ``billing deadletters requeue``) and the web console
both call these after their database change has committed, so the change is never lost
when the broker is down: the engine sweep sends every due pending charge at its next run,
and a dead letter whose task could not be sent keeps waiting in the list.

The Celery app is imported inside the functions: it reads the settings and the plans file
when imported, which commands that never send anything should not pay for.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from billing.db import session_scope
from billing.durations import format_delay
from billing.errors import BillingError
from billing.models import Charge, ChargeState, SubscriptionStatus
from billing.settings import Settings


def send_retried(number: int, settings: Settings) -> str:
    """Hand due charges to the workers now; say what became of charge ``number``.

    Failing to reach the broker is not an error: the retry is recorded, and the engine
    sweep sends every due pending charge at its next run.
    """
    from kombu.exceptions import OperationalError

    later = "the engine sweep will send it within a minute"
    try:
        from billing.engine import Engine
        from tasks.app import app as celery_app
        from tasks.base import send_charges

        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=5
            )
        Engine(settings, dispatcher=send_charges).dispatch_due()
    except (OperationalError, OSError) as exc:
        if charge_state(number, settings.database_url)[0] == ChargeState.QUEUED:
            wait = format_delay(timedelta(seconds=int(settings.requeue_after_seconds)))
            return (
                f"the broker failed while sending ({exc}); the engine sweep re-sends it in {wait}"
            )
        return f"not sent now: the broker is unreachable ({exc}); {later}"
    except BillingError as exc:
        return f"not sent now: {exc}; {later}"
    return dispatched_state(number, settings.database_url)


def dispatched_state(number: int, url: str) -> str:
    """What became of retried charge ``number`` after a dispatch, in words."""
    later = "the engine sweep will send it within a minute"
    state, sub_status = charge_state(number, url)
    if state in (ChargeState.QUEUED, ChargeState.IN_FLIGHT):
        return "sent to the workers"
    if state == ChargeState.PENDING and sub_status == SubscriptionStatus.PAUSED:
        return "not sent: its subscription is paused; it is sent once the subscription resumes"
    if state == ChargeState.PENDING:
        return f"not sent now: the workers are busy; {later}"
    return f"charge is now {state}"


def charge_state(number: int, url: str) -> tuple[str, str]:
    with session_scope(url) as session:
        charge = session.get_one(Charge, number)
        return charge.state, charge.subscription.status


def send_task(name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Send one Celery task by name (a requeued dead letter); return its task ID."""
    from tasks.app import app as celery_app

    result = celery_app.send_task(name, args=args, kwargs=kwargs)
    return str(result.id)
