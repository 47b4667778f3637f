"""Subscription intake: CSV / JSON-lines files and the one-at-a-time function."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from billing import intake
from billing.db import session_scope
from billing.errors import ImportRejected, InvalidInput
from billing.intake import add_subscription, import_subscriptions, parse_rows
from billing.models import Subscription
from billing.plans import PlanSet, load_plans

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
PLANS_FILE = DATA / "intake_plans.toml"
# Before every fixture's next_charge_at (2030), so nothing counts as old.
NOW = datetime(2029, 12, 1, tzinfo=UTC)

HEADER = "external_ref,plan,alias,customer_ip,next_charge_at,email,amount\n"


@pytest.fixture
def plans() -> PlanSet:
    return load_plans(PLANS_FILE)


def count(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(Subscription)) or 0


def by_ref(url: str) -> dict[str, Subscription]:
    with session_scope(url) as session:
        return {s.external_ref: s for s in session.scalars(select(Subscription))}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- valid files


def test_csv_import_creates_active_subscriptions(db_url: str, plans: PlanSet) -> None:
    result = import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)

    assert (result.created, result.unchanged, result.warnings) == (3, 0, [])
    subs = by_ref(db_url)
    assert set(subs) == {"shop-1", "shop-2", "shop-3"}
    one = subs["shop-1"]
    assert one.plan == "pro-monthly"
    assert one.alias == "ab12cd34ef56gh78"
    assert one.customer_ip == "203.0.113.7"
    assert one.email == "ann@example.com"
    assert one.amount_override is None
    assert one.next_charge_at == datetime(2030, 1, 15, 8, 0, tzinfo=UTC)
    assert one.anchor_at == one.next_charge_at
    assert one.next_period == 0
    assert one.status == "active"
    assert subs["shop-2"].customer_ip == "2001:db8::1"
    assert subs["shop-2"].amount_override == Decimal("19.90")
    assert subs["shop-2"].email is None
    assert subs["shop-3"].amount_override == Decimal("5.00")


def test_jsonl_import(db_url: str, plans: PlanSet) -> None:
    result = import_subscriptions(db_url, DATA / "intake_valid.jsonl", plans, now=NOW)

    assert (result.created, result.unchanged) == (2, 0)
    subs = by_ref(db_url)
    assert subs["web-1"].next_charge_at == datetime(2030, 1, 15, 8, 0, tzinfo=UTC)
    # A JSON number is read as a Decimal, never through float.
    assert subs["web-2"].amount_override == Decimal("3.50")
    assert subs["web-2"].plan == "basic-weekly"


def test_format_is_detected_from_content(tmp_path: Path, plans: PlanSet) -> None:
    jsonl = (DATA / "intake_valid.jsonl").read_text()
    rows = parse_rows(write(tmp_path, "export.txt", jsonl), plans)
    assert [r.external_ref for r in rows] == ["web-1", "web-2"]
    assert [r.line for r in rows] == [1, 3]

    csv_text = (DATA / "intake_valid.csv").read_text()
    rows = parse_rows(write(tmp_path, "export.dat", csv_text), plans)
    assert [r.external_ref for r in rows] == ["shop-1", "shop-2", "shop-3"]


def test_new_subscription_repr_masks_alias(plans: PlanSet) -> None:
    rows = parse_rows(DATA / "intake_valid.csv", plans)
    text = repr(rows[0])
    assert "ab12cd34ef56gh78" not in text
    assert "ab12…78" in text
    assert "shop-1" in text


def test_importing_the_same_file_twice_changes_nothing(db_url: str, plans: PlanSet) -> None:
    import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)
    before = by_ref(db_url)

    again = import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)

    assert (again.created, again.unchanged) == (0, 3)
    after = by_ref(db_url)
    assert {k: v.updated_at for k, v in after.items()} == {
        k: v.updated_at for k, v in before.items()
    }


def test_reimport_after_charging_is_still_unchanged(db_url: str, plans: PlanSet) -> None:
    """Charging moves next_charge_at; the file's value is compared with the anchor."""
    import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)
    with session_scope(db_url) as session:
        session.execute(
            update(Subscription)
            .where(Subscription.external_ref == "shop-1")
            .values(next_period=1, next_charge_at=datetime(2030, 2, 15, 8, tzinfo=UTC))
        )

    again = import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)

    assert (again.created, again.unchanged) == (0, 3)
    assert by_ref(db_url)["shop-1"].next_period == 1


