"""The plans file: which merchant account charges what, how often, and what to do on failure.

The file (TOML, ``schedules/plans.toml`` by default) holds ``[accounts.CUR]`` tables (one
Klik & Pay merchant ID per currency, as the gateway issues them), ``[plans.NAME]`` tables
and, optionally, ``[webhooks.NAME]`` tables: endpoints that receive events besides
``BILLING_WEBHOOK_URL``, each with its own secret and event filter.
It is checked whole: :func:`load_plans` reports every problem at once, each naming the table,
the key and what is wrong, so one run of ``billing plans check`` fixes a file.

Private keys and webhook secrets never appear in the file: an account (an endpoint) names
the environment variable holding its key (secret), read only when a charge (a post) needs it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
import os
import re
import stat
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select

from billing.durations import (
    MAX_QUOTED,
    Cron,
    Interval,
    parse_cron,
    parse_delay,
    parse_interval,
    printable,
    quote,
    shown,
)
from billing.errors import ConfigError, InvalidInput, NotFound, PlanFileError
from billing.events import DEFAULT_ENDPOINT, EVENT_TYPES, type_matches
from billing.models import PlanVersion
from billing.money import MAX_AMOUNT, format_amount, parse_amount

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from billing.settings import Settings

T = TypeVar("T")

_CURRENCY = re.compile(r"[A-Z]{3}")
_MERCHANT_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# Dots would make "plans.a.b.amount" ambiguous; 64 is the width of the plan columns.
_PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_ACCOUNT_KEYS: Final = ("merchant_id", "private_key_env", "max_charges_per_second")
_PLAN_KEYS: Final = (
    "amount",
    "currency",
    "every",
    "sweep",
    "timezone",
    "deferred",
    "capture_after",
    "retry_ladder",
    "after_ladder",
    "catch_up",
    "catch_up_spacing",
)

DEFAULT_SWEEP: Final = "1 hour"
DEFAULT_TIMEZONE: Final = "UTC"
DEFAULT_CAPTURE_AFTER: Final = "2 days"
DEFAULT_RETRY_LADDER: Final = ("1 day", "3 days", "5 days", "7 days")
DEFAULT_AFTER_LADDER: Final = "suspend"
DEFAULT_CATCH_UP: Final = "latest"
DEFAULT_CATCH_UP_SPACING: Final = "1 day"

_WEBHOOK_KEYS: Final = ("url", "secret_env", "events")
#: Shortest secret accepted, as for BILLING_WEBHOOK_SECRET.
MIN_WEBHOOK_SECRET: Final = 16


@dataclass(frozen=True)
class Account:
    """A Klik & Pay merchant account: one per currency, the key kept in the environment."""

    currency: str
    merchant_id: str
    private_key_env: str
    #: Charges per second this merchant may send (the gateway may refuse rapid repeats).
    max_charges_per_second: float | None

    def private_key(self) -> str:
        """The account's private key, read from the environment at the moment it is needed."""
        key = os.environ.get(self.private_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"accounts.{self.currency}: environment variable {self.private_key_env} is not "
                f"set; it must hold the Klik & Pay private key of merchant {self.merchant_id}"
            )
        return key


@dataclass(frozen=True)
class Plan:
    """One plan of the file, every default filled in."""

    name: str
    amount: Decimal
    currency: str
    every: Interval
    #: When beat looks for due charges: a cron line, or a fixed period.
    sweep: Cron | timedelta
    timezone: ZoneInfo
    deferred: bool
    capture_after: timedelta
    #: Delays after each soft decline; empty means no retry.
    retry_ladder: tuple[timedelta, ...]
    after_ladder: Literal["suspend", "cancel"]
    catch_up: Literal["latest", "all"]
    catch_up_spacing: timedelta

    def fingerprint(self) -> str:
        """What a plan version is keyed by: the terms a customer agreed to pay.

        Only amount, currency and interval count; changing the sweep or the retry ladder is
        operations, not a new price.
        """
        terms = f"{format_amount(self.amount)}|{self.currency}|{self.every}"
        return hashlib.sha256(terms.encode()).hexdigest()


