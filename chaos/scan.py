"""Looking for secrets where they must never be: log files and every table of the database.

The promise is that card numbers, CVVs and private keys are never stored or logged. This
module is how that promise is checked after a test run or a chaos run: it reads every log
file of a folder and a dump of every table (``SELECT *`` of each, the ledger included) and
reports each place where one of ``PATTERNS`` matches. Findings show where and which
pattern, never the secret itself.

Each text is looked at as stored and as every reader could decode it: form-decoded
(``+`` -> space, ``%XX``), percent-decoded, JSON-unescaped, and two of these in a row
(:func:`decoded_views`). A secret that is only there percent-encoded or JSON-escaped is
still there. This decoding is written here with the standard library, apart from
``billing.redact``, so that the scan checks the redaction rather than repeating it.

What counts as a secret here, and why the patterns are shaped as they are:

- the guide's two test card numbers, anywhere, even inside a longer token;
- any other Luhn-valid run of 13 to 19 digits standing alone (not part of a word, a hex
  alias, a decimal fraction such as Celery's ``succeeded in 0.0123456789012s``, or a
  UUID), plain or in groups of any size joined by spaces, dashes, dots or ``+`` (once
  the text is decoded, ``%20`` is a space too);
- a CVV next to its field name (``CVV=111``, ``"cvv": "111"``);
- the private keys the tests, benchmarks and chaos runs use, and any ``PRIVATE_KEY=``
  field whose value was not redacted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote, unquote_plus

from sqlalchemy import MetaData, select

from billing.db import get_engine

#: The guide's test cards: the only ones the sandbox approves.
TEST_CARDS = ("4012888888881881", "5555555555554444")
#: Private keys of the test, benchmark and chaos merchant accounts.
TEST_KEYS = ("test-key-eur", "test-key-usd", "bench-key", "chaos-key")
#: File names read by :func:`log_files`.
LOG_SUFFIXES = (".log", ".out", ".err")


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (13 to 19 of them) pass the Luhn check every card number passes."""
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _luhn_of_match(text: str) -> bool:
    return luhn_valid(re.sub(r"\D", "", text))


def _always(_: str) -> bool:
    return True