def test_partly_new_file_creates_only_the_new_rows(db_url: str, plans: PlanSet, tmp_path: Path):
    import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)
    text = (DATA / "intake_valid.csv").read_text()
    text += "pro-monthly,shop-4,ff00ee11dd22cc33,192.0.2.4,2030-03-01T09:00:00+01:00,,\n"
    seen: list[int] = []

    result = import_subscriptions(
        db_url, write(tmp_path, "more.csv", text), plans, now=NOW, progress=seen.append
    )

    assert (result.created, result.unchanged) == (1, 3)
    assert sum(seen) == 4
    assert count(db_url) == 4


# --------------------------------------------------------------------------- bad files


def test_bad_rows_are_all_reported_and_nothing_is_written(db_url: str, plans: PlanSet) -> None:
    with pytest.raises(ImportRejected) as caught:
        import_subscriptions(db_url, DATA / "intake_bad.csv", plans, now=NOW)

    problems = caught.value.problems
    assert problems[0].startswith('line 3: plan "gold-yearly" is not in the plans file')
    assert problems[1:] == [
        'line 4: customer_ip "300.1.1.1" is not an IP address',
        "line 5: alias is missing or blank",
        'line 6: next_charge_at "2030-01-15T09:00:00" is a time without offset '
        "(write it like 2025-03-01T09:00:00+01:00 or with a Z)",
        'line 7: external_ref "shop-1" appears again (first on line 2)',
        'line 8: amount: "12.345" has more than two decimal places',
        'line 9: email "not-an-email" is not an e-mail address',
        'line 10: next_charge_at "next tuesday" is not an ISO 8601 time',
    ]
    assert caught.value.path.endswith("intake_bad.csv")
    assert count(db_url) == 0


def test_unknown_and_missing_columns_are_named(tmp_path: Path, plans: PlanSet) -> None:
    path = write(tmp_path, "cols.csv", "external_ref,plan,alias,ip,next_charge_at,notes\nx,y\n")

    with pytest.raises(ImportRejected) as caught:
        parse_rows(path, plans)

    assert caught.value.problems == [
        'line 1: unknown column(s) "ip", "notes" '
        "(columns are: external_ref, plan, alias, customer_ip, next_charge_at, email, amount)",
        'line 1: missing column(s) "customer_ip"',
    ]


def test_csv_row_shape_problems(tmp_path: Path, plans: PlanSet) -> None:
    text = HEADER + "a,pro-monthly,ab12cd34ef56,10.0.0.1,2030-01-01T00:00:00Z,,,extra\n"
    text += "b,pro-monthly\n"
    with pytest.raises(ImportRejected) as caught:
        parse_rows(write(tmp_path, "shape.csv", text), plans)

    assert caught.value.problems == [
        "line 2: 8 values for 7 columns",
        "line 3: alias is missing or blank",
        "line 3: customer_ip is missing",
        "line 3: next_charge_at is missing",
    ]


def test_jsonl_problems_have_line_numbers(tmp_path: Path, plans: PlanSet) -> None:
    good = {
        "external_ref": "j-1",
        "plan": "pro-monthly",
        "alias": "ab12cd34ef56",
        "customer_ip": "10.0.0.1",
        "next_charge_at": "2030-01-01T00:00:00Z",
    }
    lines = [
        json.dumps(good),
        '{"external_ref": "j-2", ',
        "[1, 2]",
        json.dumps({**good, "external_ref": "j-3", "card": "4111"}),
        json.dumps({**good, "external_ref": "j-4", "amount": 0}),
        json.dumps({**good, "external_ref": 17}),
        json.dumps({**good, "external_ref": "j-7", "next_charge_at": 1893456000}),
    ]
    path = write(tmp_path, "rows.jsonl", "\n".join(lines) + "\n")

    with pytest.raises(ImportRejected) as caught:
        parse_rows(path, plans)

    problems = caught.value.problems
    assert problems[0].startswith("line 2: not valid JSON")
    assert problems[1:] == [
        "line 3: each line must be a JSON object",
        'line 4: unknown field(s) "card"',
        "line 5: amount: 0 must be a positive amount",
        "line 6: external_ref must be text, not 17",
        "line 7: next_charge_at must be ISO 8601 text, not 1893456000",
    ]


