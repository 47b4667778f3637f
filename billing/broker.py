"""The broker, from ``billing``'s side: the one module of the domain that imports Celery.

Why here: the workers' app lives in ``tasks/`` and ``billing`` never imports ``tasks``, yet
the CLI and the console must hand work to the workers (a person's retry, a requeued dead
letter). So the Celery configuration is defined once here — ``tasks/app.py`` builds the
workers' app from :func:`celery_config` — and a sending-only app with the same settings
sends tasks by name. The workers' own sends (a sweep's dispatch) pass their app in.

A retried charge is sent after its database change committed, so a broker that is down
loses nothing: the engine sweep sends every due pending charge at its next run.

Two brokers, one set of guarantees (:func:`celery_config`):

- **Redis** (``redis://``): Kombu's defaults, a visibility timeout, and the task base class
  counting deliveries that never finished (Redis counts nothing itself).
- **RabbitMQ** (``amqp://``): what RabbitMQ does better. The billing queue is a *quorum*
  queue (replicated, durable: a message the broker accepted survives a broker restart),
  sends wait for the broker's *publisher confirm*, and the queue itself dead-letters a
  message delivered :data:`~billing.defaults.DELIVERY_LIMIT` times without being
  acknowledged (``x-delivery-limit``) into :func:`dead_letter_queue` instead of handing it
  out for ever. Countdowns on quorum queues travel through Celery's *native delayed
  delivery* (a ladder of TTL queues in the broker, not a timer in the worker), which
  Celery skips for ``direct`` exchanges — a countdown would then be held by the worker
  that received it, blocking one of its prefetch slots until its time (the warning in
  ``celery/app/base.py``). So the billing queue is bound to a *topic* exchange.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.exceptions import OperationalError
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import deadletters
from billing.charging import poison as poisoned
from billing.charging.context import worker_name
from billing.db import read_scope
from billing.deliveries import BrokerDeadLetter, PoisonMessage
from billing.durations import format_delay
from billing.engine import Engine
from billing.errors import BillingError
from billing.models import Charge, ChargeState, SubscriptionStatus, utcnow
from billing.settings import Settings
from billing.vocabulary import ATTENTION_STATES

log = logging.getLogger("billing.broker")

#: Task names, shared by the workers' tasks (``tasks/``) and what sends them.
CHARGE_TASK = "billing.charge"
#: Several charges in one message (see ``send_charges``).
CHARGE_BATCH_TASK = "billing.charge_batch"
CAPTURE_TASK = "billing.capture"
#: A task that does nothing: Celery's own cost per message (``make bench``).
NOOP_TASK = "billing.noop"
#: Seconds a person's command waits for the broker before saying it is unreachable.
CONNECT_TIMEOUT = 5.0
#: RabbitMQ: the topic exchange the billing queue is bound to (routing key: the queue's
#: name), and the exchange its dead letters go to.
EXCHANGE = "billing"
DEAD_LETTER_EXCHANGE = "billing.dead"
#: The reason RabbitMQ gives a message it dead-lettered past ``x-delivery-limit``.
DELIVERY_LIMIT_REASON = "delivery_limit"
#: URL schemes of RabbitMQ (py-amqp, Celery's default AMQP transport).
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def _connect(connection: Connection) -> None:
    """Connect now, or raise Kombu's ``OperationalError`` within ``CONNECT_TIMEOUT`` (one
    try: a person's command says the broker is unreachable instead of waiting)."""
    connection.ensure_connection(  # type: ignore[no-untyped-call]
        max_retries=1, interval_start=0, interval_step=0, interval_max=0,
        timeout=CONNECT_TIMEOUT,
    )  # fmt: skip


def is_amqp(broker_url: str) -> bool:
    """Whether the broker is RabbitMQ (and so counts deliveries and dead-letters itself)."""
    return broker_url.startswith(AMQP_SCHEMES)


def dead_letter_queue(queue: str) -> str:
    """RabbitMQ: the queue that holds the poison messages of ``queue``."""
    return f"{queue}.dead"


