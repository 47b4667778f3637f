"""Posting the outbox's events to each endpoint: signed, at least once, in order per
subscription, every endpoint on its own.

Endpoints: ``default`` (``BILLING_WEBHOOK_URL``, signed with ``BILLING_WEBHOOK_SECRET``,
every event) and each ``[webhooks.NAME]`` table of the plans file (its own URL, secret and
event filter). Every (event, endpoint) pair is an ``event_deliveries`` row, written with the
event (see ``billing.events``), so each endpoint has its own tries, order and dead events.

How an event gets to an endpoint exactly as often as it must:
- a delivery run claims one delivery at a time with a lease (``claimed_until``), committed
  before the post; a worker killed mid-post leaves the claim to expire, and the next run
  posts the event again under the same ``event_id`` (the endpoint drops the duplicate);
- a delivery is due only when no earlier event of its subscription is still pending *for
  the same endpoint*, so the shop never hears of a reactivation before the suspension it
  ends, and an endpoint that fails holds back none of the others;
- a 2xx answer marks it delivered; anything else (status, timeout, refused connection, an
  answer that cannot be read, any exception at all while posting) schedules the next try
  from ``webhook_backoff``, stored in the database rather than in a broker countdown; after
  the last try it is dead, with a dead letter for ops, until ``billing events redeliver``
  (or ``billing deadletters requeue``) sends it again;
- one run posts to the endpoints in parallel threads, so a slow endpoint (timeouts) does
  not make the others wait for it either.

An endpoint that is not configured (``BILLING_WEBHOOK_URL`` unset, a table removed from the
plans file, its secret missing from the environment) is not posted to and nothing fails:
its deliveries stay pending, listed by ``billing events list``, and go out once it is.

What is stored and logged of a failed post is built from the kind of failure, never from
the exception's message: requests names the URL's path and query in it, and a shop may
put a token there. Only :func:`endpoint_label` of a URL is stored or shown, and an
endpoint's answer is kept only scrubbed of its secret and its URL's credentials.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session, aliased, selectinload
from urllib3.exceptions import DecodeError, NameResolutionError, ProtocolError

from billing import __version__, defaults
from billing.db import session_scope
from billing.errors import ConfigError, InvalidInput, NotFound, StateError
from billing.events import DEFAULT_ENDPOINT, clear_endpoint_cache
from billing.models import (
    DeadLetter,
    Event,
    EventDelivery,
    EventStatus,
    WebhookEndpointRecord,
    utcnow,
)
from billing.plans import WebhookEndpoint
from billing.redact import redact, remember_secrets, secrets_in_url
from billing.settings import Settings

if TYPE_CHECKING:
    from billing.plans import PlanSet

log = logging.getLogger("billing.webhooks")

#: Request headers of every post (documented in the README).
EVENT_ID_HEADER = "Klikandpay-Billing-Event-Id"
EVENT_TYPE_HEADER = "Klikandpay-Billing-Event-Type"
TIMESTAMP_HEADER = "Klikandpay-Billing-Timestamp"
SIGNATURE_HEADER = "Klikandpay-Billing-Signature"
ATTEMPT_HEADER = "Klikandpay-Billing-Attempt"

#: The task ``billing deadletters requeue`` sends for a dead delivery (see ``tasks/events.py``).
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


# ------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Target:
    """An endpoint one run posts to, with the secret read for that run."""

    endpoint: WebhookEndpoint
    secret: str = field(repr=False)

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never be stored or logged: the secret and the URL's credentials."""
        return (self.secret, *secrets_in_url(self.endpoint.url))


def configured_endpoints(settings: Settings, plans: PlanSet | None) -> list[WebhookEndpoint]:
    """Every endpoint to post to: ``default`` if ``BILLING_WEBHOOK_URL`` is set, then the
    plans file's (none when ``plans`` is None)."""
    found = []
    if settings.webhook_url:
        found.append(
            WebhookEndpoint(DEFAULT_ENDPOINT, settings.webhook_url, "BILLING_WEBHOOK_SECRET")
        )
    if plans is not None:
        found.extend(plans.webhooks.values())
    return found


