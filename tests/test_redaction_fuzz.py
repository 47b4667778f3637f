"""Fuzzing redaction on the real paths: whatever the secret and however it is encoded, no
stored or logged string holds it, in any decoded form, nor a card number in any grouping.

Each property draws a secret from an alphabet of the characters every encoding changes
(``+ / = % & \\ "``, a space, a non-ASCII letter), encodes it (and a Luhn-valid card
number, grouped) with one or two of the encodings a body meets on the way, and sends it
down one real path: the answer classifier (raw body, message), the ledger (rows read back
from a real database), log formatting through ``billing.logs`` (JSON and text lines), and
dead-letter recording (rows read back). What comes out is looked at with the secrets
scan's own decoders (``chaos.scan.decoded_views``, written apart from the redactor) and
scanned with its patterns.

Budget: a few seconds per property in ``make test``; ``make test-slow`` runs each again
with :data:`SLOW_EXAMPLES` examples.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import deadletters, ledger
from billing.answers import classify
from billing.db import session_scope
from billing.logs import configure_logging
from billing.models import ChargeState, DeadLetter, LedgerEntry
from billing.redact import forget_secrets, remember_secrets
from billing.settings import Settings
from chaos.scan import decoded_views, scan_text

#: Examples per property: few in the fast suite, many under the ``slow`` marker.
FAST_EXAMPLES = 25
SLOW_EXAMPLES = 400
BUDGETS = [
    pytest.param(FAST_EXAMPLES, id="fast"),
    pytest.param(SLOW_EXAMPLES, id="slow", marks=pytest.mark.slow),
]
SPECIAL = '+/=%&\\" '
ALPHABET = "abcXYZ0189é" + SPECIAL
#: What every path writes around the values: a secret found only here is not a leak.
BOILERPLATE = (
    "[redacted] [redacted-pan] RESPONSE=05&MESSAGE=&ECHO=&NUMCARTE= Declined(code='05', "
    "message=, soft=True, http_status=200, tx=None, kind='declined', retry_safe=False) "
    "Unknown NotSent HTTP 500 HTTP 503 reason= raw= ab12…78"
)


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def _json(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _json_ascii_slashes(text: str) -> str:
    return json.dumps(text)[1:-1].replace("/", "\\/")


def _json_every_char(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in text)


#: The encodings a value meets on the way (name, function).
ENCODINGS: dict[str, Callable[[str], str]] = {
    "as sent": lambda text: text,
    "form-decoded": lambda text: text.replace("+", " "),
    "percent": lambda text: quote(text, safe=""),
    "percent, lower case": lambda text: _lower_hex(quote(text, safe="")),
    "percent, / kept": quote,
    "form": lambda text: quote_plus(text, safe=""),
    "form, lower case": lambda text: _lower_hex(quote_plus(text, safe="")),
    "json": _json,
    "json, ascii, \\/": _json_ascii_slashes,
    "json, every char": _json_every_char,
}
#: How people group a card number; ``%20`` and the like come from the encodings after.
SEPARATORS = [" ", "-", ".", "+", " - ", "  "]


@dataclass(frozen=True)
class Case:
    """A secret and a card number, each as it travels (encoded one or two times)."""

    secret: str
    secret_sent: str
    pan: str
    pan_sent: str

    def forms(self) -> set[str]:
        """The secret in every decoded form a reader could make of it."""
        found = {self.secret, self.secret.replace("+", " ")}
        found |= {unquote(self.secret), unquote_plus(self.secret)}
        return {form for form in found if len(form) >= 4}


def _luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body + "0")):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


pans = st.integers(12, 18).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n).map(_luhn_complete)
)


@st.composite
def grouped(draw: st.DrawFn, pan: str) -> str:
    """``pan`` split in groups joined by separators; never ``integer.fraction``."""
    cuts = sorted(draw(st.sets(st.integers(1, len(pan) - 1), max_size=5)))
    groups = [pan[a:b] for a, b in zip([0, *cuts], [*cuts, len(pan)], strict=True)]
    joints = [draw(st.sampled_from(SEPARATORS)) for _ in groups[1:]]
    if joints.count(".") and (len(joints) < 2 or set(joints) != {"."}):
        joints = [" " if joint == "." else joint for joint in joints]  # decimals, not cards
    return groups[0] + "".join(j + g for j, g in zip(joints, groups[1:], strict=True))


def _encode(draw: st.DrawFn, text: str, layers: int) -> str:
    for name in draw(st.lists(st.sampled_from(sorted(ENCODINGS)), min_size=1, max_size=layers)):
        text = ENCODINGS[name](text)
    return text


@st.composite
def cases(draw: st.DrawFn, layers: int = 2) -> Case:
    secret = draw(st.text(ALPHABET, min_size=8, max_size=24))
    case_secret = secret if any(c in SPECIAL for c in secret) else secret + "+/"
    pan = draw(pans)
    return Case(
        secret=case_secret,
        secret_sent=_encode(draw, case_secret, layers),
        pan=pan,
        pan_sent=_encode(draw, draw(grouped(pan)), layers),
    )


def _usable(case: Case) -> bool:
    """A secret that the boilerplate itself spells is not one a test can look for."""
    return not any(form in BOILERPLATE for form in case.forms())


def leaks(case: Case, *texts: str) -> list[str]:
    """What of ``case`` is still readable in ``texts``, once decoded as a reader would."""
    found: list[str] = []
    for text in texts:
        for view in decoded_views(text):
            digits_joined = re.sub(r"(?<=\d)[ .+\-]{1,3}(?=\d)", "", view)
            if case.pan in digits_joined:
                found.append(f"card number in {text[:200]!r}")
            found += [f"secret {f!r} in {text[:200]!r}" for f in case.forms() if f in view]
        found += [str(f) for f in scan_text(text, "output", extra_secrets=[case.secret])]
    return found


def _run(examples: int, strategy: st.SearchStrategy[Any], check: Callable[..., None]) -> None:
    budget = settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    budget(given(strategy)(check))()


# --- the answer classifier ----------------------------------------------------------------


@st.composite
def answers(draw: st.DrawFn) -> tuple[Case, int, str]:
    """(case, HTTP status, body): the gateway echoes the secret and the card back."""
    shape = draw(st.sampled_from(["form", "json"]))
    case = draw(cases(layers=2 if shape == "form" else 1))  # JSON itself is one more layer
    status = draw(st.sampled_from([200, 500, 503, 302]))
    code = draw(st.sampled_from(["05", "00", "AUTH", "0"]))
    if shape == "form":
        body = f"RESPONSE={code}&MESSAGE=bad+key+{case.secret_sent}&ECHO=card {case.pan_sent}"
    else:
        body = json.dumps(
            {"RESPONSE": code, "MESSAGE": f"bad key {case.secret_sent}", "ECHO": case.pan_sent}
        )
    return case, status, body


@pytest.mark.parametrize("examples", BUDGETS)
def test_the_classifier_keeps_no_secret_in_raw_message_or_repr(examples: int) -> None:
    def check(drawn: tuple[Case, int, str]) -> None:
        case, status, body = drawn
        if not _usable(case):
            return
        outcome = classify(status, body, secrets=(case.secret,))
        texts = [outcome.raw, outcome.message, outcome.code, getattr(outcome, "reason", "")]
        assert not leaks(case, *texts, repr(outcome), str(outcome))

    _run(examples, answers(), check)


# --- the ledger, read back from the database ----------------------------------------------


@pytest.mark.parametrize("examples", BUDGETS)
def test_ledger_rows_keep_no_secret(db_url: str, examples: int) -> None:
    from tests.test_ops import add_charge, add_subscription

    counter = iter(range(10**6))

    def check(drawn: tuple[Case, int, str]) -> None:
        case, status, body = drawn
        if not _usable(case):
            return
        outcome = classify(status, body, secrets=(case.secret,))
        with session_scope(db_url) as session:
            sub = add_subscription(session, f"fuzz-{next(counter)}")
            charge = add_charge(session, sub, state=ChargeState.FAILED)
            entry_id = ledger.append_outcome(
                session, charge, sub, outcome, operation="duplicate", actor="fuzz",
                outcome=outcome.kind, secrets=(case.secret,),
                reason=f"gateway said {case.secret_sent}",
            )  # fmt: skip
        with session_scope(db_url) as session:
            row = session.get_one(LedgerEntry, entry_id)
            texts = [row.message or "", row.raw or "", row.code or ""]
        assert not leaks(case, *texts)

    _run(examples, answers(), check)


# --- log lines through the project's handler ----------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[Callable[[str], io.StringIO]]:
    """Configure the project's logging (format of choice) into a fresh stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def configure(log_format: str) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(Settings(log_format=log_format), level="DEBUG", stream=stream)  # type: ignore[arg-type]
        return stream

    yield configure
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.parametrize("examples", BUDGETS)
def test_log_lines_keep_no_secret(log_stream: Callable[[str], io.StringIO], examples: int) -> None:
    log = logging.getLogger("billing.fuzz")

    def check(case: Case, log_format: str) -> None:
        if not _usable(case):
            return
        stream = log_stream(log_format)
        remember_secrets(case.secret)  # as configure_logging does for the plans file's keys
        try:
            log.warning("gateway said %s, card %s", case.secret_sent, case.pan_sent)
            log.info(
                f"inline {case.secret_sent} {case.pan_sent}",
                extra={"note": case.secret_sent, "data": {"args": [case.pan_sent]}},
            )
            try:
                raise ValueError(f"echo {case.secret_sent} {case.pan_sent}")
            except ValueError:
                log.exception("call failed")
        finally:
            forget_secrets(case.secret)
        text = stream.getvalue()
        assert text.count("\n") >= 3
        assert not leaks(case, *text.splitlines())

    _run(examples, st.tuples(cases(), st.sampled_from(["json", "text"])), lambda d: check(*d))


