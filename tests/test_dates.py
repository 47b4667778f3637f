"""Period due times: computed from the anchor, on the plan's wall clock, DST-safe."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.dates import DateOutOfRange, due_at, first_period_after, latest_due_period
from billing.durations import Interval
from billing.errors import BillingError

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
MONTHLY = Interval(1, "months")
YEARLY = Interval(1, "years")
DAILY = Interval(1, "days")
WEEKLY = Interval(1, "weeks")


def local(moment: datetime, tz: ZoneInfo = PARIS) -> datetime:
    return moment.astimezone(tz)


def walls(anchor: datetime, every: Interval, periods: int, tz: ZoneInfo = PARIS) -> list[str]:
    """Local wall times of periods 0..periods-1, as 'YYYY-MM-DD HH:MM'."""
    return [
        local(due_at(anchor, every, n, tz), tz).strftime("%Y-%m-%d %H:%M") for n in range(periods)
    ]


def test_due_at_is_utc_and_aware() -> None:
    anchor = datetime(2027, 1, 15, 9, 0, tzinfo=PARIS)
    due = due_at(anchor, MONTHLY, 1, PARIS)
    assert due.tzinfo is UTC
    assert due == datetime(2027, 2, 15, 8, 0, tzinfo=UTC)


def test_month_end_anchor_clamps_and_comes_back_without_drifting() -> None:
    anchor = datetime(2027, 1, 31, 9, 0, tzinfo=PARIS)
    assert walls(anchor, MONTHLY, 7) == [
        "2027-01-31 09:00",
        "2027-02-28 09:00",
        "2027-03-31 09:00",
        "2027-04-30 09:00",
        "2027-05-31 09:00",
        "2027-06-30 09:00",
        "2027-07-31 09:00",
    ]
    # Far out, still the 31st: period n is anchor + n months, not a chain of additions.
    assert local(due_at(anchor, MONTHLY, 120, PARIS)).day == 31


def test_month_end_anchor_in_a_leap_year_gives_feb_29() -> None:
    anchor = datetime(2028, 1, 31, 9, 0, tzinfo=PARIS)
    assert walls(anchor, MONTHLY, 3) == ["2028-01-31 09:00", "2028-02-29 09:00", "2028-03-31 09:00"]


def test_every_three_months_from_the_31st() -> None:
    anchor = datetime(2027, 8, 31, 12, 0, tzinfo=PARIS)
    assert walls(anchor, Interval(3, "months"), 4) == [
        "2027-08-31 12:00",
        "2027-11-30 12:00",
        "2028-02-29 12:00",
        "2028-05-31 12:00",
    ]


def test_yearly_from_feb_29() -> None:
    anchor = datetime(2028, 2, 29, 10, 0, tzinfo=PARIS)
    assert walls(anchor, YEARLY, 5) == [
        "2028-02-29 10:00",
        "2029-02-28 10:00",
        "2030-02-28 10:00",
        "2031-02-28 10:00",
        "2032-02-29 10:00",
    ]


def test_monthly_at_a_wall_time_skipped_by_spring_forward() -> None:
    """2027-03-28 02:30 does not exist in Paris: it resolves to 03:30 CEST, once."""
    anchor = datetime(2027, 2, 28, 2, 30, tzinfo=PARIS)
    assert [due_at(anchor, MONTHLY, n, PARIS) for n in range(3)] == [
        datetime(2027, 2, 28, 1, 30, tzinfo=UTC),
        datetime(2027, 3, 28, 1, 30, tzinfo=UTC),  # 03:30 local, the old offset kept
        datetime(2027, 4, 28, 0, 30, tzinfo=UTC),  # back to 02:30 local
    ]
    assert walls(anchor, MONTHLY, 3) == ["2027-02-28 02:30", "2027-03-28 03:30", "2027-04-28 02:30"]


def test_monthly_at_a_wall_time_repeated_by_fall_back() -> None:
    """2027-10-31 02:30 happens twice in Paris: the first one (summer time) is used."""
    anchor = datetime(2027, 8, 31, 2, 30, tzinfo=PARIS)
    assert [due_at(anchor, MONTHLY, n, PARIS) for n in (2, 3)] == [
        datetime(2027, 10, 31, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2027, 11, 30, 1, 30, tzinfo=UTC),  # 02:30 CET
    ]
    assert local(due_at(anchor, MONTHLY, 2, PARIS)).utcoffset() == timedelta(hours=2)


def test_daily_plan_keeps_its_wall_time_across_both_transitions() -> None:
    spring = datetime(2027, 3, 26, 9, 0, tzinfo=PARIS)
    assert walls(spring, DAILY, 5) == [f"2027-03-{day} 09:00" for day in range(26, 31)]
    gaps = [due_at(spring, DAILY, n + 1, PARIS) - due_at(spring, DAILY, n, PARIS) for n in range(4)]
    assert gaps == [timedelta(hours=h) for h in (24, 23, 24, 24)]

    autumn = datetime(2027, 10, 29, 9, 0, tzinfo=PARIS)
    assert walls(autumn, DAILY, 5) == [
        "2027-10-29 09:00",
        "2027-10-30 09:00",
        "2027-10-31 09:00",
        "2027-11-01 09:00",
        "2027-11-02 09:00",
    ]
    gaps = [due_at(autumn, DAILY, n + 1, PARIS) - due_at(autumn, DAILY, n, PARIS) for n in range(4)]
    assert gaps == [timedelta(hours=h) for h in (24, 25, 24, 24)]


def test_daily_plan_inside_the_skipped_hour_moves_once_and_comes_back() -> None:
    anchor = datetime(2027, 3, 26, 2, 30, tzinfo=PARIS)
    assert walls(anchor, DAILY, 4) == [
        "2027-03-26 02:30",
        "2027-03-27 02:30",
        "2027-03-28 03:30",
        "2027-03-29 02:30",
    ]
    dues = [due_at(anchor, DAILY, n, PARIS) for n in range(4)]
    assert dues == sorted(set(dues))


def test_daily_plan_inside_the_repeated_hour() -> None:
    anchor = datetime(2027, 10, 30, 2, 30, tzinfo=PARIS)
    dues = [due_at(anchor, DAILY, n, PARIS) for n in range(3)]
    assert dues == [
        datetime(2027, 10, 30, 0, 30, tzinfo=UTC),
        datetime(2027, 10, 31, 0, 30, tzinfo=UTC),  # first 02:30
        datetime(2027, 11, 1, 1, 30, tzinfo=UTC),
    ]


def test_period_zero_is_the_anchor_even_in_the_second_repeated_hour() -> None:
    second = datetime(2027, 10, 31, 2, 30, fold=1, tzinfo=PARIS)
    assert second.utcoffset() == timedelta(hours=1)
    assert due_at(second, DAILY, 0, PARIS) == datetime(2027, 10, 31, 1, 30, tzinfo=UTC)
    assert due_at(second, DAILY, 1, PARIS) == datetime(2027, 11, 1, 1, 30, tzinfo=UTC)


def test_anchor_in_another_zone_is_converted_to_the_plan_zone_first() -> None:
    anchor = datetime(2027, 1, 31, 23, 30, tzinfo=UTC)  # already Feb 1, 00:30 in Paris
    assert walls(anchor, MONTHLY, 2) == ["2027-02-01 00:30", "2027-03-01 00:30"]


def test_weekly_and_fortnightly() -> None:
    anchor = datetime(2027, 3, 22, 9, 0, tzinfo=NEW_YORK)  # a Monday
    weekly = [local(due_at(anchor, WEEKLY, n, NEW_YORK), NEW_YORK) for n in range(4)]
    assert [d.strftime("%a %d %H:%M") for d in weekly] == [
        "Mon 22 09:00",
        "Mon 29 09:00",
        "Mon 05 09:00",
        "Mon 12 09:00",
    ]
    fortnight = Interval(2, "weeks")
    assert due_at(anchor, fortnight, 3, NEW_YORK) == due_at(anchor, WEEKLY, 6, NEW_YORK)
    # New York springs forward on 2027-03-14: same wall time on both sides.
    before = datetime(2027, 3, 8, 9, 0, tzinfo=NEW_YORK)
    assert walls(before, WEEKLY, 2, NEW_YORK) == ["2027-03-08 09:00", "2027-03-15 09:00"]


def test_every_n_days() -> None:
    anchor = datetime(2027, 1, 1, tzinfo=UTC)
    assert due_at(anchor, Interval(30, "days"), 2, ZoneInfo("UTC")) == datetime(
        2027, 3, 2, tzinfo=UTC
    )


def test_naive_times_and_negative_periods_are_refused() -> None:
    with pytest.raises(ValueError, match="anchor must be timezone-aware"):
        due_at(datetime(2027, 1, 1), MONTHLY, 1, PARIS)
    anchor = datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="period must be 0 or more"):
        due_at(anchor, MONTHLY, -1, PARIS)
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        latest_due_period(anchor, MONTHLY, PARIS, datetime(2027, 5, 1))


ANCHOR = datetime(2027, 1, 31, 9, 0, tzinfo=PARIS)  # 08:00 UTC


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2027, 1, 31, 7, 59, 59, tzinfo=UTC), None),
        (datetime(2027, 1, 31, 8, 0, tzinfo=UTC), 0),
        (datetime(2027, 2, 28, 7, 59, 59, tzinfo=UTC), 0),
        (datetime(2027, 2, 28, 8, 0, tzinfo=UTC), 1),
        (datetime(2027, 3, 31, 6, 59, 59, tzinfo=UTC), 1),  # 09:00 CEST is 07:00 UTC
        (datetime(2027, 3, 31, 7, 0, tzinfo=UTC), 2),
        (datetime(2037, 1, 31, 8, 0, tzinfo=UTC), 120),
    ],
)
def test_latest_due_period_boundaries(now: datetime, expected: int | None) -> None:
    assert latest_due_period(ANCHOR, MONTHLY, PARIS, now) == expected


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 12, 1, tzinfo=UTC), 0),
        (datetime(2027, 1, 31, 7, 59, 59, tzinfo=UTC), 0),
        (datetime(2027, 1, 31, 8, 0, tzinfo=UTC), 1),
        (datetime(2027, 2, 28, 7, 59, 59, tzinfo=UTC), 1),
        (datetime(2027, 2, 28, 8, 0, tzinfo=UTC), 2),
        (datetime(2027, 3, 15, tzinfo=UTC), 2),
    ],
)
def test_first_period_after_boundaries(moment: datetime, expected: int) -> None:
    assert first_period_after(ANCHOR, MONTHLY, PARIS, moment) == expected


def test_what_is_due_now_follows_the_clock() -> None:
    with freeze_time("2027-03-31T06:59:59Z"):
        assert latest_due_period(ANCHOR, MONTHLY, PARIS, datetime.now(UTC)) == 1
    with freeze_time("2027-03-31T07:00:00Z"):
        assert latest_due_period(ANCHOR, MONTHLY, PARIS, datetime.now(UTC)) == 2
        # A subscription paused since February resumes with the next period still ahead.
        assert first_period_after(ANCHOR, MONTHLY, PARIS, datetime.now(UTC)) == 3


def test_latest_due_period_of_an_old_daily_plan_is_cheap() -> None:
    anchor = datetime(1980, 1, 1, 6, 0, tzinfo=PARIS)
    now = datetime(2030, 6, 15, 12, 0, tzinfo=UTC)
    started = time.perf_counter()
    for _ in range(200):
        n = latest_due_period(anchor, DAILY, PARIS, now)
    elapsed = time.perf_counter() - started
    assert n is not None
    assert due_at(anchor, DAILY, n, PARIS) <= now < due_at(anchor, DAILY, n + 1, PARIS)
    assert n == (datetime(2030, 6, 15) - datetime(1980, 1, 1)).days
    # Walking from period 0 would be ~18,500 due_at calls per lookup, seconds for 200.
    assert elapsed < 1.0


ZONES = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",  # 30-minute DST
    "Asia/Kolkata",
    "Pacific/Auckland",
]

intervals = st.builds(
    Interval, st.integers(1, 10), st.sampled_from(["days", "weeks", "months", "years"])
)
anchors = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2040, 12, 31),
    timezones=st.sampled_from([ZoneInfo(name) for name in ZONES]),
    allow_imaginary=False,
)
plan_zones = st.sampled_from([ZoneInfo(name) for name in ZONES])


@settings(max_examples=150, deadline=None)
@given(anchor=anchors, every=intervals, tz=plan_zones, n=st.integers(0, 150))
def test_due_at_is_strictly_increasing(
    anchor: datetime, every: Interval, tz: ZoneInfo, n: int
) -> None:
    assert due_at(anchor, every, n, tz) < due_at(anchor, every, n + 1, tz)


@settings(max_examples=150, deadline=None)
@given(
    anchor=anchors,
    every=intervals,
    tz=plan_zones,
    offset=st.timedeltas(min_value=timedelta(days=-400), max_value=timedelta(days=365 * 60)),
)
def test_latest_due_period_agrees_with_due_at(
    anchor: datetime, every: Interval, tz: ZoneInfo, offset: timedelta
) -> None:
    now = (anchor + offset).astimezone(UTC)
    latest = latest_due_period(anchor, every, tz, now)
    if latest is None:
        assert now < due_at(anchor, every, 0, tz)
        assert first_period_after(anchor, every, tz, now) == 0
    else:
        assert due_at(anchor, every, latest, tz) <= now < due_at(anchor, every, latest + 1, tz)
        assert first_period_after(anchor, every, tz, now) == latest + 1
    # Exactly at a due time, that period is due and the next one is not.
    k = latest if latest is not None else 0
    exact = due_at(anchor, every, k, tz)
    assert latest_due_period(anchor, every, tz, exact) == k
    assert first_period_after(anchor, every, tz, exact) == k + 1


# --- the end of the calendar (issue 14, item 9) ---------------------------------------------

KIRITIMATI = ZoneInfo("Pacific/Kiritimati")  # UTC+14


@pytest.mark.parametrize(
    ("anchor", "every", "period", "tz"),
    [
        # relativedelta: "year 10000 is out of range" (a ValueError nobody names).
        (datetime(9999, 6, 1, tzinfo=UTC), MONTHLY, 12, PARIS),
        (datetime(9999, 12, 31, tzinfo=UTC), DAILY, 1, UTC),
        # The wall clock of a zone east of UTC is already in year 10000.
        (datetime(9999, 12, 31, 11, tzinfo=UTC), DAILY, 1, KIRITIMATI),
        (datetime(9999, 12, 30, 20, tzinfo=UTC), DAILY, 1, KIRITIMATI),
        # Converting the first hour of year 1, +01:00, to UTC underflows.
        (datetime.fromisoformat("0001-01-01T00:00+01:00"), MONTHLY, 0, UTC),
        (datetime.fromisoformat("0001-01-01T00:00+01:00"), MONTHLY, 1, UTC),
        # A period number no calendar reaches: OverflowError.
        (datetime(2027, 1, 1, tzinfo=UTC), DAILY, 10**30, UTC),
    ],
)
def test_a_due_date_past_the_calendar_is_a_named_error(
    anchor: datetime, every: Interval, period: int, tz: ZoneInfo
) -> None:
    with pytest.raises(DateOutOfRange) as info:
        due_at(anchor, every, period, tz)
    assert isinstance(info.value, BillingError)
    message = str(info.value)
    assert f"period {period}" in message and str(every) in message, message
    assert "9999" in message, message


def test_looking_for_the_latest_period_at_the_end_of_the_calendar_is_a_named_error() -> None:
    anchor = datetime(9999, 12, 1, tzinfo=UTC)
    with pytest.raises(DateOutOfRange):
        latest_due_period(anchor, DAILY, UTC, datetime(9999, 12, 31, 12, tzinfo=UTC))
    with pytest.raises(DateOutOfRange):
        first_period_after(anchor, DAILY, UTC, datetime(9999, 12, 31, 12, tzinfo=UTC))


def test_the_last_computable_dates_are_still_computed() -> None:
    assert due_at(datetime(9999, 11, 30, tzinfo=UTC), MONTHLY, 1, UTC) == datetime(
        9999, 12, 30, tzinfo=UTC
    )
    assert due_at(datetime(1, 1, 1, tzinfo=UTC), MONTHLY, 0, UTC) == datetime(1, 1, 1, tzinfo=UTC)
