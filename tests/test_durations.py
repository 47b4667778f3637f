"""Intervals, delays and cron lines as plans write them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from celery.schedules import crontab

from billing.durations import (
    Cron,
    Interval,
    format_delay,
    parse_cron,
    parse_delay,
    parse_interval,
    quote,
    shown,
)


@pytest.mark.parametrize(
    ("text", "count", "unit"),
    [
        ("1 month", 1, "months"),
        ("3 months", 3, "months"),
        ("2 weeks", 2, "weeks"),
        ("1 week", 1, "weeks"),
        ("1 year", 1, "years"),
        ("2 years", 2, "years"),
        ("30 days", 30, "days"),
        ("1 day", 1, "days"),
        ("  6  Months ", 6, "months"),
    ],
)
def test_parse_interval(text: str, count: int, unit: str) -> None:
    assert parse_interval(text) == Interval(count, unit)  # type: ignore[arg-type]


def test_interval_str_is_singular_for_one() -> None:
    assert str(Interval(1, "months")) == "1 month"
    assert str(Interval(3, "months")) == "3 months"
    assert str(parse_interval("1 days")) == "1 day"
    assert str(Interval(2, "weeks")) == "2 weeks"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r'^"" is empty'),
        ("0 months", r'^"0 months" must be at least 1 month'),
        ("-1 month", r'^"-1 month" must be at least 1 month'),
        ("1.5 months", r'^"1.5 months" is not an interval such as "1 month"'),
        ("monthly", r'^"monthly" is not an interval'),
        ("1 fortnight", r'^"1 fortnight" has an unknown unit "fortnight"'),
        ("12 hours", r'^"12 hours": hours are too short for a billing interval'),
    ],
)
def test_parse_interval_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_interval(text)


def test_interval_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Interval(0, "days")
    with pytest.raises(ValueError, match="unit"):
        Interval(1, "hours")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30 seconds", timedelta(seconds=30)),
        ("1 second", timedelta(seconds=1)),
        ("90 minutes", timedelta(minutes=90)),
        ("1 minute", timedelta(minutes=1)),
        ("2 hours", timedelta(hours=2)),
        ("1 hour", timedelta(hours=1)),
        ("1 day", timedelta(days=1)),
        ("3 days", timedelta(days=3)),
        ("2 weeks", timedelta(days=14)),
        ("1 Week", timedelta(days=7)),
    ],
)
def test_parse_delay(text: str, expected: timedelta) -> None:
    assert parse_delay(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1 day", r'^"-1 day" must be a positive delay$'),
        ("0 seconds", r'^"0 seconds" must be a positive delay$'),
        ("", r'^"" is empty: give a delay such as "30 seconds"'),
        ("   ", r'^"   " is empty'),
        ("1.5 days", r'^"1.5 days" is not a delay'),
        ("soon", r'^"soon" is not a delay'),
        ("1 month", r'^"1 month" is not a fixed delay \(months vary in length\)'),
        ("1 year", r'^"1 year" is not a fixed delay'),
        ("3 fortnights", r'^"3 fortnights" has an unknown unit "fortnights"'),
    ],
)
def test_parse_delay_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_delay(text)


@pytest.mark.parametrize(
    ("delay", "text"),
    [
        (timedelta(seconds=30), "30 seconds"),
        (timedelta(minutes=90), "90 minutes"),
        (timedelta(hours=1), "1 hour"),
        (timedelta(days=7), "7 days"),
        (timedelta(days=1), "1 day"),
        (timedelta(seconds=3601), "3601 seconds"),
    ],
)
def test_format_delay_reads_back(delay: timedelta, text: str) -> None:
    assert format_delay(delay) == text
    assert parse_delay(text) == delay


VALID_CRON = [
    "0 3 * * *",
    "*/15 * * * *",
    "0 0-23/2 * * *",
    "5,35 9-17 * * mon-fri",
    "0 3 1 jan,apr,jul,oct *",
    "0 3 1-7 * SUN",
    "30 4 15 Feb *",
    "0 12 * * 0",
    "0 12 28-31 * *",
    "59 23 31 12 6",
    "0 8 * jan-mar/2 mon,wed,fri",
]


@pytest.mark.parametrize("line", VALID_CRON)
def test_parse_cron_keeps_the_fields_as_written(line: str) -> None:
    cron = parse_cron(line)
    assert str(cron) == line
    assert cron.minute == line.split()[0]


@pytest.mark.parametrize("line", [*VALID_CRON, "0 3 * * 7", "0 3 * * 5-7", "0 3 * * 1-7/2"])
def test_every_accepted_cron_line_is_accepted_by_celery(line: str) -> None:
    """Beat builds celery's crontab from the five strings: they must all be valid there."""
    cron = parse_cron(line)
    schedule = crontab(
        minute=cron.minute,
        hour=cron.hour,
        day_of_month=cron.day_of_month,
        month_of_year=cron.month_of_year,
        day_of_week=cron.day_of_week,
    )
    assert schedule.minute