@dataclass(frozen=True)
class WebhookEndpoint:
    """An endpoint that receives events, signed with its own secret from the environment.

    ``events`` holds exact types (``"charge.approved"``) or prefixes (``"subscription.*"``);
    empty means every event.
    """

    name: str
    url: str
    secret_env: str
    events: tuple[str, ...] = ()

    def matches(self, event_type: str) -> bool:
        """Whether this endpoint receives events of ``event_type``."""
        return type_matches(self.events, event_type)

    def secret(self) -> str:
        """The signing secret, read from the environment at the moment a post needs it."""
        value = os.environ.get(self.secret_env, "").strip()
        if not value:
            raise ConfigError(
                f"webhooks.{self.name}: environment variable {self.secret_env} is not set; it "
                f"must hold the secret that signs the events posted to {self.name}"
            )
        if len(value) < MIN_WEBHOOK_SECRET:
            raise ConfigError(
                f"webhooks.{self.name}: environment variable {self.secret_env} must hold at "
                f"least {MIN_WEBHOOK_SECRET} characters (a random string, kept secret)"
            )
        return value


@dataclass(frozen=True)
class PlanSet:
    """A whole, valid plans file."""

    path: str
    #: By currency.
    accounts: dict[str, Account]
    plans: dict[str, Plan]
    #: Endpoints of ``[webhooks.NAME]`` tables, by name (``default`` is never one of them).
    webhooks: dict[str, WebhookEndpoint] = field(default_factory=dict)

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            known = ", ".join(sorted(self.plans)) or "none"
            raise NotFound(f"unknown plan {name!r} (known: {known})") from None

    def account_for(self, plan: Plan | str) -> Account:
        """The merchant account that charges ``plan`` (by its currency)."""
        found = self.plan(plan) if isinstance(plan, str) else plan
        return self.accounts[found.currency]

    def warnings(self) -> list[str]:
        """What is valid but will hurt later: keys missing from the environment, idle accounts."""
        used = {plan.currency for plan in self.plans.values()}
        out = []
        for currency, account in self.accounts.items():
            if not os.environ.get(account.private_key_env, "").strip():
                out.append(
                    f"accounts.{currency}: environment variable {account.private_key_env} is "
                    f"not set; charges in {currency} will fail until it holds the private key"
                )
            if currency not in used:
                out.append(f"accounts.{currency}: no plan is charged in {currency}")
        for endpoint in self.webhooks.values():
            try:
                endpoint.secret()
            except ConfigError as exc:
                out.append(f"{exc}; its events wait until it does")
        return out


# --- reading ----------------------------------------------------------------------------


class _Bad(Exception):
    """One problem with one value; the message follows the value's location."""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _where(table: str, name: str) -> str:
    """``plans.pro-monthly``, or ``plans."pro\\nmonthly"`` for a name TOML must quote (or too
    long to show whole): the location stays one short line however the name is spelt."""
    if _BARE_KEY.fullmatch(name) and len(name) <= MAX_QUOTED:
        return f"{table}.{name}"
    return f"{table}.{quote(name)}"


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, for messages."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return shown(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return repr(value)


