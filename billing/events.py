"""The outbox: every state change the shop is told about becomes an ``events`` row in the
flush that writes the change.

Why a ``before_flush`` listener rather than calls in the engine: the listener sees every
ledger row and every status change whoever makes it (engine, settlement, a person in the
CLI), and the event lands in the same transaction as the change. A change that commits
always has its event; a change rolled back takes its event with it.

What becomes an event:
- a new ledger row whose outcome tells something (approved, declined, unknown, authorized,
  validated, cancelled, refunded, discarded, held, any ``resolved_*``);
- a charge whose ``state`` becomes ``failed`` (it now waits for a person);
- a subscription whose ``status`` changes (past_due, suspended, cancelled, paused, and
  ``reactivated`` when it becomes active again).

Payloads carry references, amounts and gateway codes only: never a card number, a CVV, a
private key or even a masked alias. Delivery is ``billing.webhooks``' job.

Each event also gets, in the same flush, one ``event_deliveries`` row per endpoint that is
to receive it: always the implicit ``default`` endpoint (``BILLING_WEBHOOK_URL``, which gets
every event, even those recorded while it is unset), plus each endpoint of the plans file
that a delivery run has registered in ``webhook_endpoints`` and whose filter takes the type.
Writing them here rather than when delivering keeps each endpoint's set of events exact:
an event and its deliveries commit together, so a later delivery run can never miss an
event that committed out of ID order, and an endpoint added to the file later receives
the events created from then on, never the history before it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session, SessionTransaction

from billing.models import (
    Charge,
    ChargeState,
    Event,
    EventDelivery,
    EventStatus,
    LedgerEntry,
    Subscription,
    SubscriptionStatus,
    WebhookEndpointRecord,
    utcnow,
)
from billing.money import format_amount
from billing.redact import redact

#: Ledger outcomes that become an event, and the event's type.
LEDGER_EVENTS: dict[str, str] = {
    "approved": "charge.approved",
    "declined": "charge.declined",
    "unknown": "charge.unknown",
    "authorized": "charge.authorized",
    "validated": "charge.validated",
    "cancelled": "charge.cancelled",
    "refunded": "charge.refunded",
    "discarded": "charge.discarded",
    # The velocity guard held the charge back and failed it: the charge.failed event.
    "held": "charge.failed",
}
#: Every ``resolved_<what>`` outcome (a person recorded what the back office shows).
RESOLVED_PREFIX = "resolved_"
RESOLVED_EVENT = "charge.resolved"
FAILED_EVENT = "charge.failed"

#: Subscription status -> event type when a subscription moves to it.
STATUS_EVENTS: dict[str, str] = {
    SubscriptionStatus.PAST_DUE: "subscription.past_due",
    SubscriptionStatus.SUSPENDED: "subscription.suspended",
    SubscriptionStatus.CANCELLED: "subscription.cancelled",
    SubscriptionStatus.PAUSED: "subscription.paused",
    SubscriptionStatus.ACTIVE: "subscription.reactivated",
}

#: Every event type, in the order the README documents them.
EVENT_TYPES: tuple[str, ...] = (
    "charge.approved",
    "charge.authorized",
    "charge.validated",
    "charge.declined",
    "charge.failed",
    "charge.unknown",
    "charge.resolved",
    "charge.discarded",
    "charge.cancelled",
    "charge.refunded",
    "subscription.past_due",
    "subscription.suspended",
    "subscription.cancelled",
    "subscription.paused",
    "subscription.reactivated",
)

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


#: Settlement calls, named as the shop knows them (``charge`` is the recurring charge).
_CALLS = ("validate", "release", "refund")
#: The engine's wording for an answer that came after the call was declared lost: the
#: charge does not change (it waits for a person), so there is nothing to tell yet.
_LATE_ANSWER = "late answer"
#: Session.info key: charges whose charge.failed event this transaction already wrote.
_FAILED_SEEN = "billing.events.failed_seen"


def iso(value: datetime | None) -> str | None:
    """UTC, ISO 8601 with a ``Z``: what every time in a payload looks like."""
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


def subscription_part(sub: Subscription | None) -> dict[str, Any] | None:
    if sub is None:
        return None
    return {"external_ref": sub.external_ref, "plan": sub.plan, "status": str(sub.status)}


def charge_part(
    charge: Charge | None, *, code: str | None = None, message: str | None = None
) -> dict[str, Any] | None:
    if charge is None:
        return None
    text = message if message is not None else charge.last_message
    return {
        "id": charge.id,
        "period": charge.period,
        "amount": format_amount(charge.amount),
        "currency": charge.currency,
        "state": str(charge.state),
        "tx": charge.tx,
        "code": code if code is not None else charge.last_code,
        "message": redact(text)[:500] or None,
    }


def _amount(value: Any) -> str | None:
    return format_amount(value) if value is not None else None


def _new_event(
    type_: str,
    *,
    at: datetime,
    sub: Subscription | None,
    charge: Charge | None,
    data: dict[str, Any],
    charge_fields: dict[str, Any] | None = None,
) -> Event:
    event_id = str(uuid.uuid4())
    payload: dict[str, Any] = {
        "id": event_id,
        "type": type_,
        "created_at": iso(at),
        "subscription": subscription_part(sub),
        "charge": charge_fields if charge_fields is not None else charge_part(charge),
        "data": data,
    }
    return Event(
        event_id=event_id,
        type=type_,
        subscription_id=sub.id if sub is not None else None,
        external_ref=sub.external_ref if sub is not None else None,
        charge_id=charge.id if charge is not None else None,
        payload=payload,
        created_at=at,
        status=EventStatus.PENDING,
        next_attempt_at=at,
        attempts=0,
    )


def _call_of(entry: LedgerEntry, charge: Charge | None) -> str:
    """Which gateway call an outcome is about: the charge itself or a settlement call."""
    kind = (entry.details or {}).get("kind")
    if kind in _CALLS:
        return str(kind)
    reason = charge.reason if charge is not None else None
    if reason and reason.endswith("_unknown") and reason.removesuffix("_unknown") in _CALLS:
        return reason.removesuffix("_unknown")
    return "charge"


def _ledger_data(entry: LedgerEntry, type_: str, charge: Charge | None) -> dict[str, Any]:
    """The ``data`` of a ledger-made event: what this one change says beyond the charge."""
    details = entry.details or {}
    data: dict[str, Any] = {"amount": _amount(entry.amount), "reason": entry.reason}
    if type_ == "charge.declined":
        data["call"] = _call_of(entry, charge)
        data["soft"] = details.get("soft")
        retry_at = details.get("next_attempt_at")
        data["next_attempt_at"] = retry_at.replace("+00:00", "Z") if retry_at else None
    elif type_ == "charge.unknown":
        data["call"] = _call_of(entry, charge)
    elif type_ == RESOLVED_EVENT:
        data["resolution"] = entry.outcome.removeprefix(RESOLVED_PREFIX)
    elif type_ == "charge.refunded" and charge is not None:
        data["refunded_total"] = _amount(charge.refunded_amount)
    elif type_ == FAILED_EVENT and charge is not None:
        data["failure"] = charge.reason
    if entry.operation == "person":
        data["by"] = entry.actor
    return data


def _ledger_type(entry: LedgerEntry) -> str | None:
    if entry.reason and entry.reason.startswith(_LATE_ANSWER):
        return None
    if entry.outcome.startswith(RESOLVED_PREFIX):
        return RESOLVED_EVENT
    return LEDGER_EVENTS.get(entry.outcome)


def _changed(obj: Any, attr: str) -> tuple[bool, Any, Any]:
    """(changed, old, new) of one column since it was loaded or last flushed."""
    history = inspect(obj).attrs[attr].history
    if not history.added:
        return False, None, None
    old = history.deleted[0] if history.deleted else None
    new = history.added[0]
    return old != new, old, new


def _status_before(session: Session, sub: Subscription) -> str | None:
    """The status a subscription had in the database, when the session did not load it."""
    return session.scalar(select(Subscription.status).where(Subscription.id == sub.id))


def _sorted_new(session: Session, kind: type[Any]) -> list[Any]:
    """New objects of one class in the order they were added: the order of the changes."""
    found = [obj for obj in session.new if isinstance(obj, kind)]
    return sorted(found, key=lambda obj: inspect(obj).insert_order or 0)


def _lock_subscriptions(session: Session, ids: Iterable[int]) -> None:
    """Hold each subscription's row until commit (PostgreSQL).

    Event IDs come from a sequence, taken at flush; without the lock two transactions
    touching one subscription could commit in the opposite order to their IDs, and a
    delivery worker could post the later event first. SQLite has one writer at a time.
    """
    wanted = sorted(set(ids))
    if not wanted or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(
        select(Subscription.id)
        .where(Subscription.id.in_(wanted))
        .order_by(Subscription.id)
        .with_for_update()
    )


def collect(session: Session) -> list[Event]:
    """The events this flush's changes make, in the order they happened."""
    at = utcnow()
    made: list[Event] = []
    failed_seen: set[int] = session.info.setdefault(_FAILED_SEEN, set())

    for entry in _sorted_new(session, LedgerEntry):
        type_ = _ledger_type(entry)
        if type_ is None:
            continue
        charge = session.get(Charge, entry.charge_id) if entry.charge_id is not None else None
        sub = (
            session.get(Subscription, entry.subscription_id)
            if entry.subscription_id is not None
            else None
        )
        if type_ == FAILED_EVENT and charge is not None:
            if charge.id in failed_seen:
                continue
            failed_seen.add(charge.id)
        fields = charge_part(charge, code=entry.code, message=entry.message)
        if fields is not None and entry.tx and not fields["tx"]:
            fields["tx"] = entry.tx
        made.append(
            _new_event(
                type_,
                at=at,
                sub=sub,
                charge=charge,
                data=_ledger_data(entry, type_, charge),
                charge_fields=fields,
            )
        )

    for obj in list(session.dirty):
        if not isinstance(obj, Charge) or obj.id in failed_seen:
            continue
        changed, _old, new = _changed(obj, "state")
        if changed and new == ChargeState.FAILED:
            failed_seen.add(obj.id)
            made.append(
                _new_event(
                    FAILED_EVENT,
                    at=at,
                    sub=obj.subscription,
                    charge=obj,
                    data={"amount": "0.00", "reason": None, "failure": obj.reason},
                )
            )

    for obj in list(session.dirty):
        if not isinstance(obj, Subscription):
            continue
        changed, old, new = _changed(obj, "status")
        if not changed:
            continue
        if old is None:
            old = _status_before(session, obj)
            if old == new:
                continue
        type_ = STATUS_EVENTS.get(str(new))
        if type_ is None:
            continue
        made.append(
            _new_event(
                type_,
                at=at,
                sub=obj,
                charge=None,
                data={"previous_status": str(old) if old is not None else None},
            )
        )
    return made


