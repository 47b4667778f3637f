"""The three kinds of time span a plan is written with.

- An :class:`Interval` ("1 month") is a *calendar* span between billing periods: months and
  years vary in length, so it is kept as a count and a unit and applied with
  ``relativedelta`` (see ``billing.dates``), never turned into seconds.
- A delay ("3 days", "90 minutes") is a fixed ``timedelta``: retry ladders, capture delays.
- A :class:`Cron` line ("0 3 * * *") says when beat sweeps for due charges. It is validated
  here by hand and kept as its five strings, because beat hands those strings to Celery's
  ``crontab`` and nothing in ``billing`` imports Celery.

Parsers raise ``ValueError`` with a message that quotes the text and says what is wrong;
``billing.plans`` prefixes it with the plan and key.

Both spans are bounded, because everything the engine derives from them must stay inside the
calendar ``datetime`` can hold (years 1 to 9999): "now minus one period" for a plan of
"3000 years" is before year 1, and a retry "99999999999999999 days" away is no ``timedelta``
at all. Counts are ASCII digits: a regex ``\\d`` also matches "３" and "١", which ``int`` reads.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Literal, cast

IntervalUnit = Literal["days", "weeks", "months", "years"]

INTERVAL_UNITS: Final[tuple[IntervalUnit, ...]] = ("days", "weeks", "months", "years")
DELAY_UNITS: Final[dict[str, int]] = {
    "seconds": 1,
    "minutes": 60,
    "hours": 3600,
    "days": 86400,
    "weeks": 7 * 86400,
}

#: The longest billing interval, in each unit: ten years. Longer is a typo, and it keeps
#: "now minus one period" and a subscription's due dates for centuries inside the calendar.
MAX_INTERVAL: Final[dict[IntervalUnit, int]] = {
    "days": 3650,
    "weeks": 520,
    "months": 120,
    "years": 10,
}
#: The longest fixed delay (a retry, a capture delay, a sweep period, an age filter): ten
#: years of days, so that ``now`` plus or minus it is always a date.
MAX_DELAY: Final = timedelta(days=3650)
#: Digits read as a count: more are out of every bound above (and past ``int``'s limit).
_MAX_DIGITS: Final = 12
#: Longest value a message quotes whole; longer ones are cut, with "…".
MAX_QUOTED: Final = 80

_SPAN = re.compile(r"(?P<count>[+-]?[0-9]+)\s+(?P<unit>[a-z]+)")


def quote(text: str) -> str:
    """``29.999`` -> ``"29.999"``: how every message shows a value the user wrote.

    A value longer than ``MAX_QUOTED`` is cut, so that one pasted megabyte does not become a
    megabyte of error message. Every character that is not printable is written as its JSON
    escape: a lone surrogate (a JSON "\\ud800", a command-line byte that is not UTF-8) could
    not be printed or stored, and U+0085 or U+2028 would break the message's one line.
    """
    if len(text) > MAX_QUOTED:
        text = text[: MAX_QUOTED - 1] + "…"
    return printable(json.dumps(text, ensure_ascii=False))


def printable(text: str) -> str:
    """``text`` with every character that is not printable written as its JSON escape
    (``\\u001b``): a path or a message that echoes what a user typed stays one line, and
    sends no control sequence to a terminal."""
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)


def shown(value: object) -> str:
    """Any value as a message shows it: text quoted, anything else by ``repr``, both cut to
    ``MAX_QUOTED``. An integer of thousands of digits (JSON and TOML allow them) is described
    by its length: ``repr`` of one past 4300 digits raises ``ValueError``."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_QUOTED:
        return f"a whole number of {math.floor(math.log10(abs(value))) + 1} digits"
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 1] + "…"


def read_count(digits: str) -> int | None:
    """``"+12"`` -> 12: an ASCII whole number, or None when it has more than a dozen digits
    (larger than any bound here, and cheap to refuse before ``int`` reads it)."""
    if len(digits.lstrip("+-0")) > _MAX_DIGITS:
        return None
    return int(digits)