def _string(value: object, example: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{_show(value)} must be a quoted string such as {quote(example)}")
    return value


def _amount(value: object) -> Decimal:
    if isinstance(value, float):
        raise _Bad(
            f"{value!r} is a TOML float, which cannot hold cents exactly: "
            f'quote it, amount = "{value!r}"'
        )
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad(f'{_show(value)} must be a quoted amount such as "29.90"')
    if isinstance(value, int) and value > MAX_AMOUNT:
        raise _Bad(f"{_show(value)} is larger than {format_amount(MAX_AMOUNT)}")
    with contextlib.suppress(InvalidOperation):
        if Decimal(str(value).strip()) > MAX_AMOUNT:
            raise _Bad(f"{quote(str(value))} is larger than {format_amount(MAX_AMOUNT)}")
    try:
        return parse_amount(value)
    except InvalidInput:
        problem = f"{quote(str(value))} is not a positive amount with at most two decimal places"
        raise _Bad(problem) from None


def _currency_code(value: object) -> str:
    code = _string(value, "EUR")
    if not _CURRENCY.fullmatch(code):
        raise _Bad(f"{quote(code)} is not a currency code (three capital letters such as EUR)")
    return code


def _interval(value: object) -> Interval:
    try:
        return parse_interval(_string(value, "1 month"))
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _delay(value: object) -> timedelta:
    try:
        return parse_delay(_string(value, "1 day"))
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _sweep(value: object) -> Cron | timedelta:
    text = _string(value, "0 3 * * *")
    fields = len(text.split())
    try:
        if fields == 5:
            return parse_cron(text)
        if fields == 2:
            return parse_delay(text)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    raise _Bad(
        f"{quote(text)} is neither a cron line (five fields: minute hour day-of-month month "
        'day-of-week) nor a duration such as "30 seconds"'
    )


def _timezone(value: object) -> ZoneInfo:
    name = _string(value, "Europe/Paris")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _Bad(f"{quote(name)} is not a known time zone (e.g. Europe/Paris, UTC)") from None


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{_show(value)} must be true or false (unquoted)")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def read(value: object) -> str:
        text = _string(value, choices[0])
        if text not in choices:
            raise _Bad(f"{quote(text)} must be " + " or ".join(quote(c) for c in choices))
        return text

    return read


def _rate(value: object) -> float:
    problem = f"{_show(value)} must be a positive number such as 5 or 0.1"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(problem)
    try:
        rate = float(value)  # an integer of 400 digits is no float
    except OverflowError:
        raise _Bad(problem) from None
    if not math.isfinite(rate) or rate <= 0:
        raise _Bad(problem)
    return rate


def _merchant_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise _Bad(f'{_show(value)} must be quoted: merchant_id = "{_show(value)}"')
    text = _string(value, "1234567")
    if not _MERCHANT_ID.fullmatch(text):
        raise _Bad(f"{quote(text)} is not a merchant ID (1-32 letters or digits)")
    return text


def _env_name(value: object) -> str:
    # The value is never echoed: someone may have pasted the private key itself here.
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise _Bad(
            "must be the NAME of the environment variable that holds the private key "
            "(capital letters, digits and _, e.g. KLIKANDPAY_KEY_EUR), never the key itself"
        )
    return value


class _Table:
    """Reads one TOML table, collecting a problem per bad key instead of stopping."""

    def __init__(self, where: str, table: Mapping[str, Any], problems: list[str]) -> None:
        self.where = where
        self.table = table
        self.problems = problems
        self.ok = True

    def _problem(self, key: str, message: str) -> None:
        self.ok = False
        self.problems.append(f"{self.where}.{key}: {message}")

    def required(self, key: str, read: Callable[[object], T]) -> T | None:
        if key not in self.table:
            self._problem(key, "missing")
            return None
        return self.optional(key, read, None)

    def optional(self, key: str, read: Callable[[object], T], default: object) -> T | None:
        value = self.table.get(key, default)
        try:
            return read(value)
        except _Bad as exc:
            self._problem(key, str(exc))
            return None

    def ladder(self, key: str, default: tuple[str, ...]) -> tuple[timedelta, ...] | None:
        value = self.table.get(key, list(default))
        if not isinstance(value, list):
            self._problem(
                key, f'{_show(value)} must be a list of delays such as ["1 day", "3 days"]'
            )
            return None
        delays = []
        for index, item in enumerate(value):
            try:
                delays.append(_delay(item))
            except _Bad as exc:
                self._problem(f"{key}[{index}]", str(exc))
        return tuple(delays) if len(delays) == len(value) else None

    def unknown_keys(self, known: tuple[str, ...], hints: Mapping[str, str] | None = None) -> None:
        for key in self.table:
            if key in known:
                continue
            self.ok = False
            hint = (hints or {}).get(key)
            if hint is None:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {quote(close[0])}?)" if close else ""
            self.problems.append(f"{self.where}: unknown key {quote(key)}{hint}")


_ACCOUNT_HINTS: Final = {
    key: (
        ": the key itself never goes in this file; set private_key_env to the name of the "
        "environment variable that holds it"
    )
    for key in ("private_key", "key", "secret", "PRIVATE_KEY")
}


