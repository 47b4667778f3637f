"""Amounts as the gateway wants them: ``Decimal`` with two places, sent as ``29.90``."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from billing.errors import InvalidInput

CENT = Decimal("0.01")
#: The largest amount the database keeps (Numeric(12, 2)); far above any card payment.
MAX_AMOUNT = Decimal("9999999999.99")


def parse_amount(value: object, *, field: str = "amount") -> Decimal:
    """Return a positive amount with at most two decimal places, or raise ``InvalidInput``.

    Floats are refused: ``0.1 + 0.2`` is how invoices end up a cent off.
    """
    if isinstance(value, float | bool):
        raise InvalidInput(f"{field}: {value!r} must be a decimal string or Decimal, not a float")
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise InvalidInput(f"{field}: {value!r} is not a decimal amount") from None
    if not amount.is_finite() or amount <= 0:
        raise InvalidInput(f"{field}: {value!r} must be a positive amount")
    if amount > MAX_AMOUNT:
        raise InvalidInput(f"{field}: {value!r} is larger than {MAX_AMOUNT}")
    rounded = amount.quantize(CENT)
    if rounded != amount:
        raise InvalidInput(f"{field}: {value!r} has more than two decimal places")
    return rounded


def format_amount(amount: Decimal) -> str:
    """``Decimal('29.9')`` -> ``'29.90'``: a dot and two places, never cents or exponents."""
    return f"{amount.quantize(CENT):f}"
