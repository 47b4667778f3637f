"""Writing to the append-only ledger.

Every gateway call's outcome and every money movement goes through :func:`append`, so
the rows always carry the same fields: amount, currency, merchant ID, TX, masked alias,
the raw answer with secrets removed, who wrote it and why.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from billing.models import Charge, LedgerEntry, Subscription, utcnow
from billing.outcomes import Outcome
from billing.redact import mask_alias, redact

ZERO = Decimal("0.00")

#: Ledger outcomes that move money into the merchant's account.
COLLECTED = ("approved", "validated", "resolved_approved", "resolved_validated")
#: Ledger outcomes that move money back to the customer.
REFUNDED = ("refunded", "resolved_refunded")
#: Ledger outcomes of money held (deferred) but not collected: never counted as revenue.
AUTHORIZED = ("authorized", "resolved_authorized")

_RAW_LIMIT = 4000


def append(
    session: Session,
    *,
    outcome: str,
    operation: str,
    actor: str,
    charge: Charge | None = None,
    subscription: Subscription | None = None,
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
) -> LedgerEntry:
    """Add one ledger row to ``session`` (the caller's transaction decides when it lands)."""
    if subscription is None and charge is not None:
        subscription = charge.subscription
    entry = LedgerEntry(
        at=utcnow(),
        outcome=outcome,
        operation=operation,
        actor=actor,
        charge_id=charge.id if charge is not None else None,
        attempt_id=attempt_id,
        subscription_id=subscription.id if subscription is not None else None,
        external_ref=subscription.external_ref if subscription is not None else None,
        plan=(charge.plan if charge is not None else subscription.plan if subscription else None),
        period=charge.period if charge is not None else period,
        amount=amount,
        currency=currency or (charge.currency if charge is not None else ""),
        merchant_id=merchant_id or (charge.merchant_id if charge is not None else ""),
        tx=tx,
        alias_masked=mask_alias(subscription.alias) if subscription is not None else None,
        code=code,
        message=redact(message, secrets=secrets)[:_RAW_LIMIT] if message else None,
        raw=redact(raw, secrets=secrets)[:_RAW_LIMIT] if raw else None,
        http_status=http_status,
        reason=reason,
        details=details,
    )
    session.add(entry)
    return entry


def append_outcome(
    session: Session,
    charge: Charge,
    result: Outcome,
    *,
    operation: str,
    actor: str,
    ledger_outcome: str,
    amount: Decimal = ZERO,
    attempt_id: int | None = None,
    reason: str | None = None,
    secrets: tuple[str, ...] = (),
    details: dict[str, Any] | None = None,
) -> LedgerEntry:
    """The ledger row for one gateway call's ``result``."""
    return append(
        session,
        outcome=ledger_outcome,
        operation=operation,
        actor=actor,
        charge=charge,
        amount=amount,
        tx=getattr(result, "tx", None),
        code=result.code or None,
        message=result.message or getattr(result, "reason", None) or None,
        raw=result.raw,
        http_status=result.http_status,
        attempt_id=attempt_id,
        reason=reason,
        secrets=secrets,
        details=details,
    )
