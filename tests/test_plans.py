"""The plans file: loading, every kind of problem, versions in the database, and the CLI."""

from __future__ import annotations

import os
import subprocess
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from billing.db import session_scope
from billing.durations import Cron, Interval
from billing.errors import ConfigError, NotFound, PlanFileError
from billing.models import PlanVersion
from billing.plans import (
    Account,
    PlanSet,
    get_plans,
    load_plans,
    parse_plans,
    sync_plan_versions,
)
from billing.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "schedules" / "plans.toml"
DATA = Path(__file__).parent / "data"
BILLING = str(ROOT / ".venv" / "bin" / "billing")

ACCOUNTS = """
[accounts.EUR]
merchant_id = "1234567"
private_key_env = "KLIKANDPAY_KEY_EUR"
"""

BASE_PLAN = {"amount": '"29.90"', "currency": '"EUR"', "every": '"1 month"'}


def plan_text(name: str = "pro-monthly", drop: str = "", **keys: str) -> str:
    """The accounts above plus one plan: BASE_PLAN with ``keys`` (raw TOML values) applied
    and the keys named in ``drop`` left out."""
    values = {**BASE_PLAN, **keys}
    lines = [f"{key} = {value}" for key, value in values.items() if key != drop]
    return ACCOUNTS + f"\n[plans.{name}]\n" + "\n".join(lines) + "\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PlanFileError) as info:
        parse_plans(text, source="plans.toml")
    assert info.value.path == "plans.toml"
    return info.value.problems


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --- loading -----------------------------------------------------------------------------


def test_shipped_example_loads() -> None:
    plans = load_plans(SHIPPED)
    assert plans.path == str(SHIPPED)
    assert set(plans.accounts) == {"EUR", "USD"}
    assert plans.accounts["EUR"] == Account("EUR", "1234567", "KLIKANDPAY_KEY_EUR", 5.0)
    assert plans.accounts["USD"] == Account("USD", "7654321", "KLIKANDPAY_KEY_USD", None)

    pro = plans.plan("pro-monthly")
    assert (pro.amount, pro.currency, pro.every) == (Decimal("29.90"), "EUR", Interval(1, "months"))
    assert pro.sweep == Cron("0", "3", "*", "*", "*")
    assert pro.timezone == ZoneInfo("Europe/Paris")
    assert pro.deferred is False
    assert pro.retry_ladder == tuple(timedelta(days=d) for d in (1, 3, 5, 7))
    assert (pro.after_ladder, pro.catch_up) == ("suspend", "latest")

    team = plans.plan("team-yearly")
    assert (team.amount, team.every, team.deferred) == (
        Decimal("299.00"),
        Interval(1, "years"),
        True,
    )
    assert team.capture_after == timedelta(days=3)

    starter = plans.plan("starter-weekly")
    assert (starter.amount, starter.currency, starter.every) == (
        Decimal("4.99"),
        "USD",
        Interval(1, "weeks"),
    )
    assert starter.sweep == timedelta(minutes=15)
    assert (starter.after_ladder, starter.catch_up) == ("cancel", "all")
    assert plans.account_for(starter).merchant_id == "7654321"
    assert plans.account_for("team-yearly").merchant_id == "1234567"


def test_defaults_fill_every_optional_key() -> None:
    plan = parse_plans(plan_text()).plan("pro-monthly")
    assert plan.sweep == timedelta(hours=1)
    assert plan.timezone == ZoneInfo("UTC")
    assert plan.deferred is False
    assert plan.capture_after == timedelta(days=2)
    assert plan.retry_ladder == tuple(timedelta(days=d) for d in (1, 3, 5, 7))
    assert plan.after_ladder == "suspend"
    assert plan.catch_up == "latest"
    assert plan.catch_up_spacing == timedelta(days=1)
    assert parse_plans(plan_text()).accounts["EUR"].max_charges_per_second is None


def test_values_are_read() -> None:
    plan = parse_plans(
        plan_text(
            amount="30",
            every='"2 weeks"',
            sweep='"*/10 * * * *"',
            timezone='"America/New_York"',
            deferred="true",
            capture_after='"36 hours"',
            retry_ladder='["90 minutes", "2 days"]',
            after_ladder='"cancel"',
            catch_up='"all"',
            catch_up_spacing='"12 hours"',
        )
    ).plan("pro-monthly")
    assert plan.amount == Decimal("30.00")
    assert plan.every == Interval(2, "weeks")
    assert plan.sweep == Cron("*/10", "*", "*", "*", "*")
    assert plan.timezone.key == "America/New_York"
    assert plan.deferred is True
    assert plan.capture_after == timedelta(hours=36)
    assert plan.retry_ladder == (timedelta(minutes=90), timedelta(days=2))
    assert (plan.after_ladder, plan.catch_up) == ("cancel", "all")
    assert plan.catch_up_spacing == timedelta(hours=12)


