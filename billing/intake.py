"""Bringing subscriptions in: from a CSV or JSON-lines file, or one at a time from code.

Why it is shaped like this:
- A file is all or nothing. Every row is checked (against the plans file and against the
  database) before the first insert, and every problem is reported with its line number,
  so a merchant fixes the file once instead of once per error.
- Importing the same file again changes nothing. A row whose ``external_ref`` already
  exists with the same data is *unchanged*; with different data it is a problem, because
  silently re-pointing a subscription at another card or plan is how customers get
  charged twice.
- The comparison with an existing row uses its ``anchor_at`` (the ``next_charge_at`` it
  was imported with), not its current ``next_charge_at``, which moves as it is charged.
- 100,000 rows must fit: existing references are read with batched ``IN`` queries and new
  rows are bulk-inserted in batches, so the cost is a few hundred round trips.
- A file is untrusted: whatever it holds (JSON nested 100,000 deep, numbers of thousands of
  digits, a date in year 1 or 9999, a lone surrogate, a value wider than its column) ends as a
  problem on its line, never as an exception from a parser, a date or the database.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import logging
import re
import stat
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import dates
from billing.db import session_scope
from billing.durations import printable, quote, shown
from billing.errors import ImportRejected, InvalidInput
from billing.models import Subscription, SubscriptionStatus
from billing.money import parse_amount
from billing.plans import PlanSet, get_plans
from billing.redact import PAN_MARK, mask_alias, redact

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("external_ref", "plan", "alias", "customer_ip", "next_charge_at")
OPTIONAL_FIELDS = ("email", "amount")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

#: References looked up per ``IN (...)`` query: far below SQLite's bound-parameter limit.
LOOKUP_BATCH = 500
#: Rows per bulk ``INSERT``.
INSERT_BATCH = 1000
#: Imports creating at least this many rows refresh PostgreSQL's table statistics.
ANALYZE_FROM_ROWS = 1000

#: How far from now a first charge may be, either way: a century. Further is a typo (2205 for
#: 2025), and it keeps every due date a subscription reaches inside the calendar (year 1 to
#: 9999, see billing.dates), with plans at most ten years apart.
ANCHOR_WINDOW = timedelta(days=36525)
#: Digits Python's ``int()`` reads at most (``sys.get_int_max_str_digits()``); json.loads
#: raises ValueError past it.
_INT_DIGITS = 4300

# Lengths of the columns in billing.models.Subscription.
_MAX_LEN = {"external_ref": 128, "alias": 128, "email": 254, "customer_ip": 45}
# Deliberately loose: one @, no spaces, a dot in the domain. The gateway never sees it.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

Format = Literal["csv", "jsonl"]


@dataclass(frozen=True, slots=True)
class NewSubscription:
    """One validated row, ready to insert. Its repr masks the alias (a reusable card imprint)."""

    external_ref: str
    plan: str
    alias: str
    customer_ip: str
    #: UTC.
    next_charge_at: datetime
    email: str | None = None
    #: Overrides the plan's amount for this subscription.
    amount: Decimal | None = None
    #: Where the row was in its file (0 when it did not come from a file).
    line: int = field(default=0, compare=False)

    def __repr__(self) -> str:
        return (
            f"NewSubscription(external_ref={self.external_ref!r}, plan={self.plan!r}, "
            f"alias={mask_alias(self.alias)!r}, customer_ip={self.customer_ip!r}, "
            f"next_charge_at={self.next_charge_at.isoformat()!r}, email={self.email!r}, "
            f"amount={self.amount!r}, line={self.line})"
        )

    def compared(self) -> dict[str, Any]:
        """The values an existing subscription with this reference must have to be the same."""
        return {
            "plan": self.plan,
            "alias": self.alias,
            "customer_ip": self.customer_ip,
            "email": self.email,
            "amount_override": self.amount,
            "anchor_at": self.next_charge_at,
        }

    def values(self, now: datetime) -> dict[str, Any]:
        """The column values of the subscription this row creates."""
        return {
            "external_ref": self.external_ref,
            "plan": self.plan,
            "alias": self.alias,
            "customer_ip": self.customer_ip,
            "email": self.email,
            "amount_override": self.amount,
            "anchor_at": self.next_charge_at,
            "next_period": 0,
            "next_charge_at": self.next_charge_at,
            "status": SubscriptionStatus.ACTIVE.value,
            "created_at": now,
            "updated_at": now,
        }


@dataclass(frozen=True)
class ImportResult:
    """What an import did: rows created, rows already there identically, and warnings."""

    created: int
    unchanged: int
    warnings: list[str]


# --------------------------------------------------------------------------- validation


def _redacted(problems: list[str]) -> list[str]:
    """Problems quote what the file says; a card number pasted into a column stays out."""
    return [redact(p) for p in problems]


def _text(data: Mapping[str, object], name: str) -> tuple[str | None, str | None]:
    """``(value, problem)`` for a text field: stripped, None when absent or blank."""
    value = data.get(name)
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"{name} must be text, not {shown(value)}"
    value = value.strip()
    if not value:
        return None, None
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        # "\ud800" is valid JSON and no text: neither database can store it.
        return None, f"{name} is not valid Unicode text (it holds a lone surrogate)"
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        # A NUL or another control character: PostgreSQL refuses NUL in text, and none
        # belongs in a reference, an alias, an address or a plan name.
        return None, f"{name} contains a control character"
    limit = _MAX_LEN.get(name)
    if limit is not None and len(value) > limit:
        return None, f"{name} is longer than {limit} characters"
    return value, None


def check_time(
    value: object, name: str = "next_charge_at", *, now: datetime | None = None
) -> tuple[datetime | None, str | None]:
    """``(moment in UTC, problem)`` for a time field; ``(None, None)`` when absent or blank.

    A time must carry its offset (a naive one would be read in whatever zone the server
    is), and lie within a century of ``now`` (default: the clock): further is a typo, and
    its later periods could not be computed.
    """
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None, f"{name} {quote(value)} is not an ISO 8601 time"
    elif value is None or value == "":
        return None, None
    else:
        return None, f"{name} must be ISO 8601 text, not {shown(value)}"
    shown_time = quote(value if isinstance(value, str) else moment.isoformat())
    if moment.tzinfo is None or moment.utcoffset() is None:
        return None, (
            f"{name} {shown_time} is a time without offset "
            "(write it like 2025-03-01T09:00:00+01:00 or with a Z)"
        )
    # Aware subtraction never leaves the calendar; astimezone(UTC) of 0001-01-01T00:00+01:00
    # would, so the window is checked first.
    if abs(moment - (now or datetime.now(UTC))) > ANCHOR_WINDOW:
        return None, f"{name} {shown_time} is more than 100 years from now"
    return moment.astimezone(UTC), None


def check_plan(value: object, plans: PlanSet) -> tuple[str | None, str | None]:
    """``(plan name, problem)``: the plan must be in the plans file."""
    plan, problem = _text({"plan": value}, "plan")
    if problem or plan is None:
        return None, problem
    if plan not in plans.plans:
        known = ", ".join(sorted(plans.plans)) or "none"
        return None, f"plan {quote(plan)} is not in the plans file (known: {known})"
    return plan, None


#: The characters of an alias: printable ASCII (``!`` to ``~``; white space is refused
#: on its own). The sandbox issues hex; Klik & Pay's aliases are ASCII tokens.
ALIAS_FIRST, ALIAS_LAST = "\x21", "\x7e"
_JOINERS = re.compile(r"[^0-9A-Za-z]")


def check_alias(value: object) -> tuple[str | None, str | None]:
    """``(alias, problem)``: one word of printable ASCII, and never a card number sent in
    its place."""
    alias, problem = _text({"alias": value}, "alias")
    if problem or alias is None:
        return None, problem
    if any(ch.isspace() for ch in alias):
        return None, "alias contains white space"
    odd = next((ch for ch in alias if not ALIAS_FIRST <= ch <= ALIAS_LAST), None)
    if odd is not None:
        # A zero-width space pasted from a spreadsheet, a full-width digit typed through an
        # input method, a look-alike letter: never in an alias the gateway issued, often
        # invisible on a screen, so named by code point. (A card number in full-width
        # digits is refused here too: the card-number check below reads ASCII digits.)
        name = unicodedata.name(odd, "unnamed")
        return None, (
            f"alias contains U+{ord(odd):04X} ({name}) at position {alias.index(odd) + 1}: "
            "an alias Klik & Pay issues is printable ASCII"
        )
    # A card number sent as the alias, also with its groups joined by any character
    # (``4111_1111_…``, ``4111/1111/…``). Only the whole alias: a digit run *inside* an
    # alias can pass the card check by chance (1 in about 1,250 of the sandbox's hex
    # aliases holds one), and Klik & Pay's own alias format is not documented.
    if PAN_MARK in (redact(alias), redact(_JOINERS.sub("", alias))):
        return None, (
            "alias is a card number, not an alias: send the ALIAS that Klik & Pay returned "
            "for the card's first payment (card numbers are never stored)"
        )
    return alias, None


def check_ip(value: object) -> tuple[str | None, str | None]:
    """``(IP address, problem)``: IPv4 or IPv6, kept in its usual spelling."""
    raw, problem = _text({"customer_ip": value}, "customer_ip")
    if problem or raw is None:
        return None, problem
    if "%" in raw:
        # ip_address() takes "fe80::1%eth0" with a zone of any length; a zone only means
        # something on this machine's own links, never for a customer's address.
        return None, f"customer_ip {quote(raw)} has a zone (%...): not a customer's address"
    try:
        return str(ipaddress.ip_address(raw)), None
    except ValueError:
        return None, f"customer_ip {quote(raw)} is not an IP address"


def check_amount(value: object) -> tuple[Decimal | None, str | None]:
    """``(amount, problem)``: positive, two places at most, never a float."""
    if isinstance(value, str):
        value = value.strip() or None
    if value is None:
        return None, None
    try:
        return parse_amount(value), None
    except InvalidInput as exc:
        return None, str(exc)


def check_fields(
    data: Mapping[str, object], plans: PlanSet, *, line: int = 0, now: datetime | None = None
) -> tuple[NewSubscription | None, list[str]]:
    """Validate one row's fields; return the row, or None and every problem found.

    Problems name the field and quote the bad value (never the alias). ``now`` (default: the
    clock) is what ``next_charge_at`` must lie within a century of.
    """
    problems: list[str] = []

    def required(found: tuple[Any, str | None], missing: str) -> Any:
        value, problem = found
        if problem or value is None:
            problems.append(problem or missing)
        return value

    external_ref = required(_text(data, "external_ref"), "external_ref is missing")
    plan = required(check_plan(data.get("plan"), plans), "plan is missing")
    alias = required(check_alias(data.get("alias")), "alias is missing or blank")
    customer_ip = required(check_ip(data.get("customer_ip")), "customer_ip is missing")
    next_charge_at = required(
        check_time(data.get("next_charge_at"), now=now), "next_charge_at is missing"
    )

    email, problem = _text(data, "email")
    if problem:
        problems.append(problem)
    elif email is not None and not _EMAIL.match(email):
        problems.append(f"email {quote(email)} is not an e-mail address")

    amount, problem = check_amount(data.get("amount"))
    if problem:
        problems.append(problem)

    if problems:
        return None, problems
    assert external_ref and plan and alias and customer_ip and next_charge_at
    return (
        NewSubscription(
            external_ref=external_ref,
            plan=plan,
            alias=alias,
            customer_ip=customer_ip,
            next_charge_at=next_charge_at,
            email=email,
            amount=amount,
            line=line,
        ),
        [],
    )


# --------------------------------------------------------------------------- reading files


def detect_format(path: Path) -> Format:
    """By extension (.csv, .jsonl, .ndjson), else by the first character that is not blank."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for text_line in fh:
            stripped = text_line.strip()
            if stripped:
                return "jsonl" if stripped.startswith("{") else "csv"
    return "csv"


