"""Hostile input, drawn by hypothesis: a plans file, an import file, every CLI value.

Each property is the promise of issue 14, item 9: whatever comes in ends as a valid result
or as a named error (``PlanFileError``, ``ImportRejected``, one ``error:`` line and exit
status 1 or 2), never as a traceback, and a rejected import writes nothing.

The values are built from plausible pieces and the hostile ones that broke something once:
numbers of thousands of digits, digits of other scripts, nesting thousands deep, dates in
year 1 and 9999, zones at +14:00, bytes that are not UTF-8, lone surrogates, control
characters, values wider than their columns.

Budgets: each property runs a few examples in ``make test`` (the whole file in about twenty
seconds) and many more under the ``slow`` marker (``make test-slow``), through the
``budget`` parameter that :func:`budgets` gives it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from billing import migrate
from billing.charging.sweep import shortest_period
from billing.dates import DateOutOfRange, due_at, latest_due_period
from billing.db import session_scope
from billing.errors import BillingError, ImportRejected, PlanFileError
from billing.intake import ANCHOR_WINDOW, import_subscriptions, parse_rows
from billing.models import Subscription
from billing.plans import PlanSet, load_plans, parse_plans
from billing.settings import get_settings
from tests.test_cli_errors import (  # noqa: F401 (run: a fixture, used by name)
    BILLING,
    COMMANDS,
    Ran,
    offline_env,
    run,
)

DATA = Path(__file__).parent / "data"
NOW = datetime(2029, 12, 1, tzinfo=UTC)


def budgets(fast: int, long: int) -> pytest.MarkDecorator:
    """``budget``: ``fast`` examples in the fast suite, ``long`` under the slow marker."""
    return pytest.mark.parametrize(
        "budget",
        [pytest.param(fast, id="fast"), pytest.param(long, id="long", marks=pytest.mark.slow)],
    )


def fuzz(budget: int) -> Any:
    """The settings of every property here: ``budget`` examples, no deadline (databases)."""
    return settings(
        max_examples=budget,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- hostile pieces -------------------------------------------------------------------------

OTHER_DIGITS = ["١٢", "３", "²", "߁", "໒"]  # Arabic-Indic, fullwidth, superscript, NKo, Lao
#: Whole numbers as text: ordinary, signed, huge, other scripts, Python-only spellings.
number_texts = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.integers(-(10**30), 10**30).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.sampled_from([*OTHER_DIGITS, "1_000", "0x10", "1e3", "1e400", "nan", "inf", "-0", " 7 "]),
)
DELAY_UNITS = ["second", "seconds", "minutes", "hours", "day", "days", "weeks", "Week"]
INTERVAL_UNITS = ["day", "days", "weeks", "month", "months", "year", "years", "Months"]
ODD_UNITS = ["", "fortnights", "hours", "months", "décades", "days days"]


def spans(units: list[str]) -> st.SearchStrategy[str]:
    """ "3 days": counts from number_texts, units plausible or not."""
    return st.builds(
        lambda count, unit, gap: f"{count}{gap}{unit}",
        number_texts,
        st.sampled_from(units + ODD_UNITS),
        st.sampled_from([" ", "  ", "\t", "", "\u2003"]),
    )


ZONES = sorted(zoneinfo.available_timezones())
zone_names = st.one_of(
    st.sampled_from(ZONES),
    st.sampled_from(["", "Mars/Base", "../etc/passwd", "Etc/GMT+14", "x" * 300, "UTC\x00"]),
)
cron_fields = st.one_of(
    st.sampled_from(["*", "*/15", "0", "59", "1-5", "mon-fri", "jan,jul", "7", "*/0", "5/15"]),
    number_texts,
)
cron_lines = st.lists(cron_fields, min_size=4, max_size=6).map(" ".join)
amount_texts = st.one_of(
    st.sampled_from(["29.90", "0.01", "9999999999.99", "10000000000", "29.999", "-5", "0"]),
    st.sampled_from(["1e400", "١٢.٣٠", "1_000.00", "NaN", "Infinity", "29,90", " 5 ", ""]),
    number_texts,
)
#: Text a person or a broken export could put anywhere: any character but NUL (which no
#: command line can carry), surrogates and control characters included, up to 5000 long.
any_text = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "[", "9"]), st.integers(0, 5000)),
    # Lone surrogates: a JSON escape ("\ud800") or a byte that is not UTF-8 makes them.
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map("r-{}".format),
)


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are TOML's, surrogates aside: those
    make the file invalid TOML, which is one more hostile case)."""
    return json.dumps(text)


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return "{a = " * depth + "1" + "}" * depth