def billing_queue(settings: Settings) -> Queue:
    """RabbitMQ: the billing queue, a quorum queue on the topic exchange, dead-lettering a
    message past the delivery limit.

    ``at-least-once`` dead-lettering (with ``reject-publish`` overflow, which it requires)
    keeps a poison message in the billing queue until the dead-letter queue confirmed it,
    instead of RabbitMQ's default ``at-most-once``, which may drop it on the way.
    """
    return Queue(  # type: ignore[no-untyped-call]
        settings.queue,
        Exchange(EXCHANGE, type="topic", durable=True),  # type: ignore[no-untyped-call]
        routing_key=settings.queue,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": settings.queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def dead_letters_queue(settings: Settings) -> Queue:
    """RabbitMQ: the dead-letter queue of the billing queue (quorum too: it holds what
    nobody may lose), on its own direct exchange."""
    return Queue(  # type: ignore[no-untyped-call]
        dead_letter_queue(settings.queue),
        Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True),  # type: ignore[no-untyped-call]
        routing_key=settings.queue,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def declare_dead_letters(connection: Connection, settings: Settings) -> None:
    """Declare the dead-letter exchange and queue (a worker does before consuming: a
    dead-letter exchange that does not exist drops what is sent to it)."""
    with connection.channel() as channel:  # type: ignore[no-untyped-call]
        dead_letters_queue(settings).bind(channel).declare()  # type: ignore[no-untyped-call]


def delete_queues(settings: Settings) -> str | None:
    """RabbitMQ: delete the billing queue of ``settings`` and its dead-letter queue, with
    whatever they hold (for a run that made a queue of its own, such as the demo). None
    when done, else what stopped it."""
    try:
        with sending_app(settings).connection_for_write() as connection:
            _connect(connection)
            with connection.channel() as channel:
                for queue in (billing_queue(settings), dead_letters_queue(settings)):
                    queue.bind(channel).delete()  # type: ignore[no-untyped-call]
    except (OperationalError, OSError) as exc:
        return str(exc)
    return None


def is_reachable(settings: Settings) -> bool:
    """Whether the broker answers within ``CONNECT_TIMEOUT`` (see :func:`ensure_reachable`)."""
    try:
        ensure_reachable(settings)
    except (OperationalError, OSError):
        return False
    return True


#: Dead letters moved from RabbitMQ's dead-letter queue per drain at most, so that one
#: drain (an engine sweep, a person's ``billing deadletters list``) never runs for long.
DRAIN_BATCH = 500


def drain_dead_letters(settings: Settings, app: Celery | None = None) -> list[int]:
    """RabbitMQ: move the messages of the dead-letter queue into the dead-letter table
    (``source = rabbitmq``), so that one view lists, shows and requeues every letter.

    Each message is acknowledged only after its letter committed: a drain that dies in
    between leaves the message for the next one, which does not store it twice (a letter
    of the same task ID from RabbitMQ is kept once). Returns the new letters' IDs; nothing
    on Redis, which has no dead-letter queue (its workers write their letters directly).
    """
    if not is_amqp(settings.broker_url):
        return []
    moved: list[int] = []
    with (app or sending_app(settings)).connection_for_write() as connection:
        _connect(connection)
        with connection.channel() as channel:
            queue = dead_letters_queue(settings).bind(channel)  # type: ignore[no-untyped-call]
            queue.declare()
            for _ in range(DRAIN_BATCH):
                message = queue.get(no_ack=False, accept=["json"])
                if message is None:
                    break
                letter = _store_broker_letter(settings, message)
                message.ack()
                if letter is not None:
                    moved.append(letter)
    return moved


def move_dead_letters(settings: Settings) -> str | None:
    """:func:`drain_dead_letters` for a person's command: what to tell them (None:
    nothing moved), a warning when the broker could not be read (the table is listed)."""
    try:
        moved = drain_dead_letters(settings)
    except (OperationalError, OSError) as exc:
        return f"warning: RabbitMQ's dead-letter queue was not read ({exc}); listed: the table"
    return f"{len(moved)} letter(s) moved from RabbitMQ's dead-letter queue" if moved else None


@dataclass(frozen=True)
class Poisoned:
    """A poison message's dead letter, and its charges: failed now, or left as they were."""

    letter: int
    failed: list[int]
    untouched: list[int]


def charge_ids_of(task_name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """The charges a message of ``task_name`` makes (none: not a charge message). What is
    not a charge ID (a message sent by hand with anything in it) is left out."""
    if task_name == CHARGE_TASK:
        found: Any = [args[0] if args else kwargs.get("charge_id")]
    elif task_name == CHARGE_BATCH_TASK:
        found = args[0] if args else kwargs.get("charge_ids")
    else:
        return []
    if not isinstance(found, list | tuple):
        return []
    return [n for n in found if isinstance(n, int) and not isinstance(n, bool)]


def record_poison(
    url: str,
    *,
    task_name: str,
    task_id: str | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    poison: PoisonMessage,
    source: str,
    traceback: str | None = None,
) -> Poisoned:
    """Dead-letter a message the delivery limit gave up on, and fail its charges still
    ``queued`` (``billing.charging.poison``), in one transaction: both brokers' paths end
    here (the workers' count on Redis, the drain of RabbitMQ's dead-letter queue).

    Without the second part the engine sweep would send those charges again after
    ``requeue_after_seconds``, and the same poison would kill workers every ten minutes for
    ever. One transaction: a drain that dies before its acknowledgement finds the letter
    stored next time and skips it, its charges failed with it.
    """
    charges: list[poisoned.PoisonedCharges] = []

    def fail_charges(session: Session, letter: int) -> None:
        done = poisoned.fail_queued(
            session, charge_ids_of(task_name, args, kwargs), letter=letter,
            deliveries=poison.deliveries, actor=worker_name(), now=utcnow(),
        )  # fmt: skip
        charges.append(done)

    letter = deadletters.record(
        url, task_name=task_name, task_id=task_id, args=list(args), kwargs=kwargs, exc=poison,
        traceback=traceback, source=source, then=fail_charges,
    )  # fmt: skip
    done = Poisoned(letter, charges[0].failed, charges[0].untouched)
    if done.failed:
        log.error(
            "charge(s) %s of dead letter %d moved to the failed-charge queue (poison): "
            "billing failed list --reason poison",
            ", ".join(map(str, done.failed)), letter,
        )  # fmt: skip
    if done.untouched:
        log.warning(
            "charge(s) %s of dead letter %d left as they were: no longer queued",
            ", ".join(map(str, done.untouched)), letter,
        )  # fmt: skip
    return done


def requeued_charges(url: str, letter_id: int) -> str | None:
    """For a requeued letter of a charge message, what its task will find (None: not a
    charge message, or every charge is still ``queued``, which the task makes as usual).

    A charge that is not ``queued`` is left as it is by the task (its claim loses): one
    failed as poison is sent again by a person's ``billing failed retry``, not by this.
    """
    with read_scope(url) as session:
        letter = deadletters.get(session, letter_id)
        stored = letter.args or {}
        ids = charge_ids_of(letter.task_name, stored.get("args") or [], stored.get("kwargs") or {})
        rows = session.execute(
            select(Charge.id, Charge.state, Charge.reason).where(Charge.id.in_(ids))
        ).all()
    moved = sorted(row for row in rows if row.state != ChargeState.QUEUED)
    if not moved:
        return None
    states = ", ".join(
        f"{row.id} is {row.state}" + (f" ({row.reason})" if row.reason else "") for row in moved
    )
    failed = [str(row.id) for row in moved if row.state in ATTENTION_STATES]
    them = "it" if len(failed) == 1 else "them"
    retry = f"; `billing failed retry {' / '.join(failed)}` sends {them} again" if failed else ""
    return f"the task leaves what is not queued as it is: charge {states}{retry}"


def _store_broker_letter(settings: Settings, message: Any) -> int | None:
    """One message of the dead-letter queue as a letter (None: stored by an earlier drain)."""
    headers = dict(message.headers or {})
    task_id = str(headers.get("id") or "")[:64] or None
    task_name = str(headers.get("task") or "unknown")
    if task_id is not None and deadletters.has_letter(
        settings.database_url, task_id, deadletters.SOURCE_RABBITMQ
    ):
        return None
    try:
        body = message.decode()
        args, kwargs = (body[0], body[1]) if isinstance(body, list | tuple) else ([], {})
    except Exception:  # not JSON, not Celery's protocol 2: keep what the headers say
        args, kwargs = [], {}
    deaths = headers.get("x-death") or [{}]
    reason = str(headers.get("x-first-death-reason") or deaths[0].get("reason") or "unknown")
    args = list(args) if isinstance(args, list | tuple) else [args]
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    traceback = f"dead-lettered by RabbitMQ from queue {settings.queue!r}: {reason}\n"
    if reason != DELIVERY_LIMIT_REASON:
        # Rejected (Celery rejects a malformed message without requeueing it), expired...:
        # a letter, but no evidence that the message kills workers, so its charges are left
        # alone — a message naming charge IDs must not fail them just by being dead-lettered.
        return deadletters.record(
            settings.database_url, task_name=task_name, task_id=task_id, args=args,
            kwargs=kwargs, exc=BrokerDeadLetter(reason), source=deadletters.SOURCE_RABBITMQ,
            traceback=traceback,
        )  # fmt: skip
    deliveries = int(headers.get("x-delivery-count") or settings.delivery_limit + 1)
    exc = PoisonMessage(deliveries, settings.delivery_limit, f"RabbitMQ ({reason})")
    return record_poison(
        settings.database_url, task_name=task_name, task_id=task_id, args=args, kwargs=kwargs,
        poison=exc, source=deadletters.SOURCE_RABBITMQ, traceback=traceback,
    ).letter  # fmt: skip


def countdown(seconds: float) -> int:
    """A retry's countdown in whole seconds, rounded up and at least 1.

    RabbitMQ's native delayed delivery takes whole seconds: Celery truncates (2.7 s would
    arrive 0.7 s early, and be held by the worker until its ETA) and refuses less than one
    second (``calculate_routing_key`` raises for 0.5 s). Rounding up costs under a second.
    """
    return max(1, math.ceil(seconds))


def _rabbitmq_config(settings: Settings) -> dict[str, Any]:
    return {
        # A send returns once the broker has the message (quorum: on a majority of nodes).
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": [billing_queue(settings)],
        "task_default_exchange": EXCHANGE,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": settings.queue,
        # Any queue Celery creates on its own is a quorum queue too.
        "task_default_queue_type": "quorum",
        # Quorum queues refuse a global QoS: Celery sets it per consumer once it sees one.
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The configuration every Celery app of the project runs with (see ``tasks/app.py``
    for why each value); on RabbitMQ, the quorum queue and its dead letters on top."""
    config = {
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
    if is_amqp(settings.broker_url):
        config.update(_rabbitmq_config(settings))
    return config


@functools.cache
def _sending_app(
    broker_url: str, queue: str, visibility_timeout: int, delivery_limit: int
) -> Celery:
    app = Celery("klikandpay_billing_sender")
    app.conf.update(
        celery_config(
            Settings(
                broker_url=broker_url, queue=queue, visibility_timeout=visibility_timeout,
                delivery_limit=delivery_limit,
            )
        )
    )  # fmt: skip
    return app


def sending_app(settings: Settings) -> Celery:
    """A Celery app that only sends, configured like the workers' (one per broker)."""
    return _sending_app(
        settings.broker_url, settings.queue, settings.visibility_timeout, settings.delivery_limit
    )


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
        _connect(connection)


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
    "DEAD_LETTER_EXCHANGE",
    "EXCHANGE",
    "NOOP_TASK",
    "Poisoned",
    "batches",
    "billing_queue",
    "celery_config",
    "charge_ids_of",
    "countdown",
    "dead_letter_queue",
    "dead_letters_queue",
    "declare_dead_letters",
    "delete_queues",
    "dispatched_state",
    "drain_dead_letters",
    "ensure_reachable",
    "is_amqp",
    "is_reachable",
    "move_dead_letters",
    "record_poison",
    "requeued_charges",
    "send_charges",
    "send_many",
    "send_retried",
    "send_task",
    "sending_app",
]
