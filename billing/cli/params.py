"""How every command reads the values it is given: one strict reader per kind of value.

Why not typer's own ``int`` and ``float``: they take "１２", "1_000" and numbers of any size,
which then overflow a SQL integer, a ``timedelta`` or a date far from where the user typed
them; and ``str.isdigit`` passes "²", which ``int`` refuses. Each :class:`Kind` here reads
the text as typed (ASCII digits only, bounds checked, text that a database can store) and
raises ``InvalidInput`` naming the option or argument, so a bad value is one line on stderr
and exit status 2 before anything is read or written.

A command declares each value with :func:`option` or :func:`argument`::

    older_than: Annotated[
        timedelta | None, params.option("--older-than", params.DELAY, help="...")
    ] = None

Typer hands the reader the default too; a default that is not text is returned as it is.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Generic, TypeVar

import typer

from billing.db import MAX_ID
from billing.durations import parse_delay, quote
from billing.errors import InvalidInput
from billing.models import LedgerEntry, Subscription
from billing.money import parse_amount

T = TypeVar("T")

#: Rows a listing shows at most: more than a terminal holds (``ledger export`` writes all).
MAX_LIMIT: Final = 1_000_000
#: Characters of free text (a reason, a filter) at most: a line, not a document.
MAX_TEXT: Final = 1000
#: Event numbers are 64-bit (``BigInteger`` on PostgreSQL).
MAX_EVENT_NUMBER: Final = 2**63 - 1
#: Actors are stored as "ops:NAME" by ``billing capture`` and ``billing cancel``.
_ACTOR_PREFIX: Final = "ops:"


def _width(model: Any, column: str) -> int:
    """The length of a ``String(n)`` column: one definition of each width, the model's."""
    return int(model.__table__.c[column].type.length)


@dataclass(frozen=True)
class Kind(Generic[T]):
    """One kind of value: its name in ``--help`` and how its text is read.

    ``read(text, where)`` returns the value or raises ``InvalidInput`` whose message starts
    with ``where`` (the option, or the argument's name).
    """

    metavar: str
    read: Callable[[str, str], T]

    def parser(self, where: str) -> Callable[[Any], Any]:
        def parse(value: Any) -> Any:
            return self.read(value, where) if isinstance(value, str) else value

        return parse


def option(name: str, kind: Kind[Any], *aliases: str, help: str, **more: Any) -> Any:
    """A typer option ``name`` (and short ``aliases`` such as ``-c``) read by ``kind``."""
    return typer.Option(
        name, *aliases, parser=kind.parser(name), metavar=kind.metavar, help=help, **more
    )


def argument(name: str, kind: Kind[Any], *, help: str, **more: Any) -> Any:
    """A typer argument (``name`` as messages call it, e.g. "charge id") read by ``kind``."""
    return typer.Argument(parser=kind.parser(name), metavar=kind.metavar, help=help, **more)


# --- numbers ------------------------------------------------------------------------------


def whole_number(text: str, where: str, *, low: int, high: int) -> int:
    """ASCII digits (surrounding blanks allowed) from ``low`` to ``high``."""
    digits = text.strip()
    # Compared by length first: int() of thousands of digits raises ValueError.
    if (
        not (digits.isascii() and digits.isdigit())
        or len(digits.lstrip("0")) > len(str(high))
        or not low <= int(digits) <= high
    ):
        raise InvalidInput(f"{where} {quote(text)} must be a whole number from {low} to {high}")
    return int(digits)


def count(low: int, high: int, metavar: str = "N") -> Kind[int]:
    """A whole number from ``low`` to ``high``."""
    return Kind(metavar, lambda text, where: whole_number(text, where, low=low, high=high))


_DECIMAL_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def number(low: float, high: float, metavar: str) -> Kind[float]:
    """A decimal number such as ``1.5`` from ``low`` to ``high`` (no signs, exponents, NaN)."""

    def read(text: str, where: str) -> float:
        value = text.strip()
        if not _DECIMAL_TEXT.fullmatch(value) or not low <= Decimal(value) <= high:
            raise InvalidInput(f"{where} {quote(text)} must be a number from {low:g} to {high:g}")
        return float(value)

    return Kind(metavar, read)


def _id(text: str, where: str) -> int:
    return whole_number(text, where, low=1, high=MAX_ID)