def _unit(word: str, known: tuple[str, ...]) -> str | None:
    """The plural unit ``word`` names ("day" and "days" -> "days"), or None."""
    plural = word if word.endswith("s") else word + "s"
    return plural if plural in known else None


def _split(text: str) -> tuple[int | None, str] | None:
    """(count, unit word) of "3 days"; the count is None when it is too large to read."""
    match = _SPAN.fullmatch(text.strip().lower())
    if match is None:
        return None
    return read_count(match["count"]), match["unit"]


_LONGEST_INTERVAL: Final = f"{MAX_INTERVAL['years']} years, the longest billing interval"


@dataclass(frozen=True)
class Interval:
    """How far apart two billing periods are: ``Interval(1, "months")`` is "1 month"."""

    count: int
    unit: IntervalUnit

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"interval count must be a whole number of at least 1: {self.count!r}")
        if self.unit not in INTERVAL_UNITS:
            raise ValueError(f"interval unit must be one of {', '.join(INTERVAL_UNITS)}")
        if self.count > MAX_INTERVAL[self.unit]:
            raise ValueError(f"{self} is longer than {_LONGEST_INTERVAL}")

    def __str__(self) -> str:
        return f"{self.count} {self.unit if self.count != 1 else self.unit[:-1]}"


def parse_interval(text: str) -> Interval:
    """``"1 month"``, ``"3 months"``, ``"2 weeks"``, ``"1 year"``, ``"30 days"`` -> Interval."""
    example = 'such as "1 month" (units: days, weeks, months, years)'
    if not text.strip():
        raise ValueError(f"{quote(text)} is empty: give an interval {example}")
    parts = _split(text)
    if parts is None:
        raise ValueError(f"{quote(text)} is not an interval {example}")
    count, word = parts
    unit = _unit(word, INTERVAL_UNITS)
    if unit is None:
        short_unit = _unit(word, tuple(DELAY_UNITS))
        if short_unit is not None:
            raise ValueError(
                f"{quote(text)}: {short_unit} are too short for a billing interval; "
                "use days, weeks, months or years"
            )
        raise ValueError(
            f"{quote(text)} has an unknown unit {quote(word)}: give an interval {example}"
        )
    if count is not None and count < 1:
        raise ValueError(f"{quote(text)} must be at least 1 {unit[:-1]}")
    if count is None or count > MAX_INTERVAL[cast(IntervalUnit, unit)]:
        raise ValueError(f"{quote(text)} is longer than {_LONGEST_INTERVAL}")
    return Interval(count, cast(IntervalUnit, unit))


def parse_delay(text: str) -> timedelta:
    """``"30 seconds"``, ``"90 minutes"``, ``"1 day"``, ``"2 weeks"`` -> a positive timedelta.

    Months and years are refused: they have no fixed length, and a retry that waits "1 month"
    would wait 28 to 31 days depending on when it happened.
    """
    example = 'such as "30 seconds" or "1 day" (units: seconds, minutes, hours, days, weeks)'
    if not text.strip():
        raise ValueError(f"{quote(text)} is empty: give a delay {example}")
    parts = _split(text)
    if parts is None:
        raise ValueError(f"{quote(text)} is not a delay {example}")
    count, word = parts
    unit = _unit(word, tuple(DELAY_UNITS))
    if unit is None:
        calendar_unit = _unit(word, ("months", "years"))
        if calendar_unit is not None:
            raise ValueError(
                f"{quote(text)} is not a fixed delay ({calendar_unit} vary in length): "
                "use days or weeks"
            )
        raise ValueError(f"{quote(text)} has an unknown unit {quote(word)}: give a delay {example}")
    if count is not None and count <= 0:
        raise ValueError(f"{quote(text)} must be a positive delay")
    if count is None or count * DELAY_UNITS[unit] > MAX_DELAY.total_seconds():
        raise ValueError(f"{quote(text)} is longer than {MAX_DELAY.days} days, the longest delay")
    return timedelta(seconds=count * DELAY_UNITS[unit])


