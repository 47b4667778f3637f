"""Card numbers, CVVs, expiries and private keys never leak: logs, reprs, errors, raw bodies.

Each test drives real calls (sandbox, echoing and failing loopback servers), gathers every
text a person or a database could see, and searches it for the secrets.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable
from decimal import Decimal

import pytest

from billing.errors import BillingError
from billing.gateway import DirectPayment, KlikAndPayClient
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.redact import mask_alias, redact
from billing.sandbox import Sandbox
from tests.fixtures.sandbox import (
    EUR_KEY,
    EUR_MERCHANT,
    LoopbackServer,
    SandboxControl,
    http_answer,
)

CARD = "4012888888881881"
OTHER_CARD = "5555555555554444"
CVV = "111"
EXP_YEAR = "2093"
IP = "192.0.2.10"
SECRET_PATTERNS = [
    re.compile(re.escape(CARD)),
    re.compile(re.escape(OTHER_CARD)),
    re.compile(r"4012\D{0,2}8888\D{0,2}8888\D{0,2}1881"),
    re.compile(r"(?i)cvv\W{0,4}111"),
    re.compile(r"(?i)(expannee|exp_year)\W{0,4}" + EXP_YEAR),
    re.compile(re.escape(EUR_KEY)),
]


def assert_clean(*texts: object) -> None:
    for text in texts:
        rendered = text if isinstance(text, str) else repr(text)
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(rendered), f"{pattern.pattern!r} leaked in {rendered[:300]!r}"


def outcome_texts(outcome: Outcome) -> list[str]:
    return [
        repr(outcome),
        str(outcome),
        outcome.raw,
        outcome.message,
        outcome.code,
        getattr(outcome, "reason", ""),
    ]


def card_payment(card: str = CARD, cvv: str = CVV, **extra: object) -> DirectPayment:
    return DirectPayment(
        merchant_id=EUR_MERCHANT,
        ip=IP,
        last_name="Durand",
        first_name="Paul",
        address="2 place",
        postcode="69001",
        city="Lyon",
        country="FR",
        email="paul@example.org",
        phone="0400000000",
        amount=Decimal("12.00"),
        card_number=card,
        exp_month="11",
        exp_year=EXP_YEAR,
        cvv=cvv,
        **extra,  # type: ignore[arg-type]
    )


def test_direct_payment_repr_and_str_hide_the_card() -> None:
    payment = card_payment(card="4012 8888 8888 1881")
    for text in (repr(payment), str(payment), f"{payment}", f"{payment!r}"):
        assert "…1881" in text
        assert_clean(text)
        assert (
            "cvv" not in text.lower()
            and EXP_YEAR not in text
            and "11" not in text.split("card=")[1]
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("card_number", CARD + "9999"),
        ("card_number", CARD[:-1] + "x"),
        ("cvv", "11a1"),
        ("cvv", "1"),
        ("exp_month", "1" + CVV),
        ("exp_year", EXP_YEAR + "1"),
    ],
)
def test_validation_errors_never_show_secret_values(field: str, value: str) -> None:
    values = {"card": CARD, "cvv": CVV}
    with pytest.raises(BillingError) as caught:
        if field == "card_number":
            card_payment(card=value)
        elif field == "cvv":
            card_payment(cvv=value)
        else:
            DirectPayment(**{**card_payment().__dict__, field: value})
    message = str(caught.value)
    assert message.startswith(f"{field}:")
    assert value not in message and values["card"] not in message
    assert_clean(message, repr(caught.value))


def test_whole_flow_logs_outcomes_and_sandbox_state_are_clean(
    sandbox: Sandbox, sandbox_control: SandboxControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    client = KlikAndPayClient(sandbox.url, connect_timeout=1, read_timeout=0.5)

    approved = client.direct_payment(card_payment())
    assert isinstance(approved, Approved) and approved.alias
    alias = approved.alias
    outcomes: list[Outcome] = [
        approved,
        client.direct_payment(card_payment(cvv="123")),
        client.direct_payment(card_payment(card=OTHER_CARD, deferred=True)),
    ]
    charge = dict(
        merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("3"), private_key=EUR_KEY
    )
    outcomes.append(client.duplicate(**charge))  # type: ignore[arg-type]
    outcomes.append(client.duplicate(**{**charge, "private_key": "wrong-" + EUR_KEY}))  # type: ignore[arg-type]
    for behaviour in (
        {"decline": "05"},
        {"garbage": True},
        {"error_500_after_record": True},
        {"drop_after_record": True},
        {"slow": 1.0},
        {"unavailable": 1},
    ):
        sandbox_control.set_behaviour(alias, **behaviour)
        outcomes.append(client.duplicate(**charge))  # type: ignore[arg-type]
    sandbox_control.clear_behaviours()
    auth = client.duplicate(**charge, deferred=True)  # type: ignore[arg-type]
    assert isinstance(auth, Approved)
    outcomes.append(
        client.validate_deferred(
            merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("1"), private_key=EUR_KEY
        )
    )
    outcomes.append(
        client.cancel(
            merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("1"), private_key=EUR_KEY
        )
    )
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = KlikAndPayClient(f"http://127.0.0.1:{closed.getsockname()[1]}")
        outcomes.append(refused.duplicate(**charge))  # type: ignore[arg-type]
        outcomes.append(refused.direct_payment(card_payment()))
    for bad in ({"amount": Decimal("0")}, {"ip": "x"}, {"alias": ""}):
        with pytest.raises(BillingError) as caught:
            client.duplicate(**{**charge, **bad})  # type: ignore[arg-type]
        seen += [str(caught.value), repr(caught.value)]

    kinds = {type(o) for o in outcomes}
    assert kinds == {Approved, Declined, NotSent, Unknown}
    for outcome in outcomes:
        seen += outcome_texts(outcome)
    # Sandbox state as a person would read it through the control API.
    seen.append(json.dumps(sandbox_control.calls()))
    seen.append(json.dumps(sandbox_control.totals()))
    seen.append(json.dumps(sandbox_control.transaction(approved.tx)))
    seen.append(caplog.text)
    seen += [record.getMessage() for record in caplog.records]
    assert_clean(*seen)
    # The alias is only ever logged masked.
    gateway_lines = [r.getMessage() for r in caplog.records if r.name == "billing.gateway"]
    assert gateway_lines and all(alias not in line for line in gateway_lines)
    assert any(mask_alias(alias) in line for line in gateway_lines)


def test_one_log_line_per_call_with_what_a_person_needs(
    sandbox: Sandbox, sandbox_control: SandboxControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="billing.gateway")
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, decline="51")
    KlikAndPayClient(sandbox.url).duplicate(
        merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("3"), private_key=EUR_KEY
    )
    [record] = [r for r in caplog.records if r.name == "billing.gateway"]
    line = record.getMessage()
    for part in (
        "duplicate.pl",
        f"merchant={EUR_MERCHANT}",
        f"alias={mask_alias(alias)}",
        "outcome=declined",
        "code=51",
        "duration_ms=",
    ):
        assert part in line
    assert alias not in line and EUR_KEY not in line


def _echo(conn: socket.socket, request: bytes) -> None:
    """A gateway that echoes the whole request (headers and form) in its answer."""
    echoed = request.decode("latin-1").replace("\r\n", "\n")
    body = "RESPONSE=05&MESSAGE=" + request.split(b"\r\n\r\n", 1)[1].decode() + "\n" + echoed
    data = body.encode("latin-1")
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )


def _echo_json(conn: socket.socket, request: bytes) -> None:
    from urllib.parse import parse_qsl

    form = dict(parse_qsl(request.split(b"\r\n\r\n", 1)[1].decode()))
    data = json.dumps({"RESPONSE": "00", "TX": "9", "ECHO": form}).encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )


@pytest.mark.parametrize("respond", [_echo, _echo_json])
def test_echoed_secrets_are_scrubbed_from_raw_and_message(
    respond: Callable[[socket.socket, bytes], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with LoopbackServer(respond) as server:
        client = KlikAndPayClient(server.url)
        direct = client.direct_payment(card_payment())
        dup = client.duplicate(
            merchant_id=EUR_MERCHANT,
            alias="alias-0001",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
        cancel = client.cancel(
            merchant_id=EUR_MERCHANT, tx="1", amount=Decimal("1"), private_key=EUR_KEY
        )
    assert CARD.encode() in server.requests[0]  # the secret really was echoed back
    for outcome in (direct, dup, cancel):
        assert not isinstance(outcome, Unknown | NotSent), outcome
        assert outcome.raw  # the answer is kept for a person to read...
        assert_clean(*outcome_texts(outcome))  # ...without the secrets
    assert_clean(caplog.text)


def test_secret_sent_under_an_unusual_name_is_scrubbed_by_value() -> None:
    key = "k3y-" + "z" * 20

    def leak(conn: socket.socket, request: bytes) -> None:
        data = f"RESPONSE=AUTH&MESSAGE=bad key {key}&DEBUG=key was {key}".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )

    with LoopbackServer(leak) as server:
        outcome = KlikAndPayClient(server.url).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="alias-0001",
            ip=IP,
            amount=Decimal("1"),
            private_key=key,
        )
    assert isinstance(outcome, Declined)
    assert key not in outcome.raw and key not in outcome.message


def test_client_repr_has_no_secret() -> None:
    client = KlikAndPayClient("http://127.0.0.1:9")
    assert_clean(repr(client))


# --- every encoding a secret can take on the way (issue 14, item 5) ----------------------

#: A private key made of the characters every encoding changes.
ODD_KEY = 'Zk9+ab/Q1w==&x%41\\y"z'


def _encodings(secret: str) -> list[str]:
    """Forms a secret can take in a body: as sent, form-encoded, percent-encoded (either
    case), form-decoded, JSON-escaped."""
    from urllib.parse import quote, quote_plus

    def lower_hex(text: str) -> str:
        return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)

    json_escaped = json.dumps(secret)[1:-1].replace("/", "\\/")
    return [
        secret,
        secret.replace("+", " "),
        quote(secret, safe=""),
        lower_hex(quote(secret, safe="")),
        quote_plus(secret, safe=""),
        lower_hex(quote_plus(secret, safe="")),
        quote(secret),
        json_escaped,
        json.dumps(secret, ensure_ascii=True)[1:-1].replace("+", "\\u002b"),
    ]


def _decoded(text: str) -> list[str]:
    """``text`` as each decoder a reader might apply would show it."""
    from urllib.parse import unquote, unquote_plus

    def json_unescape(value: str) -> str:
        return re.sub(
            r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])',
            lambda m: json.loads(f'"\\{m.group(1)}"'),
            value,
        )

    views = [text, unquote(text), unquote_plus(text), json_unescape(text)]
    return [*views, unquote_plus(json_unescape(text)), json_unescape(unquote_plus(text))]


def assert_no_form_of(secret: str, *texts: str) -> None:
    forms = {secret, secret.replace("+", " ")}
    for text in texts:
        for form in _encodings(secret):
            assert form not in text, f"{form!r} leaked in {text[:300]!r}"
        for view in _decoded(text):
            for form in forms:
                assert form not in view, f"{form!r} leaked (decoded) in {text[:300]!r}"


def _declined_by(body: str, private_key: str = EUR_KEY) -> Outcome:
    """A charge answered with ``body`` by a gateway on loopback."""
    with LoopbackServer(http_answer(200, body)) as server:
        outcome = KlikAndPayClient(server.url).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="alias-0001",
            ip=IP,
            amount=Decimal("1"),
            private_key=private_key,
        )
    assert isinstance(outcome, Declined), outcome
    return outcome


@pytest.mark.parametrize("shape", ["form", "json"])
def test_a_private_key_echoed_in_any_encoding_is_scrubbed(
    shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ``+`` was decoded to a space before the key was searched for, and the raw
    body kept its percent-encoded (either case) and JSON-escaped forms."""
    caplog.set_level(logging.DEBUG)
    forms = _encodings(ODD_KEY)
    if shape == "form":
        from urllib.parse import quote

        body = "RESPONSE=05&MESSAGE=" + quote(f"bad key {ODD_KEY}") + "&MESSAGE2=" + "|".join(forms)
        body += "&RAW=" + ODD_KEY.replace("+", "%2B")
    else:
        body = json.dumps({"RESPONSE": "05", "MESSAGE": f"bad key {ODD_KEY}", "ECHO": forms})
    outcome = _declined_by(body, ODD_KEY)
    assert outcome.raw and "[redacted]" in outcome.raw
    assert_no_form_of(ODD_KEY, *outcome_texts(outcome), caplog.text)