#: A record's number (charge, dead letter): 1 to the largest ``integer`` of PostgreSQL.
RECORD_ID: Final = Kind("ID", _id)
#: How many rows to show.
LIMIT: Final = count(1, MAX_LIMIT)
#: A TCP port to listen on.
PORT: Final = count(1, 65535, "PORT")
#: A TCP port, or 0 for any free one.
ANY_PORT: Final = count(0, 65535, "PORT")


# --- text ---------------------------------------------------------------------------------


def checked_text(text: str, where: str, *, longest: int = MAX_TEXT, blank: bool = False) -> str:
    """``text`` if a database can store it and a terminal can show it; never echoed, since
    some options hold secrets (``--account MERCHANT_ID=PRIVATE_KEY``). Blank text is refused
    unless ``blank``: then the command decides what it means."""
    if not blank and not text.strip():
        raise InvalidInput(f"{where}: is blank")
    if any("\ud800" <= char <= "\udfff" for char in text):
        # What Python makes of command-line bytes that are not UTF-8 (surrogateescape).
        raise InvalidInput(f"{where}: holds bytes that are not UTF-8 text")
    if any(unicodedata.category(char) == "Cc" for char in text):
        raise InvalidInput(f"{where}: holds a control character")
    if len(text) > longest:
        raise InvalidInput(f"{where}: is longer than {longest} characters")
    return text


def text(longest: int = MAX_TEXT, metavar: str = "TEXT", *, blank: bool = False) -> Kind[str]:
    """Text of at most ``longest`` characters (blank too, with ``blank``)."""
    return Kind(
        metavar, lambda value, where: checked_text(value, where, longest=longest, blank=blank)
    )


#: A reason, a filter, a name (blank allowed: "--reason ''" is the command's to refuse).
TEXT: Final = text(blank=True)
#: Who does something: stored in ``ledger.actor``, after "ops:" for capture and cancel.
ACTOR: Final = text(_width(LedgerEntry, "actor") - len(_ACTOR_PREFIX), "NAME")
#: A Klik & Pay transaction number typed from the back office.
TX: Final = text(_width(LedgerEntry, "tx"), "TX")


def _subscription_ref(value: str, where: str) -> str:
    longest = _width(Subscription, "external_ref")
    if len(value) > longest:  # a reference this long exists nowhere (nor does such an id)
        raise InvalidInput(f"{where}: is longer than any reference ({longest} characters)")
    return checked_text(value, where)


def _event_ref(value: str, where: str) -> str:
    if value.strip().isascii() and value.strip().isdigit():
        return str(whole_number(value, where, low=1, high=MAX_EVENT_NUMBER))
    return checked_text(value, where).strip()


#: A subscription's external reference, or its id.
SUBSCRIPTION_REF: Final = Kind("REF", _subscription_ref)
#: An event's number, or its event ID (a UUID, checked where events are looked up).
EVENT_REF: Final = Kind("EVENT", _event_ref)


# --- spans, amounts, times ----------------------------------------------------------------


def _delay(value: str, where: str) -> timedelta:
    try:
        return parse_delay(value)
    except ValueError as exc:
        raise InvalidInput(f"{where}: {exc}") from None


def _amount(value: str, where: str) -> Decimal:
    return parse_amount(value, field=where)


#: A fixed delay such as "2 days" (at most ``billing.durations.MAX_DELAY``).
DELAY: Final = Kind("DELAY", _delay)
#: An amount such as 19.90.
AMOUNT: Final = Kind("AMOUNT", _amount)


def moment(value: str, where: str, *, end: bool = False) -> datetime:
    """A day (its midnight UTC; with ``end``, the next midnight) or an ISO 8601 time, in UTC.

    Times beyond the ends of the calendar stand for those ends: ``--to 9999-12-31`` means
    "to the end", though the next midnight cannot be written.
    """
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if not end:
                return start
            return start + timedelta(days=1) if day < date.max else datetime.max.replace(tzinfo=UTC)
        found = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"{where}: {quote(value)} is not a day (YYYY-MM-DD) or an ISO 8601 time "
            "(2025-01-15T12:00:00Z)"
        ) from None
    if found.tzinfo is None:
        return found.replace(tzinfo=UTC)
    try:
        return found.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the calendar starts in UTC
        edge = datetime.min if found.year == 1 else datetime.max
        return edge.replace(tzinfo=UTC)


#: The start of a window: a day's first instant, or an exact time.
SINCE: Final = Kind("DAY", moment)
#: The end of a window: a day included whole, or an exact time.
UNTIL: Final = Kind("DAY", lambda value, where: moment(value, where, end=True))