def test_an_empty_ladder_means_no_retries() -> None:
    assert parse_plans(plan_text(retry_ladder="[]")).plan("pro-monthly").retry_ladder == ()


def test_unknown_plan_names_the_known_ones() -> None:
    plans = parse_plans(
        plan_text() + '\n[plans.basic]\namount = "1"\ncurrency = "EUR"\nevery = "1 day"\n'
    )
    with pytest.raises(NotFound, match=r"^unknown plan 'gold' \(known: basic, pro-monthly\)$"):
        plans.plan("gold")
    with pytest.raises(NotFound, match="unknown plan 'gold'"):
        plans.account_for("gold")


# --- one test per kind of problem --------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"amount": '"29.999"'},
            'plans.pro-monthly.amount: "29.999" is not a positive amount with at most two '
            "decimal places",
        ),
        (
            {"amount": '"-5"'},
            'plans.pro-monthly.amount: "-5" is not a positive amount with at most two '
            "decimal places",
        ),
        (
            {"amount": '"0"'},
            'plans.pro-monthly.amount: "0" is not a positive amount with at most two '
            "decimal places",
        ),
        (
            {"amount": '"abc"'},
            'plans.pro-monthly.amount: "abc" is not a positive amount with at most two '
            "decimal places",
        ),
        (
            {"amount": "29.9"},
            "plans.pro-monthly.amount: 29.9 is a TOML float, which cannot hold cents exactly: "
            'quote it, amount = "29.9"',
        ),
        (
            {"amount": "true"},
            'plans.pro-monthly.amount: true must be a quoted amount such as "29.90"',
        ),
        ({"amount": '"12345678901"'}, 'plans.pro-monthly.amount: "12345678901" is larger than'),
        ({"currency": '"USD"'}, 'plans.pro-monthly.currency: "USD" has no [accounts.USD]'),
        (
            {"currency": '"eur"'},
            'plans.pro-monthly.currency: "eur" is not a currency code (three capital letters',
        ),
        (
            {"currency": '"EURO"'},
            'plans.pro-monthly.currency: "EURO" is not a currency code',
        ),
        ({"every": '"1 fortnight"'}, 'plans.pro-monthly.every: "1 fortnight" has an unknown unit'),
        ({"every": '"0 months"'}, 'plans.pro-monthly.every: "0 months" must be at least 1 month'),
        ({"every": "1"}, 'plans.pro-monthly.every: 1 must be a quoted string such as "1 month"'),
        (
            {"timezone": '"Mars/Base"'},
            'plans.pro-monthly.timezone: "Mars/Base" is not a known time zone',
        ),
        ({"timezone": '"../etc/passwd"'}, 'plans.pro-monthly.timezone: "../etc/passwd" is not'),
        (
            {"sweep": '"61 * * * *"'},
            'plans.pro-monthly.sweep: "61 * * * *": minute 61 is out of range 0-59',
        ),
        ({"sweep": '"0 3 * * mon-fry"'}, 'plans.pro-monthly.sweep: "0 3 * * mon-fry": day of week'),
        ({"sweep": '"-30 seconds"'}, 'plans.pro-monthly.sweep: "-30 seconds" must be a positive'),
        (
            {"sweep": '"hourly"'},
            'plans.pro-monthly.sweep: "hourly" is neither a cron line (five fields',
        ),
        (
            {"retry_ladder": '["1 day", "3 days", "-1 day"]'},
            'plans.pro-monthly.retry_ladder[2]: "-1 day" must be a positive delay',
        ),
        ({"retry_ladder": '["1 day", ""]'}, 'plans.pro-monthly.retry_ladder[1]: "" is empty'),
        (
            {"retry_ladder": '[1, "2 days"]'},
            "plans.pro-monthly.retry_ladder[0]: 1 must be a quoted",
        ),
        (
            {"retry_ladder": '"1 day"'},
            'plans.pro-monthly.retry_ladder: "1 day" must be a list of delays',
        ),
        (
            {"capture_after": '"1 month"'},
            'plans.pro-monthly.capture_after: "1 month" is not a fixed delay',
        ),
        ({"catch_up_spacing": '"0 days"'}, 'plans.pro-monthly.catch_up_spacing: "0 days" must be'),
        ({"deferred": '"yes"'}, 'plans.pro-monthly.deferred: "yes" must be true or false'),
        (
            {"after_ladder": '"pause"'},
            'plans.pro-monthly.after_ladder: "pause" must be "suspend" or "cancel"',
        ),
        ({"catch_up": '"some"'}, 'plans.pro-monthly.catch_up: "some" must be "latest" or "all"'),
        ({"amout": '"1"'}, 'plans.pro-monthly: unknown key "amout" (did you mean "amount"?)'),
        ({"colour": '"red"'}, 'plans.pro-monthly: unknown key "colour"'),
    ],
)
def test_each_problem_names_plan_key_and_what_is_wrong(keys: dict[str, str], expected: str) -> None:
    assert only_problem(plan_text(**keys)).startswith(expected)