def test_a_card_number_in_a_column_is_not_echoed(tmp_path: Path, plans: PlanSet) -> None:
    text = HEADER + "a-1,pro-monthly,ab12cd34ef56,4111 1111 1111 1111,2030-01-01T00:00:00Z,,\n"

    with pytest.raises(ImportRejected) as caught:
        parse_rows(write(tmp_path, "pan.csv", text), plans)

    assert caught.value.problems == ['line 2: customer_ip "[redacted-pan]" is not an IP address']
    assert "1111" not in str(caught.value)


def test_missing_and_non_utf8_files_are_rejected(tmp_path: Path, plans: PlanSet) -> None:
    with pytest.raises(ImportRejected, match="no such file"):
        parse_rows(tmp_path / "nope.csv", plans)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(HEADER.encode() + "é,pro-monthly\n".encode("latin-1"))
    with pytest.raises(ImportRejected, match="not UTF-8"):
        parse_rows(latin, plans)


def test_conflict_with_existing_row_rejects_the_whole_file(
    db_url: str, plans: PlanSet, tmp_path: Path
) -> None:
    import_subscriptions(db_url, DATA / "intake_valid.csv", plans, now=NOW)
    text = HEADER
    text += "new-1,pro-monthly,ff00ee11dd22cc33,192.0.2.4,2030-03-01T09:00:00+01:00,,\n"
    text += "shop-1,basic-weekly,ab12cd34ef56gh78,203.0.113.7,2030-01-15T09:00:00+01:00,"
    text += "ann@example.com,\n"
    text += "shop-3,basic-weekly,other-alias-1234,198.51.100.20,2030-02-01T12:30:00Z,"
    text += "bob@example.org,5.00\n"

    with pytest.raises(ImportRejected) as caught:
        import_subscriptions(db_url, write(tmp_path, "conflict.csv", text), plans, now=NOW)

    assert caught.value.problems == [
        'line 3: external_ref "shop-1" already exists with a different plan',
        'line 4: external_ref "shop-3" already exists with a different alias',
    ]
    assert count(db_url) == 3
    assert "new-1" not in by_ref(db_url)


# --------------------------------------------------------------------------- hostile rows
# Issue 14, item 9: each of these was a traceback (or a database error) before, with the
# rows before it in the same file already validated: now a named problem on its line, and
# the whole import writes nothing.

GOOD = {
    "external_ref": "h-1",
    "plan": "pro-monthly",
    "alias": "ab12cd34ef56",
    "customer_ip": "10.0.0.1",
    "next_charge_at": "2030-01-01T00:00:00Z",
}


def _jsonl(tmp_path: Path, *rows: str) -> Path:
    return write(tmp_path, "hostile.jsonl", json.dumps(GOOD) + "\n" + "\n".join(rows) + "\n")


def _row(**fields: object) -> str:
    return json.dumps({**GOOD, "external_ref": "h-2", **fields})


