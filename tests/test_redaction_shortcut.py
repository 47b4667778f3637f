"""The redactor's shortcuts are optimisations, never a change of what is redacted.

``billing.redact`` skips work where it provably finds nothing: a text that no step of the
full scrubber would change is returned as it is (``_untouched``), a secret that no decoding
changes has itself as its only form, and a text's views are not decoded twice. Each
property below draws texts of the kind the classifier redacts (short fields: a code, an
amount, a message) and texts that hold a secret or a card number in the encodings a
hostile answer may use (percent in either case, form, ``+`` for a space, JSON escapes,
``\\x``, two layers), near misses of them (one character off, ``+`` and spaces mixed),
secret field names, Unicode digits, and checks that the shortcut gives exactly what the
full scrubber gives, with given and with remembered secrets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock
from urllib.parse import quote, quote_plus, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import redact as redact_module
from billing.answers import classify
from billing.redact import (
    _decoded_plain_forms,
    _escape_decode,
    _plain_forms,
    _redact_full,
    _untouched,
    _views,
    forget_secrets,
    redact,
    remember_secrets,
)
from tests.test_redaction_fuzz import _lower_hex, pans

EXAMPLES = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
#: Characters every encoding changes, and those the shortcut tests for.
SPECIAL = '+/=%&\\": '
SECRET_ALPHABET = "abcXYZ0189é" + SPECIAL
#: What a short field is made of: letters, digits (ASCII and not: ``\d`` reads both),
#: separators of card numbers, and no character the shortcut refuses.
FIELD_ALPHABET = "abcdeXYZ 0123456789.-+,é٣߁"


#: The encodings a value meets on the way, one or two of them stacked.
ENCODINGS: dict[str, Callable[[str], str]] = {
    "as sent": lambda text: text,
    "form-decoded": lambda text: text.replace("+", " "),
    "spaces as +": lambda text: text.replace(" ", "+"),
    "percent": lambda text: quote(text, safe=""),
    "percent, lower case": lambda text: _lower_hex(quote(text, safe="")),
    "percent, / kept": quote,
    "form": lambda text: quote_plus(text, safe=""),
    "json": lambda text: json.dumps(text, ensure_ascii=False)[1:-1],
    "json, ascii, \\/": lambda text: json.dumps(text)[1:-1].replace("/", "\\/"),
    "json, every char": lambda text: "".join(f"\\u{ord(c):04x}" for c in text),
    "python \\x": lambda text: "".join(f"\\x{ord(c):02x}" if ord(c) < 0x100 else c for c in text),
}


secrets_ = st.text(SECRET_ALPHABET, min_size=1, max_size=14)


@st.composite
def encoded(draw: st.DrawFn, value: str) -> str:
    for name in draw(st.lists(st.sampled_from(sorted(ENCODINGS)), min_size=1, max_size=2)):
        value = ENCODINGS[name](value)
    return value


@st.composite
def near_miss(draw: st.DrawFn, value: str) -> str:
    """``value`` one step off: a character dropped or changed, or ``+``/space mixed."""
    if not value:
        return value
    i = draw(st.integers(0, len(value) - 1))
    how = draw(st.sampled_from(["drop", "change", "swap one +/space"]))
    if how == "drop":
        return value[:i] + value[i + 1 :]
    if how == "change":
        return value[:i] + draw(st.sampled_from(FIELD_ALPHABET)) + value[i + 1 :]
    ch = {"+": " ", " ": "+"}.get(value[i], value[i])
    return value[:i] + ch + value[i + 1 :]


@st.composite
def grouped(draw: st.DrawFn, pan: str) -> str:
    cuts = sorted(draw(st.sets(st.integers(1, len(pan) - 1), max_size=4)))
    groups = [pan[a:b] for a, b in zip([0, *cuts], [*cuts, len(pan)], strict=True)]
    joints = [draw(st.sampled_from([" ", "-", ".", "+", " - "])) for _ in groups[1:]]
    return groups[0] + "".join(j + g for j, g in zip(joints, groups[1:], strict=True))


@st.composite
def texts(draw: st.DrawFn, secrets: list[str]) -> str:
    """A field's text: filler, and pieces of the secrets and of a card number, some encoded,
    some one step off, some plain."""
    pieces = [draw(st.text(FIELD_ALPHABET, max_size=12))]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["filler", "secret", "pan", "field", "near"]))
        if kind == "filler":
            pieces.append(draw(st.text(FIELD_ALPHABET, max_size=12)))
        elif kind == "secret" and secrets:
            pieces.append(draw(encoded(draw(st.sampled_from(secrets)))))
        elif kind == "pan":
            pan = draw(grouped(draw(pans)))
            pieces.append(draw(st.one_of(st.just(pan), encoded(pan), near_miss(pan))))
        elif kind == "field":
            name = draw(st.sampled_from(["CVV", "numcarte", "Private_Key", "MESSAGE"]))
            sep = draw(st.sampled_from(["=", ": ", "%3D", "%3a", '":"', " "]))
            pieces.append(f"{name}{sep}{draw(st.text(FIELD_ALPHABET, max_size=6))}")
        elif secrets:
            pieces.append(draw(near_miss(draw(st.sampled_from(secrets)))))
    return "".join(pieces)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, list[str | None], list[str]]:
    """(text, given secrets, remembered secrets)."""
    given_ = draw(st.lists(st.one_of(st.none(), secrets_), max_size=3))
    remembered = draw(st.lists(secrets_.filter(lambda s: len(s) >= 4), max_size=2))
    text = draw(texts([s for s in (*given_, *remembered) if s]))
    return text, given_, remembered


@contextmanager
def remembering(values: list[str]) -> Iterator[None]:
    fresh = [v for v in values if v not in redact_module.remembered_secrets()]
    remember_secrets(*fresh)
    try:
        yield
    finally:
        forget_secrets(*fresh)


@EXAMPLES
@given(cases())
def test_redact_gives_exactly_what_the_full_scrubber_gives(
    case: tuple[str, list[str | None], list[str]],
) -> None:
    text, given_, remembered = case
    with remembering(remembered):
        assert redact(text, secrets=given_) == _redact_full(text, given_)


@EXAMPLES
@given(cases())
def test_what_the_shortcut_lets_through_the_full_scrubber_leaves_alone(
    case: tuple[str, list[str | None], list[str]],
) -> None:
    text, given_, remembered = case
    with remembering(remembered):
        if _untouched(text, given_):
            assert _redact_full(text, given_) == text


#: Secrets whose encodings hold none of ``% = :`` in most encodings: the shortcut then
#: rests on its other tests alone (the backslash, the forms).
plain_secrets = st.text("abcXYZ0189é+/ &\"'", min_size=4, max_size=12)


@EXAMPLES
@given(
    st.one_of(plain_secrets, secrets_.filter(lambda s: len(s) >= 4)),
    st.sampled_from(sorted(ENCODINGS)),
    st.sampled_from(sorted(ENCODINGS)),
    st.text(FIELD_ALPHABET, max_size=8),
    st.text(FIELD_ALPHABET, max_size=8),
    st.booleans(),
)
def test_a_secret_in_any_encoding_inside_a_short_field_is_redacted_as_in_full(
    secret: str, first: str, second: str, before: str, after: str, remembered: bool
) -> None:
    text = before + ENCODINGS[second](ENCODINGS[first](secret)) + after
    given_ = () if remembered else (secret,)
    with remembering([secret] if remembered else []):
        assert redact(text, secrets=given_) == _redact_full(text, given_)


@EXAMPLES
@given(
    pans.flatmap(grouped),
    st.sampled_from(sorted(ENCODINGS)),
    st.sampled_from(sorted(ENCODINGS)),
    st.text(FIELD_ALPHABET, max_size=8),
)
def test_a_card_number_in_any_encoding_inside_a_short_field_is_redacted_as_in_full(
    pan: str, first: str, second: str, before: str
) -> None:
    text = before + ENCODINGS[second](ENCODINGS[first](pan))
    assert not _untouched(text, ())  # every encoding of a digit keeps that digit
    assert redact(text) == _redact_full(text, ())


@st.composite
def untouched_cases(draw: st.DrawFn) -> tuple[str, list[str | None]]:
    """Texts the shortcut lets through, the hard ones: up to 12 digits, a card number's
    separators, near misses of the secrets (``+`` where the secret has a space), Unicode
    digits."""
    given_ = draw(st.lists(secrets_, min_size=1, max_size=3))
    text = draw(texts(list(given_)))
    return text, list(given_)


@EXAMPLES
@given(untouched_cases())
def test_the_shortcut_is_taken_only_where_nothing_is_found(
    case: tuple[str, list[str | None]],
) -> None:
    text, given_ = case
    if _untouched(text, given_):
        assert _redact_full(text, given_) == text
    else:
        # Not a failure: the full scrubber decides. But a text with none of the characters
        # the shortcut refuses, few digits and no secret in it must take the shortcut.
        plain = not any(c in text for c in "%\\=:")
        few_digits = sum(c.isdecimal() for c in text) < 13
        found = any(form in text for s in given_ if s for form in _plain_forms(s))
        assert not (plain and few_digits and not found)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("00", "bench-key"),
        ("29.90", "bench-key"),
        ("Transaction acceptee", "bench-key"),
        ("4111 1111 1111", "bench-key"),  # 12 digits: no card number
    ],
)
def test_short_fields_without_anything_to_redact_take_the_shortcut(text: str, secret: str) -> None:
    assert _untouched(text, (secret,))
    assert redact(text, secrets=(secret,)) == text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("key bench-key", "bench-key"),  # the secret as sent
        ("key bench key", "bench+key"),  # form-decoded
        ("key bench%2Bkey", "bench+key"),  # percent-encoded
        ("key bench\\u002bkey", "bench+key"),  # JSON-escaped
        ("card 4111 1111 1111 1111", "bench-key"),  # a card number
        ("CVV: 123", "bench-key"),  # a secret field
        ("key ab12", "ab%31%32"),  # a secret that is itself encoded
    ],
)
def test_a_field_holding_a_secret_never_takes_the_shortcut(text: str, secret: str) -> None:
    assert not _untouched(text, (secret,))
    assert redact(text, secrets=(secret,)) != text


def test_a_remembered_secret_in_a_short_field_is_redacted() -> None:
    with remembering(["remembered-key"]):
        assert not _untouched("x remembered-key", ())
        assert redact("x remembered-key") == "x [redacted]"
    assert redact("x remembered-key") == "x remembered-key"  # forgotten, snapshot too


@EXAMPLES
@given(secrets_)
def test_a_secret_that_no_decoding_changes_is_its_only_form(secret: str) -> None:
    assert _plain_forms(secret) == _decoded_plain_forms(secret)


def _views_before(text: str) -> set[str]:
    """``_views`` as it was written before it stopped decoding the text twice."""
    once = {text, unquote(text) if "%" in text else text, _escape_decode(text)}
    views = set(once)
    for view in once:
        if "%" in view:
            views.add(unquote(view))
        views.add(_escape_decode(view))
    return views


@EXAMPLES
@given(st.lists(secrets_, min_size=1, max_size=2).flatmap(texts))
def test_views_are_those_of_decoding_each_once_form_again(text: str) -> None:
    assert _views(text) == _views_before(text)


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, tuple[str, ...]]:
    """An answer whose short fields may hold the secret, a card number or the alias."""
    secret = draw(secrets_.filter(lambda s: len(s) >= 4))
    alias = draw(st.one_of(st.just("3f9a0c12de45b6789a01"), st.just(secret)))
    fields = {
        "RESPONSE": draw(st.sampled_from(["00", "05", "AWAITING", "0", "", "0" * 30]))
        or draw(texts([secret])),
        "TX": draw(st.sampled_from(["123456789", "4111111111111111", "", "<b>"])),
        "ALIAS": alias,
        "MONTANT": draw(st.one_of(st.sampled_from(["29.90", "29,90", ""]), texts([secret]))),
        "MESSAGE": draw(texts([secret, alias])),
    }
    if draw(st.booleans()):
        body = "&".join(f"{k}={quote(v, safe='')}" for k, v in fields.items())
    else:
        body = json.dumps(fields)
    return body, (secret,)


@EXAMPLES
@given(answers(), st.sampled_from([200, 500, 503]))
def test_the_classifier_gives_what_it_gives_without_the_shortcut(
    answer: tuple[str, tuple[str, ...]], status: int
) -> None:
    body, secrets = answer
    fast = classify(status, body, secrets=secrets)
    with mock.patch.object(redact_module, "_untouched", lambda *_: False):
        full = classify(status, body, secrets=secrets)
    assert _fields(fast) == _fields(full)


def _fields(outcome: Any) -> dict[str, Any]:
    return {name: getattr(outcome, name) for name in outcome.__dataclass_fields__}


#: ``_RUN`` as it was before it looked ahead for a card number's length of run characters.
_RUN_BEFORE = re.compile(
    rf"(?=[0-9%\\])(?:(?P<run>{redact_module._DIGIT}(?:(?:{redact_module._SEPARATOR})"
    rf"{{0,{redact_module.PAN_MAX_SEPARATORS}}}{redact_module._DIGIT})*+)|{redact_module._ESCAPE})"
)
#: What runs are made of, and characters no run holds, to cut runs short.
RUN_ALPHABET = "0123456789 .-+%\\uxabcdefABCDEF" + "=&é٣_"


@st.composite
def digit_texts(draw: st.DrawFn) -> str:
    pieces = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["soup", "pan", "pan encoded", "filler"]))
        if kind == "soup":
            pieces.append(draw(st.text(RUN_ALPHABET, max_size=30)))
        elif kind == "pan":
            pieces.append(draw(grouped(draw(pans))))
        elif kind == "pan encoded":
            pieces.append(draw(encoded(draw(grouped(draw(pans))))))
        else:
            pieces.append(draw(st.text(FIELD_ALPHABET, max_size=10)))
    return "".join(pieces)


@EXAMPLES
@given(digit_texts())
def test_card_numbers_are_found_where_they_were_before_the_length_lookahead(text: str) -> None:
    found = list(redact_module._pan_spans(text))
    with mock.patch.object(redact_module, "_RUN", _RUN_BEFORE):
        assert found == list(redact_module._pan_spans(text))


@EXAMPLES
@given(
    st.sampled_from("0123456789" + redact_module.PAN_SEPARATORS).flatmap(
        lambda ch: st.tuples(st.just(ch), encoded(ch))
    )
)
def test_every_character_a_run_may_hold_is_a_run_character(drawn: tuple[str, str]) -> None:
    ch, text = drawn
    assert re.fullmatch(redact_module.char_pattern(ch), text)
    assert set(text) <= redact_module._RUN_CHARS


#: ``_FIELD`` as it was before its first-letter lookahead.
_FIELD_BEFORE = re.compile(
    redact_module._FIELD.pattern.split(")", 1)[1], redact_module._FIELD.flags
)
#: Letters of the names in any case, and characters that case-fold oddly (Kelvin sign, long
#: s, dotted and dotless i, the ﬀ ligature), around the separators of a field.
FIELD_NAME_ALPHABET = "cvnumartepxisoglCVNUMARTEPXISOG_Kſİıﬀ2=:%3Dd\"'\\ &é0123"


@st.composite
def field_texts(draw: st.DrawFn) -> str:
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(redact_module.SECRET_FIELDS)))
            name = "".join(c.lower() if draw(st.booleans()) else c for c in name)
            sep = draw(st.sampled_from(["=", ": ", "%3D", "%3a", '":"', '\\":\\"', " "]))
            pieces.append(f"{name}{sep}")
        pieces.append(draw(st.text(FIELD_NAME_ALPHABET, max_size=12)))
    return "".join(pieces)


@EXAMPLES
@given(field_texts())
def test_secret_fields_are_found_where_they_were_before_the_first_letter_lookahead(
    text: str,
) -> None:
    assert _FIELD_BEFORE.pattern.startswith("(?P<key>")
    mark = redact_module.SECRET_MARK
    before = _FIELD_BEFORE.sub(lambda m: f"{m.group('key')}{m.group('sep')}{mark}", text)
    assert redact_module._redact_fields(text) == before
