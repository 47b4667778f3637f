"""Amounts as the gateway wants them: ``Decimal`` with two places, sent as ``29.90``.

Text is read strictly: ASCII digits, at most one dot, an optional sign. ``Decimal()`` alone
would also take "١٢.٣٠", "1_000", "2.99e1" and "Infinity"; none of them is how a person or
a shop writes an amount, and a typo read as a valid amount is money moved by mistake.
"""

from __future__ import annotations

import re
from decimal import Decimal

from billing.durations import shown
from billing.errors import InvalidInput

CENT = Decimal("0.01")
#: The largest amount the database keeps (Numeric(12, 2)); far above any card payment.
MAX_AMOUNT = Decimal("9999999999.99")

_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _decimal(value: object, field: str) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):  # not str(value): past 4300 digits it raises ValueError
        return Decimal(value)
    text = value.strip() if isinstance(value, str) else None
    if text is None or not _DECIMAL_TEXT.fullmatch(text):
        raise InvalidInput(f"{field}: {shown(value)} is not a decimal amount")
    return Decimal(text)


def parse_amount(value: object, *, field: str = "amount") -> Decimal:
    """Return a positive amount with at most two decimal places, or raise ``InvalidInput``.

    Floats are refused: ``0.1 + 0.2`` is how invoices end up a cent off.
    """
    if isinstance(value, float | bool):
        raise InvalidInput(
            f"{field}: {shown(value)} must be a decimal string or Decimal, not a float"
        )
    amount = _decimal(value, field)
    if not amount.is_finite() or amount <= 0:
        raise InvalidInput(f"{field}: {shown(value)} must be a positive amount")
    if amount > MAX_AMOUNT:
        raise InvalidInput(f"{field}: {shown(value)} is larger than {MAX_AMOUNT}")
    rounded = amount.quantize(CENT)
    if rounded != amount:
        raise InvalidInput(f"{field}: {shown(value)} has more than two decimal places")
    return rounded


def format_amount(amount: Decimal) -> str:
    """``Decimal('29.9')`` -> ``'29.90'``: a dot and two places, never cents or exponents."""
    return f"{amount.quantize(CENT):f}"
