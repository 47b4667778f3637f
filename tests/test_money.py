"""Amounts: what ``parse_amount`` takes, and what it refuses with a short, named message."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.errors import InvalidInput
from billing.money import format_amount, parse_amount


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("29.90", "29.90"),
        (" 29.9 ", "29.90"),
        ("29.900", "29.90"),
        ("+5", "5.00"),
        (".5", "0.50"),
        (29, "29.00"),
        (Decimal("29.9"), "29.90"),
        ("9999999999.99", "9999999999.99"),
    ],
)
def test_an_amount_is_read(value: object, expected: str) -> None:
    assert format_amount(parse_amount(value)) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # Decimal() reads other scripts' digits, underscores and exponents; an amount a person
        # types or a shop exports is ASCII digits and one dot.
        ("١٢.٣٠", "is not a decimal amount"),
        ("１２.３０", "is not a decimal amount"),
        ("1_000.00", "is not a decimal amount"),
        ("2.99e1", "is not a decimal amount"),
        ("1e9999", "is not a decimal amount"),
        ("Infinity", "is not a decimal amount"),
        ("NaN", "is not a decimal amount"),
        ("-5", "must be a positive amount"),
        ("0", "must be a positive amount"),
        ("12.345", "has more than two decimal places"),
        ("10000000000", "is larger than 9999999999.99"),
        # Thousands of digits: a message of thousands of characters before, and for an int
        # (JSON lines allow one) str() itself raised ValueError past 4300 digits.
        ("9" * 5000, "is larger than 9999999999.99"),
        (10**5000, "is larger than 9999999999.99"),
        ("1." + "1" * 5000, "has more than two decimal places"),
        (29.9, "not a float"),
        (True, "not a float"),
        (None, "is not a decimal amount"),
    ],
    ids=lambda value: "10**5000" if value == 10**5000 else repr(value)[:30],
)
def test_a_bad_amount_is_a_short_named_problem(value: object, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_amount(value, field="--amount")
    message = str(info.value)
    assert message.startswith("--amount: ") and problem in message, message
    assert len(message) < 200 and "sys." not in message, message
