"""Handing due charges to the workers, never more than ``max_in_flight`` at once, and
sending again the messages a broker lost.

The move to ``queued`` commits before any message is sent: a message is never about a
charge the database does not know is on its way. A message sent twice (a requeue of a
message that was not lost after all, a broker's redelivery) is harmless: the claim is
atomic, and the second message finds the charge claimed and does nothing.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from psycopg.errors import LockNotAvailable
from sqlalchemy import ColumnElement, Select, case, func, literal, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.charging import lifecycle
from billing.charging.context import Context
from billing.db import session_scope
from billing.models import Charge, Subscription
from billing.vocabulary import CHARGEABLE, ChargeState

log = logging.getLogger("billing.engine")

#: Key of the PostgreSQL advisory lock that serialises dispatching, so that two beats or
#: many finishing charges never send more than ``max_in_flight`` between them.
DISPATCH_LOCK = 0x4B50_0001
#: Longest wait for another dispatch to finish (a dispatch holds the lock for two short
#: statements, milliseconds); past it this one gives up and the engine sweep fills the room.
DISPATCH_LOCK_WAIT = "5s"


def _lock_dispatch(session: Session) -> bool:
    """Serialise dispatchers on PostgreSQL (SQLite serialises writers by itself).

    A dispatch that meets another *waits* for it, then counts the room afresh: the other
    counted before this one's charge finished, so giving up would leave that slot empty
    until the next engine sweep (and for ever where no beat runs). The lock is this
    transaction's first: it holds no row while it waits, so it cannot deadlock.

    One round trip (a refill runs every few charges): the wait's bound, the lock, the bound
    lifted, as one simple query. A lock that times out aborts the transaction, which has
    written nothing yet: the caller's rollback is all there is to undo.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    try:
        session.connection().exec_driver_sql(_lock_sql())
    except OperationalError as exc:
        if not isinstance(exc.orig, LockNotAvailable):
            raise
        session.rollback()  # the aborted transaction, which had written nothing
        return False  # waited DISPATCH_LOCK_WAIT: the engine sweep fills the room instead
    return True


def _lock_sql() -> str:
    """The lock's simple query (no parameters: several statements in one round trip).
    The bound is for the lock only: the move that follows waits for rows as usual."""
    return (
        f"SET LOCAL lock_timeout = '{DISPATCH_LOCK_WAIT}'; "
        f"SELECT pg_advisory_xact_lock({int(DISPATCH_LOCK)}); "
        "SET LOCAL lock_timeout = DEFAULT"
    )


def room(max_in_flight: int) -> ColumnElement[int]:
    """How many more charges may be sent, counted by the statement that sends them (so
    under the dispatch lock, in one round trip): ``max_in_flight`` less those queued or in
    flight, never below 0 (a negative ``LIMIT`` is no limit at all on SQLite)."""
    busy = (
        select(func.count())
        .select_from(Charge)
        .where(Charge.state.in_((ChargeState.QUEUED, ChargeState.IN_FLIGHT)))
        .scalar_subquery()
    )
    free = literal(max_in_flight) - busy
    return case((free > 0, free), else_=0)


def due_charges(now: datetime, room: int | ColumnElement[int]) -> Select[int]:
    """The IDs of the ``room`` due pending charges first in line (oldest due first, then
    by ID) whose subscriptions may be charged. Read in index order on PostgreSQL
    (``ix_charges_dispatch``: state, next_attempt_at, id), so a dispatch costs the same
    with a hundred thousand charges waiting as with ten: a sweep's charges share one
    ``next_attempt_at``, and without ``id`` in the index every dispatch sorted them all."""
    return (
        select(Charge.id)
        .join(Subscription, Subscription.id == Charge.subscription_id)
        .where(
            Charge.state == ChargeState.PENDING,
            Charge.next_attempt_at <= now,
            Subscription.status.in_(CHARGEABLE),
        )
        .order_by(Charge.next_attempt_at, Charge.id)
        .limit(room)
    )


class Dispatch:
    """Sends due pending charges and re-sends lost messages."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def dispatch_due(self, now: datetime) -> int:
        """Send due pending charges of chargeable subscriptions, within the in-flight bound."""
        with session_scope(self.ctx.url) as session:
            if not _lock_dispatch(session):
                return 0  # another process is dispatching right now; it fills the room
            due = due_charges(now, room(self.ctx.settings.max_in_flight))
            moved = lifecycle.move_many(
                session,
                "dispatch",
                to=ChargeState.QUEUED,
                now=now,
                where=[Charge.id.in_(due.scalar_subquery())],
                values={"queued_at": now},
            )
        ids = [charge.id for charge in moved]
        if ids:
            try:
                self.ctx.dispatcher(ids)
            except Exception:
                self._unsend(ids, now)
                raise
        return len(ids)

    def _unsend(self, ids: list[int], now: datetime) -> None:
        """The send of ``ids`` failed: those still queued by this dispatch go back to
        pending, due now, so the next dispatch sends them (not the requeue, 10 minutes on).

        Safe whatever part of the send got through: a message that did reach the broker
        finds its charge pending and is not claimed (a claim takes only a queued charge),
        or, sent again by the next dispatch, one of the two messages claims it and the
        other finds it claimed. ``queued_at = now`` keeps a later dispatch's move."""
        with session_scope(self.ctx.url) as session:
            back = lifecycle.move_many(
                session, "unsent", to=ChargeState.PENDING, now=now,
                where=[Charge.id.in_(ids), Charge.queued_at == now],
            )  # fmt: skip
        log.warning("send failed: %d charge(s) due again for the next dispatch", len(back))

    def requeue_lost(self, now: datetime) -> int:
        """Send again the messages of charges queued too long ago (the broker lost them).

        Safe: the charge task claims atomically, so a message that was not lost after all
        meets a claimed charge and does nothing.
        """
        cutoff = now - timedelta(seconds=self.ctx.settings.requeue_after_seconds)
        with session_scope(self.ctx.url) as session:
            ids = sorted(
                session.connection().scalars(
                    update(Charge)
                    .where(Charge.state == ChargeState.QUEUED, Charge.queued_at < cutoff)
                    .values(queued_at=now, updated_at=now)
                    .returning(Charge.id)
                )
            )
        if ids:
            log.warning("re-sending %d charge message(s) queued before %s", len(ids), cutoff)
            try:
                self.ctx.dispatcher(ids)
            except Exception:
                self._unsend(ids, now)  # pending again: the next dispatch sends them
                raise
        return len(ids)


__all__ = ["DISPATCH_LOCK", "Dispatch", "due_charges"]
