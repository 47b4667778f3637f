"""Writing to the append-only ledger.

Every gateway call's outcome and every money movement goes through :func:`append`, so the
rows always carry the same fields: amount, currency, merchant ID, TX, masked alias, the raw
answer with secrets removed, who wrote it and why. Rows are inserted by a plain statement
in the caller's transaction (no ORM unit of work), and every outside value is cut to its
column's width first (``billing.widths``): a long gateway message can never make the
database refuse the transaction that records a real approval.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from billing import widths
from billing.charging.rows import ChargeLike, SubscriptionLike
from billing.models import LedgerEntry, utcnow
from billing.outcomes import Outcome
from billing.redact import mask_alias, redact
from billing.vocabulary import AUTHORIZED, COLLECTED, REFUNDED, LedgerOutcome, Operation

ZERO = Decimal("0.00")

__all__ = [
    "AUTHORIZED",
    "COLLECTED",
    "COLUMNS",
    "REFUNDED",
    "append",
    "append_outcome",
    "outcome_fields",
    "row",
]


def _text(value: str | None, secrets: tuple[str, ...]) -> str | None:
    if not value:
        return None
    return widths.fit(redact(value, secrets=secrets), widths.LEDGER_TEXT)


def row(
    *,
    outcome: LedgerOutcome | str,
    operation: Operation | str,
    actor: str,
    subscription: SubscriptionLike | None = None,
    charge: ChargeLike | None = None,
    period: int | None = None,
    amount: Decimal = ZERO,
    currency: str | None = None,
    merchant_id: str | None = None,
    tx: str | None = None,
    code: str | None = None,
    message: str | None = None,
    raw: str | None = None,
    http_status: int | None = None,
    reason: str | None = None,
    attempt_id: int | None = None,
    details: dict[str, Any] | None = None,
    secrets: tuple[str, ...] = (),
    at: datetime | None = None,
) -> dict[str, Any]:
    """The columns of one ledger row (every one, secrets scrubbed, each cut to its width).
    ``subscription`` defaults to an ORM charge's own; ``at`` to now."""
    sub = subscription if subscription is not None else getattr(charge, "subscription", None)
    return {
        "at": at or utcnow(),
        "outcome": str(outcome),
        "operation": str(operation),
        "actor": widths.fit(actor, widths.ACTOR),
        "charge_id": charge.id if charge is not None else None,
        "attempt_id": attempt_id,
        "subscription_id": sub.id if sub is not None else None,
        "external_ref": sub.external_ref if sub is not None else None,
        "plan": charge.plan if charge is not None else sub.plan if sub is not None else None,
        "period": charge.period if charge is not None else period,
        "amount": amount,
        "currency": currency or (charge.currency if charge is not None else ""),
        "merchant_id": merchant_id or (charge.merchant_id if charge is not None else ""),
        "tx": widths.fit(tx, widths.TX),
        "alias_masked": mask_alias(sub.alias) if sub is not None else None,
        "code": widths.fit(code, widths.CODE),
        "message": _text(message, secrets),
        "raw": _text(raw, secrets),
        "http_status": http_status,
        "reason": _text(reason, secrets),
        "details": details,
    }


#: The columns :func:`row` fills, in order (a statement prepared once binds them all).
COLUMNS: tuple[str, ...] = tuple(row(outcome="", operation="", actor="", at=datetime.min).keys())


def append(session: Session, **fields: Any) -> int:
    """Insert one ledger row (the fields of :func:`row`) in ``session``'s transaction (it
    lands when that commits); returns its ID."""
    return (
        session.connection()
        .execute(insert(LedgerEntry).values(row(**fields)).returning(LedgerEntry.id))
        .scalar_one()
    )


def outcome_fields(
    charge: ChargeLike,
    subscription: SubscriptionLike,
    result: Outcome,
    *,
    operation: Operation | str,
    actor: str,
    outcome: LedgerOutcome | str,
    amount: Decimal = ZERO,
    attempt_id: int | None = None,
    reason: str | None = None,
    secrets: tuple[str, ...] = (),
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The :func:`row` fields of one gateway call's ``result``."""
    return {
        "outcome": outcome,
        "operation": operation,
        "actor": actor,
        "subscription": subscription,
        "charge": charge,
        "amount": amount,
        "tx": getattr(result, "tx", None),
        "code": result.code or None,
        "message": result.message or getattr(result, "reason", None) or None,
        "raw": result.raw,
        "http_status": result.http_status,
        "attempt_id": attempt_id,
        # Why an outcome is unknown or not sent, when the caller has no reason of its own.
        "reason": reason or (getattr(result, "reason", None) if result.message else None),
        "secrets": secrets,
        "details": details,
    }


def append_outcome(
    session: Session,
    charge: ChargeLike,
    subscription: SubscriptionLike,
    result: Outcome,
    **how: Any,
) -> int:
    """The ledger row of one gateway call's ``result`` (``how``: the keyword arguments of
    :func:`outcome_fields`); returns its ID."""
    return append(session, **outcome_fields(charge, subscription, result, **how))