def _targets(
    settings: Settings, endpoints: Sequence[WebhookEndpoint]
) -> tuple[list[Target], dict[str, str]]:
    """(endpoints ready to post to, endpoint -> why not) for this run."""
    ready: list[Target] = []
    problems: dict[str, str] = {}
    for endpoint in endpoints:
        if endpoint.name == DEFAULT_ENDPOINT:
            # Settings refuse a URL without a secret: it is there.
            assert settings.webhook_secret is not None
            ready.append(Target(endpoint, settings.webhook_secret.get_secret_value()))
            continue
        try:
            ready.append(Target(endpoint, endpoint.secret()))
        except ConfigError as exc:
            problems[endpoint.name] = str(exc)
    for target in ready:  # blanked from every log line of this process from now on
        remember_secrets(*target.secrets)
    return ready, problems


def _insert_ignoring_known(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert endpoint rows, leaving alone any another run has just inserted."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        statement: Any = pg_insert(WebhookEndpointRecord)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = sqlite_insert(WebhookEndpointRecord)
    session.execute(statement.values(rows).on_conflict_do_nothing(index_elements=["name"]))


def register_endpoints(url: str, plans: PlanSet, *, now: datetime | None = None) -> None:
    """Record the plans file's endpoints: events written from now on get a delivery for each.

    An endpoint seen for the first time receives the events created from then on, never
    the ones before (an endpoint added a year later does not get a year of history). One
    gone from the file is marked removed: new events get no delivery for it, and its
    pending deliveries wait, unposted, in case it comes back under the same name. Writes
    only what changed, so running this at every delivery run costs one read.
    """
    now = now or utcnow()
    wanted = {
        name: (endpoint_label(endpoint.url), list(endpoint.events))
        for name, endpoint in plans.webhooks.items()
    }
    with session_scope(url) as session:
        known = {row.name: row for row in session.scalars(select(WebhookEndpointRecord))}
        new = [
            {"name": name, "url": label, "events": events, "first_seen_at": now}
            for name, (label, events) in wanted.items()
            if name not in known
        ]
        if new:
            _insert_ignoring_known(session, new)
            for values in new:
                log.info("webhook endpoint %s seen for the first time", values["name"])
        for name, row in known.items():
            if name in wanted:
                label, events = wanted[name]
                if (row.url, list(row.events or []), row.removed_at) != (label, events, None):
                    if row.removed_at is not None:
                        log.info("webhook endpoint %s is back in the plans file", name)
                    row.url, row.events, row.removed_at = label, events, None
            elif row.removed_at is None:
                row.removed_at = now
                log.warning("webhook endpoint %s is no longer in the plans file", name)
    clear_endpoint_cache()  # this process sees its own registration at once


def known_endpoints(session: Session) -> list[str]:
    """``default`` and every endpoint a delivery run has registered (removed ones too)."""
    names = session.scalars(select(WebhookEndpointRecord.name).order_by(WebhookEndpointRecord.name))
    return [DEFAULT_ENDPOINT, *(name for name in names if name != DEFAULT_ENDPOINT)]


def _known_endpoint(session: Session, name: str) -> str:
    known = known_endpoints(session)
    if name not in known:
        raise InvalidInput(
            f'endpoint "{name}" is unknown (known: {", ".join(known)}); an endpoint of the '
            "plans file is known once a delivery run has seen it"
        )
    return name


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class EndpointResult:
    """What one run did for one endpoint; ``error`` says why it posted nothing."""

    name: str
    posted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    error: str | None = None


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery run did, in total and per endpoint. ``configured`` is False when
    no endpoint is set."""

    configured: bool
    posted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    endpoints: tuple[EndpointResult, ...] = ()


@dataclass(frozen=True)
class Claimed:
    """A delivery this run holds the lease on, with what it posts."""

    id: int
    event_number: int
    event_id: str
    type: str
    payload: dict[str, Any]
    attempts: int
    token: str
    endpoint: str


def _token() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _claimable(now: datetime) -> Any:
    return or_(EventDelivery.claimed_until.is_(None), EventDelivery.claimed_until <= now)


def due_query(now: datetime, endpoint: str = DEFAULT_ENDPOINT) -> Any:
    """An endpoint's pending deliveries due at ``now``, oldest event first, none behind a
    pending earlier event of its subscription for the same endpoint."""
    earlier = aliased(EventDelivery)
    blocked = exists().where(
        earlier.endpoint == EventDelivery.endpoint,
        earlier.subscription_id == EventDelivery.subscription_id,
        earlier.event_id < EventDelivery.event_id,
        earlier.status == EventStatus.PENDING,
    )
    return (
        select(EventDelivery.id)
        .where(EventDelivery.endpoint == endpoint)
        .where(EventDelivery.status == EventStatus.PENDING, EventDelivery.next_attempt_at <= now)
        .where(_claimable(now), ~blocked)
        .order_by(EventDelivery.event_id)
    )


def claim_next(
    url: str,
    now: datetime,
    lease: timedelta,
    token: str,
    endpoint: str = DEFAULT_ENDPOINT,
    target_url: str | None = None,
) -> Claimed | None:
    """Take ``endpoint``'s next due delivery and commit the claim before anything is posted."""
    with session_scope(url) as session:
        # SKIP LOCKED: concurrent runs take different deliveries (SQLite ignores it and has
        # one writer at a time; the conditional UPDATE below settles any race).
        row_id = session.scalar(
            due_query(now, endpoint).limit(1).with_for_update(skip_locked=True, of=EventDelivery)
        )
        if row_id is None:
            return None
        values: dict[str, Any] = {
            "claimed_until": now + lease,
            "claimed_by": token,
            "attempts": EventDelivery.attempts + 1,
            "last_attempt_at": now,
        }
        if target_url is not None:
            values["url"] = endpoint_label(target_url)
        row = session.execute(
            update(EventDelivery)
            .where(EventDelivery.id == row_id, EventDelivery.status == EventStatus.PENDING)
            .where(_claimable(now))
            .values(**values)
            .returning(EventDelivery.id, EventDelivery.event_id, EventDelivery.attempts)
        ).one_or_none()
        if row is None:
            return None
        event = session.execute(
            select(Event.event_id, Event.type, Event.payload).where(Event.id == row.event_id)
        ).one()
    return Claimed(
        row.id, row.event_id, event.event_id, event.type, dict(event.payload), row.attempts,
        token, endpoint,
    )  # fmt: skip


#: Why a post failed, by the kind of exception (the first that matches): what is stored
#: and logged instead of the exception's message.
_FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (NameResolutionError, "host name did not resolve"),
    (requests.exceptions.ConnectTimeout, "connect timeout"),
    (requests.exceptions.ReadTimeout, "no answer within the timeout"),
    (requests.exceptions.SSLError, "TLS failed"),
    (requests.exceptions.ProxyError, "the proxy failed"),
    ((requests.exceptions.ContentDecodingError, DecodeError), "answer could not be decoded"),
    ((requests.exceptions.ChunkedEncodingError, ProtocolError), "connection lost mid-answer"),
    (
        (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
         requests.exceptions.InvalidSchema),
        "invalid URL",
    ),
    (requests.exceptions.ConnectionError, "could not connect"),
)  # fmt: skip


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (urllib3 keeps the cause in ``reason``)."""
    found: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(found) < 32:
        item = todo.pop(0)
        if isinstance(item, BaseException) and all(item is not known for known in found):
            found.append(item)
            todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return found


def failure_text(exc: BaseException) -> str:
    """``ConnectionError: connection refused``: the exception's type and the reason it
    stands for, from types and error numbers only (never ``str(exc)``)."""
    chain = _chain(exc)
    reason = next(
        (text for kinds, text in _FAILURES if any(isinstance(e, kinds) for e in chain)),
        "unexpected error while posting",
    )
    if reason == "could not connect":  # say why, from the system's error number
        for error in chain:
            code = error.errno if isinstance(error, OSError) else None
            if code is not None and code in errno.errorcode:
                reason = os.strerror(code).lower()
                break
    return f"{type(exc).__name__}: {reason}"


def _post(
    http: requests.Session, target: Target, claimed: Claimed, timeout: float
) -> tuple[int | None, str | None]:
    """(HTTP status, error text) of one post; status None when no answer came.

    Any exception is a failed try: a hostile answer (a bad ``Content-Encoding``, a cut
    body) must never leave the delivery claimed with no error.
    """
    try:
        body = body_of(claimed.payload)
        headers = headers_for(claimed.event_id, claimed.type, claimed.attempts, body, target.secret)
        with http.post(
            target.endpoint.url,
            data=body,
            headers=headers,
            timeout=(timeout, timeout),
            allow_redirects=False,
            stream=True,
        ) as answer:
            status = answer.status_code
            if 200 <= status < 300:
                return status, None
            try:
                excerpt = answer.raw.read(300, decode_content=True) or b""
            except Exception as exc:
                return status, f"HTTP {status} (answer unreadable: {type(exc).__name__})"
            text = redact(excerpt.decode("utf-8", "replace").strip(), secrets=target.secrets)
            return status, f"HTTP {status}" + (f": {text}" if text else "")
    except Exception as exc:
        return None, failure_text(exc)


def _delivered(url: str, claimed: Claimed, status: int, now: datetime) -> None:
    with session_scope(url) as session:
        session.execute(
            update(EventDelivery)
            .where(EventDelivery.id == claimed.id, EventDelivery.status == EventStatus.PENDING)
            .values(
                status=EventStatus.DELIVERED,
                delivered_at=now,
                last_status=status,
                last_error=None,
                claimed_until=None,
                claimed_by=None,
            )
        )


def letter_args(event_id: str, endpoint: str) -> dict[str, Any]:
    """A dead delivery's letter arguments: what ``billing.redeliver_event`` takes."""
    kwargs = {} if endpoint == DEFAULT_ENDPOINT else {"endpoint": endpoint}
    return {"args": [event_id], "kwargs": kwargs}