def _rejected(db_url: str, plans: PlanSet, path: Path) -> list[str]:
    with pytest.raises(ImportRejected) as caught:
        import_subscriptions(db_url, path, plans, now=NOW)
    assert count(db_url) == 0
    for problem in caught.value.problems:
        assert len(problem) < 300 and "\n" not in problem and "sys." not in problem, problem
    return caught.value.problems


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        # json.loads recursed once per level: RecursionError.
        ('{"external_ref": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
        # json.loads' int() refused: ValueError, not JSONDecodeError.
        ('{"amount": ' + "9" * 5000 + "}", "a number of more than 4300 digits"),
        # 4300 digits parse: a 4300-character message before, then repr() of it in a field.
        (_row(amount=None)[:-1] + ', "amount": ' + "9" * 4300 + "}", "amount: a whole number"),
        (_row()[:-1].replace('"h-2"', "9" * 4300) + "}", "external_ref must be text, not a whole"),
        # Converting to UTC underflowed (OverflowError); the check of period 1 overflowed.
        (_row(next_charge_at="0001-01-01T00:00+01:00"), "more than 100 years from now"),
        (_row(next_charge_at="9999-12-31T00:00Z"), "more than 100 years from now"),
        (_row(next_charge_at="2131-01-01T00:00Z"), "more than 100 years from now"),
        # A lone surrogate is valid JSON and no text a database stores (UnicodeEncodeError).
        (_row(alias="ab12\ud800cd34"), "alias is not valid Unicode text"),
        (_row(external_ref="h-\udfff"), "external_ref is not valid Unicode text"),
        # 45 characters is the column; a zone ID is no customer's address anyway.
        (_row(customer_ip="fe80::1%" + "x" * 60), "customer_ip is longer than 45 characters"),
        (_row(customer_ip="fe80::1%eth0"), 'customer_ip "fe80::1%eth0" has a zone'),
        (_row(plan="p" * 10_000), 'plan "ppp'),
    ],
    ids=lambda value: value[:30] if isinstance(value, str) else None,
)
def test_a_hostile_json_line_is_named_and_nothing_is_written(
    db_url: str, plans: PlanSet, tmp_path: Path, line: str, problem: str
) -> None:
    problems = _rejected(db_url, plans, _jsonl(tmp_path, line))
    assert len(problems) == 1 and problems[0].startswith("line 2: "), problems
    assert problem in problems[0], problems


@pytest.mark.parametrize(
    "when", ["0001-01-01T00:00+01:00", "9999-12-31T00:00Z", "0001-01-01T00:00:00Z"]
)
def test_a_next_charge_at_at_the_end_of_the_calendar_is_named_in_csv(
    db_url: str, plans: PlanSet, tmp_path: Path, when: str
) -> None:
    text = HEADER + "c-1,pro-monthly,ab12cd34ef56,10.0.0.1,2030-01-01T00:00:00Z,,\n"
    text += f"c-2,pro-monthly,ab12cd34ef56,10.0.0.1,{when},,\n"
    problems = _rejected(db_url, plans, write(tmp_path, "calendar.csv", text))
    expected = f'line 3: next_charge_at "{when}" is more than 100 years from now'
    assert problems == [expected], problems


def test_a_csv_field_past_the_csv_limit_names_its_line(
    db_url: str, plans: PlanSet, tmp_path: Path
) -> None:
    text = HEADER + "c-1,pro-monthly,ab12cd34ef56,10.0.0.1,2030-01-01T00:00:00Z,,\n"
    text += "c-2," + "x" * 200_000 + ",a,10.0.0.1,2030-01-01T00:00:00Z,,\n"
    problems = _rejected(db_url, plans, write(tmp_path, "wide.csv", text))
    assert len(problems) == 1 and problems[0].startswith("line 3: not a readable CSV row"), problems


def test_add_subscription_names_a_date_at_the_end_of_the_calendar(
    sqlite_url: str, plans: PlanSet
) -> None:
    far = datetime(9999, 12, 31, tzinfo=UTC)
    with (
        pytest.raises(InvalidInput, match="is more than 100 years from now"),
        session_scope(sqlite_url) as session,
    ):
        add_subscription(session, plans, **{**ONE, "next_charge_at": far})  # type: ignore[arg-type]
    assert count(sqlite_url) == 0


# --------------------------------------------------------------------------- old rows


def _old_file(tmp_path: Path) -> Path:
    text = HEADER
    text += "old-1,basic-weekly,ab12cd34ef56gh78,10.0.0.1,2030-01-01T09:00:00Z,,\n"
    text += "recent-1,basic-weekly,ab12cd34ef56gh79,10.0.0.2,2030-01-05T09:00:00Z,,\n"
    return write(tmp_path, "old.csv", text)


def test_old_next_charge_at_is_a_warning(db_url: str, plans: PlanSet, tmp_path: Path) -> None:
    now = datetime(2030, 1, 10, tzinfo=UTC)

    result = import_subscriptions(db_url, _old_file(tmp_path), plans, now=now)

    assert result.created == 2
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith(
        "line 2: next_charge_at 2030-01-01T09:00:00+00:00 is more than one period in the past"
    )


