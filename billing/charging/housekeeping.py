"""Calls whose worker died: in flight longer than any call can last, they become unknown.

Every gateway call ends by a total deadline (connect + read timeout, ``billing.deadline``),
so a charge still ``in_flight`` after that plus a margin has no worker waiting for it any
more: the process was killed, the machine lost. Its call may have reached the gateway, so
the charge is ``unknown`` and waits for a person; it is never sent again by itself. Should
its worker still answer after all, that answer is still the attempt's own and is recorded
as such (see ``billing.charging.calls``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import ledger
from billing.charging import lifecycle
from billing.charging.context import Context
from billing.charging.rows import ChargeRow, SubRow, load_subscription
from billing.db import session_scope
from billing.events import charge_event
from billing.models import Attempt, Charge
from billing.vocabulary import (
    Call,
    ChargeState,
    EventType,
    FailureReason,
    LedgerOutcome,
    Operation,
)

log = logging.getLogger("billing.engine")


def attempt_id_of(session: Session, charge: ChargeRow) -> int | None:
    """The ID of the charge's current attempt (numbered ``charge.attempts``)."""
    return session.connection().scalar(
        select(Attempt.id).where(Attempt.charge_id == charge.id, Attempt.number == charge.attempts)
    )


class Housekeeping:
    """The stuck-call sweep."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def limit_seconds(self) -> float:
        """How long a call can last at most, plus the margin."""
        s = self.ctx.settings
        return s.connect_timeout + s.read_timeout + s.stuck_margin_seconds

    def mark_stuck(self, now: datetime) -> int:
        """Charges and settlement calls in flight longer than any call can last."""
        limit = self.limit_seconds()
        cutoff = now - timedelta(seconds=limit)
        with session_scope(self.ctx.url) as session:
            # Every charge row first, then the subscriptions in ID order, then the rows
            # that refer to them: the lock order, so two sweeps never wait in a circle.
            charges = lifecycle.move_many(
                session, "stuck", to=ChargeState.UNKNOWN, now=now,
                where=[Charge.state == ChargeState.IN_FLIGHT, Charge.claimed_at < cutoff],
                values={
                    "reason": FailureReason.STUCK_IN_FLIGHT,
                    "last_message": "the worker stopped during the gateway call",
                },
            )  # fmt: skip
            operations = lifecycle.move_many(
                session, "settle_stuck", to=ChargeState.UNKNOWN, now=now,
                where=[Charge.operation.is_not(None), Charge.operation_since < cutoff],
                values={
                    "reason": Charge.operation + "_unknown",
                    "operation": None,
                    "operation_since": None,
                    "last_message": "the worker stopped during a settlement call",
                },
            )  # fmt: skip
            subs = {
                sub_id: load_subscription(session, sub_id, lock=True)
                for sub_id in sorted({c.subscription_id for c in (*charges, *operations)})
            }
            for charge in charges:
                since = charge.claimed_at or now
                self._unknown(
                    session, charge, subs[charge.subscription_id], Call.CHARGE,
                    f"in flight since {since:%Y-%m-%d %H:%M:%S}Z, longer than any call can "
                    f"last ({limit:g} s): the worker died mid-call; the card may have been "
                    "charged",
                )  # fmt: skip
            for charge in operations:
                call = FailureReason(charge.reason).call if charge.reason else Call.CHARGE
                self._unknown(
                    session, charge, subs[charge.subscription_id], call,
                    f"the worker stopped during a {call} call; the money may have moved",
                )  # fmt: skip
        total = len(charges) + len(operations)
        if total:
            log.warning("marked %d stuck call(s) unknown", total)
        return total

    def _unknown(
        self, session: Session, charge: ChargeRow, sub: SubRow, call: Call, why: str
    ) -> None:
        ledger.append(
            session, outcome=LedgerOutcome.UNKNOWN, operation=Operation.ENGINE,
            actor=self.ctx.actor,
            subscription=sub, charge=charge, reason=why,
            attempt_id=attempt_id_of(session, charge),
        )  # fmt: skip
        charge_event(session, EventType.CHARGE_UNKNOWN, charge, sub, reason=why, call=call)


__all__ = ["Housekeeping", "attempt_id_of"]