def _failed(
    url: str,
    claimed: Claimed,
    status: int | None,
    error: str,
    now: datetime,
    delays: tuple[timedelta, ...],
) -> bool:
    """Schedule the next try, or make the delivery dead after the last one; True if dead."""
    error = redact(error)[:_ERROR_LIMIT]
    dead = claimed.attempts > len(delays)
    with session_scope(url) as session:
        delivery = session.scalars(
            select(EventDelivery)
            .where(EventDelivery.id == claimed.id, EventDelivery.claimed_by == claimed.token)
            .where(EventDelivery.status == EventStatus.PENDING)
            .with_for_update()
        ).one_or_none()
        if delivery is None:  # the lease ran out and another run took the delivery over
            return False
        delivery.last_status = status
        delivery.last_error = error
        delivery.claimed_until = None
        delivery.claimed_by = None
        if not dead:
            delivery.next_attempt_at = now + delays[claimed.attempts - 1]
            return False
        delivery.status = EventStatus.DEAD
        delivery.dead_at = now
        name = claimed.endpoint
        option = "" if name == DEFAULT_ENDPOINT else f" --endpoint {name}"
        session.add(
            DeadLetter(
                task_name=REDELIVER_TASK,
                task_id=None,
                args=letter_args(claimed.event_id, name),
                exc_type="WebhookNotDelivered",
                exc_message=(
                    f"event {claimed.event_id} ({claimed.type}, id {claimed.event_number}) not "
                    f"delivered to endpoint {name} ({delivery.url}) after {claimed.attempts} "
                    f"tries: {error}"
                )[:4000],
                traceback=(
                    f"The endpoint {name} did not answer 2xx to any of {claimed.attempts} "
                    f"posts; the last one got: {error}\nRequeue sends it again under the same "
                    f"event ID (or: billing events redeliver {claimed.event_number}{option})."
                ),
                created_at=now,
            )
        )
        return True