def test_old_next_charge_at_is_rejected_when_strict(
    db_url: str, plans: PlanSet, tmp_path: Path
) -> None:
    now = datetime(2030, 1, 10, tzinfo=UTC)

    with pytest.raises(ImportRejected) as caught:
        import_subscriptions(db_url, _old_file(tmp_path), plans, now=now, strict=True)

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("line 2: next_charge_at 2030-01-01T09:00:00+00:00")
    assert count(db_url) == 0


# --------------------------------------------------------------------------- one at a time

ONE = {
    "external_ref": "api-1",
    "plan": "pro-monthly",
    "alias": "ab12cd34ef56gh78",
    "customer_ip": "203.0.113.7",
    "next_charge_at": datetime(2030, 1, 15, 8, tzinfo=UTC),
}


def test_add_subscription_is_idempotent(db_url: str, plans: PlanSet) -> None:
    with session_scope(db_url) as session:
        first = add_subscription(session, plans, **ONE, amount="9.90", now=NOW)  # type: ignore[arg-type]
        first_id = first.id
    with session_scope(db_url) as session:
        again = add_subscription(session, plans, **ONE, amount="9.9", now=NOW)  # type: ignore[arg-type]
        assert again.id == first_id
    assert count(db_url) == 1
    sub = by_ref(db_url)["api-1"]
    assert sub.amount_override == Decimal("9.90")
    assert sub.anchor_at == sub.next_charge_at == ONE["next_charge_at"]


def test_add_subscription_refuses_conflicting_data(db_url: str, plans: PlanSet) -> None:
    with session_scope(db_url) as session:
        add_subscription(session, plans, **ONE)  # type: ignore[arg-type]
    with (
        pytest.raises(InvalidInput, match='"api-1" already exists with a different customer_ip'),
        session_scope(db_url) as session,
    ):
        add_subscription(session, plans, **{**ONE, "customer_ip": "10.0.0.9"})  # type: ignore[arg-type]
    assert by_ref(db_url)["api-1"].customer_ip == "203.0.113.7"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("plan", "gold", 'plan "gold" is not in the plans file'),
        ("customer_ip", "1.2.3", 'customer_ip "1.2.3" is not an IP address'),
        ("alias", " ", "alias is missing or blank"),
        # A shop that sends the card number instead of its alias: never stored.
        ("alias", "4012888888881881", "alias is a card number, not an alias"),
        ("next_charge_at", datetime(2030, 1, 1), "next_charge_at .* without offset"),
        ("next_charge_at", "2030-13-01T00:00:00Z", "is not an ISO 8601 time"),
        ("email", "a@b", 'email "a@b" is not an e-mail address'),
    ],
)
def test_add_subscription_names_the_bad_field(
    sqlite_url: str, plans: PlanSet, field: str, value: object, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message), session_scope(sqlite_url) as session:
        add_subscription(session, plans, **{**ONE, field: value})  # type: ignore[arg-type]
    assert count(sqlite_url) == 0


def test_add_subscription_refuses_float_amount(sqlite_url: str, plans: PlanSet) -> None:
    with pytest.raises(InvalidInput, match="not a float"), session_scope(sqlite_url) as session:
        add_subscription(session, plans, **ONE, amount=9.9)  # type: ignore[arg-type]