@pytest.mark.parametrize(
    ("line", "day_of_week", "days"),
    [
        ("0 3 * * 7", "0", {0}),
        ("0 3 * * 5-7", "0,5,6", {0, 5, 6}),
        ("0 3 * * 1-7/2", "0,1,3,5", {0, 1, 3, 5}),
        ("0 3 * * 0", "0", {0}),
        ("0 3 * * *", "*", set(range(7))),
    ],
)
def test_sunday_as_7_becomes_what_celery_reads_as_sunday(
    line: str, day_of_week: str, days: set[int]
) -> None:
    cron = parse_cron(line)
    assert cron.day_of_week == day_of_week
    assert crontab(day_of_week=cron.day_of_week).day_of_week == days


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("61 * * * *", r'^"61 \* \* \* \*": minute 61 is out of range 0-59$'),
        ("0 24 * * *", r"hour 24 is out of range 0-23$"),
        ("0 3 0 * *", r"day of month 0 is out of range 1-31$"),
        ("0 3 32 * *", r"day of month 32 is out of range 1-31$"),
        ("0 3 * 13 *", r"month 13 is out of range 1-12$"),
        ("0 3 * * 8", r"day of week 8 is out of range 0-7$"),
        ("0 3 * foo *", r'month "foo" is not a number 1-12 or jan-dec$'),
        ("0 3 * * funday", r'day of week "funday" is not a number 0-7 or sun-sat$'),
        ("0 3 * * jan", r'day of week "jan" is not a number 0-7 or sun-sat$'),
        ("x 3 * * *", r'minute "x" is not a number 0-59$'),
        ("*/0 * * * *", r'minute step "0" must be a number 1-59$'),
        ("*/ * * * *", r'minute step "" must be a number'),
        ("5/15 * * * *", r'minute "5/15": a step needs \* or a range'),
        ("0 3 * * fri-mon", r'day of week range "fri-mon" runs backwards'),
        ("0 5-3 * * *", r'hour range "5-3" runs backwards'),
        ("1,,2 * * * *", r'minute "1,,2" has an empty item between commas'),
        ("-5 * * * *", r'minute "" is not a number 0-59'),
        ("0 3 * *", r'^"0 3 \* \*" has 4 field\(s\): a cron line has five'),
        ("0 3 * * * *", r"has 6 field\(s\)"),
    ],
)
def test_parse_cron_errors_name_the_field_and_value(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cron(line)


def test_cron_is_a_frozen_value() -> None:
    assert parse_cron("0 3 * * *") == Cron("0", "3", "*", "*", "*")
    assert hash(parse_cron("0 3 * * *")) == hash(Cron("0", "3", "*", "*", "*"))


# --- hostile values (issue 14, item 9) ------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        # timedelta(seconds=...) overflowed: OverflowError, not a named problem.
        (parse_delay, "99999999999999999 days", r'^"99999999999999999 days" is longer than 3650'),
        (parse_delay, "3651 days", r'^"3651 days" is longer than 3650 days, the longest delay'),
        (parse_delay, "600 weeks", r'^"600 weeks" is longer than 3650 days'),
        # More digits than int() reads: Python's own message, which names a sys setting.
        (parse_delay, "9" * 5000 + " seconds", r"is longer than 3650 days"),
        # Digits of other scripts pass \d and int(); a plan is written in ASCII digits.
        (parse_delay, "３ days", r'^"３ days" is not a delay'),
        (parse_delay, "١ day", r'^"١ day" is not a delay'),
        # Passed, then every sweep crashed: "now minus one period" is before year 1.
        (parse_interval, "3000 years", r'^"3000 years" is longer than 10 years, the longest'),
        (parse_interval, "11 years", r'^"11 years" is longer than 10 years'),
        (parse_interval, "121 months", r'^"121 months" is longer than 10 years'),
        (parse_interval, "521 weeks", r'^"521 weeks" is longer than 10 years'),
        (parse_interval, "3651 days", r'^"3651 days" is longer than 10 years'),
        (parse_interval, "9" * 5000 + " days", r"is longer than 10 years"),
        (parse_interval, "１ month", r'^"１ month" is not an interval'),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_a_span_out_of_bounds_is_a_named_problem(
    parse: Callable[[str], object], text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse(text)
    assert "sys." not in str(info.value)
    assert len(str(info.value)) < 300


def test_the_longest_interval_and_delay_are_accepted() -> None:
    assert parse_interval("10 years") == Interval(10, "years")
    assert parse_interval("120 months") == Interval(120, "months")
    assert parse_interval("520 weeks") == Interval(520, "weeks")
    assert parse_interval("3650 days") == Interval(3650, "days")
    assert parse_delay("3650 days") == timedelta(days=3650)
    assert parse_delay("315360000 seconds") == timedelta(days=3650)


def test_an_interval_built_in_code_has_the_same_bound() -> None:
    with pytest.raises(ValueError, match="longer than 10 years"):
        Interval(11, "years")


def test_a_cron_number_of_thousands_of_digits_is_a_named_problem() -> None:
    with pytest.raises(ValueError, match=r"minute .* is out of range 0-59$") as info:
        parse_cron("9" * 5000 + " 3 * * *")
    assert "sys." not in str(info.value)
    assert len(str(info.value)) < 300


def test_a_quoted_value_is_short_printable_text() -> None:
    assert quote("29.999") == '"29.999"'
    assert quote("x" * 1000) == '"' + "x" * 79 + '…"'
    # A lone surrogate cannot be encoded, printed or stored; its escape can.
    assert quote("a\udcff") == '"a\\udcff"'
    assert quote("a\udcff").encode("utf-8")
    # Characters that end a line for str.splitlines() and many terminals stay escaped.
    assert quote("a\x85b\u2028c\nd") == '"a\\u0085b\\u2028c\\nd"'
    assert shown(10**5000) == "a whole number of 5001 digits"
    assert shown(17) == "17" and shown([1] * 1000).endswith("…")