def _deliver_to(
    url: str,
    settings: Settings,
    target: Target,
    *,
    now: datetime | None,
    limit: int,
    http: requests.Session | None,
) -> EndpointResult:
    """Post one endpoint's due deliveries one by one, at most ``limit`` of them."""
    lease = timedelta(seconds=settings.webhook_timeout * 2)
    token = _token()
    name = target.name
    posted = delivered = retrying = dead = 0
    own_http = http is None
    http = http or requests.Session()
    stop_at = time.monotonic() + defaults.WEBHOOK_RUN_SECONDS
    try:
        for _ in range(limit):
            if time.monotonic() >= stop_at:  # the next run posts the rest
                break
            claimed = claim_next(url, now or utcnow(), lease, token, name, target.endpoint.url)
            if claimed is None:
                break
            status, error = _post(http, target, claimed, settings.webhook_timeout)
            posted += 1
            finished = now or utcnow()
            if error is None and status is not None:
                _delivered(url, claimed, status, finished)
                delivered += 1
                log.info(
                    "event %s %s delivered to %s (HTTP %s)",
                    claimed.event_id, claimed.type, name, status,
                )  # fmt: skip
                continue
            assert error is not None
            if _failed(url, claimed, status, error, finished, settings.webhook_backoff):
                dead += 1
                log.error(
                    "event %s %s dead for %s after %d tries: %s",
                    claimed.event_id, claimed.type, name, claimed.attempts, error,
                )  # fmt: skip
            else:
                retrying += 1
                log.warning(
                    "event %s %s not delivered to %s (try %d): %s",
                    claimed.event_id, claimed.type, name, claimed.attempts, error,
                )  # fmt: skip
    finally:
        if own_http:
            http.close()
    return EndpointResult(name, posted, delivered, retrying, dead)