def _read_account(currency: str, value: object, problems: list[str]) -> Account | None:
    where = _where("accounts", currency)
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a table, written [{where}]")
        return None
    ok = True
    if not _CURRENCY.fullmatch(currency):
        problems.append(
            f"{where}: {quote(currency)} is not a currency code (three capital letters such as EUR)"
        )
        ok = False
    table = _Table(where, value, problems)
    merchant_id = table.required("merchant_id", _merchant_id)
    env = table.required("private_key_env", _env_name)
    rate = table.optional("max_charges_per_second", lambda v: None if v is None else _rate(v), None)
    table.unknown_keys(_ACCOUNT_KEYS, _ACCOUNT_HINTS)
    if not (ok and table.ok) or merchant_id is None or env is None:
        return None
    return Account(currency, merchant_id, env, rate)


def _secret_env(value: object) -> str:
    # The value is never echoed: someone may have pasted the secret itself here.
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise _Bad(
            "must be the NAME of the environment variable that holds the webhook secret "
            "(capital letters, digits and _, e.g. CRM_WEBHOOK_SECRET), never the secret itself"
        )
    return value


def _webhook_url(value: object) -> str:
    text = _string(value, "https://shop.example/hooks/billing")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Bad(f"{quote(text)} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        # Not echoed: the part before "@" is a credential.
        raise _Bad(
            "must not hold a user name or password (user:password@host): the plans file "
            "holds no secrets, and every post is signed with the secret of secret_env"
        )
    try:
        _ = parts.port  # raises on a port out of range
    except ValueError:
        raise _Bad(f"{quote(text)} has an invalid port") from None
    if not parts.hostname or any(char.isspace() for char in text):
        raise _Bad(f"{quote(text)} is not a valid URL")
    return text


def _event_pattern(value: object) -> str:
    """One filter entry: a known event type, or a prefix of known types ending in ``.*``."""
    text = _string(value, "charge.approved")
    if text.endswith(".*") and "*" not in text[:-2]:
        if any(known.startswith(text[:-1]) for known in EVENT_TYPES):
            return text
        prefixes = sorted({known.split(".")[0] + ".*" for known in EVENT_TYPES})
        raise _Bad(
            f"{quote(text)} matches no event type (prefixes: "
            + ", ".join(quote(p) for p in prefixes)
            + ")"
        )
    if text in EVENT_TYPES:
        return text
    if text == "*":
        raise _Bad('"*": leave events out to send every event')
    if "*" in text:
        raise _Bad(f'{quote(text)}: "*" only ends a prefix, as in "charge.*"')
    close = difflib.get_close_matches(text, EVENT_TYPES, n=1)
    hint = f"did you mean {quote(close[0])}?" if close else "see the README for the list"
    raise _Bad(f'{quote(text)} is not an event type nor a prefix such as "charge.*" ({hint})')


def _read_event_filter(table: _Table) -> tuple[str, ...] | None:
    if "events" not in table.table:
        return ()
    value = table.table["events"]
    if not isinstance(value, list):
        table._problem(
            "events",
            f'{_show(value)} must be a list such as ["charge.approved", "subscription.*"]',
        )
        return None
    if not value:
        table._problem(
            "events", "an empty list would send nothing; leave events out to send every event"
        )
        return None
    patterns: list[str] = []
    bad = False
    for index, item in enumerate(value):
        try:
            pattern = _event_pattern(item)
        except _Bad as exc:
            table._problem(f"events[{index}]", str(exc))
            bad = True
            continue
        if pattern not in patterns:
            patterns.append(pattern)
    return None if bad else tuple(patterns)


_WEBHOOK_HINTS: Final = {
    key: (
        ": the secret never goes in this file; set secret_env to the name of the "
        "environment variable that holds it"
    )
    for key in ("secret", "key", "webhook_secret", "SECRET")
}


def _read_webhook(name: str, value: object, problems: list[str]) -> WebhookEndpoint | None:
    where = _where("webhooks", name)
    if not isinstance(value, dict):
        problems.append(
            f"{where}: must be a table, written [{where}], with url, secret_env and "
            "optionally events (one table per endpoint)"
        )
        return None
    ok = True
    if not _PLAN_NAME.fullmatch(name):
        problems.append(
            f"{where}: endpoint name {quote(name)} must be 1-64 letters, digits, '-' or '_'"
        )
        ok = False
    elif name == DEFAULT_ENDPOINT:
        problems.append(
            f'{where}: the name "{DEFAULT_ENDPOINT}" is reserved for the endpoint of '
            "BILLING_WEBHOOK_URL; choose another name"
        )
        ok = False
    table = _Table(where, value, problems)
    url = table.required("url", _webhook_url)
    secret_env = table.required("secret_env", _secret_env)
    events = _read_event_filter(table)
    table.unknown_keys(_WEBHOOK_KEYS, _WEBHOOK_HINTS)
    if not (ok and table.ok) or url is None or secret_env is None or events is None:
        return None
    return WebhookEndpoint(name=name, url=url, secret_env=secret_env, events=events)


def _read_webhooks(data: Mapping[str, Any], problems: list[str]) -> dict[str, WebhookEndpoint]:
    raw = data.get("webhooks", {})
    if not isinstance(raw, dict):
        problems.append("webhooks: must hold tables such as [webhooks.crm]")
        return {}
    found: dict[str, WebhookEndpoint] = {}
    for name, value in raw.items():
        endpoint = _read_webhook(name, value, problems)
        if endpoint is not None:
            found[name] = endpoint
    return found


def _read_plan(
    name: str, value: object, accounts: Mapping[str, object], problems: list[str]
) -> Plan | None:
    where = _where("plans", name)
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a table, written [{where}]")
        return None
    ok = True
    if not _PLAN_NAME.fullmatch(name):
        problems.append(
            f"{where}: plan name {quote(name)} must be 1-64 letters, digits, '-' or '_'"
        )
        ok = False
    table = _Table(where, value, problems)
    amount = table.required("amount", _amount)
    currency = table.required("currency", _currency_code)
    if currency is not None and currency not in accounts:
        table._problem("currency", f"{quote(currency)} has no [accounts.{currency}]")
    every = table.required("every", _interval)
    sweep = table.optional("sweep", _sweep, DEFAULT_SWEEP)
    timezone = table.optional("timezone", _timezone, DEFAULT_TIMEZONE)
    deferred = table.optional("deferred", _boolean, False)
    capture_after = table.optional("capture_after", _delay, DEFAULT_CAPTURE_AFTER)
    ladder = table.ladder("retry_ladder", DEFAULT_RETRY_LADDER)
    after = table.optional("after_ladder", _choice("suspend", "cancel"), DEFAULT_AFTER_LADDER)
    catch_up = table.optional("catch_up", _choice("latest", "all"), DEFAULT_CATCH_UP)
    spacing = table.optional("catch_up_spacing", _delay, DEFAULT_CATCH_UP_SPACING)
    table.unknown_keys(_PLAN_KEYS)
    if not (ok and table.ok):
        return None
    # Every value is set once table.ok holds; the casts only tell mypy so.
    return Plan(
        name=name,
        amount=cast(Decimal, amount),
        currency=cast(str, currency),
        every=cast(Interval, every),
        sweep=cast(Cron | timedelta, sweep),
        timezone=cast(ZoneInfo, timezone),
        deferred=cast(bool, deferred),
        capture_after=cast(timedelta, capture_after),
        retry_ladder=cast(tuple[timedelta, ...], ladder),
        after_ladder=cast(Literal["suspend", "cancel"], after),
        catch_up=cast(Literal["latest", "all"], catch_up),
        catch_up_spacing=cast(timedelta, spacing),
    )


def _duplicate_merchants(accounts: dict[str, Account], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for currency, account in accounts.items():
        other = seen.setdefault(account.merchant_id, currency)
        if other != currency:
            problems.append(
                f"accounts.{currency}.merchant_id: {quote(account.merchant_id)} is also the "
                f"merchant ID of accounts.{other} (Klik & Pay issues one per currency)"
            )


#: Where a message about nesting points: the first line this many arrays or tables deep.
_DEEP: Final = 100
#: Digits tomllib's ``int()`` reads at most (Python's ``sys.get_int_max_str_digits()``).
_INT_DIGITS: Final = 4300
_LONG_NUMBER = re.compile(rf"[0-9][0-9_]{{{_INT_DIGITS},}}")


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _deep_line(text: str) -> int | None:
    """The line where arrays and inline tables first nest ``_DEEP`` levels, strings and
    comments skipped: where a message about a RecursionError of tomllib points."""
    depth, index, end = 0, 0, len(text)
    while index < end:
        char = text[index]
        if char in "\"'":
            closing = char * 3 if text.startswith(char * 3, index) else char
            index += len(closing)
            while index < end and not text.startswith(closing, index):
                index += 2 if char == '"' and text[index] == "\\" else 1
            index += len(closing)
            continue
        if char == "#":
            newline = text.find("\n", index)
            index = end if newline < 0 else newline
            continue
        if char in "[{":
            depth += 1
            if depth >= _DEEP:
                return _line_of(text, index)
        elif char in "]}":
            depth = max(depth - 1, 0)
        index += 1
    return None


_POSITION = re.compile(r"\s*(\(at (?:line \d+, column \d+|end of document)\))$")


def _short(message: str) -> str:
    """tomllib's message on one line, its quoted keys cut: a key of 10,000 characters
    declared twice must not make a problem of 10,000. The position is always kept."""
    found = _POSITION.search(message)
    position = found.group(1) if found else ""
    head = message[: found.start()] if found else message
    head = head.replace("\n", "\\n")
    if len(head) > 2 * MAX_QUOTED:
        head = head[: 2 * MAX_QUOTED - 1] + "…"
    return f"{head} {position}".strip()


def _toml(text: str, source: str) -> dict[str, Any]:
    """``tomllib.loads``, its two non-syntax failures named: it recurses once per level of
    nesting, and its ``int()`` refuses more than 4300 digits with a ``ValueError``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanFileError(source, [f"TOML syntax error: {_short(str(exc))}"]) from None
    except RecursionError:
        line = _deep_line(text)
        where = f" (at line {line})" if line is not None else ""
        raise PlanFileError(
            source, [f"TOML nested too deeply{where}: arrays or tables hundreds of levels deep"]
        ) from None
    except ValueError:
        found = _LONG_NUMBER.search(text)
        where = f" at line {_line_of(text, found.start())}" if found else ""
        raise PlanFileError(
            source, [f"TOML number too long{where}: more than {_INT_DIGITS} digits"]
        ) from None


def parse_plans(text: str, *, source: str = "<string>") -> PlanSet:
    """Validate a plans file's text; raise ``PlanFileError`` listing every problem."""
    data = _toml(text, source)
    problems: list[str] = []
    for key in data:
        if key not in ("accounts", "plans", "webhooks"):
            close = difflib.get_close_matches(key, ("accounts", "plans", "webhooks"), n=1)
            hint = f" (did you mean {quote(close[0])}?)" if close else ""
            problems.append(
                f"unknown top-level key {quote(key)}{hint}: the file holds only "
                "[accounts.CURRENCY], [plans.NAME] and [webhooks.NAME] tables"
            )
    webhooks = _read_webhooks(data, problems)
    raw_accounts = data.get("accounts", {})
    if not isinstance(raw_accounts, dict):
        problems.append("accounts: must hold tables such as [accounts.EUR]")
        raw_accounts = {}
    raw_plans = data.get("plans", {})
    if not isinstance(raw_plans, dict):
        problems.append("plans: must hold tables such as [plans.pro-monthly]")
        raw_plans = {}
    elif not raw_plans:
        problems.append("plans: no plan defined (add a [plans.NAME] table)")

    accounts: dict[str, Account] = {}
    for currency, value in raw_accounts.items():
        account = _read_account(currency, value, problems)
        if account is not None:
            accounts[currency] = account
    _duplicate_merchants(accounts, problems)
    plans: dict[str, Plan] = {}
    for name, value in raw_plans.items():
        plan = _read_plan(name, value, raw_accounts, problems)
        if plan is not None:
            plans[name] = plan
    if problems:
        raise PlanFileError(source, problems)
    return PlanSet(path=source, accounts=accounts, plans=plans, webhooks=webhooks)


def load_plans(path: str | Path) -> PlanSet:
    """Read and validate the plans file at ``path``; raise ``PlanFileError`` on any problem."""
    source = printable(str(path))
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise PlanFileError(source, ["file not found"]) from None
    except OSError as exc:
        raise PlanFileError(source, [f"cannot be read: {exc.strerror}"]) from None
    except ValueError:  # a NUL in the path
        raise PlanFileError(source, ["is not a valid path"]) from None
    if stat.S_ISDIR(mode):
        raise PlanFileError(source, ["is a directory, not a plans file"])
    if not stat.S_ISREG(mode):
        # A device or a pipe could be read forever (/dev/zero, a FIFO nobody writes to).
        raise PlanFileError(source, ["not a regular file"])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanFileError(source, ["file not found"]) from None
    except IsADirectoryError:
        raise PlanFileError(source, ["is a directory, not a plans file"]) from None
    except UnicodeDecodeError as exc:
        raise PlanFileError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise PlanFileError(source, [f"cannot be read: {exc.strerror}"]) from None
    return parse_plans(text, source=source)


_CACHE: dict[str, tuple[tuple[int, int, int, int], PlanSet]] = {}
_CACHE_LOCK = threading.Lock()


def get_plans(settings: Settings | None = None) -> PlanSet:
    """The plans file named by the settings, re-read only when it changes.

    A worker asks for the plans at every charge; this costs one ``stat`` unless the file was
    edited. An edit that breaks the file raises ``PlanFileError`` rather than silently
    charging with the old plans.
    """
    if settings is None:
        from billing.settings import get_settings

        settings = get_settings()
    path = Path(settings.plans_file)
    # The absolute path, not the resolved one: resolving reads every component's link
    # (a syscall each, twice per charge). ``stat`` follows links, and the stamp names the
    # file, so a link moved to another file (a config mount's swap) is still seen.
    key = os.path.abspath(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise PlanFileError(printable(str(path)), ["file not found"]) from None
    except OSError as exc:
        raise PlanFileError(printable(str(path)), [f"cannot be read: {exc.strerror}"]) from None
    # The file itself too (device, inode): a link moved to another file is another stamp.
    stamp = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        plans = load_plans(path)
        _CACHE[key] = (stamp, plans)
        return plans


# --- plan versions ----------------------------------------------------------------------

#: Rounds of "someone else took that version number" before giving up.
_SYNC_ATTEMPTS: Final = 5


def _latest_versions(session: Session, names: list[str]) -> dict[str, tuple[int, str]]:
    """plan -> (newest version, its fingerprint), in one query."""
    newest = (
        select(PlanVersion.plan, func.max(PlanVersion.version).label("version"))
        .where(PlanVersion.plan.in_(names))
        .group_by(PlanVersion.plan)
        .subquery()
    )
    rows = session.execute(
        select(PlanVersion.plan, PlanVersion.version, PlanVersion.fingerprint).join(
            newest,
            (PlanVersion.plan == newest.c.plan) & (PlanVersion.version == newest.c.version),
        )
    )
    return {plan: (version, fingerprint) for plan, version, fingerprint in rows}


def _insert_version(session: Session, plan: Plan, version: int) -> None:
    """Insert the row unless another process just took ``(plan, version)``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        statement: Any = pg_insert(PlanVersion)
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = sqlite_insert(PlanVersion)
    else:  # pragma: no cover - only the two databases are supported
        raise ConfigError(f"unsupported database dialect {dialect!r}")
    session.execute(
        statement.values(
            plan=plan.name,
            version=version,
            amount=plan.amount,
            currency=plan.currency,
            every=str(plan.every),
            fingerprint=plan.fingerprint(),
        ).on_conflict_do_nothing(index_elements=["plan", "version"])
    )


def sync_plan_versions(session: Session, plans: PlanSet) -> dict[str, int]:
    """Make sure each plan's current terms have a ``PlanVersion`` row; return plan -> version.

    A plan's current version is its newest row when that row's fingerprint matches the file;
    otherwise a row numbered newest + 1 is added (so going back to an old price is a new
    version too: versions record the order terms were in force). Safe to run at every start
    and every sweep, from many processes at once: a version number taken concurrently is
    not an error, the row is read back and the loop tries the next number. The caller commits.
    """
    current: dict[str, int] = {}
    pending = dict(plans.plans)
    for _ in range(_SYNC_ATTEMPTS):
        latest = _latest_versions(session, list(pending))
        for name, plan in list(pending.items()):
            version, fingerprint = latest.get(name, (0, ""))
            if fingerprint == plan.fingerprint():
                current[name] = version
                del pending[name]
            else:
                _insert_version(session, plan, version + 1)
        if not pending:
            return current
    raise ConfigError(
        "plan versions keep changing under this process (another process with a different "
        f"plans file?): {', '.join(sorted(pending))}"
    )
