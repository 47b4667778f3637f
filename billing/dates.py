"""When each billing period of a subscription is due.

Period ``n`` is due at ``anchor + n x interval``, always computed from the anchor and never
from the previous due date: adding "1 month" to Feb 28 gives Mar 28, so a subscription
started on Jan 31 would drift to the 28th forever. From the anchor, period 2 is Mar 31.

The arithmetic happens on the wall clock of the plan's time zone: a customer who subscribed
at 09:00 in Paris is charged at 09:00 Paris time in winter and in summer. The wall time is
then placed on the UTC time line with ``fold=0``, which settles the two DST edge cases:

- A wall time that does not exist (02:30 on the spring-forward night in Europe/Paris)
  resolves to the instant it would have been on the old offset, i.e. 03:30 local (01:30
  UTC): one hour later on the wall clock, the same instant every time, and the next period
  is back at 02:30.
- A wall time that happens twice (02:30 on the fall-back night) resolves to its first
  occurrence (02:30 summer time, 00:30 UTC).

So a period never moves by more than the clocks do and no period is skipped or repeated.
(A zone that skips a whole calendar day, as Pacific/Apia did on 2011-12-30, can give a daily
plan two periods at the same instant; no other change of offset can.)

``datetime`` ends at 9999-12-31 and starts at 0001-01-01. Plans (intervals of at most ten
years) and imports (first charges within a century of now) keep every date a subscription
reaches far inside; a date that still falls outside raises :class:`DateOutOfRange`, which
names the anchor, the interval and the period, never Python's ``OverflowError``.

A subscription moved to a plan of another interval is *re-anchored*: the first period on
the new plan becomes its anchor (:class:`Schedule` counts periods from it), so the periods
already charged keep their numbers and the new interval counts from that due date.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

from billing.durations import Interval
from billing.errors import BillingError


class DateOutOfRange(BillingError):
    """A due date falls outside the calendar that can be computed (years 1 to 9999)."""


#: Average lengths in days, only used to guess a period number before checking it exactly.
_AVERAGE_DAYS = {"days": 1.0, "weeks": 7.0, "months": 365.2425 / 12, "years": 365.2425}


def _aware(moment: datetime, name: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {moment.isoformat()}")


def _step(every: Interval, period: int) -> relativedelta:
    n = every.count * period
    if every.unit == "days":
        return relativedelta(days=n)
    if every.unit == "weeks":
        return relativedelta(weeks=n)
    if every.unit == "months":
        return relativedelta(months=n)
    return relativedelta(years=n)


def _out_of_range(anchor: datetime, every: Interval, period: int) -> DateOutOfRange:
    return DateOutOfRange(
        f"period {period} of a plan charged every {every} from {anchor.isoformat()} falls "
        "outside the calendar (0001-01-01 to 9999-12-31 UTC)"
    )


def due_at(anchor: datetime, every: Interval, period: int, tz: ZoneInfo) -> datetime:
    """When period ``period`` (0 = the anchor itself) is due, as an aware UTC datetime.

    Months and years past the end of a shorter month are clamped to its last day (Jan 31 ->
    Feb 28, or Feb 29 in leap years; Feb 29 yearly -> Feb 28 in common years), each period
    computed from the anchor so the day comes back (Mar 31). See the module docstring for
    what happens to wall times that DST skips or repeats.
    """
    _aware(anchor, "anchor")
    if period < 0:
        raise ValueError(f"period must be 0 or more, got {period}")
    try:
        if period == 0:
            # Exactly the anchor, even when it lies in the second occurrence of a repeated hour.
            return anchor.astimezone(UTC)
        wall = anchor.astimezone(tz).replace(tzinfo=None) + _step(every, period)
        return wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    except (OverflowError, ValueError):
        # datetime and relativedelta say "date value out of range" / "year 10000 is out of
        # range"; nothing else in these two lines raises.
        raise _out_of_range(anchor, every, period) from None


def latest_due_period(anchor: datetime, every: Interval, tz: ZoneInfo, now: datetime) -> int | None:
    """The greatest ``n`` with ``due_at(n) <= now``, or None when ``now`` is before the anchor.

    Guesses ``n`` from the average length of the interval, then corrects the guess by a
    period or two, so a 50-year-old daily plan costs a handful of ``due_at`` calls.
    """
    _aware(anchor, "anchor")
    _aware(now, "now")
    if now < anchor:
        return None
    elapsed_days = (now - anchor).total_seconds() / 86400
    n = max(0, int(elapsed_days / (_AVERAGE_DAYS[every.unit] * every.count)))
    while n > 0 and due_at(anchor, every, n, tz) > now:
        n -= 1
    while due_at(anchor, every, n + 1, tz) <= now:
        n += 1
    return n


def first_period_after(anchor: datetime, every: Interval, tz: ZoneInfo, moment: datetime) -> int:
    """The least ``n`` with ``due_at(n) > moment``: where a resumed subscription picks up."""
    latest = latest_due_period(anchor, every, tz, moment)
    return 0 if latest is None else latest + 1


@dataclass(frozen=True)
class Schedule:
    """A subscription's due dates on one plan: period ``n`` is due at the anchor plus
    ``n - first`` intervals (``first`` is 0 until a change of interval re-anchors it)."""

    anchor: datetime
    first: int
    every: Interval
    tz: ZoneInfo

    def due(self, period: int) -> datetime:
        """When ``period`` is due (periods before ``first`` are not on this schedule)."""
        return due_at(self.anchor, self.every, period - self.first, self.tz)

    def latest(self, now: datetime) -> int | None:
        """The greatest period due at ``now``, or None before the anchor."""
        found = latest_due_period(self.anchor, self.every, self.tz, now)
        return None if found is None else found + self.first

    def first_after(self, moment: datetime) -> int:
        """The least period due after ``moment``."""
        return first_period_after(self.anchor, self.every, self.tz, moment) + self.first