def deliver_due(
    url: str,
    settings: Settings,
    *,
    plans: PlanSet | None = None,
    now: datetime | None = None,
    limit: int | None = None,
    http: requests.Session | None = None,
    endpoint: str | None = None,
) -> DeliveryResult:
    """Post due deliveries to every configured endpoint, at most ``limit`` per endpoint.

    ``plans``: the plans file whose ``[webhooks.NAME]`` endpoints are registered (see
    :func:`register_endpoints`) and posted to; None posts to ``default`` only and leaves
    the registrations alone. ``endpoint`` restricts the run to one endpoint. Endpoints are
    posted to in parallel threads, unless ``http`` (one session, tests) is given. ``now``
    (tests) fixes the clock used for due times, leases and backoff; the signature's
    timestamp is always the real time, since the endpoint checks it against its own clock.
    """
    if plans is not None:
        register_endpoints(url, plans, now=now)
    endpoints = configured_endpoints(settings, plans)
    if endpoint is not None:
        endpoints = [found for found in endpoints if found.name == endpoint]
    if not endpoints:
        return DeliveryResult(configured=False)
    targets, problems = _targets(settings, endpoints)
    for name, problem in problems.items():
        log.error("webhook endpoint %s not posted to: %s", name, problem)
    batch = limit if limit is not None else settings.webhook_batch

    def run(target: Target) -> EndpointResult:
        return _deliver_to(url, settings, target, now=now, limit=batch, http=http)

    if len(targets) > 1 and http is None:
        with ThreadPoolExecutor(len(targets), thread_name_prefix="webhooks") as pool:
            done = list(pool.map(run, targets))
    else:
        done = [run(target) for target in targets]
    by_name = {result.name: result for result in done}
    by_name.update({name: EndpointResult(name, error=text) for name, text in problems.items()})
    results = tuple(by_name[found.name] for found in endpoints)
    return DeliveryResult(
        True,
        posted=sum(r.posted for r in results),
        delivered=sum(r.delivered for r in results),
        retrying=sum(r.retrying for r in results),
        dead=sum(r.dead for r in results),
        endpoints=results,
    )


# ------------------------------------------------------------------ looking and redelivery


def _status(status: str) -> str:
    try:
        return EventStatus(status).value
    except ValueError:
        known = ", ".join(s.value for s in EventStatus)
        raise InvalidInput(f'status "{status}" is not one of: {known}') from None


def list_events(
    session: Session,
    *,
    status: str | None = None,
    type_: str | None = None,
    subscription: str | None = None,
    endpoint: str | None = None,
    limit: int = 100,
) -> list[Event]:
    """The latest ``limit`` events (oldest first), their deliveries loaded, optionally
    filtered: ``status`` and ``endpoint`` keep events with such a delivery."""
    query = (
        select(Event).options(selectinload(Event.deliveries)).order_by(Event.id.desc()).limit(limit)
    )
    wanted: list[Any] = []
    if status is not None:
        wanted.append(EventDelivery.status == _status(status))
    if endpoint is not None:
        wanted.append(EventDelivery.endpoint == _known_endpoint(session, endpoint))
    if wanted:
        query = query.where(Event.deliveries.any(*wanted))
    if type_ is not None:
        # "charge." lists every charge event; "charge.approved" exactly that type.
        query = query.where(
            Event.type.startswith(type_) if type_.endswith(".") else Event.type == type_
        )
    if subscription is not None:
        query = query.where(Event.external_ref == subscription)
    return list(reversed(session.scalars(query).all()))