@pytest.mark.parametrize("key", ["amount", "currency", "every"])
def test_missing_required_plan_key(key: str) -> None:
    assert only_problem(plan_text(drop=key)) == f"plans.pro-monthly.{key}: missing"


def test_bad_plan_name() -> None:
    assert only_problem(plan_text(name='"pro monthly"')).startswith(
        'plans."pro monthly": plan name "pro monthly" must be 1-64 letters, digits'
    )


def test_plan_that_is_not_a_table() -> None:
    text = ACCOUNTS + "[plans]\ngold = 3\n"
    assert only_problem(text) == "plans.gold: must be a table, written [plans.gold]"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('private_key_env = "K"', "accounts.EUR.merchant_id: missing"),
        ('merchant_id = "1"', "accounts.EUR.private_key_env: missing"),
        (
            'merchant_id = 1234567\nprivate_key_env = "K"',
            'accounts.EUR.merchant_id: 1234567 must be quoted: merchant_id = "1234567"',
        ),
        (
            'merchant_id = "12 34"\nprivate_key_env = "K"',
            'accounts.EUR.merchant_id: "12 34" is not a merchant ID',
        ),
        (
            'merchant_id = "1"\nprivate_key_env = "K"\nmax_charges_per_second = 0',
            "accounts.EUR.max_charges_per_second: 0 must be a positive number",
        ),
        (
            'merchant_id = "1"\nprivate_key_env = "K"\nmax_charges_per_second = "5"',
            'accounts.EUR.max_charges_per_second: "5" must be a positive number',
        ),
        (
            'merchant_id = "1"\nprivate_key_env = "K"\nmerchant = "2"',
            'accounts.EUR: unknown key "merchant" (did you mean "merchant_id"?)',
        ),
    ],
)
def test_account_problems(body: str, expected: str) -> None:
    text = f"[accounts.EUR]\n{body}\n" + plan_text().replace(ACCOUNTS, "")
    assert only_problem(text).startswith(expected)


def test_account_rate_limit_is_read() -> None:
    text = ACCOUNTS + "max_charges_per_second = 0.1\n" + plan_text().replace(ACCOUNTS, "")
    assert parse_plans(text).accounts["EUR"].max_charges_per_second == 0.1


def test_account_needs_a_currency_code() -> None:
    text = plan_text() + '\n[accounts.euro]\nmerchant_id = "2"\nprivate_key_env = "K"\n'
    assert only_problem(text).startswith('accounts.euro: "euro" is not a currency code')


def test_two_currencies_cannot_share_a_merchant_id() -> None:
    text = plan_text() + '\n[accounts.USD]\nmerchant_id = "1234567"\nprivate_key_env = "K"\n'
    assert only_problem(text).startswith(
        'accounts.USD.merchant_id: "1234567" is also the merchant ID of accounts.EUR'
    )


SECRET = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def test_a_private_key_pasted_into_the_file_is_never_echoed() -> None:
    for body in (
        f'merchant_id = "1"\nprivate_key_env = "{SECRET}"',
        f'merchant_id = "1"\nprivate_key_env = "K"\nprivate_key = "{SECRET}"',
    ):
        text = f"[accounts.EUR]\n{body}\n" + plan_text().replace(ACCOUNTS, "")
        with pytest.raises(PlanFileError) as info:
            parse_plans(text)
        assert SECRET not in str(info.value)
        assert "environment variable" in str(info.value)
    text = f'[accounts.EUR]\nmerchant_id = "1"\nprivate_key_env = "{SECRET}"\n'
    assert only_problem(text + plan_text().replace(ACCOUNTS, "")).startswith(
        "accounts.EUR.private_key_env: must be the NAME of the environment variable"
    )


