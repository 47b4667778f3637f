"""The tables: plan versions, subscriptions, charges, attempts, the ledger, dead letters.

Why the shape:
- ``charges`` has one row per (subscription, period) under a unique constraint, so the
  database itself refuses a second charge for a period, whatever the workers do.
- ``attempts`` gets its row committed *before* each gateway call, so a crash mid-call
  leaves evidence that a call may have been made.
- ``ledger`` is append-only: no code path updates or deletes it, an ORM guard refuses
  it in every database, and on PostgreSQL a trigger refuses it too.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from billing import widths
from billing.errors import StateError
from billing.vocabulary import (
    ATTENTION_STATES,
    OPEN_STATES,
    ChargeState,
    SubscriptionStatus,
)

__all__ = [
    "ATTENTION_STATES",
    "OPEN_STATES",
    "Attempt",
    "Base",
    "Charge",
    "ChargeState",
    "DeadLetter",
    "Event",
    "EventDelivery",
    "EventStatus",
    "LedgerEntry",
    "PlanVersion",
    "Subscription",
    "SubscriptionChange",
    "SubscriptionStatus",
    "WebhookEndpointRecord",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware in Python, UTC in storage, on PostgreSQL and SQLite alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: every time must carry its offset")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Money = Numeric(12, 2, asdecimal=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        Decimal: Money,
        dict[str, Any]: JSON,
    }


class PlanVersion(Base):
    """One row per distinct (amount, currency, interval) a plan has had."""

    __tablename__ = "plan_versions"
    __table_args__ = (UniqueConstraint("plan", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    every: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (Index("ix_subscriptions_due", "plan", "status", "next_charge_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_ref: Mapped[str] = mapped_column(String(widths.EXTERNAL_REF), unique=True)
    plan: Mapped[str] = mapped_column(String(widths.PLAN))
    alias: Mapped[str] = mapped_column(String(widths.ALIAS))
    customer_ip: Mapped[str] = mapped_column(String(45))
    email: Mapped[str | None] = mapped_column(String(254))
    amount_override: Mapped[Decimal | None]
    #: Period n is due at anchor + (n - anchor_period) x interval (in the plan's time zone).
    anchor_at: Mapped[datetime]
    #: The period ``anchor_at`` is the due date of: 0, until a change of the plan's
    #: interval re-anchors the subscription on the first period of the new plan.
    anchor_period: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The next period to charge, counted from the anchor.
    next_period: Mapped[int] = mapped_column(Integer, default=0)
    next_charge_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(widths.STATE), default=SubscriptionStatus.ACTIVE)
    paused_at: Mapped[datetime | None]
    last_charged_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    charges: Mapped[list[Charge]] = relationship(back_populates="subscription")

    def __repr__(self) -> str:
        from billing.redact import mask_alias

        return (
            f"Subscription(id={self.id}, ref={self.external_ref!r}, plan={self.plan!r}, "
            f"alias={mask_alias(self.alias)!r}, status={self.status!r})"
        )


class SubscriptionChange(Base):
    """A plan or price a subscription moves to from a coming period (``billing.changes``).

    Each row holds the whole terms from ``effective_at`` on: the plan, and the amount (None:
    the plan's own). The sweep applies it when it creates the first charge due at or after
    ``effective_at`` (and writes ``applied_at``); a charge that exists already keeps its
    amount. Rows are never deleted: they are the history of what was asked and when.
    """

    __tablename__ = "subscription_changes"
    __table_args__ = (Index("ix_subscription_changes_pending", "subscription_id", "applied_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"))
    plan: Mapped[str] = mapped_column(String(widths.PLAN))
    amount_override: Mapped[Decimal | None]
    #: The terms apply to the charges due at or after this instant.
    effective_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(widths.ACTOR))
    reason: Mapped[str] = mapped_column(Text)
    #: When the sweep created the first charge on these terms, and that charge's period.
    applied_at: Mapped[datetime | None]
    applied_period: Mapped[int | None] = mapped_column(Integer)


class Charge(Base):
    __tablename__ = "charges"
    __table_args__ = (
        UniqueConstraint("subscription_id", "period"),
        Index("ix_charges_dispatch", "state", "next_attempt_at", "id"),
        Index("ix_charges_review", "review"),
        Index("ix_charges_tx", "tx"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"))
    period: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[datetime]
    plan: Mapped[str] = mapped_column(String(widths.PLAN))
    plan_version: Mapped[int] = mapped_column(Integer)
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    merchant_id: Mapped[str] = mapped_column(String(widths.MERCHANT_ID))
    deferred: Mapped[bool] = mapped_column(Boolean, default=False)
    #: A person asked for the current attempt: the engine's velocity guard does not apply.
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(widths.STATE), default=ChargeState.PENDING)
    #: Gateway calls made for this charge, of any script. The current attempt is the one
    #: numbered so: an answer carrying another number is late (see the lifecycle).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Declines so far: the position on the plan's retry ladder.
    declines: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    claimed_at: Mapped[datetime | None]
    tx: Mapped[str | None] = mapped_column(String(widths.TX))
    last_code: Mapped[str | None] = mapped_column(String(widths.CODE))
    last_message: Mapped[str | None] = mapped_column(String(widths.MESSAGE))
    #: Why the charge waits for a person (``billing.vocabulary.FailureReason``).
    reason: Mapped[str | None] = mapped_column(String(widths.REASON))
    #: Why a person must look at it whatever its state: ``billing.vocabulary.Review``
    #: values, comma-separated (``billing.charging.lifecycle`` reads and adds them).
    review: Mapped[str | None] = mapped_column(String(widths.REVIEW))
    authorized_amount: Mapped[Decimal | None]
    collected_amount: Mapped[Decimal | None]
    refunded_amount: Mapped[Decimal | None]
    #: Authorization given back: cancelled, or the rest after a partial validation.
    released_amount: Mapped[Decimal | None]
    #: validate | cancel while such a call is under way (claimed atomically, like a charge).
    operation: Mapped[str | None] = mapped_column(String(widths.STATE))
    operation_since: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    subscription: Mapped[Subscription] = relationship(back_populates="charges")


class Attempt(Base):
    """One gateway call, written and committed before the call is made."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    charge_id: Mapped[int] = mapped_column(ForeignKey("charges.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    #: duplicate | validate | release | refund
    operation: Mapped[str] = mapped_column(String(widths.STATE))
    amount: Mapped[Decimal]
    worker: Mapped[str] = mapped_column(String(widths.ACTOR))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(widths.STATE))
    code: Mapped[str | None] = mapped_column(String(widths.CODE))