@pytest.mark.parametrize(
    "grouped",
    [
        "4012%208888%208888%201881",
        "4012+8888+8888+1881",
        "4012.8888.8888.1881",
        "4012%2D8888%2d8888%2D1881",
        "4012\\u00208888\\u00208888\\u00201881",
        "4012 - 8888 - 8888 - 1881",
        "401288%20888888%201881",
    ],
)
def test_a_card_number_in_any_grouping_is_scrubbed_from_the_raw_body(grouped: str) -> None:
    outcome = _declined_by(f"RESPONSE=05&MESSAGE=refus&ECHO=card%20{grouped}%20end")
    assert "[redacted-pan]" in outcome.raw
    for view in _decoded(outcome.raw):
        assert CARD not in re.sub(r"(?<=\d)[ .+\-]{1,3}(?=\d)", "", view), outcome.raw


@pytest.mark.parametrize(
    "text",
    [
        "Task billing.charge[1df905fe-4939-4424-ad70-3ec24e50fa9d] succeeded in "
        "0.012345678901234567s: 'done'",
        "2030-01-15 09:00:00.123456+00:00 at 2030-01-15T09:00:00Z",
        "alias=ab12…78 tx=100000001 amount=29.90 MONTANT=1.00",
        "epoch 1715000000.1234567890123 and 1.4012888888881881",
        "counter 1234567890123 is not Luhn-valid",
        "RESPONSE=00&TX=123456789&MESSAGE=Paiement%20accept%C3%A9",
    ],
)
def test_what_logs_and_answers_are_full_of_is_left_alone(text: str) -> None:
    from billing.redact import redact

    assert redact(text, secrets=(EUR_KEY,)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("NUMCARTE%3D4012&CVV%3D111&x=1", "NUMCARTE%3D[redacted]&CVV%3D[redacted]&x=1"),
        ('{"Cvv" : "111", "a": 1}', '{"Cvv" : "[redacted]", "a": 1}'),
        ('{"m": "{\\"cvv\\": \\"111\\"}"}', '{"m": "{\\"cvv\\": \\"[redacted]\\"}"}'),
        ('"PRIVATE_KEY": "ab\\\\cd"}', '"PRIVATE_KEY": "[redacted]"}'),
        (
            "{'cvv': '987', 'private_key': 'a b'}",
            "{'cvv': '[redacted]', 'private_key': '[redacted]'}",
        ),
        ("paid 29.90 4012 8888 8888 1881.", "paid 29.90 [redacted-pan]."),
        ("%34%30%31%32888888881881", "[redacted-pan]"),
        ("x4012888888881881y", "x[redacted-pan]y"),
    ],
)
def test_fields_and_card_numbers_in_every_shape(text: str, expected: str) -> None:
    from billing.redact import redact

    assert redact(text) == expected