def test_unknown_top_level_table() -> None:
    assert only_problem(plan_text() + '\n[webhook]\nurl = "https://x"\n').startswith(
        'unknown top-level key "webhook" (did you mean "webhooks"?)'
    )


def test_a_file_without_plans() -> None:
    assert only_problem(ACCOUNTS) == "plans: no plan defined (add a [plans.NAME] table)"


def test_every_problem_of_a_file_is_reported() -> None:
    with pytest.raises(PlanFileError) as info:
        load_plans(DATA / "plans_many_errors.toml")
    found = info.value.problems
    expected = [
        "webhooks.url: must be a table, written [webhooks.url]",
        "accounts.EUR.merchant_id: missing",
        'plans.pro-monthly.amount: "29.999" is not a positive amount',
        'plans.pro-monthly.currency: "USD" has no [accounts.USD]',
        'plans.pro-monthly.sweep: "61 * * * *": minute 61 is out of range 0-59',
        'plans.pro-monthly.timezone: "Mars/Base" is not a known time zone',
        'plans.pro-monthly.retry_ladder[2]: "-1 day" must be a positive delay',
        'plans.pro-monthly: unknown key "amout"',
        "plans.team.amount: 299.0 is a TOML float",
        "plans.team.every: missing",
    ]
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected, strict=True):
        assert problem.startswith(start), (problem, start)
    message = str(info.value)
    assert message.startswith(str(DATA / "plans_many_errors.toml") + ": ")
    assert all(problem in message for problem in found)


def test_toml_syntax_error_names_the_line() -> None:
    text = ACCOUNTS + '\n[plans.pro-monthly\namount = "29.90"\n'
    problem = only_problem(text)
    assert problem.startswith("TOML syntax error: ")
    assert "line 6" in problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError) as info:
        load_plans(tmp_path / "nope.toml")
    assert info.value.problems == ["file not found"]
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: file not found"


# --- hostile values (issue 14, item 9) ------------------------------------------------------

HUGE = "99999999999999999 days"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # OverflowError from timedelta before: a traceback out of ``billing plans check``.
        ({"capture_after": f'"{HUGE}"'}, f'plans.pro-monthly.capture_after: "{HUGE}" is longer'),
        ({"catch_up_spacing": f'"{HUGE}"'}, "plans.pro-monthly.catch_up_spacing: "),
        ({"sweep": f'"{HUGE}"'}, f'plans.pro-monthly.sweep: "{HUGE}" is longer than 3650 days'),
        ({"retry_ladder": f'["1 day", "{HUGE}"]'}, "plans.pro-monthly.retry_ladder[1]: "),
        # Passed the check, then every sweep crashed computing "now minus one period".
        ({"every": '"3000 years"'}, 'plans.pro-monthly.every: "3000 years" is longer than 10'),
        ({"every": '"36500 days"'}, 'plans.pro-monthly.every: "36500 days" is longer than 10'),
        # A hexadecimal integer has no digit limit in tomllib; str() of it has one.
        ({"amount": "0x" + "f" * 5000}, "plans.pro-monthly.amount: a whole number of 6021 "),
        ({"every": "0x" + "f" * 5000}, "plans.pro-monthly.every: a whole number of 6021 digits"),
    ],
)
def test_a_hostile_value_is_a_named_problem(keys: dict[str, str], expected: str) -> None:
    problem = only_problem(plan_text(**keys))
    assert problem.startswith(expected), problem
    assert len(problem) < 300, problem


@pytest.mark.parametrize(
    "value",
    [
        "1" + "0" * 400,  # math.isfinite(int) overflowed converting to float
        "0x" + "f" * 5000,
    ],
    ids=["400 digits", "hex of 5000 digits"],
)
def test_a_huge_rate_is_a_named_problem(value: str) -> None:
    text = plan_text().replace(
        'private_key_env = "KLIKANDPAY_KEY_EUR"\n',
        f'private_key_env = "KLIKANDPAY_KEY_EUR"\nmax_charges_per_second = {value}\n',
    )
    problem = only_problem(text)
    assert problem.startswith("accounts.EUR.max_charges_per_second: "), problem
    assert "must be a positive number" in problem and len(problem) < 300, problem


@pytest.mark.parametrize(
    "nested",
    ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000],
    ids=["arrays", "inline tables"],
)
def test_deeply_nested_toml_is_a_named_problem(nested: str) -> None:
    """tomllib recurses once per level: RecursionError, a traceback, before."""
    problem = only_problem(plan_text(colour=nested))
    assert problem.startswith("TOML nested too deeply"), problem
    assert "line 10" in problem, problem


