"""The outbox: every change the shop is told about becomes an ``events`` row in the
transaction that makes the change.

Why explicit calls rather than a flush listener: a change is a conditional statement of
the lifecycle (``billing.charging.lifecycle``) that returns the row after the move; the code
that made the move knows what happened and writes its event at once, from that row, with
:func:`emit`. A change that commits always has its event; a change rolled back takes its
event with it; a move that lost its race writes neither.

Payloads carry references, amounts and gateway codes only: never a card number, a CVV, a
private key or even a masked alias. Delivery is ``billing.webhooks``' job.

Each event also gets, in the same transaction, one ``event_deliveries`` row per endpoint
that is to receive it: always the implicit ``default`` endpoint (``BILLING_WEBHOOK_URL``,
which gets every event, even those recorded while it is unset), plus each endpoint of the
plans file that a delivery run has registered in ``webhook_endpoints`` and whose filter
takes the type. Writing them here rather than when delivering keeps each endpoint's set of
events exact: an event and its deliveries commit together, so a later delivery run can
never miss an event that committed out of ID order, and an endpoint added to the file later
receives the events created from then on, never the history before it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.orm import Session

from billing.charging.rows import ChargeLike, SubscriptionLike, locked_subscriptions
from billing.models import (
    Event,
    EventDelivery,
    EventStatus,
    Subscription,
    WebhookEndpointRecord,
    utcnow,
)
from billing.money import format_amount
from billing.redact import redact
from billing.vocabulary import EventType

#: Every event type, in the order the README documents them.
EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)

#: The endpoint of ``BILLING_WEBHOOK_URL``: gets every event (a reserved name in the plans file).
DEFAULT_ENDPOINT = "default"


def type_matches(patterns: Sequence[str], type_: str) -> bool:
    """Whether an endpoint's filter takes an event type.

    No pattern takes every type; ``"charge.approved"`` takes exactly that type and
    ``"subscription.*"`` every type that starts with ``subscription.``.
    """
    if not patterns:
        return True
    return any(
        type_ == pattern or (pattern.endswith(".*") and type_.startswith(pattern[:-1]))
        for pattern in patterns
    )


def iso(value: datetime | None) -> str | None:
    """UTC, ISO 8601 with a ``Z``: what every time in a payload looks like."""
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


def subscription_part(sub: SubscriptionLike | None) -> dict[str, Any] | None:
    if sub is None:
        return None
    return {"external_ref": sub.external_ref, "plan": sub.plan, "status": str(sub.status)}


def charge_part(charge: ChargeLike | None) -> dict[str, Any] | None:
    if charge is None:
        return None
    return {
        "id": charge.id,
        "period": charge.period,
        "amount": format_amount(charge.amount),
        "currency": charge.currency,
        "state": str(charge.state),
        "tx": charge.tx,
        "code": charge.last_code,
        "message": redact(charge.last_message)[:500] or None,
    }


def amount_text(value: Decimal | None) -> str | None:
    return format_amount(value) if value is not None else None


# --- writing ------------------------------------------------------------------------------


def _lock_subscription(session: Session, sub_id: int) -> None:
    """Hold the subscription's row until commit (PostgreSQL), once per transaction.

    Event IDs come from a sequence, taken at insert; without the lock two transactions
    touching one subscription could commit in the opposite order to their IDs, and a
    delivery worker could post the later event first. SQLite has one writer at a time.
    """
    if sub_id in locked_subscriptions(session):
        return
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(
            select(Subscription.id).where(Subscription.id == sub_id).with_for_update()
        )
    locked_subscriptions(session).add(sub_id)


@dataclass(frozen=True)
class EventRow:
    """One event's ``events`` columns and the endpoints that get a delivery of it."""

    columns: dict[str, Any]
    endpoints: tuple[str, ...]

    @property
    def event_id(self) -> str:
        return str(self.columns["event_id"])


