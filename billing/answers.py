"""Reading Klik & Pay answers: the one place that knows what a gateway body may look like.

The gateway publishes neither the format of its answers nor its HTTP statuses (see
``gateway-notes.md``), so parsing is tolerant of every plausible shape and the decision is
conservative: whatever does not clearly say "approved" or "declined" is ``Unknown``, because
the card may have been charged, and ``NotSent`` is only claimed where the request provably
never reached a script.

Nothing here raises: a gateway answer is data from outside and a payment worker must end
every call in one of the four outcomes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from billing import defaults, widths
from billing.declines import is_soft
from billing.money import CENT
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.redact import luhn_valid, mask_aliases, redact

#: Characters of a (redacted) body kept in outcomes and so in the ledger: enough to read
#: what the gateway said, not enough to store an HTML error page.
RAW_LIMIT = 2000
#: Characters of a body looked at. Redaction runs over this much before cutting to
#: ``RAW_LIMIT`` so that no secret is cut in half and escapes the patterns.
SCAN_LIMIT = 65536
#: Longest gateway message and code kept: the widths of their columns, cut with a marker.
MESSAGE_LIMIT = widths.MESSAGE
CODE_LIMIT = widths.CODE
#: Longest ``MONTANT`` kept as evidence when it does not read as an amount.
AMOUNT_TEXT_LIMIT = 40

#: What a Klik & Pay transaction number looks like (``BILLING_TX_PATTERN`` overrides it).
#: The guide publishes none; the public integrations store ``NUMXKP`` as a short string of
#: digits (the sandbox's are nine), and the shop-facing examples use digits and dashes.
#: So: 1 to 40 letters, digits, dots, dashes or underscores, starting with a letter or
#: digit. Anything else (markup, spaces, a separator, 100 characters) is not a transaction
#: number but something that came back in its place, and the outcome is unknown.
TX_PATTERN = defaults.TX_PATTERN

APPROVED_CODE = "00"
#: Statuses of the hosted-page flow that are not final: money may still move.
PENDING_CODES = frozenset({"AWAITING"})
#: HTTP statuses a front server answers before any script runs (rate limit, maintenance).
NOT_SENT_STATUSES = frozenset({429, 503})

_KEY = re.compile(r"[A-Z_][A-Z0-9_.\-]*")
_PAIR_SEPARATORS = re.compile(r"&|\r\n|\r|\n")


def _stringify(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | Decimal):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _json_pairs(text: str) -> list[tuple[str, str]] | None:
    try:
        # Decimals keep the exact text of amounts ("29.90" stays "29.90", never a float).
        data = json.loads(text, parse_float=Decimal, parse_constant=str)
    except Exception:  # ValueError, RecursionError on absurd nesting, ...
        return None
    if not isinstance(data, dict):
        return None
    pairs = []
    for key, value in data.items():
        name = str(key).strip().upper()
        if _KEY.fullmatch(name):
            pairs.append((name, _stringify(value).strip()))
    return pairs


def _form_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for piece in _PAIR_SEPARATORS.split(text):
        if "=" not in piece:
            continue
        key, _, value = piece.partition("=")
        name = unquote(key).strip().upper()
        if not _KEY.fullmatch(name):
            continue
        # Only %XX is decoded, not "+": an alias may contain "+", a space never.
        pairs.append((name, unquote(value).strip()))
    return pairs


def _pairs(body: str) -> list[tuple[str, str]]:
    if not isinstance(body, str):
        return []
    text = body[:SCAN_LIMIT].lstrip("\ufeff").strip()
    if text.startswith("{"):
        from_json = _json_pairs(text)
        if from_json is not None:
            return from_json
    return _form_pairs(text)


def parse_body(body: str) -> dict[str, str]:
    """Return the ``KEY -> value`` pairs of an answer; ``{}`` when there are none.

    Accepted shapes: ``KEY=VALUE`` pairs joined by ``&`` or by line breaks, keys in any case
    (returned upper-case), blanks around keys and values, percent-encoding, and a JSON
    object (values as strings, nested values as JSON text). ``+`` is kept as is because an
    alias may contain it. When a key repeats, the first value wins. Never raises.
    """
    try:
        result: dict[str, str] = {}
        for key, value in _pairs(body):
            result.setdefault(key, value)
        return result
    except Exception:
        return {}


#: Largest amount an answer may carry (the money columns hold 12 digits, 2 after the point).
MAX_ANSWERED_AMOUNT = Decimal("9999999999.99")


def parse_amount_lenient(text: str | None) -> Decimal | None:
    """``"30"``, ``"29.90"``, ``"29,90"`` -> a two-place Decimal; anything else (``1E+30``,
    ``NaN``, ``-5``, ``12.345``) -> None. Never raises."""
    if not text or len(text) > AMOUNT_TEXT_LIMIT:
        return None
    candidate = text.strip().replace(" ", "")
    if "," in candidate and "." not in candidate:
        candidate = candidate.replace(",", ".")
    try:
        amount = Decimal(candidate)
        if not amount.is_finite() or not 0 <= amount <= MAX_ANSWERED_AMOUNT:
            return None
        cents = amount.quantize(CENT)
    except (InvalidOperation, ValueError):
        return None
    return cents if cents == amount else None


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    # One scrubber for every shape: form, JSON, escaped JSON, any encoding of the secrets.
    return redact(text, secrets=secrets)


def _raw(body: str, secrets: tuple[str, ...], alias: str | None) -> str:
    """The body as stored: scrubbed whole (up to ``SCAN_LIMIT``) before it is cut."""
    if not isinstance(body, str):
        return ""
    cleaned = mask_aliases(_scrub(body[:SCAN_LIMIT], secrets), (alias,))
    return cleaned[:RAW_LIMIT]


def _clean(value: str, secrets: tuple[str, ...], limit: int) -> str:
    return widths.fit(_scrub(value, secrets), limit) or ""


def tx_problem(tx: str, pattern: re.Pattern[str]) -> str | None:
    """Why ``tx`` cannot be a transaction number, or None when it has the shape of one.

    A run of 13 to 19 digits passing the Luhn check is refused whatever the pattern says:
    it is more likely a card number echoed in the TX's place than a transaction number,
    and storing it would store a card number.
    """
    if len(tx) > widths.TX:  # whatever the pattern allows: it could not be stored whole
        return f"its transaction number is longer than {widths.TX} characters"
    if not pattern.fullmatch(tx):
        return "its transaction number does not have a transaction number's shape"
    if tx.isdigit() and 13 <= len(tx) <= 19 and luhn_valid(tx):
        return "its transaction number looks like a card number"
    return None


#: What a result code looks like: two to twenty letters, digits or underscores. Anything else
#: ("0", an empty value, punctuation) is an answer that cannot be trusted, so UNKNOWN.
DECLINE_CODE_SHAPE = re.compile(r"[A-Za-z0-9_]{2,20}")


def classify(
    http_status: int,
    body: str,
    *,
    decline_overrides: Mapping[str, str] | None = None,
    secrets: tuple[str, ...] = (),
    tx_pattern: str = TX_PATTERN,
) -> Outcome:
    """Turn an HTTP answer into exactly one outcome. Never raises.

    An answer is classified by its body whatever its HTTP status: a body that carries
    ``RESPONSE`` or a transaction number is the script's answer, even behind a 503 or a 500
    (a front server may rewrite the status of an answer that went through).

    - ``RESPONSE=00`` and a transaction number (``TX`` or ``NUMXKP``) of a transaction
      number's shape (``tx_pattern``): ``Approved``; ``MONTANT`` is kept as answered.
    - another ``RESPONSE``: ``Declined`` (soft or hard from ``billing.declines``), except
      ``AWAITING`` which is not final and so ``Unknown``.
    - a transaction number without ``RESPONSE``, or of the wrong shape, ``RESPONSE=00``
      without one, conflicting repeats of ``RESPONSE``/``TX``, a code that is no code:
      ``Unknown``.
    - no answer in the body: 429 and 503 are ``NotSent``, 2xx and every other status
      ``Unknown``. That a 429 or 503 without an answer never moved money is a judgment,
      not a published fact: they are what a rate limiter or a maintenance page answers
      instead of running a script, and nothing published shows a script answering them
      after moving money. A 5xx may come after the script ran, a 3xx may be a proxy in
      front of a script that ran, a 4xx such as 400 or 404 may come from a script that
      recorded the transaction before failing: a person looks at them.

    ``raw`` is the body with secret fields, card-number-like runs, the given ``secrets``
    and the returned alias removed, cut to ``RAW_LIMIT`` characters.
    """
    try:
        return _classify(http_status, body, decline_overrides, secrets, _compiled(tx_pattern))
    except Exception:
        return Unknown(reason="answer could not be classified", http_status=None, raw="")


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    found = _PATTERNS.get(pattern)
    if found is None:
        found = _PATTERNS[pattern] = re.compile(pattern)
    return found


def _classify(
    http_status: int,
    body: str,
    decline_overrides: Mapping[str, str] | None,
    secrets: tuple[str, ...],
    tx_pattern: re.Pattern[str],
) -> Outcome:
    status = http_status if isinstance(http_status, int) else None
    pairs = _pairs(body)
    fields: dict[str, str] = {}
    conflicts: set[str] = set()
    for key, value in pairs:
        if key in fields and fields[key] != value:
            conflicts.add(key)
        fields.setdefault(key, value)
    alias = fields.get("ALIAS") or None
    raw = _raw(body, secrets, alias)

    if status is None or not 100 <= status <= 599:
        return Unknown(reason=f"invalid HTTP status {http_status!r}", raw=raw)
    code = fields.get("RESPONSE", "")
    tx = fields.get("TX") or fields.get("NUMXKP") or ""
    if not code and not tx:  # no answer of a script in the body
        if status in NOT_SENT_STATUSES:
            return NotSent(reason=f"HTTP {status} without an answer", http_status=status, raw=raw)
        if not 200 <= status <= 299:
            return Unknown(reason=f"HTTP {status}", http_status=status, raw=raw)
        return Unknown(reason="answer without RESPONSE", http_status=status, raw=raw)

    where = "" if 200 <= status <= 299 else f" (in an HTTP {status})"
    if not code:
        return Unknown(
            reason=f"a transaction number without RESPONSE{where}", http_status=status, raw=raw
        )
    if conflicts & {"RESPONSE", "TX", "NUMXKP"}:
        return Unknown(
            reason="answer repeats RESPONSE or TX with different values",
            http_status=status,
            raw=raw,
        )
    message = _clean(fields.get("MESSAGE", "").replace("+", " "), secrets, MESSAGE_LIMIT)
    safe_code = _clean(code, secrets, CODE_LIMIT)  # once, whichever outcome below shows it
    bad_tx = tx_problem(tx, tx_pattern) if tx else None
    if bad_tx is None and tx and _scrub(tx, secrets) != tx:
        # A TX is stored, logged and sent to the shop as it is: one that is (or holds) a
        # private key or a card number is never one.
        bad_tx = "its transaction number carries a secret"
    if bad_tx is not None:
        # The TX is stored, logged and sent to the shop: what is not one is not trusted.
        return Unknown(
            reason=f"answer {safe_code!r}{where}: {bad_tx}",
            http_status=status,
            raw=raw,
            code=safe_code,
            message=message,
        )
    if not DECLINE_CODE_SHAPE.fullmatch(code):
        # "RESPONSE=0" is what an approval cut short looks like: reading it as a decline
        # would let the retry ladder charge the card a second time.
        return Unknown(
            reason=f"RESPONSE {safe_code!r} does not look like a code (a cut answer?)",
            http_status=status,
            raw=raw,
            code=safe_code,
            message=message,
        )
    if code == APPROVED_CODE:
        if not tx:
            return Unknown(
                reason="approved without transaction number",
                http_status=status,
                raw=raw,
                code=safe_code,
                message=message,
            )
        montant = fields.get("MONTANT")
        return Approved(
            tx=tx,
            amount=parse_amount_lenient(montant),
            amount_text=_clean(montant, secrets, AMOUNT_TEXT_LIMIT) if montant else None,
            alias=alias,
            raw=raw,
            http_status=status,
            code=code,
            message=message,
        )
    if code.upper() in PENDING_CODES:
        return Unknown(
            reason=f"answer {safe_code} is not final",
            http_status=status,
            raw=raw,
            code=safe_code,
            message=message,
            tx=tx or None,
        )
    return Declined(
        code=safe_code,
        message=message,
        soft=is_soft(code, decline_overrides),
        raw=raw,
        http_status=status,
        tx=tx or None,
    )


@dataclass(frozen=True)
class Verification:
    """Answer of ``veriftransaction.pl``: whether the gateway knows a transaction."""

    found: bool
    amount: Decimal | None = None
    age: str | None = None
    raw: str = field(default="", repr=False)


def parse_verification(body: str) -> Verification:
    """``VALIDATIONYES|<amount>|<age>`` -> found; any other body -> not found. Never raises."""
    try:
        text = body.strip() if isinstance(body, str) else ""
        parts = text.split("|")
        raw = redact(text[:RAW_LIMIT])
        if parts[0].strip().upper() != "VALIDATIONYES":
            return Verification(found=False, raw=raw)
        amount = parse_amount_lenient(parts[1]) if len(parts) > 1 else None
        age = parts[2].strip() if len(parts) > 2 else None
        return Verification(found=True, amount=amount, age=age, raw=raw)
    except Exception:
        return Verification(found=False)