def test_an_integer_past_pythons_digit_limit_is_a_named_problem() -> None:
    """tomllib's int() refuses more than 4300 digits with a ValueError of its own."""
    problem = only_problem(plan_text(amount="9" * 5000))
    assert problem.startswith("TOML number too long"), problem
    assert "line 7" in problem and "sys." not in problem, problem


def test_a_plan_name_with_a_line_break_stays_on_one_line() -> None:
    """Each problem is one line of ``billing plans check``; a name is shown as TOML quotes it."""
    found = problems(plan_text(name=r'"pro\nmonthly"', amount='"-1"'))
    assert all("\n" not in problem for problem in found), found
    assert found[0].startswith('plans."pro\\nmonthly": plan name "pro\\nmonthly" must be')


def test_a_file_that_is_not_a_regular_file_is_refused_unread() -> None:
    """A device or a pipe could be read forever (/dev/zero, a FIFO nobody writes to)."""
    with pytest.raises(PlanFileError) as info:
        load_plans("/dev/null")
    assert info.value.problems == ["not a regular file"]


def test_plan_file_error_is_a_config_error_with_exit_status_2() -> None:
    with pytest.raises(ConfigError) as info:
        parse_plans("[plans")
    assert info.value.exit_code == 2


# --- accounts and keys -------------------------------------------------------------------


def test_private_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    account = parse_plans(plan_text()).accounts["EUR"]
    monkeypatch.delenv("KLIKANDPAY_KEY_EUR", raising=False)
    with pytest.raises(ConfigError, match="KLIKANDPAY_KEY_EUR is not set") as info:
        account.private_key()
    assert str(info.value).startswith("accounts.EUR: ")
    monkeypatch.setenv("KLIKANDPAY_KEY_EUR", "   ")
    with pytest.raises(ConfigError, match="KLIKANDPAY_KEY_EUR is not set"):
        account.private_key()
    monkeypatch.setenv("KLIKANDPAY_KEY_EUR", SECRET)
    assert account.private_key() == SECRET
    assert SECRET not in repr(account)
    assert SECRET not in repr(parse_plans(plan_text()))


def test_warnings_name_missing_keys_and_idle_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    text = plan_text() + '\n[accounts.GBP]\nmerchant_id = "3"\nprivate_key_env = "KEY_GBP"\n'
    monkeypatch.delenv("KLIKANDPAY_KEY_EUR", raising=False)
    monkeypatch.setenv("KEY_GBP", "x")
    warnings = parse_plans(text).warnings()
    assert warnings == [
        "accounts.EUR: environment variable KLIKANDPAY_KEY_EUR is not set; charges in EUR "
        "will fail until it holds the private key",
        "accounts.GBP: no plan is charged in GBP",
    ]


# --- fingerprints and versions -----------------------------------------------------------


def test_fingerprint_follows_price_terms_only() -> None:
    def fingerprint(**keys: str) -> str:
        return parse_plans(plan_text(**keys)).plan("pro-monthly").fingerprint()

    base = fingerprint()
    assert len(base) == 64 and int(base, 16) >= 0
    assert fingerprint(amount='"29.9"') == base
    assert fingerprint(every='"1 months"') == base
    assert fingerprint(sweep='"5 minutes"', retry_ladder="[]", deferred="true") == base
    assert fingerprint(amount='"29.91"') != base
    assert fingerprint(every='"2 months"') != base
    text = plan_text().replace('"EUR"', '"USD"') + ACCOUNTS.replace("EUR", "USD").replace(
        "1234567", "7654321"
    )
    assert parse_plans(text).plan("pro-monthly").fingerprint() != base


