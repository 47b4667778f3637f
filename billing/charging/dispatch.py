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

from sqlalchemy import func, select, text, update
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


def _lock_dispatch(session: Session) -> bool:
    """Serialise dispatchers on PostgreSQL; SQLite serialises writers by itself."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(
        session.connection().scalar(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": DISPATCH_LOCK}
        )
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
            busy = session.connection().scalar(
                select(func.count())
                .select_from(Charge)
                .where(Charge.state.in_((ChargeState.QUEUED, ChargeState.IN_FLIGHT)))
            )
            room = self.ctx.settings.max_in_flight - int(busy or 0)
            if room <= 0:
                return 0
            due = (
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
            self.ctx.dispatcher(ids)
        return len(ids)

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
            self.ctx.dispatcher(ids)
        return len(ids)


__all__ = ["DISPATCH_LOCK", "Dispatch"]