_UUID = re.compile(r"(?i)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _grouped_card(run: str) -> bool:
    """True when whole groups of ``run`` (digits joined by separators) make a card number.

    ``29.90 4111 1111 1111 1111`` holds one. Not a card: groups joined by lone dots unless
    every joint is one (``4111.1111.1111.1111``), since ``12.00 29.90`` are decimals, nor
    groups of one or two digits before the last (dates, lists of small numbers).
    """
    if sum(char.isdigit() for char in run) < 13:
        return False
    parts = re.split(r"([ .+\-]{1,3})", run)
    digits, joints = parts[::2], parts[1::2]
    for i in range(len(digits)):
        for j in range(i, len(digits)):
            inside = joints[i:j]
            before, after = joints[i - 1] if i else "", joints[j] if j < len(joints) else ""
            if "." in (before, after):  # the fraction or the integer part of a decimal
                continue
            if "." in inside and (set(inside) != {"."} or len(inside) < 2):
                continue
            if any(len(group) < 3 for group in digits[i:j]):
                continue
            if luhn_valid("".join(digits[i : j + 1])):
                return True
    return False


@dataclass(frozen=True)
class Pattern:
    """One kind of secret: a regular expression, and a check of each match (e.g. Luhn)."""

    name: str
    regex: re.Pattern[str]
    check: Callable[[str], bool] = _always


# A digit run standing alone: no letter, digit or dot before it (a dot would make it the
# fraction of a number), no letter or digit after it, nor a dot followed by a digit.
_ALONE_BEFORE = r"(?<![0-9A-Za-z.\-])"
_ALONE_AFTER = r"(?![0-9A-Za-z]|\.\d)"

PATTERNS: tuple[Pattern, ...] = (
    Pattern("test card number", re.compile("|".join(TEST_CARDS))),
    Pattern(
        "card number (Luhn-valid run of 13-19 digits)",
        re.compile(_ALONE_BEFORE + r"\d{13,19}" + _ALONE_AFTER),
        _luhn_of_match,
    ),
    Pattern(
        "card number in digit groups",
        re.compile(_ALONE_BEFORE + r"\d+(?:[ .+\-]{1,3}\d+)+" + _ALONE_AFTER),
        lambda run: _grouped_card(run),
    ),
    Pattern(
        "CVV value",
        re.compile(r"(?i)\b(?:cvv2?|cvc2?|cryptogramme)\b[\"']?\s*[=:]\s*[\"']?\d{3,4}(?!\d)"),
    ),
    Pattern("test private key", re.compile("|".join(re.escape(key) for key in TEST_KEYS))),
    Pattern(
        "unredacted PRIVATE_KEY field",
        re.compile(r"(?i)\bprivate_key(?:=|[\"']\s*:\s*[\"'])(?!\[redacted)[^&\s\"',}]+"),
    ),
)


@dataclass(frozen=True)
class Finding:
    """Where a secret was found, which pattern matched, and a masked excerpt of it."""

    where: str
    pattern: str
    masked: str

    def __str__(self) -> str:
        return f"{self.where}: {self.pattern} ({self.masked})"


def mask(value: str) -> str:
    """``4012888888881881`` -> ``40…81 (16 chars)``: enough to find it, not to use it."""
    if len(value) <= 4:
        return f"… ({len(value)} chars)"
    return f"{value[:2]}…{value[-2:]} ({len(value)} chars)"


def json_unescape(text: str) -> str:
    """``\\/``, ``\\"``, ``\\u00e9`` and the other JSON escapes of ``text`` decoded."""

    def one(match: re.Match[str]) -> str:
        try:
            return str(json.loads(f'"{match.group(0)}"'))
        except ValueError:  # a lone surrogate escape
            return match.group(0)

    return re.sub(
        r'\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[0-9a-fA-F]{4}|u[0-9a-fA-F]{4}|["\\/bfnrt])', one, text
    )


#: How a reader may decode what it reads, each tried when the text has what it decodes.
DECODERS: tuple[tuple[str, Callable[[str], str]], ...] = (
    # Not for a "+" alone: the patterns read "+" as a space already (a card grouped with it,
    # a given secret with a space in it), and "+00:00" is on every log line.
    ("%", unquote_plus),
    ("%", unquote),
    ("\\", json_unescape),
)
#: Decoders applied one after the other: 2 finds a secret percent-encoded then escaped.
DECODING_DEPTH = 2


def decoded_views(text: str, depth: int = DECODING_DEPTH) -> list[str]:
    """``text`` and every text that up to ``depth`` decoders in a row make of it."""
    views = {text: None}
    layer = [text]
    for _ in range(depth):
        layer = [
            decode(view)
            for view in layer
            for triggers, decode in DECODERS
            if any(char in view for char in triggers)
        ]
        layer = [view for view in layer if view not in views]
        views.update(dict.fromkeys(layer))
    return list(views)


def _secret_forms(secret: str) -> list[str]:
    """The secret and its form-decoded (or form-encoded) spelling."""
    return list(dict.fromkeys([secret, secret.replace("+", " "), secret.replace(" ", "+")]))


def scan_text(
    text: str,
    where: str,
    *,
    patterns: Sequence[Pattern] = PATTERNS,
    extra_secrets: Sequence[str] = (),
) -> list[Finding]:
    """Every match of ``patterns`` (and of the literal ``extra_secrets``) in ``text``, as
    stored or decoded (see :func:`decoded_views`), once per line and kind.

    ``where`` names the source; the line number is appended for multi-line texts.
    """
    found: list[Finding] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        place = f"{where}:{number}" if len(lines) > 1 else where
        seen: set[tuple[str, str]] = set()
        for view in decoded_views(line):
            for finding in _matches(view, place, patterns, extra_secrets):
                if (finding.pattern, finding.masked) not in seen:
                    seen.add((finding.pattern, finding.masked))
                    found.append(finding)
    return found


def _matches(
    text: str, place: str, patterns: Sequence[Pattern], extra_secrets: Sequence[str]
) -> Iterator[Finding]:
    without_uuids = _UUID.sub("<uuid>", text)  # an all-digit UUID part is not a card
    for pattern in patterns:
        for match in pattern.regex.finditer(without_uuids):
            if pattern.check(match.group(0)):
                yield Finding(place, pattern.name, mask(match.group(0)))
    for secret in extra_secrets:
        if len(secret) >= 4 and any(form in text for form in _secret_forms(secret)):
            yield Finding(place, "given secret", mask(secret))


def log_files(directory: Path, suffixes: Sequence[str] = LOG_SUFFIXES) -> list[Path]:
    """Every file under ``directory`` whose name ends with one of ``suffixes``."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and path.name.endswith(tuple(suffixes))
    )


def scan_files(paths: Iterable[Path], *, extra_secrets: Sequence[str] = ()) -> list[Finding]:
    found: list[Finding] = []
    for path in paths:
        text = path.read_bytes().decode("utf-8", "replace")
        found.extend(scan_text(text, str(path), extra_secrets=extra_secrets))
    return found


def _plain(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Decimal | int | float | bool | datetime | date):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def dump_database(url: str) -> Iterator[tuple[str, str]]:
    """``(where, text)`` for every row of every table in the database, one row at a time.

    Tables are read from the database itself, not from the models, so a table that no
    model describes is dumped too.
    """
    engine = get_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            result = conn.execute(select(table)).yield_per(1000)
            for number, row in enumerate(result, start=1):
                text = " | ".join(f"{key}={_plain(value)}" for key, value in row._mapping.items())
                yield f"table {table.name} row {number}", text


def scan_database(url: str, *, extra_secrets: Sequence[str] = ()) -> list[Finding]:
    found: list[Finding] = []
    for where, text in dump_database(url):
        found.extend(scan_text(text, where, extra_secrets=extra_secrets))
    return found


def scan(
    directories: Iterable[Path] = (),
    database_url: str | None = None,
    *,
    extra_secrets: Sequence[str] = (),
) -> list[Finding]:
    """Scan the log files of ``directories`` and, when given, every table of the database."""
    found: list[Finding] = []
    for directory in directories:
        found.extend(scan_files(log_files(directory), extra_secrets=extra_secrets))
    if database_url:
        found.extend(scan_database(database_url, extra_secrets=extra_secrets))
    return found


def report(findings: Sequence[Finding], limit: int = 50) -> str:
    if not findings:
        return "secrets scan: nothing found"
    lines = [f"secrets scan: {len(findings)} finding(s)"]
    lines += [f"  {finding}" for finding in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.scan",
        description="Look for card numbers, CVVs and private keys in log files and a database.",
    )
    parser.add_argument("directories", nargs="*", type=Path, help="folders of log files")
    parser.add_argument("--db", help="database URL whose every table is dumped and scanned")
    args = parser.parse_args(argv)
    findings = scan(args.directories, args.db)
    print(report(findings))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