def versions(url: str) -> list[tuple[str, int, Decimal, str, str]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(
                PlanVersion.plan,
                PlanVersion.version,
                PlanVersion.amount,
                PlanVersion.currency,
                PlanVersion.every,
            ).order_by(PlanVersion.plan, PlanVersion.version)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def sync(url: str, plans: PlanSet) -> dict[str, int]:
    with session_scope(url) as session:
        return sync_plan_versions(session, plans)


def test_sync_plan_versions(db_url: str) -> None:
    first = parse_plans(
        plan_text() + '\n[plans.basic]\namount = "5"\ncurrency = "EUR"\nevery = "1 week"\n'
    )
    assert sync(db_url, first) == {"pro-monthly": 1, "basic": 1}
    assert versions(db_url) == [
        ("basic", 1, Decimal("5.00"), "EUR", "1 week"),
        ("pro-monthly", 1, Decimal("29.90"), "EUR", "1 month"),
    ]

    # Same plans again, and a change that is not a price term: no new row.
    assert sync(db_url, first) == {"pro-monthly": 1, "basic": 1}
    assert sync(
        db_url,
        parse_plans(
            plan_text(sweep='"5 minutes"') + "\n[plans.basic]\n"
            'amount = "5"\ncurrency = "EUR"\nevery = "1 week"\n'
        ),
    ) == {
        "pro-monthly": 1,
        "basic": 1,
    }
    assert len(versions(db_url)) == 2

    # A new amount is version 2 of that plan only.
    dearer = parse_plans(plan_text(amount='"34.90"'))
    assert sync(db_url, dearer) == {"pro-monthly": 2}
    assert sync(db_url, dearer) == {"pro-monthly": 2}
    assert versions(db_url)[-1] == ("pro-monthly", 2, Decimal("34.90"), "EUR", "1 month")

    # Going back to the old price is a new version too: versions are the order of terms.
    assert sync(db_url, parse_plans(plan_text())) == {"pro-monthly": 3}
    with session_scope(db_url) as session:
        count = session.scalar(select(func.count()).select_from(PlanVersion))
        fingerprints = session.scalars(
            select(PlanVersion.fingerprint)
            .where(PlanVersion.plan == "pro-monthly")
            .order_by(PlanVersion.version)
        ).all()
    assert count == 4
    assert fingerprints[0] == fingerprints[2] != fingerprints[1]


def test_sync_plan_versions_from_two_processes_at_once(db_url: str) -> None:
    """A worker and beat starting together: the second waits for, then reuses, the first's row."""
    plans = parse_plans(plan_text())
    other: dict[str, int] = {}
    with session_scope(db_url) as first:
        assert sync_plan_versions(first, plans) == {"pro-monthly": 1}  # written, not committed
        thread = threading.Thread(target=lambda: other.update(sync(db_url, plans)))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # blocked on the uncommitted version 1
    thread.join(30)
    assert other == {"pro-monthly": 1}
    assert len(versions(db_url)) == 1


def test_sync_plan_versions_skips_a_number_taken_with_other_terms(db_url: str) -> None:
    with session_scope(db_url) as session:
        sync_plan_versions(session, parse_plans(plan_text()))
    # Another process (with another plans file) already wrote version 2.
    with session_scope(db_url) as session:
        session.add(
            PlanVersion(
                plan="pro-monthly",
                version=2,
                amount=Decimal("99.00"),
                currency="EUR",
                every="1 month",
                fingerprint="0" * 64,
            )
        )
    assert sync(db_url, parse_plans(plan_text(amount='"39.90"'))) == {"pro-monthly": 3}
    assert [row[1:3] for row in versions(db_url)] == [
        (1, Decimal("29.90")),
        (2, Decimal("99.00")),
        (3, Decimal("39.90")),
    ]


# --- cached loading ----------------------------------------------------------------------


def test_get_plans_rereads_only_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(plan_text())
    settings = Settings(plans_file=path)
    first = get_plans(settings)
    assert get_plans(settings) is first

    path.write_text(plan_text(amount='"31.00"'))
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    second = get_plans(settings)
    assert second is not first
    assert second.plan("pro-monthly").amount == Decimal("31.00")

    path.write_text(plan_text(amount='"31.001"'))
    os.utime(path, ns=(stamp + 1_000_000_000, stamp + 1_000_000_000))
    with pytest.raises(PlanFileError, match=r"31\.001"):
        get_plans(settings)
    path.unlink()
    with pytest.raises(PlanFileError, match="file not found"):
        get_plans(settings)


def test_get_plans_sees_a_link_moved_to_another_file_of_the_same_size_and_time(
    tmp_path: Path,
) -> None:
    # As a mounted config is updated: the link is swapped to a new file in one move.
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text(plan_text(amount='"29.90"'))
    new.write_text(plan_text(amount='"39.90"'))
    stamp = old.stat().st_mtime_ns
    for each in (old, new):
        os.utime(each, ns=(stamp, stamp))
    link = tmp_path / "plans.toml"
    link.symlink_to(old)
    settings = Settings(plans_file=link)
    assert get_plans(settings).plan("pro-monthly").amount == Decimal("29.90")

    moved = tmp_path / "moved.toml"
    moved.symlink_to(new)
    moved.replace(link)

    assert get_plans(settings).plan("pro-monthly").amount == Decimal("39.90")


# --- billing plans check -----------------------------------------------------------------


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KLIKANDPAY_", "BILLING_"))}
    return subprocess.run(
        [BILLING, "plans", "check", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **env},
        timeout=60,
        check=False,
    )


def test_check_prints_the_plans_and_warns_about_missing_keys() -> None:
    result = run_check(str(SHIPPED), KLIKANDPAY_KEY_EUR="x")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert set(rows) == {"pro-monthly", "team-yearly", "starter-weekly"}
    for text in ("29.90", "EUR", "1234567", "1 month", "0 3 * * *", "Europe/Paris", "suspend"):
        assert text in rows["pro-monthly"]
    for text in ("299.00", "1 year", "yes, capture after 3 days"):
        assert text in rows["team-yearly"]
    for text in ("4.99", "USD", "7654321", "every 15 minutes", "1 day, 2 days", "cancel"):
        assert text in rows["starter-weekly"]
    assert "OK, 3 plan(s), 2 account(s)" in result.stdout
    assert "KLIKANDPAY_KEY_USD is not set" in result.stderr
    assert "KLIKANDPAY_KEY_EUR" not in result.stderr


def test_check_reads_the_file_named_by_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(plan_text(name="solo"))
    result = run_check(BILLING_PLANS_FILE=str(path), KLIKANDPAY_KEY_EUR="x")
    assert result.returncode == 0, result.stderr
    assert "solo" in result.stdout
    assert result.stderr == ""


def test_check_lists_every_problem_and_exits_2() -> None:
    path = DATA / "plans_many_errors.toml"
    result = run_check(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: {path}: 10 problems"
    assert len(lines) == 11
    assert f'{path}: plans.pro-monthly.amount: "29.999" is not a positive amount' in lines[2]
    assert all(line.startswith(f"{path}: ") for line in lines[:-1])
    assert result.stdout == ""


def test_check_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[plans.x]\namount = "1\n')
    result = run_check(str(path))
    assert result.returncode == 2
    assert "TOML syntax error" in result.stderr
    assert "line 2" in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = run_check(str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml: file not found" in result.stderr


# --- webhook endpoints ([webhooks.NAME]) -------------------------------------------------

WEBHOOKS = """
[webhooks.crm]
url = "https://crm.example.com/hooks/billing?team=7"
secret_env = "CRM_WEBHOOK_SECRET"
events = ["charge.approved", "subscription.*", "charge.approved"]

[webhooks.warehouse]
url = "http://10.0.0.5:8080/in"
secret_env = "WAREHOUSE_SECRET"
"""


def test_webhook_endpoints_are_read_with_their_filters() -> None:
    from billing.plans import WebhookEndpoint

    plans = parse_plans(plan_text() + WEBHOOKS)
    crm, warehouse = plans.webhooks["crm"], plans.webhooks["warehouse"]
    assert crm == WebhookEndpoint(
        "crm", "https://crm.example.com/hooks/billing?team=7", "CRM_WEBHOOK_SECRET",
        ("charge.approved", "subscription.*"),  # the repeated type once
    )  # fmt: skip
    assert warehouse.events == () and warehouse.url == "http://10.0.0.5:8080/in"
    assert [crm.matches(t) for t in ("charge.approved", "charge.declined")] == [True, False]
    assert crm.matches("subscription.reactivated") and crm.matches("subscription.past_due")
    assert all(warehouse.matches(t) for t in ("charge.refunded", "subscription.paused"))
    assert parse_plans(plan_text()).webhooks == {}


def test_webhook_endpoint_problems_name_the_table_and_the_key() -> None:
    text = (
        plan_text()
        + """
[webhooks.crm]
url = "ftp://crm.example.com/hook"
secret_env = "CRM_WEBHOOK_SECRET"
events = ["charge.aproved", "foo.*", "subscription.*", 3, "charge*"]
sekret = "x"

[webhooks.default]
url = "https://x.example/h"
secret_env = "X_SECRET"

[webhooks.ops]
secret_env = "OPS_SECRET"
events = []

[webhooks.erp]
url = "https://user:pw@erp.example/h"
secret_env = "ERP_SECRET"
events = "charge.*"

[webhooks.bi]
url = "https://bi.example:99999/h"
secret_env = "BI_SECRET"
"""
    )
    assert problems(text) == [
        'webhooks.crm.url: "ftp://crm.example.com/hook" must be an http:// or https:// URL',
        'webhooks.crm.events[0]: "charge.aproved" is not an event type nor a prefix such as '
        '"charge.*" (did you mean "charge.approved"?)',
        'webhooks.crm.events[1]: "foo.*" matches no event type (prefixes: "charge.*", '
        '"subscription.*")',
        'webhooks.crm.events[3]: 3 must be a quoted string such as "charge.approved"',
        'webhooks.crm.events[4]: "charge*": "*" only ends a prefix, as in "charge.*"',
        'webhooks.crm: unknown key "sekret" (did you mean "secret_env"?)',
        'webhooks.default: the name "default" is reserved for the endpoint of '
        "BILLING_WEBHOOK_URL; choose another name",
        "webhooks.ops.url: missing",
        "webhooks.ops.events: an empty list would send nothing; leave events out to send "
        "every event",
        "webhooks.erp.url: must not hold a user name or password (user:password@host): the "
        "plans file holds no secrets, and every post is signed with the secret of secret_env",
        'webhooks.erp.events: "charge.*" must be a list such as ["charge.approved", '
        '"subscription.*"]',
        'webhooks.bi.url: "https://bi.example:99999/h" has an invalid port',
    ]
    assert problems('webhooks = "https://x.example"\n' + plan_text()) == [
        "webhooks: must hold tables such as [webhooks.crm]"
    ]
    dotted = plan_text() + '\n[webhooks."crm.eu"]\nurl = "https://x"\nsecret_env = "S"\n'
    assert problems(dotted)[0].startswith('webhooks."crm.eu": endpoint name "crm.eu" must be 1-64')


def test_a_webhook_secret_pasted_into_the_file_is_never_echoed() -> None:
    for body in (
        f'url = "https://crm.example/h"\nsecret_env = "{SECRET}"',
        f'url = "https://crm.example/h"\nsecret_env = "S"\nsecret = "{SECRET}"',
        f'url = "https://me:{SECRET}@crm.example/h"\nsecret_env = "S"',
    ):
        with pytest.raises(PlanFileError) as info:
            parse_plans(plan_text() + f"\n[webhooks.crm]\n{body}\n")
        assert SECRET not in str(info.value)
        assert info.value.problems[0].startswith(
            (
                "webhooks.crm.secret_env: must be the NAME",
                'webhooks.crm: unknown key "secret": the secret never goes in this file',
                "webhooks.crm.url: must not hold",
            )
        )


def test_a_webhook_secret_comes_from_the_environment_when_a_post_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = parse_plans(plan_text() + WEBHOOKS)
    crm = plans.webhooks["crm"]
    monkeypatch.delenv("CRM_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("WAREHOUSE_SECRET", "w" * 16)
    unset = r"webhooks\.crm: environment variable CRM_WEBHOOK_SECRET is not set"
    with pytest.raises(ConfigError, match=unset):
        crm.secret()
    assert any("CRM_WEBHOOK_SECRET is not set" in w for w in plans.warnings())
    monkeypatch.setenv("CRM_WEBHOOK_SECRET", "short")
    with pytest.raises(ConfigError, match="CRM_WEBHOOK_SECRET must hold at least 16") as info:
        crm.secret()
    assert "short" not in str(info.value)
    monkeypatch.setenv("CRM_WEBHOOK_SECRET", "crm-secret-0123456789")
    assert crm.secret() == "crm-secret-0123456789"
    assert not [w for w in plans.warnings() if w.startswith("webhooks.")]
    assert "crm-secret" not in repr(crm)


def test_check_prints_the_webhook_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "hooks.toml"
    path.write_text(plan_text() + WEBHOOKS)
    result = run_check(
        str(path),
        KLIKANDPAY_KEY_EUR="x",
        CRM_WEBHOOK_SECRET="crm-secret-0123456789",
        BILLING_WEBHOOK_URL="https://shop.example/hooks?token=abc",
        BILLING_WEBHOOK_SECRET="shop-secret-0123456789",
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert "https://shop.example/hooks" in rows["default"] and "every event" in rows["default"]
    assert "BILLING_WEBHOOK_SECRET" in rows["default"]
    crm = rows["crm"]
    for text in ("https://crm.example.com/hooks/billing", "CRM_WEBHOOK_SECRET",
                 "charge.approved, subscription.*"):  # fmt: skip
        assert text in crm
    assert "every event" in rows["warehouse"] and "http://10.0.0.5:8080/in" in rows["warehouse"]
    # Query strings may carry tokens: only scheme, host and path are shown.
    assert "token=abc" not in result.stdout and "team=7" not in result.stdout
    assert "OK, 1 plan(s), 1 account(s), 2 webhook endpoint(s)" in result.stdout
    assert "WAREHOUSE_SECRET is not set" in result.stderr
    assert "CRM_WEBHOOK_SECRET" not in result.stderr