def test_an_alias_is_masked_in_any_encoding_and_url_tokens_are_secrets() -> None:
    from billing.redact import mask_aliases, secrets_in_url

    alias = "ab+cd/ef=12"
    text = "ALIAS=ab%2Bcd%2Fef%3D12 then ab cd/ef=12 then ab+cd\\/ef=12"
    assert mask_aliases(text, [alias]) == "ALIAS=ab+c…12 then ab+c…12 then ab+c…12"
    url = "https://u:pa55word@shop.example/h?token=a%2Bb%3D&x=1&sig=zzzz"
    assert secrets_in_url(url) == ("pa55word", "a%2Bb%3D", "a+b=", "zzzz")


def test_a_hostile_answer_full_of_digits_or_a_huge_alias_is_scrubbed_quickly() -> None:
    """The scrubber runs on every answer: one built to make it slow must not stall a
    worker (nor leak what it hides among the digits)."""
    import time

    from billing.answers import classify

    bodies = [
        "RESPONSE=05&MESSAGE=" + ("1 " * 150 + f"{CARD} x ") * 200,
        "RESPONSE=05&MESSAGE=" + "12-" * 21000 + CARD,
        "RESPONSE=05&ALIAS=" + "a+/" * 5000 + "&MESSAGE=x",
    ]
    for body in bodies:
        started = time.monotonic()
        outcome = classify(200, body, secrets=(EUR_KEY, "k" * 300))
        assert time.monotonic() - started < 2.0
        assert CARD not in outcome.raw and CARD not in outcome.message


def test_a_secret_too_long_for_a_pattern_is_still_scrubbed_as_encoders_write_it() -> None:
    from urllib.parse import quote

    from billing.redact import MAX_PATTERN_LENGTH, redact

    key = "Zk9+ab/Q1w==" * (MAX_PATTERN_LENGTH // 12 + 1)
    percent = quote(key, safe="")
    lower = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), percent)
    for form in (key, key.replace("+", " "), percent, lower, json.dumps(key)[1:-1]):
        assert redact(f"x {form} y", secrets=(key,)) == "x [redacted] y"


@pytest.mark.parametrize(
    "sep", ["\u00a0", "\u202f", "\u2009", "\t", "%C2%A0", "\\u00a0", "%E2%80%AF"]
)
def test_a_card_number_grouped_with_french_spaces_is_redacted(sep: str) -> None:
    """French digit grouping writes a card number with no-break (or narrow no-break, or
    thin) spaces: copied from a page into a reason, or echoed in a gateway message, it was
    kept whole (found by review)."""
    text = f"carte 4012{sep}8888{sep}8888{sep}1881 refusée"
    assert "1881" not in redact(text), redact(text)