#: Raw TOML values: numbers TOML allows of any size, floats, nesting, booleans, strings.
raw_values = st.one_of(
    any_text.map(toml_string),
    number_texts.filter(lambda t: re.fullmatch(r"-?[0-9]+", t) is not None),
    st.integers(1, 6000).map(lambda n: "0x" + "f" * n),
    st.sampled_from(["29.9", "1e400", "inf", "nan", "-0.0", "true", "false", "[]", "{}"]),
    st.builds(nested, st.integers(1, 3000), st.sampled_from(["array", "table"])),
    st.sampled_from(["1979-05-27T07:32:00Z", "07:32:00", "1979-05-27"]),
)


def quoted(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return strategy.map(toml_string)


def rarely(one_in: int) -> st.SearchStrategy[bool]:
    """True about once in ``one_in`` draws (``st.integers(...) == 0`` is far more often:
    hypothesis favours the ends of a range)."""
    return st.sampled_from([False] * (one_in - 1) + [True])


#: Spans at and around the bounds: 1 to the longest (ten years; 3650 days), and one past.
good_intervals = st.one_of(
    st.builds("{} days".format, st.integers(1, 3651)),
    st.builds("{} weeks".format, st.integers(1, 521)),
    st.builds("{} months".format, st.integers(1, 121)),
    st.builds("{} years".format, st.integers(1, 11)),
)
good_delays = st.one_of(
    st.builds("{} seconds".format, st.integers(1, 3650 * 86400 + 1)),
    st.builds("{} minutes".format, st.integers(1, 3650 * 1440 + 1)),
    st.builds("{} days".format, st.integers(1, 3651)),
    st.builds("{} weeks".format, st.integers(1, 522)),
)
good_crons = st.sampled_from(["0 3 * * *", "*/15 * * * *", "5,35 9-17 * * mon-fri", "0 3 * * 7"])


def ladders(delays: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(quoted(delays), max_size=5).map(lambda xs: f"[{', '.join(xs)}]")


@dataclass(frozen=True)
class Values:
    """What a key of the plans file is given: a good value, or a hostile one."""

    good: st.SearchStrategy[str]
    hostile: st.SearchStrategy[str]


PLAN_KEYS: dict[str, Values] = {
    "amount": Values(
        quoted(st.sampled_from(["29.90", "0.01", "9999999999.99", "5"])),
        st.one_of(quoted(amount_texts), raw_values),
    ),
    "currency": Values(
        st.just('"EUR"'), st.one_of(st.sampled_from(['"USD"', '"eur"']), raw_values)
    ),
    "every": Values(quoted(good_intervals), st.one_of(quoted(spans(INTERVAL_UNITS)), raw_values)),
    "sweep": Values(
        quoted(st.one_of(good_crons, good_delays)),
        st.one_of(quoted(cron_lines), quoted(spans(DELAY_UNITS)), raw_values),
    ),
    "timezone": Values(quoted(st.sampled_from(ZONES)), st.one_of(quoted(zone_names), raw_values)),
    "deferred": Values(st.sampled_from(["true", "false"]), raw_values),
    "capture_after": Values(quoted(good_delays), st.one_of(quoted(spans(DELAY_UNITS)), raw_values)),
    "retry_ladder": Values(
        ladders(good_delays), st.one_of(ladders(spans(DELAY_UNITS)), raw_values)
    ),
    "after_ladder": Values(st.sampled_from(['"suspend"', '"cancel"']), raw_values),
    "catch_up": Values(st.sampled_from(['"latest"', '"all"']), raw_values),
    "catch_up_spacing": Values(
        quoted(good_delays), st.one_of(quoted(spans(DELAY_UNITS)), raw_values)
    ),
    # Not a key of a plan: an "unknown key" problem.
    "colour": Values(st.nothing(), raw_values),
}
ACCOUNT_KEYS: dict[str, Values] = {
    "merchant_id": Values(st.just('"1234567"'), st.one_of(st.just("1234567"), raw_values)),
    "private_key_env": Values(st.just('"KLIKANDPAY_KEY_EUR"'), raw_values),
    "max_charges_per_second": Values(
        st.sampled_from(["5", "0.1", "1e300"]), st.one_of(st.sampled_from(["-1", "0"]), raw_values)
    ),
}
GOOD_PLAN = {"amount": '"29.90"', "currency": '"EUR"', "every": '"1 month"'}
GOOD_ACCOUNT = {"merchant_id": '"1234567"', "private_key_env": '"KLIKANDPAY_KEY_EUR"'}
TABLE_NAMES = Values(
    st.sampled_from(["pro-monthly", "basic", "a" * 64, "b_2"]),
    st.one_of(st.just("a" * 65), any_text.map(toml_string)),
)
WEBHOOK_URLS = Values(st.just('"https://shop.example/hook"'), quoted(any_text))


@st.composite
def value(draw: st.DrawFn, values: Values, clean: bool) -> str:
    """A good value; unless ``clean``, a hostile one about once in six."""
    if clean or draw(st.sampled_from([True] * 5 + [False])):
        return draw(values.good)
    return draw(values.hostile)


@st.composite
def table(
    draw: st.DrawFn, defaults: dict[str, str], keys: dict[str, Values], clean: bool
) -> dict[str, str]:
    """A table: the defaults, some keys given other values, one rarely left out."""
    table = dict(defaults)
    usable = sorted(key for key in keys if not (clean and keys[key].good.is_empty))
    for key in draw(st.lists(st.sampled_from(usable), max_size=4, unique=True)):
        table[key] = draw(value(keys[key], clean))
    if not clean and draw(rarely(10)):
        table.pop(draw(st.sampled_from(sorted(defaults))), None)
    return table


@st.composite
def plans_files(draw: st.DrawFn) -> str:
    """A plans file; half of them hold good values only (odd ones: the longest interval, a
    zone at +14:00), so that plans load and their dates are computed."""
    clean = draw(st.booleans())
    lines = ["[accounts.EUR]"]
    lines += [f"{k} = {v}" for k, v in draw(table(GOOD_ACCOUNT, ACCOUNT_KEYS, clean)).items()]
    names = draw(st.lists(value(TABLE_NAMES, clean), min_size=1, max_size=3, unique=clean))
    for name in names:
        lines.append(f"\n[plans.{name}]")
        lines += [f"{k} = {v}" for k, v in draw(table(GOOD_PLAN, PLAN_KEYS, clean)).items()]
    if draw(rarely(3)):
        lines.append(f"\n[webhooks.{draw(value(TABLE_NAMES, clean))}]")
        lines.append(f"url = {draw(value(WEBHOOK_URLS, clean))}")
        lines.append('secret_env = "CRM_SECRET"')
    return "\n".join(lines) + "\n"


#: Every problem says where it is: a TOML position, or the table and key it is about.
NAMED = re.compile(r"^(TOML|unknown top-level key|(accounts|plans|webhooks)\b)")


def _check_named(exc: PlanFileError) -> None:
    assert exc.problems
    for problem in exc.problems:
        assert NAMED.search(problem), f"problem does not say where: {problem!r}"
        assert "\n" not in problem and len(problem) < 600, problem
        assert "sys.set_int_max_str_digits" not in problem, problem


#: Anchors a subscription may have (intake refuses the rest): within a century of now.
window_anchors = st.datetimes(
    min_value=(NOW - ANCHOR_WINDOW).replace(tzinfo=None) + timedelta(days=1),
    max_value=(NOW + ANCHOR_WINDOW).replace(tzinfo=None) - timedelta(days=1),
    timezones=st.sampled_from([zoneinfo.ZoneInfo(z) for z in ("UTC", "Pacific/Kiritimati")]),
)
#: Anchors anywhere in the calendar: only a named DateOutOfRange may come of these.
any_anchors = st.datetimes(timezones=st.just(UTC))


def _survive_the_engine(plans: PlanSet, anchor: datetime, now: datetime) -> None:
    """What the engine computes from a plan for its first periods (sweep, retries, capture)."""
    for plan in plans.plans.values():
        for period in range(4):
            due_at(anchor, plan.every, period, plan.timezone)
        latest_due_period(anchor, plan.every, plan.timezone, now)
        _ = now - shortest_period(plan.every)
        for delay in (*plan.retry_ladder, plan.capture_after, plan.catch_up_spacing):
            _ = now + delay
            _ = now - delay


@budgets(fast=150, long=3000)
def test_a_plans_file_loads_or_names_its_problems(budget: int) -> None:
    @fuzz(budget)
    @given(text=plans_files(), anchor=window_anchors, far=any_anchors)
    def check(text: str, anchor: datetime, far: datetime) -> None:
        try:
            plans = parse_plans(text, source="plans.toml")
        except PlanFileError as exc:
            event("refused")
            _check_named(exc)
            return
        event("loaded")
        # A plan that loads survives the first periods from any anchor an import accepts...
        _survive_the_engine(plans, anchor, anchor + timedelta(days=400))
        # ...and from anywhere in the calendar, the only failure is a named one.
        try:
            _survive_the_engine(plans, far, far)
        except DateOutOfRange as exc:
            event("date out of range (named)")
            assert isinstance(exc, BillingError) and "period" in str(exc)
        except OverflowError:
            # ``now - delay`` itself, which is the engine's arithmetic and not billing.dates:
            # only within a few years of the ends of the calendar.
            assert far.year < 12 or far.year > 9988, far

    check()


def test_a_plans_file_on_disk_loads_or_names_its_problems(tmp_path: Path) -> None:
    """The file path: the same text through ``load_plans`` (a handful, for the reading)."""

    @fuzz(10)
    @given(text=plans_files())
    def check(text: str) -> None:
        path = tmp_path / "plans.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_plans(path)
        except PlanFileError as exc:
            if not exc.problems[0].startswith("not UTF-8"):  # a surrogate written as bytes
                _check_named(exc)

    check()


# --- import rows ----------------------------------------------------------------------------

IMPORT_PLANS = load_plans(DATA / "intake_plans.toml")
FIELD_NAMES = ["external_ref", "plan", "alias", "customer_ip", "next_charge_at", "email", "amount"]


def _iso(moment: datetime) -> str:
    return moment.isoformat()


times = st.one_of(
    st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ).map(_iso),
    st.datetimes(timezones=st.sampled_from([UTC, zoneinfo.ZoneInfo("Pacific/Kiritimati")])).map(
        _iso
    ),
    st.sampled_from(
        [
            "0001-01-01T00:00+01:00",
            "9999-12-31T00:00Z",
            "9999-12-31T23:59:59-23:59",
            "2030-02-30T00:00Z",
            "2030-01-01T00:00:00",
            "next tuesday",
            "",
        ]
    ),
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "external_ref": st.one_of(st.builds("r-{}".format, st.integers(0, 50)), any_text),
    "plan": st.one_of(st.sampled_from(["pro-monthly", "basic-weekly", "gold"]), any_text),
    "alias": st.one_of(st.sampled_from(["ab12cd34ef56", "ab12 cd34", ""]), any_text),
    "customer_ip": st.one_of(
        st.sampled_from(["10.0.0.1", "::1", "fe80::1%eth0", "300.1.1.1", "4111 1111 1111 1111"]),
        any_text,
    ),
    "next_charge_at": times,
    "email": st.one_of(st.sampled_from(["a@b.example", "not-an-email", ""]), any_text),
    "amount": amount_texts,
}
#: Values JSON allows where a text field is expected.
json_values = st.one_of(
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


#: Text a database column takes: any printable character, up to ``size``, not blank.
def column_text(size: int) -> st.SearchStrategy[str]:
    printable = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs"])
    return st.text(printable, min_size=1, max_size=size).filter(lambda t: t.strip() == t != "")


#: Valid but odd: widest values, any script, addresses of both families, the ends of the
#: window of next_charge_at, amounts at the ends of their range.
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "external_ref": column_text(128),
    "plan": st.sampled_from(["pro-monthly", "basic-weekly"]),
    "alias": column_text(128).filter(lambda t: not any(c.isspace() for c in t)),
    "customer_ip": st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    "next_charge_at": st.datetimes(
        min_value=(NOW - ANCHOR_WINDOW).replace(tzinfo=None) + timedelta(days=1),
        max_value=(NOW + ANCHOR_WINDOW).replace(tzinfo=None) - timedelta(days=1),
        timezones=st.sampled_from([UTC, zoneinfo.ZoneInfo("Pacific/Kiritimati")]),
    ).map(_iso),
    "email": st.emails(),
    "amount": st.sampled_from(["0.01", "29.9", "9999999999.99", "7"]),
}


@st.composite
def rows(draw: st.DrawFn) -> dict[str, Any]:
    row: dict[str, Any] = {name: draw(GOOD_VALUES[name]) for name in FIELD_NAMES[:5]}
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES[5:]), max_size=2, unique=True)):
        row[name] = draw(GOOD_VALUES[name])
    if draw(rarely(3)):
        for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=2, unique=True)):
            row[name] = draw(FIELD_VALUES[name])
    if draw(rarely(10)):
        row.pop(draw(st.sampled_from(FIELD_NAMES)), None)
    return row