class LedgerEntry(Base):
    """An append-only record of a gateway call's outcome or a money movement."""

    __tablename__ = "ledger"
    __table_args__ = (Index("ix_ledger_sub_at", "subscription_id", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    #: ``billing.vocabulary.Outcome``
    outcome: Mapped[str] = mapped_column(String(widths.OUTCOME), index=True)
    #: duplicate | validate | cancel | person | engine
    operation: Mapped[str] = mapped_column(String(16))
    charge_id: Mapped[int | None] = mapped_column(ForeignKey("charges.id"), index=True)
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("attempts.id"))
    subscription_id: Mapped[int | None] = mapped_column(ForeignKey("subscriptions.id"))
    external_ref: Mapped[str | None] = mapped_column(String(widths.EXTERNAL_REF))
    plan: Mapped[str | None] = mapped_column(String(widths.PLAN))
    period: Mapped[int | None] = mapped_column(Integer)
    #: Money that moved with this row (0 when none did), in ``currency``.
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    merchant_id: Mapped[str] = mapped_column(String(widths.MERCHANT_ID))
    tx: Mapped[str | None] = mapped_column(String(widths.TX))
    alias_masked: Mapped[str | None] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(widths.CODE))
    message: Mapped[str | None] = mapped_column(Text)
    #: The gateway's body with secrets removed, so a real answer can be read later.
    raw: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(widths.ACTOR))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None]