# --- dead letters, read back from the database --------------------------------------------


@pytest.mark.parametrize("examples", BUDGETS)
def test_dead_letters_keep_no_secret(db_url: str, examples: int) -> None:
    def check(case: Case) -> None:
        if not _usable(case):
            return
        remember_secrets(case.secret)  # a key or webhook secret the process knows
        try:
            message = {
                "external_ref": "shop-1", "plan": "monthly", "alias": "ab12cd34ef56gh78",
                "customer_ip": "203.0.113.7", "next_charge_at": "2030-01-15T09:00:00Z",
                "email": f"x{case.pan_sent}@example.org", "card_number": case.pan_sent,
                "note": case.secret_sent,
            }  # fmt: skip
            letter = deadletters.record(
                db_url,
                task_name="billing.add_subscription",
                task_id="t",
                args=[message],
                kwargs={"cvv": "987", "key": case.secret_sent},
                exc=ValueError(f"refused {case.secret_sent} for card {case.pan_sent}"),
                traceback=f"Traceback:\n  ValueError: {case.secret_sent} {case.pan_sent}",
            )
        finally:
            forget_secrets(case.secret)
        with session_scope(db_url) as session:
            row = session.get_one(DeadLetter, letter)
            texts = [row.exc_message, row.traceback, json.dumps(row.args, ensure_ascii=False)]
            strings = _strings(row.args)
        assert not leaks(case, *texts, *strings)
        assert "ab12cd34ef56gh78" not in texts[2]

    _run(examples, cases(), check)


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_the_oracle_sees_what_the_redactor_must_remove() -> None:
    """The checks above can fail: unredacted, each encoding is found."""
    case = Case("Zk9+ab/Q1w==", "", "4111111111111111", "")
    for name, encode in ENCODINGS.items():
        assert leaks(case, f"x {encode(case.secret)} y"), name
        assert leaks(case, f"x {encode('4111 1111%201111-1111')} y"), name
    assert leaks(case, "MESSAGE=Zk9%252Bab%252FQ1w%253D%253D")  # percent-encoded twice
    assert not leaks(case, "x [redacted] [redacted-pan] 29.90 y")