#: Seconds a process reuses its list of registered endpoints before reading it again. Every
#: charge writes events, so reading the table at each flush would cost a query per charge;
#: an endpoint added to the plans file starts receiving events within this delay.
ENDPOINTS_TTL = 30.0

_endpoints_cache: dict[str, tuple[float, list[tuple[str, tuple[str, ...]]]]] = {}


def clear_endpoint_cache() -> None:
    """Forget the cached endpoint lists (after registering endpoints, and in tests)."""
    _endpoints_cache.clear()


def endpoint_filters(session: Session) -> list[tuple[str, tuple[str, ...]]]:
    """(name, filter) of every endpoint new events go to: ``default``, then the registered
    endpoints of the plans file that were not removed from it, by name."""
    key = str(session.get_bind().engine.url)
    cached = _endpoints_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < ENDPOINTS_TTL:
        return cached[1]
    found = _read_endpoint_filters(session)
    _endpoints_cache[key] = (time.monotonic(), found)
    return found


def _read_endpoint_filters(session: Session) -> list[tuple[str, tuple[str, ...]]]:
    rows = session.execute(
        select(WebhookEndpointRecord.name, WebhookEndpointRecord.events)
        .where(WebhookEndpointRecord.removed_at.is_(None))
        .order_by(WebhookEndpointRecord.name)
    )
    return [(DEFAULT_ENDPOINT, ())] + [
        (name, tuple(events or ())) for name, events in rows if name != DEFAULT_ENDPOINT
    ]


def add_deliveries(made: Sequence[Event], endpoints: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Give each new event a pending delivery for every endpoint whose filter takes it."""
    for made_event in made:
        for name, patterns in endpoints:
            if type_matches(patterns, made_event.type):
                made_event.deliveries.append(
                    EventDelivery(
                        endpoint=name,
                        subscription_id=made_event.subscription_id,
                        status=EventStatus.PENDING,
                        next_attempt_at=made_event.created_at,
                        attempts=0,
                    )
                )


@event.listens_for(Session, "before_flush")
def _write_events(session: Session, _ctx: Any, _instances: Any) -> None:
    """Add the events of this flush's changes, and their deliveries, to the same flush."""
    with session.no_autoflush:
        made = collect(session)
        if not made:
            return
        _lock_subscriptions(session, (e.subscription_id for e in made if e.subscription_id))
        add_deliveries(made, endpoint_filters(session))
    session.add_all(made)


@event.listens_for(Session, "after_transaction_end")
def _forget_transaction(session: Session, transaction: SessionTransaction) -> None:
    """Start each transaction with no charge.failed event written yet."""
    if transaction.parent is None:
        session.info.pop(_FAILED_SEEN, None)