class DeadLetter(Base):
    """A task that raised something unexpected, kept whole for a person to requeue."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str | None] = mapped_column(String(64))
    args: Mapped[dict[str, Any]]
    exc_type: Mapped[str] = mapped_column(String(128))
    exc_message: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    requeued_at: Mapped[datetime | None]
    requeued_by: Mapped[str | None] = mapped_column(String(128))
    #: Who gave up on the message: ``task`` (it raised), ``redis`` (its deliveries died
    #: past the delivery limit, counted by the workers), ``rabbitmq`` (RabbitMQ's delivery
    #: limit; moved here from the dead-letter queue). See ``billing.deadletters``.
    source: Mapped[str] = mapped_column(String(32), default="task", server_default="task")


@event.listens_for(Session, "before_flush")
def _ledger_is_append_only(session: Session, _ctx: Any, _instances: Any) -> None:
    """Refuse, in every database, an ORM update or delete of a ledger row."""
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, LedgerEntry) and (obj in session.deleted or session.is_modified(obj)):
            raise StateError("the ledger is append-only: rows are never updated or deleted")


class EventStatus(enum.StrEnum):
    """Where an event is on its way to one endpoint (a delivery's status)."""

    PENDING = "pending"  # to be posted at next_attempt_at (also: endpoint not configured)
    DELIVERED = "delivered"  # the endpoint answered 2xx
    DEAD = "dead"  # every try failed; waits for ``billing events redeliver``


class Event(Base):
    """A state change the shop is told about: the transactional outbox.

    Rows are written by ``billing.events.emit``, called by the charge lifecycle in the very
    transaction that makes the change, so an event exists exactly when its change committed,
    together with one ``EventDelivery`` per endpoint that is to receive it. ``event_id`` never
    changes, so each endpoint drops the duplicates that at-least-once delivery brings.

    The delivery columns here (``status`` to ``redelivered_by``) held the single endpoint's
    state before migration 0003 moved it to ``event_deliveries``; they keep the values the
    event was written with and are no longer read.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_due", "status", "next_attempt_at"),
        Index("ix_events_subscription_order", "subscription_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(40), index=True)
    subscription_id: Mapped[int | None] = mapped_column(ForeignKey("subscriptions.id"))
    external_ref: Mapped[str | None] = mapped_column(String(128), index=True)
    charge_id: Mapped[int | None] = mapped_column(ForeignKey("charges.id"))
    #: The JSON body posted to the shop, fixed when the event is written.
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.PENDING)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_until: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    last_attempt_at: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    endpoint: Mapped[str | None] = mapped_column(String(255))
    delivered_at: Mapped[datetime | None]
    dead_at: Mapped[datetime | None]
    redelivered_at: Mapped[datetime | None]
    redelivered_by: Mapped[str | None] = mapped_column(String(128))

    deliveries: Mapped[list[EventDelivery]] = relationship(
        back_populates="event", order_by="EventDelivery.id"
    )


class EventDelivery(Base):
    """One event on its way to one endpoint: each endpoint has its own tries, its own
    order per subscription, its own dead events, so a failing endpoint holds back no other.

    Updated by ``billing.webhooks`` only; ``subscription_id`` is the event's, copied so the
    "no earlier pending event of this subscription" check needs no join.
    """

    __tablename__ = "event_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint"),
        Index("ix_event_deliveries_due", "endpoint", "status", "next_attempt_at"),
        Index("ix_event_deliveries_order", "endpoint", "subscription_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("events.id")
    )
    #: ``default`` (BILLING_WEBHOOK_URL) or the name of a ``[webhooks.NAME]`` table.
    endpoint: Mapped[str] = mapped_column(String(64))
    subscription_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.PENDING)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Posts started (a claim counts as one: the post may have reached the endpoint).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: A delivering worker's lease: past it, the delivery is claimed and posted again.
    claimed_until: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    last_attempt_at: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: Where it was last posted: scheme, host and path only (no credentials, no query).
    url: Mapped[str | None] = mapped_column(String(255))
    delivered_at: Mapped[datetime | None]
    dead_at: Mapped[datetime | None]
    redelivered_at: Mapped[datetime | None]
    redelivered_by: Mapped[str | None] = mapped_column(String(128))

    event: Mapped[Event] = relationship(back_populates="deliveries")


class WebhookEndpointRecord(Base):
    """An endpoint of the plans file, as delivery runs have seen it.

    New events get a delivery for each endpoint here that is not removed and whose filter
    takes their type: an endpoint receives the events created from its first sighting on,
    none from before. The implicit ``default`` endpoint is never listed here.
    """

    __tablename__ = "webhook_endpoints"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Scheme, host and path of its URL, for people reading the table.
    url: Mapped[str] = mapped_column(String(255))
    #: The ``events`` filter of the file; empty: every event.
    events: Mapped[list[str]] = mapped_column(JSON)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: When a delivery run last found it gone from the plans file; None while it is there.
    removed_at: Mapped[datetime | None]