Record = tuple[int, dict[str, object] | None, list[str]]


def _csv_records(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        try:
            for values in reader:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    continue
                if header is None:
                    header = [h.strip() for h in values]
                    problems = _header_problems(header)
                    if problems:
                        yield line, None, problems
                        return
                    continue
                if len(values) > len(header):
                    yield line, None, [f"{len(values)} values for {len(header)} columns"]
                    continue
                yield line, dict(zip(header, values, strict=False)), []
        except csv.Error as exc:
            # The reader stops at a row it cannot read (a field past its size limit).
            yield reader.line_num, None, [f"not a readable CSV row ({exc})"]
            return
        if header is None:
            yield 1, None, ["the file is empty (a CSV import needs a header line)"]


#: Names a problem lists at most (unknown columns, fields): a line, not a page.
_NAMES_SHOWN = 5


def _names(names: Sequence[str]) -> str:
    """``"ip", "notes"``: each quoted, the first few only."""
    shown_names = ", ".join(quote(name) for name in names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return shown_names + (f" and {more} more" if more > 0 else "")


def _header_problems(header: list[str]) -> list[str]:
    problems = []
    unknown = [h for h in header if h not in FIELDS]
    if unknown:
        problems.append(f"unknown column(s) {_names(unknown)} (columns are: {', '.join(FIELDS)})")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        problems.append(f"repeated column(s) {_names(repeated)}")
    missing = [f for f in REQUIRED_FIELDS if f not in header]
    if missing:
        problems.append(f"missing column(s) {_names(missing)}")
    return problems


def _jsonl_records(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8-sig") as fh:
        for line, text_line in enumerate(fh, start=1):
            if not text_line.strip():
                continue
            try:
                # Decimal, not float: an amount must not lose a cent on the way in.
                data = json.loads(text_line, parse_float=Decimal)
            except json.JSONDecodeError as exc:
                yield line, None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
                continue
            except RecursionError:  # json.loads recurses once per level
                yield line, None, ["JSON nested too deeply (arrays or objects hundreds deep)"]
                continue
            except ValueError:  # its int() refuses more digits than this
                yield line, None, [f"a number of more than {_INT_DIGITS} digits"]
                continue
            if not isinstance(data, dict):
                yield line, None, ["each line must be a JSON object"]
                continue
            unknown = [k for k in data if k not in FIELDS]
            if unknown:
                yield line, None, [f"unknown field(s) {_names(unknown)}"]
                continue
            yield line, data, []


def _records(path: Path) -> Iterator[Record]:
    if detect_format(path) == "jsonl":
        return _jsonl_records(path)
    return _csv_records(path)


def parse_rows(
    path: str | Path, plans: PlanSet | None = None, *, now: datetime | None = None
) -> list[NewSubscription]:
    """Read and validate every row of ``path``; raise ``ImportRejected`` listing every problem.

    ``plans`` defaults to the configured plans file, ``now`` to the clock. Problems read
    ``line 7: customer_ip "300.1.1.1" is not an IP address``.
    """
    plans = plans if plans is not None else get_plans()
    file = Path(path)
    problem = file_problem(file)
    if problem is not None:
        raise ImportRejected(printable(str(path)), [problem])
    rows: list[NewSubscription] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    try:
        for line, data, record_problems in _records(file):
            problems.extend(f"line {line}: {p}" for p in record_problems)
            if data is None:
                continue
            row, row_problems = check_fields(data, plans, line=line, now=now)
            problems.extend(f"line {line}: {p}" for p in row_problems)
            ref = row.external_ref if row else data.get("external_ref")
            if isinstance(ref, str) and ref.strip():
                ref = ref.strip()
                if ref in first_line:
                    problems.append(
                        f"line {line}: external_ref {quote(ref)} appears again "
                        f"(first on line {first_line[ref]})"
                    )
                    continue
                first_line[ref] = line
            if row is not None:
                rows.append(row)
    except UnicodeDecodeError:
        raise ImportRejected(printable(str(path)), ["the file is not UTF-8 text"]) from None
    except OSError as exc:
        raise ImportRejected(printable(str(path)), [f"cannot be read: {exc.strerror}"]) from None
    except csv.Error as exc:
        raise ImportRejected(printable(str(path)), [f"not a readable CSV file ({exc})"]) from None
    if problems:
        raise ImportRejected(printable(str(path)), _redacted(problems))
    return rows


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be imported, found before it is opened; None when it can be.

    ``Path.is_file()`` raises for a name past the file system's limit (ENAMETOOLONG).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    except ValueError:  # a NUL in the path
        return "is not a valid path"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def count_rows(path: str | Path) -> int:
    """About how many rows ``path`` holds (non-blank lines, less a CSV header): for progress.

    0 when it cannot be read: the import says why.
    """
    file = Path(path)
    try:
        with file.open("rb") as fh:
            lines = sum(1 for raw in fh if raw.strip())
        csv_header = detect_format(file) == "csv"
    except (OSError, ValueError):
        return 0
    return max(lines - csv_header, 0)


# --------------------------------------------------------------------------- the database


_COMPARED = ("plan", "alias", "customer_ip", "email", "amount_override", "anchor_at")


def _differences(row: NewSubscription, existing: Mapping[str, Any]) -> list[str]:
    """Names of the fields where ``row`` and an existing subscription disagree."""
    wanted = row.compared()
    names = {"amount_override": "amount", "anchor_at": "next_charge_at"}
    return [names.get(c, c) for c in _COMPARED if wanted[c] != existing[c]]


def _existing(session: Session, refs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Existing subscriptions among ``refs``, by reference, read in batches."""
    columns = [Subscription.external_ref, *(getattr(Subscription, c) for c in _COMPARED)]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(refs), LOOKUP_BATCH):
        batch = refs[start : start + LOOKUP_BATCH]
        for record in session.execute(select(*columns).where(Subscription.external_ref.in_(batch))):
            found[record.external_ref] = dict(record._mapping)
    return found


def _is_old(row: NewSubscription, plans: PlanSet, now: datetime) -> bool:
    """True when the row's first charge is more than one period of its plan in the past."""
    plan = plans.plan(row.plan)
    return dates.due_at(row.next_charge_at, plan.every, 1, plan.timezone) <= now


def _old_message(row: NewSubscription) -> str:
    return (
        f"next_charge_at {row.next_charge_at.isoformat()} is more than one period in the past"
        f" (period 0 would be charged at once and later ones follow the plan's catch_up)"
    )


def _import(
    session: Session,
    path: str,
    rows: list[NewSubscription],
    plans: PlanSet,
    *,
    strict: bool,
    progress: Callable[[int], None] | None,
    now: datetime,
) -> ImportResult:
    existing = _existing(session, [r.external_ref for r in rows])
    problems: list[str] = []
    warnings: list[str] = []
    new_rows: list[NewSubscription] = []
    for row in rows:
        found = existing.get(row.external_ref)
        if found is not None:
            diff = _differences(row, found)
            if diff:
                problems.append(
                    f"line {row.line}: external_ref {quote(row.external_ref)} already exists "
                    f"with a different {'/'.join(diff)}"
                )
            continue
        if _is_old(row, plans, now):
            message = f"line {row.line}: {_old_message(row)}"
            (problems if strict else warnings).append(message)
        new_rows.append(row)
    if problems:
        raise ImportRejected(path, _redacted(problems))

    unchanged = len(rows) - len(new_rows)
    if progress is not None and unchanged:
        progress(unchanged)
    try:
        for start in range(0, len(new_rows), INSERT_BATCH):
            batch = new_rows[start : start + INSERT_BATCH]
            session.execute(insert(Subscription), [r.values(now) for r in batch])
            if progress is not None:
                progress(len(batch))
    except IntegrityError:
        # Another import created one of these references after our check.
        raise ImportRejected(
            path, ["another process created some of these subscriptions meanwhile; run again"]
        ) from None
    if len(new_rows) >= ANALYZE_FROM_ROWS and session.get_bind().dialect.name == "postgresql":
        # Fresh statistics after a bulk load: without them PostgreSQL keeps plans made for a
        # small table (including cached generic plans of pooled connections) and a lookup
        # by reference turns into a scan of every row.
        session.execute(text("ANALYZE subscriptions"))
    return ImportResult(created=len(new_rows), unchanged=unchanged, warnings=_redacted(warnings))


def import_subscriptions(
    session_or_url: Session | str,
    path: str | Path,
    plans: PlanSet,
    *,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    now: datetime | None = None,
) -> ImportResult:
    """Create the subscriptions of a CSV or JSON-lines file, all or nothing.

    Raises ``ImportRejected`` (nothing written) listing every bad row: invalid fields,
    references repeated in the file, references that exist with different data, and,
    when ``strict``, rows whose ``next_charge_at`` is more than one period in the past
    (otherwise those are warnings). ``progress`` is called with the number of rows just
    handled (created or found unchanged), batch by batch.

    Given a URL the import commits its own transaction; given a session it only adds to
    the caller's transaction, which the caller commits.
    """
    now = now or datetime.now(UTC)
    rows = parse_rows(path, plans, now=now)
    source = printable(str(path))
    if isinstance(session_or_url, str):
        with session_scope(session_or_url) as session:
            result = _import(
                session, source, rows, plans, strict=strict, progress=progress, now=now
            )
    else:
        result = _import(
            session_or_url, source, rows, plans, strict=strict, progress=progress, now=now
        )
    log.info(
        "imported %s: %d created, %d unchanged, %d warning(s)",
        source,
        result.created,
        result.unchanged,
        len(result.warnings),
    )
    return result


# --------------------------------------------------------------------------- one at a time


def add_subscription(
    session: Session,
    plans: PlanSet,
    *,
    external_ref: str,
    plan: str,
    alias: str,
    customer_ip: str,
    next_charge_at: datetime | str,
    email: str | None = None,
    amount: Decimal | str | None = None,
    now: datetime | None = None,
) -> Subscription:
    """Create one subscription, or return the existing one if it has the same data.

    Raises ``InvalidInput`` naming each bad field, or naming the fields that differ from
    an existing subscription with this reference. A ``next_charge_at`` more than one
    period in the past is accepted and logged as a warning.
    """
    data: dict[str, object] = {
        "external_ref": external_ref,
        "plan": plan,
        "alias": alias,
        "customer_ip": customer_ip,
        "next_charge_at": next_charge_at,
        "email": email,
        "amount": amount,
    }
    now = now or datetime.now(UTC)
    row, problems = check_fields(data, plans, now=now)
    if row is None:
        raise InvalidInput("; ".join(_redacted(problems)))
    existing = session.scalars(
        select(Subscription).where(Subscription.external_ref == row.external_ref)
    ).one_or_none()
    if existing is not None:
        diff = _differences(row, {c: getattr(existing, c) for c in _COMPARED})
        if diff:
            raise InvalidInput(
                f"external_ref {quote(row.external_ref)} already exists with a different "
                + "/".join(diff)
            )
        return existing
    if _is_old(row, plans, now):
        log.warning("subscription %s: %s", row.external_ref, _old_message(row))
    subscription = Subscription(**row.values(now))
    session.add(subscription)
    session.flush()
    return subscription


def add_subscription_from_dict(url: str, data: dict[str, object]) -> int:
    """The plain-data entry (for a task queue): create or find the subscription, return its id.

    ``data`` holds the import fields (``external_ref``, ``plan``, ``alias``, ``customer_ip``,
    ``next_charge_at`` as ISO 8601 text, optional ``email`` and ``amount`` as text). Safe to
    call again with the same data; two concurrent calls end with one subscription.
    """
    unknown = sorted(k for k in data if k not in FIELDS)
    if unknown:
        raise InvalidInput("unknown field(s): " + ", ".join(unknown))
    plans = get_plans()
    kwargs: dict[str, Any] = {f: data.get(f) for f in FIELDS}
    for attempt in range(2):
        try:
            with session_scope(url) as session:
                return add_subscription(session, plans, **kwargs).id
        except IntegrityError:
            # A concurrent call inserted this reference first; the second pass finds it.
            if attempt:
                raise
    raise AssertionError("unreachable")
