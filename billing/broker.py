"""The broker, from ``billing``'s side: the one module of the domain that imports Celery.

Why here: the workers' app lives in ``tasks/`` and ``billing`` never imports ``tasks``, yet
the CLI and the console must hand work to the workers (a person's retry, a requeued dead
letter). So the Celery configuration is defined once here — ``tasks/app.py`` builds the
workers' app from :func:`celery_config` — and a sending-only app with the same settings
sends tasks by name. The workers' own sends (a sweep's dispatch) pass their app in.

A retried charge is sent after its database change committed, so a broker that is down
loses nothing: the engine sweep sends every due pending charge at its next run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from billing.db import read_scope
from billing.durations import format_delay
from billing.engine import Engine
from billing.errors import BillingError
from billing.models import Charge, ChargeState, SubscriptionStatus
from billing.settings import Settings

#: Task names, shared by the workers' tasks (``tasks/``) and what sends them.
CHARGE_TASK = "billing.charge"
#: Several charges in one message (see ``send_charges``).
CHARGE_BATCH_TASK = "billing.charge_batch"
CAPTURE_TASK = "billing.capture"
#: A task that does nothing: Celery's own cost per message (``make bench``).
NOOP_TASK = "billing.noop"
#: Seconds a person's command waits for the broker before saying it is unreachable.
CONNECT_TIMEOUT = 5.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """The configuration every Celery app of the project runs with (see ``tasks/app.py``
    for why each value)."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "timezone": "UTC",
        "enable_utc": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "worker_hijack_root_logger": False,
    }


@functools.cache
def _sending_app(broker_url: str, queue: str, visibility_timeout: int) -> Celery:
    app = Celery("klikandpay_billing_sender")
    app.conf.update(
        celery_config(
            Settings(broker_url=broker_url, queue=queue, visibility_timeout=visibility_timeout)
        )
    )
    return app


def sending_app(settings: Settings) -> Celery:
    """A Celery app that only sends, configured like the workers' (one per broker)."""
    return _sending_app(settings.broker_url, settings.queue, settings.visibility_timeout)


def batches(charge_ids: Sequence[int], size: int) -> list[list[int]]:
    """``charge_ids`` in messages of at most ``size``, as even as they can be (13 IDs by 8:
    7 and 6), so no message waits on a lone long tail."""
    count = -(-len(charge_ids) // size) if charge_ids else 0
    return [list(charge_ids[at::count]) for at in range(count)]


def send_charges(app: Celery, charge_ids: Sequence[int], batch: int) -> None:
    """The charge messages for ``charge_ids``: one ``billing.charge`` for a lone ID, else
    ``billing.charge_batch`` messages of at most ``batch`` IDs, over one producer.

    Safe whatever becomes of a message: each charge is claimed on its own, so a message
    delivered twice, or a batch redelivered after some of its charges were made, makes
    each charge at most once."""
    with app.producer_or_acquire() as producer:
        for ids in batches(charge_ids, batch):
            if len(ids) == 1:
                app.send_task(CHARGE_TASK, args=(ids[0],), producer=producer)
            else:
                app.send_task(CHARGE_BATCH_TASK, args=(ids,), producer=producer)


def send_many(app: Celery, name: str, charge_ids: Sequence[int]) -> None:
    """One ``name`` message per charge ID, over a single pooled producer connection."""
    with app.producer_or_acquire() as producer:
        for charge_id in charge_ids:
            app.send_task(name, args=(charge_id,), producer=producer)


def send_task(settings: Settings, name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Send one task by name (a requeued dead letter); return its task ID."""
    result = sending_app(settings).send_task(name, args=args, kwargs=kwargs)
    return str(result.id)


def ensure_reachable(settings: Settings) -> None:
    """Raise kombu's ``OperationalError`` within a few seconds when the broker is down."""
    with sending_app(settings).connection_for_write() as connection:
        connection.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0, interval_max=0,
            timeout=CONNECT_TIMEOUT,
        )  # fmt: skip


def send_retried(number: int, settings: Settings) -> str:
    """Hand due charges to the workers now; say what became of charge ``number``.

    Failing to reach the broker is not an error: the retry is recorded, and the engine
    sweep sends every due pending charge at its next run.
    """
    later = "the engine sweep will send it within a minute"
    app = sending_app(settings)
    try:
        ensure_reachable(settings)
        Engine(
            settings, dispatcher=lambda ids: send_charges(app, ids, settings.charge_batch)
        ).dispatch_due()
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
    """A charge's state and its subscription's status."""
    with read_scope(url) as session:
        charge = session.get_one(Charge, number)
        return charge.state, charge.subscription.status


__all__ = [
    "CAPTURE_TASK",
    "CHARGE_BATCH_TASK",
    "CHARGE_TASK",
    "batches",
    "celery_config",
    "dispatched_state",
    "ensure_reachable",
    "send_charges",
    "send_many",
    "send_retried",
    "send_task",
    "sending_app",
]