def test_add_subscription_from_dict(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from billing import plans as plans_module
    from billing.settings import get_settings

    monkeypatch.setenv("BILLING_PLANS_FILE", str(PLANS_FILE))
    get_settings.cache_clear()
    cache_clear = getattr(plans_module.get_plans, "cache_clear", None)
    if cache_clear:
        cache_clear()
    data: dict[str, object] = {**ONE, "next_charge_at": "2030-01-15T09:00:00+01:00"}
    try:
        first = intake.add_subscription_from_dict(sqlite_url, data)
        second = intake.add_subscription_from_dict(sqlite_url, data)
        with pytest.raises(InvalidInput, match="unknown field"):
            intake.add_subscription_from_dict(sqlite_url, {**data, "cvv": "123"})
    finally:
        get_settings.cache_clear()
        if cache_clear:
            cache_clear()
    assert first == second
    assert count(sqlite_url) == 1


# --------------------------------------------------------------------------- volume


def test_twenty_thousand_rows(db_url: str, plans: PlanSet, tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w") as fh:
        fh.write(HEADER)
        for i in range(20_000):
            plan = "pro-monthly" if i % 2 else "basic-weekly"
            fh.write(
                f"big-{i},{plan},alias{i:012d},10.{i // 65536}.{i // 256 % 256}.{i % 256},"
                f"2030-01-{1 + i % 28:02d}T09:00:00+01:00,,\n"
            )
    seen: list[int] = []

    result = import_subscriptions(db_url, path, plans, now=NOW, progress=seen.append)

    assert (result.created, result.unchanged) == (20_000, 0)
    assert sum(seen) == 20_000
    assert count(db_url) == 20_000
    again = import_subscriptions(db_url, path, plans, now=NOW)
    assert (again.created, again.unchanged) == (0, 20_000)


# --------------------------------------------------------------------------- the command


def _billing(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": url,
        "BILLING_PLANS_FILE": str(PLANS_FILE),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "billing"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def test_cli_import_then_reimport(sqlite_url: str) -> None:
    done = _billing(sqlite_url, "subscriptions", "import", str(DATA / "intake_valid.csv"))
    assert done.returncode == 0, done.stderr
    assert "3 created, 0 unchanged" in done.stdout

    again = _billing(sqlite_url, "subscriptions", "import", str(DATA / "intake_valid.csv"))
    assert again.returncode == 0, again.stderr
    assert "0 created, 3 unchanged" in again.stdout
    assert count(sqlite_url) == 3


def test_cli_import_prints_every_problem_and_exits_2(sqlite_url: str) -> None:
    done = _billing(
        sqlite_url,
        "subscriptions",
        "import",
        str(DATA / "intake_bad.csv"),
        "--plans",
        str(PLANS_FILE),
    )

    assert done.returncode == 2
    assert "8 problem(s), nothing was imported" in done.stderr
    for line in (3, 4, 5, 6, 7, 8, 9, 10):
        assert f"line {line}: " in done.stderr.splitlines()[line - 3]
    assert 'line 4: customer_ip "300.1.1.1" is not an IP address' in done.stderr
    assert "Traceback" not in done.stderr
    assert count(sqlite_url) == 0


@pytest.mark.parametrize(
    ("alias", "shown"),
    [("ab\u200bcd", "U+200B"), ("\u2060abcd", "U+2060"), ("ab\u202ecd", "U+202E"),
     ("abc\ufeff", "U+FEFF"), ("ab\u034fcd", "U+034F"), ("ab\u3164cd", "U+3164"),
     ("ab\u2800cd", "U+2800"), ("\uff14111111111111111", "U+FF14"),
     ("\u0664\u0661\u0661\u0661", "U+0664"), ("p\u0430ypal", "U+0430")],
)  # fmt: skip
def test_an_alias_with_a_character_outside_printable_ascii_is_named(alias: str, shown: str) -> None:
    """A zero-width space pasted from a spreadsheet, a full-width card number typed through
    an input method, a Cyrillic look-alike: an alias the gateway never issued (or a card
    number in disguise). Refused at the door, the character named by its code point."""
    value, problem = intake.check_alias(alias)
    assert value is None
    assert problem is not None and shown in problem and "printable ASCII" in problem
    assert not re.search(r"\d{4}", problem.replace(shown, ""))  # no card digits echoed
    assert intake.check_alias("AbC-123_x+/=") == ("AbC-123_x+/=", None)
    assert intake.check_alias("abcd\x07") == (None, "alias contains a control character")


@pytest.mark.parametrize(
    "alias", ["4111111111111111", "4111_1111_1111_1111", "4111/1111/1111/1111"]
)
def test_an_alias_that_is_a_card_number_is_refused(alias: str) -> None:
    value, problem = intake.check_alias(alias)
    assert value is None and problem is not None and "card number" in problem
    assert "4111" not in problem


def test_a_hex_alias_is_accepted_whatever_digits_it_holds() -> None:
    """A digit run inside a hex alias can pass the card check by chance: such an alias is
    Klik & Pay's (or the sandbox's), never refused as a card number."""
    lucky = "9133143977569f3205ec"  # 13 digits that pass the Luhn check, then hex
    assert intake.check_alias(lucky) == (lucky, None)
    aliases = [secrets.token_hex(10) for _ in range(20_000)]
    assert [a for a in aliases if intake.check_alias(a)[1] is not None] == []