#: Whole lines no row is made of: nesting, numbers past int()'s limit, not objects, junk.
hostile_json_lines = st.one_of(
    st.builds(lambda d: '{"external_ref": ' + nested(d, "array") + "}", st.integers(1, 100_000)),
    st.builds(lambda n: '{"amount": ' + "9" * n + "}", st.integers(1, 6000)),
    st.sampled_from(["[1, 2]", '"text"', "{", '{"a": 1, "a": 2}', "\ufeff{}", "NaN", "{}"]),
    any_text,
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(rarely(10)):
            lines.append(draw(hostile_json_lines).replace("\n", " "))
            continue
        row = draw(rows())
        if draw(rarely(6)):
            row[draw(st.sampled_from(FIELD_NAMES))] = draw(json_values)
        if draw(rarely(10)):
            row[draw(st.sampled_from(["card_number", "cvv", "x" * 300]))] = "4111"
        text = json.dumps(row, ensure_ascii=draw(st.booleans()), default=str)
        # json.dumps writes floats past Decimal's reach as Infinity; the file may also hold
        # raw numbers of thousands of digits, written here by hand.
        if draw(rarely(10)):
            text = text[:-1] + ', "amount": ' + "7" * draw(st.integers(4000, 4400)) + "}"
        lines.append(text)
    return "\n".join(lines) + "\n"


@st.composite
def csv_files(draw: st.DrawFn) -> str:
    header = list(FIELD_NAMES)
    if draw(rarely(10)):
        header = draw(st.lists(st.sampled_from([*FIELD_NAMES, "ip", "x" * 300]), max_size=9))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for _ in range(draw(st.integers(0, 4))):
        row = draw(rows())
        values = [str(row.get(name, "")) for name in header]
        if draw(rarely(10)):
            values.append("extra")
        if values and draw(rarely(20)):
            values[0] = "x" * 140_000  # past the csv module's field limit
        writer.writerow(values)
    text = out.getvalue()
    if draw(rarely(10)):  # a line no CSV writer makes
        text += draw(st.sampled_from(['"unclosed,quote\n', "a,b\x00c\n", "\r\r\n", ",,,,,,\n"]))
    return text


def _write(path: Path, text: str) -> None:
    """The file as UTF-8, but for lone surrogates: those become bytes that are not UTF-8."""
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


def _subscriptions(url: str) -> set[str]:
    with session_scope(url) as session:
        return set(session.scalars(select(Subscription.external_ref)))


def _empty(url: str) -> None:
    with session_scope(url) as session:
        session.execute(delete(Subscription))


LINE_PROBLEM = re.compile(r"^line \d+: \S")
FILE_PROBLEMS = (
    "no such file",
    "is not a regular file",
    "cannot be read: ",
    "the file is not UTF-8 text",
    "not a readable CSV file",
)


@budgets(fast=30, long=400)
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_an_import_file_is_imported_whole_or_rejected_with_nothing_written(
    db_url: str, tmp_path: Path, kind: str, budget: int
) -> None:
    files = csv_files() if kind == "csv" else jsonl_files()

    @fuzz(budget)
    @given(text=files, strict=st.booleans())
    def check(text: str, strict: bool) -> None:
        _empty(db_url)
        path = tmp_path / f"subscriptions.{kind}"
        _write(path, text)
        try:
            result = import_subscriptions(db_url, path, IMPORT_PLANS, strict=strict, now=NOW)
        except ImportRejected as exc:
            event("rejected")
            assert _subscriptions(db_url) == set(), "a rejected import wrote rows"
            for problem in exc.problems:
                assert (
                    LINE_PROBLEM.match(problem)
                    or problem in FILE_PROBLEMS
                    or any(problem.startswith(p) for p in FILE_PROBLEMS)
                ), problem
                assert "\n" not in problem and len(problem) < 600, problem
            return
        event("imported")
        expected = {row.external_ref for row in parse_rows(path, IMPORT_PLANS, now=NOW)}
        assert result.created + result.unchanged == len(expected)
        assert _subscriptions(db_url) == expected, "an import wrote part of its file"

    check()


# --- every CLI value ------------------------------------------------------------------------

#: Commands that start something when their values are good, and what stops them right after
#: reading their values; options left out of the fuzz, because a good value would start them.
STOPPERS: dict[tuple[str, ...], list[str]] = {
    ("sandbox",): ["--host", "192.0.2.1"],  # not loopback, no --allow-public
    ("metrics",): ["--host", "192.0.2.1"],
    ("web",): ["--host", "192.0.2.1"],
    ("demo",): [],  # --workdir: a folder with a file that is not a demo's (see cli_env)
}
NOT_FUZZED = {
    ("sandbox",): {"--host"},
    ("metrics",): {"--host"},
    ("web",): {"--host"},
    ("demo",): {"--workdir"},
}
#: What a command needs besides the value under test (required options and arguments).
NEEDS: dict[tuple[str, ...], list[str]] = {
    ("cancel",): ["--reason", "fuzz"],
    ("report",): ["--from", "2020-01-01", "--to", "2030-01-01"],
}


def _takes_a_value(param: Any) -> bool:
    return not getattr(param, "is_flag", False) and param.expose_value


TARGETS = sorted(
    (path, param.opts[0] if param.param_type_name == "option" else param.name)
    for path, command in COMMANDS.items()
    for param in command.params
    if _takes_a_value(param) and param.opts[0] not in NOT_FUZZED.get(path, set())
)

#: A path, for the options and arguments that take one.
path_texts = st.one_of(
    st.sampled_from(["plans.toml", "out.csv", ".", "..", "/", "/nonexistent/x", "/dev/null"]),
    any_text.filter(lambda t: t and "\x00" not in t),
)
#: Every value: numbers, spans, days, amounts, paths and any text; never NUL, which no
#: command line can hold.
cli_values = st.one_of(
    number_texts,
    spans(DELAY_UNITS),
    times,
    st.sampled_from(["2030-01-01", "0001-01-01", "9999-12-31", "2030-13-45", "20300101"]),
    amount_texts,
    path_texts,
    any_text,
    st.sampled_from(["head", "--help", "-1", "--", "2147483648", "9223372036854775808"]),
).filter(lambda value: "\x00" not in value)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An empty database (so no value reaches the gateway or the broker), a working folder
    of its own, and settings that reach nothing outside. Overrides the fixture of
    ``tests.test_cli_errors`` that its ``run`` uses."""
    folder = tmp_path_factory.mktemp("cli-fuzz")
    url = f"sqlite:///{folder / 'billing.db'}"
    migrate.upgrade(url)
    (folder / "not-a-demo").mkdir()
    (folder / "not-a-demo" / "keep.txt").write_text("kept")
    env = offline_env(url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.chdir(folder)
        get_settings.cache_clear()
        yield {**env, "folder": str(folder)}
    get_settings.cache_clear()


def _argv(path: tuple[str, ...], target: str, value: str, env: dict[str, str]) -> list[str]:
    """The command line: the value under test, plus what the command needs to get that far."""
    command = COMMANDS[path]
    extra = list(NEEDS.get(path, []))
    if path == ("demo",):
        extra += ["--workdir", str(Path(env["folder"]) / "not-a-demo")]
    extra += STOPPERS.get(path, [])
    if target.startswith("-"):
        given = [target, value]
        # Required arguments get an ID no record has.
        for param in command.params:
            if param.param_type_name == "argument" and param.required:
                given.insert(0, "999999")
    else:
        given = ["--", value] if value.startswith("-") else [value]
    if target in extra:  # the value under test replaces the companion
        at = extra.index(target)
        del extra[at : at + 2]
    return [*path, *extra, *given]


def _check_ran(ran: Ran, argv: list[str]) -> None:
    shown = f"argv {argv!r}\nexit {ran.code}\nstderr:\n{ran.err}\nstdout:\n{ran.out[:2000]}"
    assert "Traceback" not in ran.err + ran.out, shown
    assert ran.code in (0, 1, 2), shown
    errors = [line for line in ran.lines if line.startswith("error:")]
    if ran.code:
        assert len(errors) == 1 and ran.lines[-1] == errors[0], shown
    else:
        assert not errors, shown


@budgets(fast=120, long=4000)
def test_every_cli_value_gives_a_result_or_one_error_line(
    run,  # noqa: F811 (the fixture imported above)
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
) -> None:
    @fuzz(budget)
    @given(target=st.sampled_from(TARGETS), value=cli_values)
    def check(target: tuple[tuple[str, ...], str], value: str) -> None:
        path, name = target
        event(" ".join(path))
        if path in (("worker",), ("beat",)):  # a missing plans file stops them after parsing
            monkeypatch.setenv("BILLING_PLANS_FILE", "/nonexistent/plans.toml")
        elif path[0] == "db":  # a good revision migrates: a database of its own each time
            db = Path(cli_env["folder"]) / "migrated.db"
            db.unlink(missing_ok=True)
            monkeypatch.setenv("BILLING_DATABASE_URL", f"sqlite:///{db}")
        argv = _argv(path, name, value, cli_env)
        try:
            _check_ran(run(*argv), argv)
        finally:
            monkeypatch.setenv("BILLING_PLANS_FILE", cli_env["BILLING_PLANS_FILE"])
            monkeypatch.setenv("BILLING_DATABASE_URL", cli_env["BILLING_DATABASE_URL"])

    check()
    assert (Path(cli_env["folder"]) / "not-a-demo" / "keep.txt").read_text() == "kept"


@budgets(fast=2, long=40)
def test_the_console_script_with_bytes_that_are_not_utf8(cli_env: dict[str, str], budget: int):
    """The installed ``billing`` itself, given raw bytes as its arguments, under a strict
    UTF-8 stdout: what ``argv`` really holds after a careless paste."""
    simple = [
        t for t in TARGETS if t[0] not in STOPPERS and t[0][0] not in ("db", "worker", "beat")
    ]

    @fuzz(budget)
    @given(target=st.sampled_from(simple), raw=st.binary(min_size=1, max_size=12))
    def check(target: tuple[tuple[str, ...], str], raw: bytes) -> None:
        path, name = target
        value = os.fsdecode(raw.replace(b"\x00", b"x"))
        argv = _argv(path, name, value, cli_env)
        env = {**os.environ, **cli_env, "PYTHONIOENCODING": "utf-8:strict"}
        done = subprocess.run(
            [BILLING, *(os.fsencode(arg) for arg in argv)],
            env=env, capture_output=True, timeout=120, check=False, cwd=cli_env["folder"],
        )  # fmt: skip
        ran = Ran(
            done.returncode,
            done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"),
        )
        _check_ran(ran, argv)

    check()


def test_the_targets_cover_every_kind_of_value() -> None:
    """The fuzz reads its targets from the app: IDs, numbers, spans, days, amounts, paths."""
    names = {name for _, name in TARGETS}
    for expected in ("charge", "--limit", "--older-than", "--from", "--amount", "--plans"):
        assert expected in names, expected
    assert len(TARGETS) > 40