def format_delay(delay: timedelta) -> str:
    """The inverse of :func:`parse_delay`: the largest unit that divides the delay exactly.

    Weeks are left out: a ladder written "7 days" reads back as "7 days", not "1 week".
    """
    seconds = int(delay.total_seconds())
    if seconds <= 0 or seconds != delay.total_seconds():
        return str(delay)
    for unit in ("days", "hours", "minutes", "seconds"):
        size = DELAY_UNITS[unit]
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit if count != 1 else unit[:-1]}"
    raise AssertionError("seconds always divide")  # pragma: no cover


# --- cron -------------------------------------------------------------------------------

_MONTHS: Final = (
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
)
_WEEKDAYS: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS: Final = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, {name: i + 1 for i, name in enumerate(_MONTHS)}),
    # 7 is Sunday too, as in Vixie cron.
    _Field("day of week", 0, 7, {name: i for i, name in enumerate(_WEEKDAYS)}),
)


@dataclass(frozen=True)
class Cron:
    """A validated five-field cron line, each field kept as written for Celery's ``crontab``.

    The one exception: Celery's ``crontab`` knows weekdays 0-6 only, so a day-of-week field
    that uses 7 for Sunday is stored as the explicit list of days it means ("1-7/2" ->
    "0,1,3,5"); every other field is the original text.
    """

    minute: str
    hour: str
    day_of_month: str
    month_of_year: str
    day_of_week: str

    def __str__(self) -> str:
        return " ".join(
            (self.minute, self.hour, self.day_of_month, self.month_of_year, self.day_of_week)
        )


def _value(token: str, field: _Field) -> int:
    if token.lower() in field.names:
        return field.names[token.lower()]
    if not (token.isascii() and token.isdigit()):
        names = {12: " or jan-dec", 7: " or sun-sat"}.get(field.high, "")
        raise ValueError(
            f"{field.name} {quote(token)} is not a number {field.low}-{field.high}{names}"
        )
    number = read_count(token)
    if number is None or not field.low <= number <= field.high:
        shown = quote(token) if number is None else str(number)
        raise ValueError(f"{field.name} {shown} is out of range {field.low}-{field.high}")
    return number


def _expand(text: str, field: _Field) -> set[int]:
    """The values ``text`` selects; raises ``ValueError`` naming the field and the part."""
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"{field.name} {quote(text)} has an empty item between commas")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if (
                not (step_text.isascii() and step_text.isdigit())
                or not 1 <= (read_count(step_text) or 0) <= field.high
            ):
                raise ValueError(
                    f"{field.name} step {quote(step_text)} must be a number 1-{field.high}"
                )
            step = int(step_text)
        if base == "*":
            low, high = field.low, field.high
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _value(first, field), _value(last, field)
            if high < low:
                raise ValueError(
                    f"{field.name} range {quote(base)} runs backwards: write it as two ranges"
                )
        elif slash:
            raise ValueError(
                f"{field.name} {quote(part)}: a step needs * or a range "
                f"(e.g. */{step_text} or {base}-{field.high}/{step_text})"
            )
        else:
            low = high = _value(base, field)
        values.update(range(low, high + 1, step))
    return values


def parse_cron(line: str) -> Cron:
    """Validate a five-field cron line (minute hour day-of-month month day-of-week).

    Each field is ``*``, ``*/n``, ``a``, ``a-b``, ``a-b/n`` or a comma list of those; months
    may be written jan-dec and weekdays sun-sat (0 and 7 are both Sunday).
    """
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(
            f"{quote(line)} has {len(fields)} field(s): a cron line has five "
            "(minute hour day-of-month month day-of-week)"
        )
    for text, field in zip(fields, _FIELDS, strict=True):
        try:
            _expand(text, field)
        except ValueError as exc:
            raise ValueError(f"{quote(line)}: {exc}") from None
    day_of_week = fields[4]
    days = _expand(day_of_week, _FIELDS[4])
    if 7 in days and day_of_week != "*" and not day_of_week.startswith("*/"):
        day_of_week = ",".join(str(day) for day in sorted({day % 7 for day in days}))
    return Cron(fields[0], fields[1], fields[2], fields[3], day_of_week)