def deliveries_of(
    event: Event, *, status: str | None = None, endpoint: str | None = None
) -> list[EventDelivery]:
    """An event's deliveries, ``default`` first then by endpoint name, optionally filtered."""
    found = [
        delivery
        for delivery in event.deliveries
        if (status is None or delivery.status == status)
        and (endpoint is None or delivery.endpoint == endpoint)
    ]
    return sorted(found, key=lambda d: (d.endpoint != DEFAULT_ENDPOINT, d.endpoint))


def get_event(session: Session, ref: str, *, for_update: bool = False) -> Event:
    """An event by its number (``billing events list``) or its event ID (a UUID)."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit():
        number = int(ref)
        # Event numbers are 64-bit; a larger one names no event (not a database error).
        found = session.get(Event, number, with_for_update=for_update) if number < 2**63 else None
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


def get_delivery(
    session: Session, ref: str, endpoint: str = DEFAULT_ENDPOINT, *, for_update: bool = False
) -> EventDelivery:
    """The delivery of one event (number or event ID) to one endpoint."""
    event = get_event(session, ref, for_update=for_update)
    query = select(EventDelivery).where(
        EventDelivery.event_id == event.id, EventDelivery.endpoint == endpoint
    )
    found = session.scalars(query.with_for_update() if for_update else query).one_or_none()
    if found is None:
        has = ", ".join(d.endpoint for d in deliveries_of(event)) or "none"
        raise NotFound(
            f"event {event.id} ({event.event_id}) has no delivery to endpoint {endpoint} "
            f"(it goes to: {has})"
        )
    return found


def redeliver(
    session: Session,
    ref: str,
    *,
    by: str,
    endpoint: str | None = None,
    now: datetime | None = None,
) -> list[EventDelivery]:
    """Send a dead or delivered event again, under the same event ID, from its first try.

    To ``endpoint`` only, or (None) to every endpoint whose delivery is dead or delivered;
    deliveries still pending are on their way already and left alone. Each one's dead
    letter (if any) is marked requeued, so ops see it handled in both lists.
    """
    now = now or utcnow()
    event = get_event(session, ref, for_update=True)
    query = select(EventDelivery).where(EventDelivery.event_id == event.id)
    if endpoint is not None:
        query = query.where(EventDelivery.endpoint == _known_endpoint(session, endpoint))
    chosen = list(session.scalars(query.order_by(EventDelivery.id).with_for_update()))
    if endpoint is not None and not chosen:
        get_delivery(session, ref, endpoint)  # raises NotFound naming where it does go
    ready = [d for d in chosen if d.status != EventStatus.PENDING]
    if not ready:
        waits = "; ".join(
            f"{d.endpoint}: next try at {d.next_attempt_at.isoformat().replace('+00:00', 'Z')}"
            for d in chosen
        )
        raise StateError(
            f"event {event.id} ({event.event_id}) is pending ({waits}); only delivered or "
            "dead events can be redelivered"
        )
    letters = list(
        session.scalars(
            select(DeadLetter).where(
                DeadLetter.task_name == REDELIVER_TASK, DeadLetter.requeued_at.is_(None)
            )
        )
    )
    for delivery in ready:
        delivery.status = EventStatus.PENDING
        delivery.next_attempt_at = now
        delivery.attempts = 0
        delivery.claimed_until = None
        delivery.claimed_by = None
        delivery.delivered_at = None
        delivery.dead_at = None
        delivery.redelivered_at = now
        delivery.redelivered_by = by
        for letter in letters:
            if _letter_endpoint(letter) == (event.event_id, delivery.endpoint):
                letter.requeued_at = now
                letter.requeued_by = by
        log.info(
            "event %s %s redelivery to %s asked by %s",
            event.event_id, event.type, delivery.endpoint, by,
        )  # fmt: skip
    return sorted(ready, key=lambda d: (d.endpoint != DEFAULT_ENDPOINT, d.endpoint))


def _letter_endpoint(letter: DeadLetter) -> tuple[str, str] | None:
    """(event ID, endpoint) a redelivery letter is about; letters from before several
    endpoints existed name no endpoint: theirs is ``default``."""
    args = letter.args.get("args") or []
    if len(args) != 1:
        return None
    kwargs = letter.args.get("kwargs") or {}
    return str(args[0]), str(kwargs.get("endpoint", DEFAULT_ENDPOINT))
