"""Charges whose message was dead-lettered as poison leave the dispatch loop for a person.

Why: a poison message kills its worker on every delivery, and the delivery limit (RabbitMQ's
quorum queue, or the workers' own count on Redis) makes it a dead letter. A charge whose
worker died before the claim is still ``queued``, and the engine sweep sends every charge
queued longer than ``requeue_after_seconds`` again (``dispatch.requeue_lost``): the same
poison charge would come back every ten minutes for ever, killing workers each time and
adding a letter each time. So the letter's charges still ``queued`` move to the
failed-charge queue (``poison``), where a person sees them, finds the cause from the
letter, and retries.

Failing a ``queued`` charge cannot double-charge: ``queued`` means no worker claimed it, and
every gateway call is made only after its claim (``queued`` -> ``in_flight``) committed, so
nothing of this charge was sent to the gateway since it was queued. Each move is the
lifecycle's conditional ``poison`` move: a charge claimed meanwhile (in flight, approved,
unknown) or already moved by a person is left as it is, and the move says it lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from billing import ledger, widths
from billing.charging import lifecycle
from billing.charging.rows import ChargeRow, load_subscription
from billing.events import charge_event
from billing.vocabulary import ChargeState, EventType, FailureReason, LedgerOutcome, Operation


@dataclass
class PoisonedCharges:
    """What became of a poison letter's charges: moved to the failed queue, or left as they
    were (claimed meanwhile, moved by a person, or no such charge)."""

    failed: list[int] = field(default_factory=list)
    untouched: list[int] = field(default_factory=list)


def message_of(letter: int, deliveries: int, charges: int) -> str:
    """What a person reads on a charge failed so (``charges.last_message``)."""
    what = "its message" if charges == 1 else f"its message (of {charges} charges)"
    return (
        widths.fit(  # never None for a string
            f"{what} killed a worker {deliveries} times; dead letter {letter} "
            f"(billing deadletters show {letter}): nothing was sent; once the cause is fixed, "
            "`billing failed retry` sends it again",
            widths.MESSAGE,
        )
        or ""
    )


def fail_queued(
    session: Session,
    charge_ids: Sequence[int],
    *,
    letter: int,
    deliveries: int,
    actor: str,
    now: datetime,
) -> PoisonedCharges:
    """Move the charges of poison letter ``letter`` still ``queued`` to the failed queue, in
    ``session``'s transaction (the letter's own): a ledger row and a ``charge.failed`` event
    each. Charges are moved in ID order, all before any subscription is locked (the lock
    order), and their subscriptions are locked in ID order."""
    ids = sorted(set(charge_ids))
    message = message_of(letter, deliveries, len(ids))
    done = PoisonedCharges()
    moved: list[ChargeRow] = []
    for charge_id in ids:
        row = lifecycle.move(
            session, charge_id, "poison", to=ChargeState.FAILED, now=now,
            values={"reason": FailureReason.POISON, "last_message": message,
                    "next_attempt_at": None},
        )  # fmt: skip
        if isinstance(row, ChargeRow):
            moved.append(row)
            done.failed.append(charge_id)
        else:
            done.untouched.append(charge_id)
    for row in sorted(moved, key=lambda charge: (charge.subscription_id, charge.id)):
        # Locked before its ledger row and event refer to it (``load_subscription``).
        sub = load_subscription(session, row.subscription_id, lock=True)
        ledger.append(
            session, outcome=LedgerOutcome.HELD, operation=Operation.ENGINE, actor=actor,
            subscription=sub, charge=row, reason=message,
        )  # fmt: skip
        charge_event(
            session, EventType.CHARGE_FAILED, row, sub, reason=None, failure=FailureReason.POISON
        )
    return done


__all__ = ["PoisonedCharges", "fail_queued", "message_of"]