def event_row(
    type_: EventType,
    *,
    subscription: SubscriptionLike,
    charge: ChargeLike | None,
    data: dict[str, Any],
    endpoints: Sequence[tuple[str, tuple[str, ...]]],
    at: datetime | None = None,
) -> EventRow:
    """The row of one event (the subscription and charge as they are *after* the change)
    and, of ``endpoints`` (see :func:`endpoint_filters`), those whose filter takes it."""
    at = at or utcnow()
    event_id = str(uuid.uuid4())
    payload: dict[str, Any] = {
        "id": event_id,
        "type": type_.value,
        "created_at": iso(at),
        "subscription": subscription_part(subscription),
        "charge": charge_part(charge),
        "data": data,
    }
    columns = {
        "event_id": event_id,
        "type": type_.value,
        "subscription_id": subscription.id,
        "external_ref": subscription.external_ref,
        "charge_id": charge.id if charge is not None else None,
        "payload": payload,
        "created_at": at,
        "status": EventStatus.PENDING.value,
        "next_attempt_at": at,
        "attempts": 0,
    }
    takers = tuple(name for name, patterns in endpoints if type_matches(patterns, type_.value))
    return EventRow(columns, takers)


def emit(
    session: Session,
    type_: EventType,
    *,
    subscription: SubscriptionLike,
    charge: ChargeLike | None = None,
    data: dict[str, Any],
    at: datetime | None = None,
) -> str:
    """Write one event (the subscription and charge as they are *after* the change) and its
    deliveries, in ``session``'s transaction; returns the event ID the shop will see."""
    _lock_subscription(session, subscription.id)
    event = event_row(
        type_, subscription=subscription, charge=charge, data=data,
        endpoints=endpoint_filters(session), at=at,
    )  # fmt: skip
    row_id = (
        session.connection()
        .execute(insert(Event).values(event.columns).returning(Event.id))
        .scalar_one()
    )
    deliveries = [
        {
            "event_id": row_id,
            "endpoint": name,
            "subscription_id": subscription.id,
            "status": EventStatus.PENDING,
            "next_attempt_at": event.columns["created_at"],
            "attempts": 0,
        }
        for name in event.endpoints
    ]
    session.connection().execute(insert(EventDelivery), deliveries)
    return event.event_id


def data_of_charge(
    amount: Decimal | None = None, reason: str | None = None, by: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A charge event's ``data``: see :func:`charge_event`."""
    data: dict[str, Any] = {"amount": amount_text(amount or Decimal("0.00")), "reason": reason}
    data.update(extra)
    if by is not None:
        data["by"] = by
    return data


def charge_event(
    session: Session,
    type_: EventType,
    charge: ChargeLike,
    subscription: SubscriptionLike,
    *,
    amount: Decimal | None = None,
    reason: str | None = None,
    by: str | None = None,
    **extra: Any,
) -> str:
    """A charge's event: ``data.amount`` is the money this change moved ("0.00" when none
    did), ``data.reason`` the recorded reason, ``data.by`` the person for changes by hand."""
    data = data_of_charge(amount, reason, by, **extra)
    return emit(session, type_, subscription=subscription, charge=charge, data=data)


def subscription_event(
    session: Session, type_: EventType, subscription: SubscriptionLike, *, previous: str
) -> str:
    """A subscription's status changed: ``data.previous_status`` says from what."""
    return emit(session, type_, subscription=subscription, data={"previous_status": str(previous)})


# --- endpoints ------------------------------------------------------------------------------

#: Seconds a process reuses its list of registered endpoints before reading it again. Every
#: charge writes events, so reading the table for each would cost a query per charge; an
#: endpoint added to the plans file starts receiving events within this delay.
ENDPOINTS_TTL = 30.0

_endpoints_cache: dict[str, tuple[float, list[tuple[str, tuple[str, ...]]]]] = {}


def clear_endpoint_cache() -> None:
    """Forget the cached endpoint lists (after registering endpoints, and in tests)."""
    _endpoints_cache.clear()


def endpoint_filters(bind: Session | Connection) -> list[tuple[str, tuple[str, ...]]]:
    """(name, filter) of every endpoint new events go to: ``default``, then the registered
    endpoints of the plans file that were not removed from it, by name."""
    connection = bind.connection() if isinstance(bind, Session) else bind
    key = str(connection.engine.url)
    cached = _endpoints_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < ENDPOINTS_TTL:
        return cached[1]
    found = _read_endpoint_filters(connection)
    _endpoints_cache[key] = (time.monotonic(), found)
    return found


def _read_endpoint_filters(connection: Connection) -> list[tuple[str, tuple[str, ...]]]:
    rows = connection.execute(
        select(WebhookEndpointRecord.name, WebhookEndpointRecord.events)
        .where(WebhookEndpointRecord.removed_at.is_(None))
        .order_by(WebhookEndpointRecord.name)
    )
    return [(DEFAULT_ENDPOINT, ())] + [
        (name, tuple(events or ())) for name, events in rows if name != DEFAULT_ENDPOINT
    ]
