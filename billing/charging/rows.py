"""A charge and a subscription as one statement returned them: plain frozen values.

The lifecycle's conditional statements end with ``RETURNING``; what they return is the row
*after* the move, which is what the ledger, the events and the caller need. Frozen rows
cannot be changed by mistake and then flushed by an ORM session: the database is written
only by statements.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from billing.db import checked_id
from billing.errors import NotFound
from billing.models import Charge, Subscription
from billing.redact import mask_alias


class ChargeLike(Protocol):
    """What code that only reads a charge needs of it: an ORM ``Charge`` or a ``ChargeRow``
    (the ledger's rows and the shop's payloads are written from either)."""

    @property
    def id(self) -> int: ...
    @property
    def plan(self) -> str: ...
    @property
    def period(self) -> int: ...
    @property
    def amount(self) -> Decimal: ...
    @property
    def currency(self) -> str: ...
    @property
    def merchant_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def tx(self) -> str | None: ...
    @property
    def last_code(self) -> str | None: ...
    @property
    def last_message(self) -> str | None: ...


class SubscriptionLike(Protocol):
    """What code that only reads a subscription needs of it (ORM or ``SubRow``)."""

    @property
    def id(self) -> int: ...
    @property
    def external_ref(self) -> str: ...
    @property
    def plan(self) -> str: ...
    @property
    def alias(self) -> str: ...
    @property
    def status(self) -> str: ...


@dataclass(frozen=True)
class ChargeRow:
    """Every column of one ``charges`` row."""

    id: int
    subscription_id: int
    period: int
    due_at: datetime
    plan: str
    plan_version: int
    amount: Decimal
    currency: str
    merchant_id: str
    deferred: bool
    manual: bool
    state: str
    attempts: int
    declines: int
    next_attempt_at: datetime | None
    queued_at: datetime | None
    claimed_at: datetime | None
    tx: str | None
    last_code: str | None
    last_message: str | None
    reason: str | None
    review: str | None
    authorized_amount: Decimal | None
    collected_amount: Decimal | None
    refunded_amount: Decimal | None
    released_amount: Decimal | None
    operation: str | None
    operation_since: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> ChargeRow:
        mapping = row._mapping
        return cls(**{name: mapping[name] for name in CHARGE_FIELDS})


@dataclass(frozen=True)
class SubRow:
    """Every column of one ``subscriptions`` row; the alias is masked in the repr."""

    id: int
    external_ref: str
    plan: str
    alias: str
    customer_ip: str
    email: str | None
    amount_override: Decimal | None
    anchor_at: datetime
    anchor_period: int
    next_period: int
    next_charge_at: datetime
    status: str
    paused_at: datetime | None
    last_charged_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> SubRow:
        mapping = row._mapping
        return cls(**{name: mapping[name] for name in SUB_FIELDS})

    def __repr__(self) -> str:
        return (
            f"SubRow(id={self.id}, ref={self.external_ref!r}, plan={self.plan!r}, "
            f"alias={mask_alias(self.alias)!r}, status={self.status!r})"
        )


CHARGE_FIELDS = tuple(f.name for f in fields(ChargeRow))
SUB_FIELDS = tuple(f.name for f in fields(SubRow))
#: What a statement returns to build a row: every column, by name.
CHARGE_COLUMNS = tuple(Charge.__table__.c[name] for name in CHARGE_FIELDS)
SUB_COLUMNS = tuple(Subscription.__table__.c[name] for name in SUB_FIELDS)


def _locked(query: Select[Any], lock: bool) -> Select[Any]:
    # FOR UPDATE holds the row on PostgreSQL; SQLite's BEGIN IMMEDIATE already holds all.
    return query.with_for_update() if lock else query


def load_charge(session: Session, charge_id: int, *, lock: bool = False) -> ChargeRow:
    """The charge, read in ``session``'s transaction (locked with ``lock``)."""
    query = _locked(
        select(*CHARGE_COLUMNS).where(Charge.id == checked_id(charge_id, "charge")), lock
    )
    row = session.connection().execute(query).one_or_none()
    if row is None:
        raise NotFound(f"charge {charge_id} does not exist")
    return ChargeRow.of(row)


def load_subscription(session: Session, sub_id: int, *, lock: bool = False) -> SubRow:
    """The subscription, read in ``session``'s transaction (locked with ``lock``).

    Lock a subscription *before* the first row that refers to it is written (a ledger row,
    an event): PostgreSQL checks such a foreign key with a share lock on the subscription,
    and two transactions holding that share lock would each wait for the other to let go
    before either could lock the row for update.
    """
    query = _locked(select(*SUB_COLUMNS).where(Subscription.id == sub_id), lock)
    row = session.connection().execute(query).one_or_none()
    if row is None:
        raise NotFound(f"subscription {sub_id} does not exist")
    if lock:
        locked_subscriptions(session).add(sub_id)
    return SubRow.of(row)


#: Session.info key: the subscriptions the session's current transaction holds locked.
_LOCKED = "billing.locked_subscriptions"


def locked_subscriptions(session: Session) -> set[int]:
    """The subscriptions locked for update by this session's current transaction."""
    transaction = session.get_transaction()
    held = session.info.get(_LOCKED)
    if held is None or held[0] is not transaction:
        held = session.info[_LOCKED] = (transaction, set())
    locked: set[int] = held[1]
    return locked
