"""Keeping secrets out of logs, errors, reprs and stored answers, in every encoding.

Card numbers, CVVs, private keys and webhook secrets never leave the request they travel
in; aliases are shown masked. Everything that stores or prints a gateway body, a log
record, a dead letter or a webhook error passes it through :func:`redact`.

Why redaction cannot simply search for the secret as it was sent: on the way back a secret
is transformed. A form body percent-encodes it (``+`` -> ``%2B``, in upper or lower case
depending on who wrote it), a reader form-decodes it (``+`` -> space), a JSON echo escapes
it (``/`` -> ``\\/``, ``"`` -> ``\\"``, any character -> ``\\u002b``), and a hostile answer
may stack two of these. So each secret is looked for as a pattern in which every one of its
characters may appear in any of these encodings, up to :data:`ENCODING_DEPTH` layers deep.
Card numbers are found the same way: digits and the separators people group them with
(space, dash, dot, ``+``), each in any encoding, then checked with Luhn.

A process also knows secrets that no caller passes explicitly (a log record does not know
the private key): :func:`remember_secrets` adds them, and every :func:`redact` call blanks
them too.

Why :func:`redact` has a shortcut: most texts it is given are short and hold nothing (an
answer's code, amount and message, redacted for every charge), and the full scrubber costs
microseconds even then. A text with no ``%``, no backslash, no ``=`` or ``:``, fewer than 13
digits and no plain form of any secret is one that no step of the full scrubber changes
(:func:`_untouched` says why, step by step), so it is returned as it is; any other text is
scrubbed in full. The shortcut decides nothing the full scrubber would not: a test compares
the two on texts holding secrets and card numbers in every encoding.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

#: Request or answer fields whose values are secret, in any case (the gateway's names, and
#: the other names of a card's security code that ``chaos.scan`` looks for).
SECRET_FIELDS = frozenset(
    {"NUMCARTE", "CVV", "PRIVATE_KEY", "EXPMOIS", "EXPANNEE", "CVV2", "CVC", "CVC2", "CRYPTOGRAMME"}
)
#: What replaces a secret (by value or by field name) and a card number.
SECRET_MARK = "[redacted]"
PAN_MARK = "[redacted-pan]"
#: Secrets shorter than this are not searched for by value (a 3-digit CVV would blank every
#: "111" of a text); such values are caught by their field name only.
MIN_SECRET_LENGTH = 4
#: Layers of encoding undone when looking for a secret or a card number: 2 covers a value
#: percent-encoded then JSON-escaped (or the reverse), or percent-encoded twice.
ENCODING_DEPTH = 2
#: Card numbers have 13 to 19 digits (ISO/IEC 7812).
PAN_DIGITS = (13, 19)
#: Separator characters a card number may be grouped with, at most this many in a row: the
#: spaces of French digit grouping (no-break, narrow no-break, thin) and a tab too.
PAN_SEPARATORS = " .-+\u00a0\u202f\u2009\t"
PAN_MAX_SEPARATORS = 3
#: A run of more digit groups than this is blanked whole, and so is every long run of a
#: text with more groups than ``PAN_MAX_TEXT_GROUPS`` (see ``_pan_spans``).
PAN_MAX_GROUPS = 200
PAN_MAX_TEXT_GROUPS = 4000
#: Longer secrets (and aliases, which come from outside) are looked for in the usual
#: encoders' spellings only: a pattern of every mix grows with the secret's length.
MAX_PATTERN_LENGTH = 128
#: Secrets a process remembers (accounts' keys, endpoints' secrets: a few dozen at most);
#: past this the oldest is forgotten, so a leak of calls cannot grow memory for ever.
MAX_REMEMBERED = 256

# --- each character in every encoding ---------------------------------------------------

_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n"}
_JSON_SHORT |= {"\r": "\\r", "\t": "\\t", "'": "\\'"}  # \' : Python's repr of a str
#: A form is a sequence of positions, each a set of characters (hex digits in either case).
_Form = tuple[frozenset[str], ...]


def _hex_digits(value: int, width: int) -> list[frozenset[str]]:
    return [frozenset({c.upper(), c.lower()}) for c in f"{value:0{width}x}"]


def _literal(text: str) -> list[frozenset[str]]:
    return [frozenset({c}) for c in text]


def _forms(ch: str) -> list[_Form]:
    """``ch`` as each single encoding writes it, itself included."""
    forms: list[list[frozenset[str]]] = [[frozenset({ch})]]
    forms.append(
        [
            part
            for byte in ch.encode("utf-8", "surrogatepass")
            for part in [frozenset("%"), *_hex_digits(byte, 2)]
        ]
    )
    code = ord(ch)
    units = (
        [code] if code <= 0xFFFF else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + (code & 0x3FF)]
    )
    forms.append([part for unit in units for part in [*_literal("\\u"), *_hex_digits(unit, 4)]])
    if code < 0x100:
        forms.append([*_literal("\\x"), *_hex_digits(code, 2)])
    if ch in _JSON_SHORT:
        forms.append(_literal(_JSON_SHORT[ch]))
    if ch == "+":  # form-decoded
        forms.append([frozenset(" ")])
    if ch == " ":  # form-encoded
        forms.append([frozenset("+")])
    return [tuple(form) for form in forms]


@functools.lru_cache(maxsize=4096)
def char_pattern(ch: str, depth: int = ENCODING_DEPTH) -> str:
    """A regular expression matching ``ch`` in up to ``depth`` layers of encoding."""
    if depth == 0:
        return re.escape(ch)
    alternatives: dict[str, None] = {}
    for form in _forms(ch):
        parts = []
        for choices in form:
            if len(choices) == 1:
                parts.append(char_pattern(next(iter(choices)), depth - 1))
            elif depth == 1:  # hex digits in either case
                parts.append("[" + "".join(re.escape(c) for c in sorted(choices)) + "]")
            else:
                inner = "|".join(char_pattern(c, depth - 1) for c in sorted(choices))
                parts.append(f"(?:{inner})")
        alternatives["".join(parts)] = None
    return "(?:" + "|".join(alternatives) + ")"


def _json_unescape(text: str) -> str:
    if "\\" not in text:  # every escape begins with a backslash
        return text

    def one(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] == "u":
            return chr(int(escape[1:], 16))
        return {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(escape, escape)

    return re.sub(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])', one, text)


_ESCAPE_DECODE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[\"'\\/bfnrt])")


def _escape_decode(text: str) -> str:
    """Every backslash escape a JSON or Python writer makes (``\u0041``, ``\x41``,
    ``\\/``, ``\"``, ``\'``...) decoded."""

    def one(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] in "ux" and len(escape) > 1:
            return chr(int(escape[1:], 16))
        return {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(escape, escape)

    return _ESCAPE_DECODE.sub(one, text) if "\\" in text else text


def _views(text: str) -> set[str]:
    """``text`` as a reader that decodes it up to two layers would read it (percent-
    encoding in either case, backslash escapes, in either order): where any encoded form of
    a secret reads as the secret itself."""
    once = {text, unquote(text) if "%" in text else text, _escape_decode(text)}
    views = set(once)
    for view in once - {text}:  # the text decoded once is in ``once`` already
        if "%" in view:
            views.add(unquote(view))
        views.add(_escape_decode(view))
    return views


def _plain_forms(secret: str) -> tuple[str, ...]:
    """The secret as it reads once decoded, form-decoded too (``+`` read as a space)."""
    if "%" not in secret and "\\" not in secret and "+" not in secret and " " not in secret:
        # The common case (a key, an alias, a card number), worked out without decoding:
        # nothing to percent-decode, unescape or form-decode, so the one form is the secret.
        return (secret,) if len(secret) >= MIN_SECRET_LENGTH else ()
    return _decoded_plain_forms(secret)


def _decoded_plain_forms(secret: str) -> tuple[str, ...]:
    """:func:`_plain_forms` worked out in full, whatever the secret holds."""
    forms = {
        variant
        for form in decoded_forms(secret)
        for variant in (form, form.replace("+", " "), form.replace(" ", "+"))
    }
    return tuple(form for form in forms if len(form) >= MIN_SECRET_LENGTH)


def _scrubbed(text: str, secrets: Iterable[str], mark: Callable[[str], str]) -> str:
    """``text`` with each secret replaced by ``mark(secret)``, in every encoding.

    The common case costs string operations only: the secret's plain forms are replaced,
    then the text is read decoded (:func:`_views`); only a secret still found there is
    looked for with its full pattern (one per secret, compiled once), since an encoded
    form of it remains.
    """
    wanted = [(secret, _forms_of(secret)) for secret in secrets]
    if not wanted:
        return text
    for secret, forms in wanted:
        for form in forms:
            if form in text:
                text = text.replace(form, mark(secret))
    views = _views(text)
    for secret, forms in wanted:
        if any(form in view for form in forms for view in views):
            # A function, not a replacement string: that would read backslashes as escapes.
            text = _secret_regex(secret).sub(functools.partial(_constant, mark(secret)), text)
    return text


def _constant(value: str, _: re.Match[str]) -> str:
    return value


def decoded_forms(secret: str) -> list[str]:
    """The secret itself and what a reader that decodes it once makes of it."""
    found: dict[str, None] = {}
    for form in (secret, unquote(secret), _json_unescape(secret)):
        if len(form) >= MIN_SECRET_LENGTH:
            found[form] = None
    return list(found)


def _first_chars(ch: str) -> str:
    """Every character an encoding of ``ch`` can start with, as a regex class."""
    starts = {ch, "%", "\\"} | ({" "} if ch == "+" else set()) | ({"+"} if ch == " " else set())
    return "[" + "".join(re.escape(c) for c in sorted(starts)) + "]"


@functools.lru_cache(maxsize=512)
def secret_pattern(secret: str) -> str:
    """A regular expression matching ``secret`` in every form it can take on the way."""
    return "|".join(
        # The lookahead first: at most places of a text it fails at once.
        f"(?={_first_chars(form[0])})" + "".join(char_pattern(ch) for ch in form)
        for form in decoded_forms(secret)
    )


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def fixed_forms(secret: str) -> list[str]:
    """The secret as the usual encoders write it, for secrets too long for a pattern."""
    json_escaped = json.dumps(secret)[1:-1]
    forms = [secret, secret.replace("+", " "), json_escaped, json_escaped.replace("/", "\\/")]
    for encoded in (quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)):
        forms += [encoded, _lower_hex(encoded)]
    return list(dict.fromkeys(forms))


@functools.lru_cache(maxsize=512)
def _secret_regex(secret: str) -> re.Pattern[str]:
    # One pattern per secret, compiled once per process: the set of secrets changes from
    # call to call (a card number is given for one payment), each secret does not.
    if len(secret) > MAX_PATTERN_LENGTH:
        return re.compile("|".join(re.escape(form) for form in fixed_forms(secret)))
    return re.compile(secret_pattern(secret))


# --- secrets a process knows ------------------------------------------------------------

#: Each remembered secret and its plain forms (``_plain_forms``), worked out once: every
#: log line is redacted with all of them, and the forms cost more than the search.
_remembered: dict[str, tuple[str, ...]] = {}
_remembered_lock = threading.Lock()
#: Every plain form of every remembered secret, replaced whole (never changed in place) at
#: each change: what :func:`_untouched` reads without the lock.
_remembered_forms: tuple[str, ...] = ()


def _snapshot_locked() -> None:
    global _remembered_forms
    _remembered_forms = tuple(form for forms in _remembered.values() for form in forms)


def _forms_of(secret: str) -> tuple[str, ...]:
    """``_plain_forms(secret)``, kept for a remembered secret. Others (a card number given
    for one payment) are worked out at each call, so that no cache holds them."""
    forms = _remembered.get(secret)
    return forms if forms is not None else _plain_forms(secret)


def remember_secrets(*values: str | None) -> None:
    """Blank ``values`` in every later :func:`redact` of this process (keys, secrets)."""
    with _remembered_lock:
        for value in values:
            if value and len(value) >= MIN_SECRET_LENGTH:
                _remembered.pop(value, None)
                _remembered[value] = _plain_forms(value)
        while len(_remembered) > MAX_REMEMBERED:
            del _remembered[next(iter(_remembered))]
        _snapshot_locked()


def forget_secrets(*values: str) -> None:
    """Stop blanking ``values`` everywhere (tests; a rotated secret)."""
    with _remembered_lock:
        for value in values:
            _remembered.pop(value, None)
        _snapshot_locked()


def remembered_secrets() -> tuple[str, ...]:
    with _remembered_lock:
        return tuple(_remembered)


# --- card numbers -----------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The check every card number passes (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _alternation(chars: str) -> str:
    """Any of ``chars``: as written (tried first, the common case), or encoded."""
    encoded = "|".join(char_pattern(c) for c in chars)
    return f"(?:[{re.escape(chars)}]|(?=[%\\\\])(?:{encoded}))"


_DIGIT = _alternation("0123456789")
_SEPARATOR = "(?>" + _alternation(PAN_SEPARATORS) + ")"
# Any escape sequence, so that a run never starts inside one ("%20" + "4012..." must not
# read as the digits "204012...").
_ESCAPE = r"%(?:25)?[0-9A-Fa-f]{2}|(?:\\|%5[cC])(?:u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2})"


def _chars_of(ch: str, depth: int) -> frozenset[str]:
    """Every character that ``char_pattern(ch, depth)`` may match."""
    if depth == 0:
        return frozenset(ch)
    found: set[str] = set()
    for form in _forms(ch):
        for choices in form:
            for choice in choices:
                found |= _chars_of(choice, depth - 1)
    return frozenset(found)


#: Every character a run (digits and separators, as written or encoded) or an escape holds.
_RUN_CHARS = frozenset(
    set("%\\ux0123456789abcdefABCDEF").union(
        *(_chars_of(ch, ENCODING_DEPTH) for ch in "0123456789" + PAN_SEPARATORS)
    )
)
_RUN = re.compile(
    # The lookaheads first: most characters of a text can start neither, and say so at
    # once; and a run shorter than a card number is never looked at, so a match is tried
    # only where at least that many characters a run may hold follow (not at a transaction
    # number's digits, nor at most of a hex alias's). Where a match is so skipped, every
    # later start up to the next character no run holds is skipped too, and what the full
    # pattern would have matched there is shorter still: the runs found are the same.
    rf"(?=[0-9%\\])(?=[{re.escape(''.join(sorted(_RUN_CHARS)))}]{{{PAN_DIGITS[0]}}})"
    rf"(?:(?P<run>{_DIGIT}(?:(?:{_SEPARATOR}){{0,{PAN_MAX_SEPARATORS}}}{_DIGIT})*+)|{_ESCAPE})"
)
_ENOUGH_DIGITS = re.compile(rf"(?:\D*\d){{{PAN_DIGITS[0]}}}")
_TOKEN = re.compile(f"(?P<digit>{_DIGIT})|(?P<dot>{char_pattern('.')})|(?P<sep>{_SEPARATOR})")


@dataclass(frozen=True)
class _Group:
    """Digits written together, where they are, and how they join the group before."""

    start: int
    end: int
    digits: str
    #: Joined to the group before by one plain dot: "29.90" is a decimal, not a grouping.
    after_lone_dot: bool


_PLAIN_DIGITS = re.compile(r"\d+")


def _groups(run: str, offset: int) -> list[_Group]:
    """The digit groups of a run that starts at ``offset`` of the text."""
    if "%" not in run and "\\" not in run:  # no encoding: the quick way
        found = list(_PLAIN_DIGITS.finditer(run))
        return [
            _Group(
                offset + m.start(),
                offset + m.end(),
                m.group(),
                k > 0 and run[found[k - 1].end() : m.start()] == ".",
            )
            for k, m in enumerate(found)
        ]
    groups: list[_Group] = []
    start = end = offset
    digits = ""
    lone_dot = False
    joints: list[str] = []  # separators since the last digit
    for token in _TOKEN.finditer(run):
        if token.lastgroup != "digit":
            joints.append(token.group())
            continue
        if joints:
            groups.append(_Group(start, end, digits, lone_dot))
            start, digits, lone_dot = offset + token.start(), "", joints == ["."]
            joints = []
        digits += token.group()[-1]  # every encoding of a digit ends with that digit
        end = offset + token.end()
    groups.append(_Group(start, end, digits, lone_dot))
    return groups


def _decimal_part(groups: list[_Group], i: int, j: int) -> bool:
    """Whether groups ``i``..``j`` belong to decimal numbers rather than a grouping.

    A decimal's part: ``29.90``, ``0.0123456789012345``, or lone dots mixed with other
    joints (``12.00 29.90 100.00``); ``4012.8888.8888.1881`` is a grouping.
    """
    if groups[i].after_lone_dot or (j + 1 < len(groups) and groups[j + 1].after_lone_dot):
        return True
    dots = [group.after_lone_dot for group in groups[i + 1 : j + 1]]
    return any(dots) and not (all(dots) and len(dots) >= 2)


def _card_groups(groups: list[_Group]) -> list[bool]:
    """Which groups are part of a card number: whole groups, 13 to 19 digits, Luhn-valid.

    The Luhn sum is built from the right (each group added on the left keeps the place of
    the digits after it), so each candidate costs only its new group's digits.
    """
    low, high = PAN_DIGITS
    marked = [False] * len(groups)
    for j in range(len(groups)):
        total = length = 0
        for i in range(j, -1, -1):
            for ch in reversed(groups[i].digits):
                value = ord(ch) - 48
                if length % 2:
                    value = value * 2 - 9 if value > 4 else value * 2
                total += value
                length += 1
                if length > high:
                    break
            if length > high:
                break
            if length >= low and total % 10 == 0 and not _decimal_part(groups, i, j):
                marked[i : j + 1] = [True] * (j + 1 - i)
    return marked


def _pan_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each card number in ``text``, in order, never overlapping.

    A run of more than :data:`PAN_MAX_GROUPS` digit groups is blanked whole, and in a text
    of more than :data:`PAN_MAX_TEXT_GROUPS` every run long enough to hold a card is: a
    hostile answer full of digits must not cost seconds to search, and holds no evidence
    worth it.
    """
    if not _ENOUGH_DIGITS.match(text):  # every encoding of a digit holds that digit
        return
    soup: bool | None = None  # counted at the first run long enough: most texts have none
    for match in _RUN.finditer(text):
        run = match.group("run")
        if run is None or len(run) < PAN_DIGITS[0]:
            continue
        if soup is None:
            soup = len(_PLAIN_DIGITS.findall(text)) > PAN_MAX_TEXT_GROUPS
        if soup:
            yield match.start(), match.end()
            continue
        groups = _groups(run, match.start())
        if len(groups) > PAN_MAX_GROUPS:
            yield match.start(), match.end()
            continue
        marked = _card_groups(groups)
        i = 0
        while i < len(groups):
            if not marked[i]:
                i += 1
                continue
            j = i
            while j + 1 < len(groups) and marked[j + 1]:
                j += 1
            yield groups[i].start, groups[j].end
            i = j + 1


def _redact_pans(text: str) -> str:
    pieces: list[str] = []
    last = 0
    for start, end in _pan_spans(text):
        pieces += [text[last:start], PAN_MARK]
        last = end
    if not pieces:
        return text
    return "".join(pieces) + text[last:]


# --- secret fields ----------------------------------------------------------------------

_FIELD = re.compile(
    # The lookahead first: a name can start only with one of the names' first letters (in
    # either case, as the names themselves match), which most characters of a text are not.
    "(?=[" + "".join(sorted({name[0] for name in SECRET_FIELDS})) + "])"
    r"(?P<key>\b(?:"
    + "|".join(sorted(SECRET_FIELDS))
    # Quotes around the key and the value: JSON's, Python's (a dict's repr, as Celery logs
    # a task's arguments), escaped (JSON inside a JSON string); a percent-encoded = or :.
    + r")\b)(?P<sep>(?:\\*[\"'])?\s*(?:[=:]|%3[dDaA])\s*(?:\\*[\"'])?)"
    # The value runs to the next delimiter, over escapes except an escaped quote.
    + r"(?P<val>(?:\\[^\"'\n]|[^&\n\"',}\\])*)",
    re.IGNORECASE,
)


def _redact_fields(text: str) -> str:
    return _FIELD.sub(lambda m: f"{m.group('key')}{m.group('sep')}{SECRET_MARK}", text)


# --- the scrubber -----------------------------------------------------------------------


def mask_alias(alias: str | None) -> str:
    """``ab12cd34ef9f`` -> ``ab12…9f``: enough for a person to match, not to reuse."""
    if not alias:
        return ""
    if len(alias) <= 6:
        return "…"
    return f"{alias[:4]}…{alias[-2:]}"


def mask_aliases(text: str, aliases: Iterable[str | None]) -> str:
    """``text`` with each alias, in any encoding, replaced by its masked form."""
    found = sorted({a for a in aliases if a and len(a) >= MIN_SECRET_LENGTH}, key=len)
    return _scrubbed(text, reversed(found), mask_alias)


def secrets_in_url(url: str | None) -> tuple[str, ...]:
    """The parts of a URL that are credentials: the password and each query value.

    A shop may put a token in its webhook URL (``/hooks?token=...``); such a URL is stored
    and shown only without them, and they are scrubbed like any secret.
    """
    if not url:
        return ()
    parts = urlsplit(url)
    found = [parts.password or ""]
    for pair in parts.query.split("&"):
        value = pair.partition("=")[2]
        found += [value, unquote_plus(value)]
    return tuple(v for v in dict.fromkeys(found) if len(v) >= MIN_SECRET_LENGTH)


def _usable(secrets: Iterable[str | None]) -> list[str]:
    """Secrets to look for, longest first: one that begins another must not leave the
    other's tail behind."""
    found = {s for s in (*secrets, *remembered_secrets()) if s and len(s) >= MIN_SECRET_LENGTH}
    return sorted(found, key=lambda s: (-len(s), s))


def _untouched(text: str, secrets: Iterable[str | None]) -> bool:
    """Whether :func:`_redact_full` provably returns ``text`` as it is, found cheaply.

    Most texts redacted are short fields that hold nothing (a result code, an amount, a
    message), and the full scrubber costs microseconds even then. Each test below is what
    one step of the full scrubber would find, so that ``True`` means every step would leave
    the text alone (``False`` only means "run the full scrubber"):

    - no ``%`` and no backslash: every encoding :func:`_views` undoes begins with one, so
      the text is its only view, and the secret patterns are searched only where a plain
      form of a secret is found in a view (``_scrubbed``);
    - no plain form (``_forms_of``) of a given or remembered secret in the text: nothing
      is replaced, nothing is found in the one view, so ``_scrubbed`` changes nothing;
    - no ``=`` and no ``:`` (and no ``%``, so no ``%3D`` or ``%3A``): ``_FIELD`` needs one
      between a secret field's name and its value;
    - fewer than 13 digits: ``_pan_spans`` yields nothing (its own first test).
    """
    if "%" in text or "\\" in text or "=" in text or ":" in text:
        return False
    if len(text) >= PAN_DIGITS[0] and _ENOUGH_DIGITS.match(text):
        return False
    for form in _remembered_forms:
        if form in text:
            return False
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            for form in _forms_of(secret):
                if form in text:
                    return False
    return True


def _redact_full(text: str, secrets: Iterable[str | None]) -> str:
    """:func:`redact` without its shortcut (see :func:`_untouched`)."""
    out = _scrubbed(text, _usable(secrets), lambda _secret: SECRET_MARK)
    return _redact_pans(_redact_fields(out))


def redact(text: str | None, *, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with the given and remembered secrets (in every encoding), secret
    fields and card numbers (in any grouping and encoding) blanked."""
    if not text:
        return ""
    secrets = tuple(secrets)  # read twice: once to decide, once to redact
    if _untouched(text, secrets):
        return text
    return _redact_full(text, secrets)


def redact_data(value: Any, *, secrets: Iterable[str | None] = ()) -> Any:
    """``value`` with every string in it (keys too, at any depth) passed to :func:`redact`."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact(value, secrets=secrets)
    if isinstance(value, Mapping):
        return {
            redact_data(k, secrets=secrets): redact_data(v, secrets=secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_data(item, secrets=secrets) for item in value)
    return value
