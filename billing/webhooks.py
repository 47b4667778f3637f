"""Posting the outbox's events to the shop: signed, at least once, in order per subscription.

How an event gets to the shop exactly as often as it must:
- a delivery claims one event at a time with a lease (``claimed_until``), committed before
  the post; a worker killed mid-post leaves the claim to expire, and the next delivery
  posts the event again under the same ``event_id`` (the shop drops the duplicate);
- an event is due only when no earlier event of its subscription is still pending, so the
  shop never hears of a reactivation before the suspension it ends;
- a 2xx answer marks it delivered; anything else (status, timeout, refused connection)
  schedules the next try from ``webhook_backoff``, stored in the database rather than in a
  broker countdown; after the last try it is dead, with a dead letter for ops, until
  ``billing events redeliver`` (or ``billing deadletters requeue``) sends it again.

Without ``BILLING_WEBHOOK_URL`` nothing is posted and nothing fails: events stay pending,
listed by ``billing events list``, and go out once an endpoint is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from billing import __version__
from billing.db import session_scope
from billing.errors import InvalidInput, NotFound, StateError
from billing.models import DeadLetter, Event, EventStatus, utcnow
from billing.redact import redact
from billing.settings import Settings

log = logging.getLogger("billing.webhooks")

#: Request headers of every post (documented in the README).
EVENT_ID_HEADER = "Klikandpay-Billing-Event-Id"
EVENT_TYPE_HEADER = "Klikandpay-Billing-Event-Type"
TIMESTAMP_HEADER = "Klikandpay-Billing-Timestamp"
SIGNATURE_HEADER = "Klikandpay-Billing-Signature"
ATTEMPT_HEADER = "Klikandpay-Billing-Attempt"

#: The task ``billing deadletters requeue`` sends for a dead event (see ``tasks/events.py``).
REDELIVER_TASK = "billing.redeliver_event"

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ERROR_LIMIT = 500


# ---------------------------------------------------------------------------- signing


def body_of(payload: dict[str, Any]) -> bytes:
    """The exact bytes posted (and signed): compact JSON, UTF-8, the same on every try."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``v1=`` + HMAC-SHA256(secret, timestamp + "." + body)."""
    signed = timestamp.encode() + b"." + body
    return "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, header: str, tolerance: int = 300
) -> bool:
    """True when `header` signs `timestamp` + "." + `body` with `secret`, and the timestamp
    is at most `tolerance` seconds away from now (an old captured request is refused)."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - sent_at) > tolerance:
        return False
    signed = timestamp.encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return any(
        hmac.compare_digest(part.strip()[3:], expected)
        for part in header.split(",")
        if part.strip().startswith("v1=")
    )


def headers_for(
    event_id: str, type_: str, attempt: int, body: bytes, secret: str
) -> dict[str, str]:
    """Every header of one post; the timestamp is the sending time, so each try differs."""
    timestamp = str(int(time.time()))
    return {
        "Content-Type": "application/json",
        "User-Agent": f"klikandpay-billing/{__version__}",
        EVENT_ID_HEADER: event_id,
        EVENT_TYPE_HEADER: type_,
        ATTEMPT_HEADER: str(attempt),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def endpoint_label(url: str) -> str:
    """``https://user:pw@shop.example/hooks?token=x`` -> ``https://shop.example/hooks``.

    What is stored and shown of the endpoint: credentials and query strings stay in the
    environment.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"[:255]


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery run did. ``configured`` is False when no endpoint is set."""

    configured: bool
    posted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0


@dataclass(frozen=True)
class Claimed:
    """An event this delivery holds the lease on."""

    id: int
    event_id: str
    type: str
    payload: dict[str, Any]
    attempts: int
    token: str


def _token() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _claimable(now: datetime) -> Any:
    return or_(Event.claimed_until.is_(None), Event.claimed_until <= now)


def due_query(now: datetime) -> Any:
    """Pending events due at ``now``, oldest first, none behind a pending earlier one."""
    earlier = aliased(Event)
    blocked = exists().where(
        earlier.subscription_id == Event.subscription_id,
        earlier.id < Event.id,
        earlier.status == EventStatus.PENDING,
    )
    return (
        select(Event.id)
        .where(Event.status == EventStatus.PENDING, Event.next_attempt_at <= now)
        .where(_claimable(now), ~blocked)
        .order_by(Event.id)
    )


def claim_next(
    url: str, now: datetime, lease: timedelta, token: str, endpoint: str
) -> Claimed | None:
    """Take the next due event and commit the claim before anything is posted."""
    with session_scope(url) as session:
        # SKIP LOCKED: concurrent deliveries take different events (SQLite ignores it and
        # has one writer at a time; the conditional UPDATE below settles any race).
        row_id = session.scalar(due_query(now).limit(1).with_for_update(skip_locked=True, of=Event))
        if row_id is None:
            return None
        row = session.execute(
            update(Event)
            .where(Event.id == row_id, Event.status == EventStatus.PENDING, _claimable(now))
            .values(
                claimed_until=now + lease,
                claimed_by=token,
                attempts=Event.attempts + 1,
                last_attempt_at=now,
                endpoint=endpoint,
            )
            .returning(Event.id, Event.event_id, Event.type, Event.payload, Event.attempts)
        ).one_or_none()
    if row is None:
        return None
    return Claimed(row.id, row.event_id, row.type, dict(row.payload), row.attempts, token)


def _post(
    http: requests.Session, settings: Settings, claimed: Claimed, secret: str
) -> tuple[int | None, str | None]:
    """(HTTP status, error text) of one post; status None when no answer came."""
    assert settings.webhook_url is not None
    body = body_of(claimed.payload)
    headers = headers_for(claimed.event_id, claimed.type, claimed.attempts, body, secret)
    timeout = settings.webhook_timeout
    try:
        with http.post(
            settings.webhook_url,
            data=body,
            headers=headers,
            timeout=(timeout, timeout),
            allow_redirects=False,
            stream=True,
        ) as answer:
            if 200 <= answer.status_code < 300:
                return answer.status_code, None
            excerpt = answer.raw.read(300, decode_content=True) or b""
            text = excerpt.decode("utf-8", "replace").strip()
            return answer.status_code, f"HTTP {answer.status_code}" + (f": {text}" if text else "")
    except requests.RequestException as exc:
        message = str(exc).replace(settings.webhook_url, endpoint_label(settings.webhook_url))
        return None, f"{type(exc).__name__}: {message}"


def _delivered(url: str, claimed: Claimed, status: int, now: datetime) -> None:
    with session_scope(url) as session:
        session.execute(
            update(Event)
            .where(Event.id == claimed.id, Event.status == EventStatus.PENDING)
            .values(
                status=EventStatus.DELIVERED,
                delivered_at=now,
                last_status=status,
                last_error=None,
                claimed_until=None,
                claimed_by=None,
            )
        )


def _failed(
    url: str,
    claimed: Claimed,
    status: int | None,
    error: str,
    now: datetime,
    delays: tuple[timedelta, ...],
) -> bool:
    """Schedule the next try, or make the event dead after the last one; True if dead."""
    error = redact(error)[:_ERROR_LIMIT]
    dead = claimed.attempts > len(delays)
    with session_scope(url) as session:
        event = session.scalars(
            select(Event)
            .where(Event.id == claimed.id, Event.claimed_by == claimed.token)
            .where(Event.status == EventStatus.PENDING)
            .with_for_update()
        ).one_or_none()
        if event is None:  # the lease ran out and another delivery took the event over
            return False
        event.last_status = status
        event.last_error = error
        event.claimed_until = None
        event.claimed_by = None
        if not dead:
            event.next_attempt_at = now + delays[claimed.attempts - 1]
            return False
        event.status = EventStatus.DEAD
        event.dead_at = now
        session.add(
            DeadLetter(
                task_name=REDELIVER_TASK,
                task_id=None,
                args={"args": [claimed.event_id], "kwargs": {}},
                exc_type="WebhookNotDelivered",
                exc_message=(
                    f"event {claimed.event_id} ({claimed.type}, id {claimed.id}) not delivered "
                    f"to {event.endpoint} after {claimed.attempts} tries: {error}"
                )[:4000],
                traceback=(
                    f"The endpoint did not answer 2xx to any of {claimed.attempts} posts; the "
                    f"last one got: {error}\nRequeue sends it again under the same event ID "
                    f"(or: billing events redeliver {claimed.id})."
                ),
                created_at=now,
            )
        )
        return True


def deliver_due(
    url: str,
    settings: Settings,
    *,
    now: datetime | None = None,
    limit: int | None = None,
    http: requests.Session | None = None,
) -> DeliveryResult:
    """Post due events to ``settings.webhook_url`` one by one, at most ``limit`` of them.

    ``now`` (tests) fixes the clock used for due times, leases and backoff; the signature's
    timestamp is always the real time, since the shop checks it against its own clock.
    """
    if not settings.webhook_url or settings.webhook_secret is None:
        return DeliveryResult(configured=False)
    secret = settings.webhook_secret.get_secret_value()
    lease = timedelta(seconds=settings.webhook_timeout * 2)
    endpoint = endpoint_label(settings.webhook_url)
    token = _token()
    posted = delivered = retrying = dead = 0
    own_http = http is None
    http = http or requests.Session()
    try:
        for _ in range(limit if limit is not None else settings.webhook_batch):
            claimed = claim_next(url, now or utcnow(), lease, token, endpoint)
            if claimed is None:
                break
            status, error = _post(http, settings, claimed, secret)
            posted += 1
            finished = now or utcnow()
            if error is None and status is not None:
                _delivered(url, claimed, status, finished)
                delivered += 1
                log.info("event %s %s delivered (HTTP %s)", claimed.event_id, claimed.type, status)
                continue
            assert error is not None
            if _failed(url, claimed, status, error, finished, settings.webhook_backoff):
                dead += 1
                log.error(
                    "event %s %s dead after %d tries: %s",
                    claimed.event_id, claimed.type, claimed.attempts, error,
                )  # fmt: skip
            else:
                retrying += 1
                log.warning(
                    "event %s %s not delivered (try %d): %s",
                    claimed.event_id, claimed.type, claimed.attempts, error,
                )  # fmt: skip
    finally:
        if own_http:
            http.close()
    return DeliveryResult(True, posted, delivered, retrying, dead)


# ------------------------------------------------------------------ looking and redelivery


def list_events(
    session: Session,
    *,
    status: str | None = None,
    type_: str | None = None,
    subscription: str | None = None,
    limit: int = 100,
) -> list[Event]:
    """The latest ``limit`` events (oldest first), optionally filtered."""
    query = select(Event).order_by(Event.id.desc()).limit(limit)
    if status is not None:
        try:
            EventStatus(status)
        except ValueError:
            known = ", ".join(s.value for s in EventStatus)
            raise InvalidInput(f'status "{status}" is not one of: {known}') from None
        query = query.where(Event.status == status)
    if type_ is not None:
        # "charge." lists every charge event; "charge.approved" exactly that type.
        query = query.where(
            Event.type.startswith(type_) if type_.endswith(".") else Event.type == type_
        )
    if subscription is not None:
        query = query.where(Event.external_ref == subscription)
    return list(reversed(session.scalars(query).all()))


def get_event(session: Session, ref: str, *, for_update: bool = False) -> Event:
    """An event by its number (``billing events list``) or its event ID (a UUID)."""
    ref = ref.strip()
    if ref.isdigit():
        found = session.get(Event, int(ref), with_for_update=for_update)
    elif _UUID.fullmatch(ref):
        query = select(Event).where(Event.event_id == ref.lower())
        found = session.scalars(query.with_for_update() if for_update else query).one_or_none()
    else:
        raise InvalidInput(
            f'event "{ref}" must be an event number such as 12 or an event ID (a UUID)'
        )
    if found is None:
        raise NotFound(f"event {ref} does not exist")
    return found


def redeliver(session: Session, ref: str, *, by: str, now: datetime | None = None) -> Event:
    """Send a dead or delivered event again, under the same event ID, from its first try.

    Its dead letter (if any) is marked requeued, so ops see it handled in both lists.
    """
    now = now or utcnow()
    event = get_event(session, ref, for_update=True)
    if event.status == EventStatus.PENDING:
        when = event.next_attempt_at.isoformat().replace("+00:00", "Z")
        raise StateError(
            f"event {event.id} ({event.event_id}) is pending: its next try is at {when}; "
            "only delivered or dead events can be redelivered"
        )
    event.status = EventStatus.PENDING
    event.next_attempt_at = now
    event.attempts = 0
    event.claimed_until = None
    event.claimed_by = None
    event.delivered_at = None
    event.dead_at = None
    event.redelivered_at = now
    event.redelivered_by = by
    letters = session.scalars(
        select(DeadLetter).where(
            DeadLetter.task_name == REDELIVER_TASK, DeadLetter.requeued_at.is_(None)
        )
    )
    for letter in letters:
        if letter.args.get("args") == [event.event_id]:
            letter.requeued_at = now
            letter.requeued_by = by
    log.info("event %s %s redelivery asked by %s", event.event_id, event.type, by)
    return event
