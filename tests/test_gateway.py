"""The Klik & Pay client over real loopback HTTP: every script, every outcome class.

Transport failures are produced for real: a bound port nobody listens on (refused), a
listener with a full backlog (connect timeout), servers that drop, reset or cut answers
after reading the request, TLS servers that fail the handshake.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NameResolutionError

from billing import __version__, gateway
from billing.errors import ConfigError, GatewayAnswerError, InvalidInput
from billing.gateway import (
    ISO_COUNTRIES,
    BasketLine,
    DirectPayment,
    KlikAndPayClient,
    encode_basket,
    get_client,
    transport_outcome,
)
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.sandbox import Sandbox
from billing.settings import Settings
from tests.fixtures.sandbox import (
    EUR_KEY,
    EUR_MERCHANT,
    USD_KEY,
    USD_MERCHANT,
    LoopbackServer,
    SandboxControl,
    http_answer,
)

Responder = Callable[[socket.socket, bytes], None]
IP = "203.0.113.7"
VISA = "4012888888881881"
MASTERCARD = "5555555555554444"


def payment(**overrides: object) -> DirectPayment:
    values: dict[str, object] = {
        "merchant_id": EUR_MERCHANT,
        "ip": IP,
        "last_name": "Martin",
        "first_name": "Claire",
        "address": "1 rue de la Paix",
        "postcode": "75002",
        "city": "Paris",
        "country": "FR",
        "email": "claire@example.org",
        "phone": "+33100000000",
        "amount": Decimal("29.90"),
        "card_number": VISA,
        "exp_month": "12",
        "exp_year": str(time.gmtime().tm_year + 3),
        "cvv": "111",
    }
    values.update(overrides)
    return DirectPayment(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[KlikAndPayClient]:
    with KlikAndPayClient(sandbox.url, connect_timeout=2, read_timeout=5) as c:
        yield c


def first_alias(client: KlikAndPayClient, merchant_id: str = EUR_MERCHANT) -> str:
    outcome = client.direct_payment(payment(merchant_id=merchant_id))
    assert isinstance(outcome, Approved)
    assert outcome.alias
    return outcome.alias


# --- direct payment ---------------------------------------------------------------------


@pytest.mark.parametrize("card", [VISA, MASTERCARD, "4012 8888 8888 1881"])
def test_direct_payment_with_test_card_issues_alias(
    client: KlikAndPayClient, sandbox_control: SandboxControl, card: str
) -> None:
    outcome = client.direct_payment(payment(card_number=card))
    assert isinstance(outcome, Approved)
    assert outcome.amount == Decimal("29.90")
    assert outcome.alias and len(outcome.alias) >= 16
    assert outcome.tx
    [call] = sandbox_control.calls(script="server_server")
    assert call["recorded"] and call["result"] == "approved" and call["tx"] == outcome.tx
    assert sandbox_control.totals()[EUR_MERCHANT]["collected"] == "29.90"
    # The alias can be charged again at once.
    again = client.duplicate(
        merchant_id=EUR_MERCHANT,
        alias=outcome.alias,
        ip=IP,
        amount=Decimal("9.99"),
        private_key=EUR_KEY,
    )
    assert isinstance(again, Approved)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"card_number": "4111111111111111"}, "14"),
        ({"cvv": "123"}, "N7"),
        ({"exp_year": "2020", "exp_month": "01"}, "54"),
    ],
)
def test_direct_payment_refusals_are_hard(
    client: KlikAndPayClient, sandbox_control: SandboxControl, overrides: dict[str, str], code: str
) -> None:
    outcome = client.direct_payment(payment(**overrides))
    assert isinstance(outcome, Declined)
    assert outcome.code == code
    assert outcome.soft is False
    assert sandbox_control.calls()[0]["recorded"] is False
    assert sandbox_control.totals() == {}


def test_direct_payment_unknown_merchant_is_auth(client: KlikAndPayClient) -> None:
    outcome = client.direct_payment(payment(merchant_id="999"))
    assert isinstance(outcome, Declined) and outcome.code == "AUTH" and not outcome.soft


def test_deferred_direct_payment_is_an_authorization(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    outcome = client.direct_payment(payment(deferred=True, amount=Decimal("50")))
    assert isinstance(outcome, Approved)
    tx = sandbox_control.transaction(outcome.tx)
    assert tx["status"] == "authorized" and tx["authorized"] == "50.00"
    assert sandbox_control.totals()[EUR_MERCHANT] == {
        "collected": "0.00",
        "authorized": "50.00",
        "refunded": "0.00",
        "released": "0.00",
    }


def test_direct_payment_with_basket(client: KlikAndPayClient) -> None:
    basket = [
        BasketLine("A1", 2, Decimal("10"), "T-shirt"),
        BasketLine("B|2", 1, Decimal("9.9"), "Mug: 50% off"),
    ]
    outcome = client.direct_payment(payment(basket=basket))
    assert isinstance(outcome, Approved)


def test_encode_basket_escapes_separators() -> None:
    lines = [
        BasketLine("A1", 2, Decimal("10"), "T-shirt"),
        BasketLine("B|2", 1, Decimal("9.9"), "Mug: 50% off"),
    ]
    assert encode_basket(lines) == (
        "REF:A1%Q:2%PRIX:10.00%PROD:T-shirt|REF:B%7C2%Q:1%PRIX:9.90%PROD:Mug%3A 50%25 off|"
    )


# --- duplicate --------------------------------------------------------------------------


def test_duplicate_approved(client: KlikAndPayClient, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    outcome = client.duplicate(
        merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("19.9"), private_key=EUR_KEY
    )
    assert isinstance(outcome, Approved)
    assert outcome.amount == Decimal("19.90")
    [call] = sandbox_control.calls(alias=alias)
    assert call == {
        **call,
        "script": "duplicate",
        "amount": "19.90",
        "deferred": False,
        "recorded": True,
        "code": "00",
        "merchant_id": EUR_MERCHANT,
    }
    assert sandbox_control.transaction(outcome.tx)["status"] == "collected"


def test_duplicate_soft_decline_then_normal(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, decline="51", times=1)
    args = {
        "merchant_id": EUR_MERCHANT,
        "alias": alias,
        "ip": IP,
        "amount": Decimal("5"),
        "private_key": EUR_KEY,
    }
    first = client.duplicate(**args)  # type: ignore[arg-type]
    assert isinstance(first, Declined) and first.code == "51" and first.soft
    assert isinstance(client.duplicate(**args), Approved)  # type: ignore[arg-type]
    assert [c["recorded"] for c in sandbox_control.calls(alias=alias)] == [False, True]


def test_duplicate_hard_decline(client: KlikAndPayClient, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, decline="54")
    for _ in range(2):
        outcome = client.duplicate(
            merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("5"), private_key=EUR_KEY
        )
        assert isinstance(outcome, Declined) and outcome.code == "54" and not outcome.soft


def test_decline_overrides_of_the_client(sandbox: Sandbox, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, decline="05")
    with KlikAndPayClient(sandbox.url, decline_overrides={"05": "hard"}) as strict:
        outcome = strict.duplicate(
            merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("5"), private_key=EUR_KEY
        )
    assert isinstance(outcome, Declined) and outcome.soft is False


@pytest.mark.parametrize(
    ("merchant_id", "key", "alias_of", "code"),
    [
        (EUR_MERCHANT, "wrong-key", EUR_MERCHANT, "AUTH"),
        (EUR_MERCHANT, USD_KEY, EUR_MERCHANT, "AUTH"),
        ("0000000", EUR_KEY, EUR_MERCHANT, "AUTH"),
        (EUR_MERCHANT, EUR_KEY, None, "ALIAS"),
        (USD_MERCHANT, USD_KEY, EUR_MERCHANT, "ALIAS"),
    ],
)
def test_duplicate_refusals(
    client: KlikAndPayClient,
    sandbox_control: SandboxControl,
    merchant_id: str,
    key: str,
    alias_of: str | None,
    code: str,
) -> None:
    alias = sandbox_control.seed_aliases(alias_of, 1)[0] if alias_of else "never-issued-alias"
    outcome = client.duplicate(
        merchant_id=merchant_id, alias=alias, ip=IP, amount=Decimal("5"), private_key=key
    )
    assert isinstance(outcome, Declined)
    assert outcome.code == code and outcome.soft is False
    assert sandbox_control.totals() == {}


# --- deferred and cancellations ---------------------------------------------------------


def test_deferred_authorization_validate_partial_then_refund(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    auth = client.duplicate(
        merchant_id=EUR_MERCHANT,
        alias=alias,
        ip=IP,
        amount=Decimal("50"),
        private_key=EUR_KEY,
        deferred=True,
    )
    assert isinstance(auth, Approved)
    assert sandbox_control.calls(alias=alias)[0]["deferred"] is True
    assert sandbox_control.totals()[EUR_MERCHANT]["authorized"] == "50.00"

    too_much = client.validate_deferred(
        merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("50.01"), private_key=EUR_KEY
    )
    assert isinstance(too_much, Declined) and too_much.code == "AMOUNT"

    valid = client.validate_deferred(
        merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("30"), private_key=EUR_KEY
    )
    assert isinstance(valid, Approved) and valid.tx == auth.tx
    assert valid.amount == Decimal("30.00")
    assert sandbox_control.totals()[EUR_MERCHANT] == {
        "collected": "30.00",
        "authorized": "0.00",
        "refunded": "0.00",
        "released": "20.00",
    }
    again = client.validate_deferred(
        merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("1"), private_key=EUR_KEY
    )
    assert isinstance(again, Declined) and again.code == "STATE"

    refund = client.cancel(
        merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("30"), private_key=EUR_KEY
    )
    assert isinstance(refund, Approved)
    assert sandbox_control.totals()[EUR_MERCHANT]["refunded"] == "30.00"
    assert sandbox_control.transaction(auth.tx)["status"] == "refunded"
    assert [c["script"] for c in sandbox_control.calls(alias=alias)] == [
        "duplicate",
        "validedifferee",
        "validedifferee",
        "validedifferee",
        "cancel_transaction",
    ]


def test_cancel_pending_authorization_in_parts(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    auth = client.duplicate(
        merchant_id=EUR_MERCHANT,
        alias=alias,
        ip=IP,
        amount=Decimal("40"),
        private_key=EUR_KEY,
        deferred=True,
    )
    assert isinstance(auth, Approved)
    kwargs = {"merchant_id": EUR_MERCHANT, "tx": auth.tx, "private_key": EUR_KEY}
    assert isinstance(client.cancel(amount=Decimal("15"), **kwargs), Approved)
    beyond = client.cancel(amount=Decimal("25.01"), **kwargs)
    assert isinstance(beyond, Declined) and beyond.code == "AMOUNT" and not beyond.soft
    assert isinstance(client.cancel(amount=Decimal("25"), **kwargs), Approved)
    assert sandbox_control.transaction(auth.tx)["status"] == "released"
    assert sandbox_control.totals()[EUR_MERCHANT] == {
        "collected": "0.00",
        "authorized": "0.00",
        "refunded": "0.00",
        "released": "40.00",
    }
    late = client.validate_deferred(amount=Decimal("1"), **kwargs)
    assert isinstance(late, Declined) and late.code == "STATE"


def test_partial_refunds_add_up_and_refuse_beyond(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    charge = client.duplicate(
        merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("30"), private_key=EUR_KEY
    )
    assert isinstance(charge, Approved)
    kwargs = {"merchant_id": EUR_MERCHANT, "tx": charge.tx, "private_key": EUR_KEY}
    results = [
        client.cancel(amount=Decimal(a), **kwargs) for a in ("10", "15", "5.01", "5", "0.01")
    ]
    assert [type(r).__name__ for r in results] == [
        "Approved",
        "Approved",
        "Declined",
        "Approved",
        "Declined",
    ]
    assert {r.code for r in results if isinstance(r, Declined)} == {"AMOUNT"}
    assert sandbox_control.totals()[EUR_MERCHANT] == {
        "collected": "30.00",
        "authorized": "0.00",
        "refunded": "30.00",
        "released": "0.00",
    }


def test_cancel_unknown_or_foreign_tx(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(USD_MERCHANT, 1)
    charge = client.duplicate(
        merchant_id=USD_MERCHANT, alias=alias, ip=IP, amount=Decimal("3"), private_key=USD_KEY
    )
    assert isinstance(charge, Approved)
    for tx in ("424242", charge.tx):
        outcome = client.cancel(
            merchant_id=EUR_MERCHANT, tx=tx, amount=Decimal("1"), private_key=EUR_KEY
        )
        assert isinstance(outcome, Declined) and outcome.code == "TX"


def test_verify_transaction(client: KlikAndPayClient, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    charge = client.duplicate(
        merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("30"), private_key=EUR_KEY
    )
    assert isinstance(charge, Approved)
    found = client.verify_transaction(merchant_id=EUR_MERCHANT, tx=charge.tx)
    assert found.found and found.amount == Decimal("30.00") and found.age is not None
    assert not client.verify_transaction(merchant_id=USD_MERCHANT, tx=charge.tx).found
    assert not client.verify_transaction(merchant_id=EUR_MERCHANT, tx="1").found


def test_verify_transaction_without_answer_raises() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
        with pytest.raises(GatewayAnswerError, match="connection refused"):
            KlikAndPayClient(url).verify_transaction(merchant_id="1", tx="2")


# --- NOT SENT ---------------------------------------------------------------------------


def test_503_unavailable_is_not_sent_and_records_nothing(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, unavailable=2)
    args = {
        "merchant_id": EUR_MERCHANT,
        "alias": alias,
        "ip": IP,
        "amount": Decimal("5"),
        "private_key": EUR_KEY,
    }
    outcomes = [client.duplicate(**args) for _ in range(3)]  # type: ignore[arg-type]
    assert [type(o) for o in outcomes] == [NotSent, NotSent, Approved]
    assert outcomes[0].http_status == 503 and outcomes[0].retry_safe
    assert [c["recorded"] for c in sandbox_control.calls(alias=alias)] == [False, False, True]


def test_connection_refused_is_not_sent() -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        client = KlikAndPayClient(f"http://127.0.0.1:{port}", connect_timeout=1)
        outcome = client.duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
    assert isinstance(outcome, NotSent)
    assert outcome.reason == "connection refused"


def test_connect_timeout_is_not_sent() -> None:
    """A listener with a full backlog never completes new TCP handshakes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.05)
        client = KlikAndPayClient(f"http://127.0.0.1:{port}", connect_timeout=0.3)
        started = time.monotonic()
        outcome = client.duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
        assert time.monotonic() - started < 3
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert isinstance(outcome, NotSent)
    assert outcome.reason == "connect timeout"


def test_outage_refuses_connections_then_recovers(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    args = {
        "merchant_id": EUR_MERCHANT,
        "alias": alias,
        "ip": IP,
        "amount": Decimal("5"),
        "private_key": EUR_KEY,
    }
    assert isinstance(client.duplicate(**args), Approved)  # type: ignore[arg-type]  # pooled
    sandbox_control.outage(1.0)
    during = client.duplicate(**args)  # type: ignore[arg-type]
    assert isinstance(during, NotSent) and during.reason == "connection refused"
    with pytest.raises(requests.ConnectionError):
        sandbox_control.calls()
    sandbox_control.wait_ready(10)
    assert isinstance(client.duplicate(**args), Approved)  # type: ignore[arg-type]
    assert [c["recorded"] for c in sandbox_control.calls(alias=alias)] == [True, True]


def test_name_resolution_failure_is_not_sent() -> None:
    # Built by hand: resolving a real name would leave loopback.
    reason = NameResolutionError("gateway.invalid", None, socket.gaierror(-2, "Name unknown"))  # type: ignore[arg-type]
    error = requests.exceptions.ConnectionError(MaxRetryError(None, "/duplicate.pl", reason))  # type: ignore[arg-type]
    outcome = transport_outcome(error)
    assert isinstance(outcome, NotSent) and "resolve" in outcome.reason


# --- UNKNOWN ----------------------------------------------------------------------------


def test_read_timeout_is_unknown_and_the_sandbox_recorded(
    sandbox: Sandbox, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, slow=1.0)
    with KlikAndPayClient(sandbox.url, read_timeout=0.3) as impatient:
        outcome = impatient.duplicate(
            merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("5"), private_key=EUR_KEY
        )
    assert isinstance(outcome, Unknown)
    assert "read timeout" in outcome.reason
    assert outcome.retry_safe is False
    assert sandbox_control.calls(alias=alias)[0]["recorded"] is True


@pytest.mark.parametrize(
    ("behaviour", "status", "result"),
    [
        ("drop_after_record", None, "dropped"),
        ("error_500_after_record", 500, "error_500"),
        ("garbage", 200, "garbage"),
    ],
)
def test_faults_after_record_are_unknown(
    client: KlikAndPayClient,
    sandbox_control: SandboxControl,
    behaviour: str,
    status: int | None,
    result: str,
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, **{behaviour: True})
    outcome = client.duplicate(
        merchant_id=EUR_MERCHANT, alias=alias, ip=IP, amount=Decimal("5"), private_key=EUR_KEY
    )
    assert isinstance(outcome, Unknown)
    assert outcome.http_status == status
    [call] = sandbox_control.calls(alias=alias)
    assert call["recorded"] is True and call["result"] == result
    assert sandbox_control.totals()[EUR_MERCHANT]["collected"] == "5.00"


def test_deferred_validation_lost_is_unknown(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    auth = client.duplicate(
        merchant_id=EUR_MERCHANT,
        alias=alias,
        ip=IP,
        amount=Decimal("5"),
        private_key=EUR_KEY,
        deferred=True,
    )
    assert isinstance(auth, Approved)
    sandbox_control.set_behaviour(alias, drop_after_record=True)
    outcome = client.validate_deferred(
        merchant_id=EUR_MERCHANT, tx=auth.tx, amount=Decimal("5"), private_key=EUR_KEY
    )
    assert isinstance(outcome, Unknown)
    assert sandbox_control.transaction(auth.tx)["status"] == "collected"


def _close_after_request(conn: socket.socket, request: bytes) -> None:
    conn.close()


def _reset_after_request(conn: socket.socket, request: bytes) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def _cut_body(conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nRESPONSE=00&TX=1")
    conn.close()


def _cut_chunked(conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nRESPONSE=00&TX=1\r\n")
    conn.close()


def _cut_headers(conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
    conn.close()


def _not_http(conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"RESPONSE=00&TX=1\r\n")
    conn.close()


@pytest.mark.parametrize(
    "respond",
    [_close_after_request, _reset_after_request, _cut_body, _cut_chunked, _cut_headers, _not_http],
)
def test_connection_lost_after_sending_is_unknown_and_not_retried(respond: Responder) -> None:
    with LoopbackServer(respond) as server:
        client = KlikAndPayClient(server.url, connect_timeout=1, read_timeout=2)
        outcome = client.duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
        time.sleep(0.1)
        assert len(server.requests) == 1  # no automatic retry of the POST
    assert isinstance(outcome, Unknown), outcome
    assert outcome.retry_safe is False


def test_oversized_answer_is_read_up_to_the_limit() -> None:
    body = "RESPONSE=05&MESSAGE=" + "x" * (gateway.MAX_ANSWER_BYTES + 10)
    with LoopbackServer(http_answer(200, body)) as server:
        outcome = KlikAndPayClient(server.url).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
    assert isinstance(outcome, Declined) and outcome.code == "05"


def _duplicate(client: KlikAndPayClient) -> Outcome:
    """One charge of 1 EUR on a made-up alias (the server decides the answer)."""
    return client.duplicate(
        merchant_id=EUR_MERCHANT, alias="abcdefgh", ip=IP, amount=Decimal("1"), private_key=EUR_KEY
    )


def test_a_cut_oversized_answer_never_leaks_into_the_next_call() -> None:
    """An answer cut at the limit leaves bytes on its connection: the connection is
    dropped, so the next call reads its own answer on a new one (on a keep-alive server,
    which would otherwise answer the next request on the same connection)."""
    big = ("RESPONSE=05&MESSAGE=" + "x" * (gateway.MAX_ANSWER_BYTES + 200_000)).encode()

    def oversized(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client hangs up once it has read enough
            _ok(big)(conn)

    server = KeepAliveServer([oversized, _ok(b"RESPONSE=00&TX=12345&MONTANT=1.00")])
    try:
        client = KlikAndPayClient(server.url)
        first, second = _duplicate(client), _duplicate(client)
    finally:
        server.close()
    assert isinstance(first, Declined) and first.code == "05"
    assert isinstance(second, Approved) and second.tx == "12345", second
    assert (server.connections, server.requests) == (2, 2)


def test_the_environment_proxy_carries_the_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HTTP_PROXY`` is read once, when the client is made, and every POST goes through it
    with the whole URL on its request line, as requests would send it."""
    with LoopbackServer(http_answer(200, "RESPONSE=00&TX=777")) as proxy:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        client = KlikAndPayClient("http://gateway.invalid/paiement")
        outcome = client.duplicate(
            merchant_id=EUR_MERCHANT, alias="abcdefgh", ip=IP,
            amount=Decimal("1"), private_key=EUR_KEY,
        )  # fmt: skip
        [request] = proxy.requests
    assert isinstance(outcome, Approved) and outcome.tx == "777", outcome
    assert request.startswith(b"POST http://gateway.invalid/paiement/duplicate.pl HTTP/1.1\r\n")
    assert b"Content-Type: application/x-www-form-urlencoded" in request
    assert _form(request)["ALIAS"] == "abcdefgh"


class KeepAliveServer:
    """A TCP server on 127.0.0.1 that answers every request of a connection in turn (the
    n-th request overall with ``answers[n]``, raw bytes or a function of the connection)."""

    def __init__(self, answers: list[Callable[[socket.socket], None]]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while self._read_request(conn):
                answer = self.answers[min(self.requests, len(self.answers) - 1)]
                self.requests += 1
                answer(conn)

    @staticmethod
    def _read_request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length:\s*(\d+)", head)
        while match and len(body) < int(match.group(1)):
            body += conn.recv(65536)
        return True

    def close(self) -> None:
        self._listener.close()


def _ok(body: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return answer


def test_an_interim_answer_never_hands_the_real_one_to_the_next_call() -> None:
    """http.client reads a 103 Early Hints as the answer: the connection went back to the
    pool with the script's real answer (a decline) still to come, and the next charge, on
    that connection, read it as its own — a decline for a charge the gateway approved,
    which the retry ladder would charge again (found by review)."""

    def early_hints_then_decline(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        time.sleep(0.3)
        _ok(b"RESPONSE=05&MESSAGE=refused")(conn)

    server = KeepAliveServer([early_hints_then_decline, _ok(b"RESPONSE=00&TX=999&MONTANT=1.00")])
    try:
        client = KlikAndPayClient(server.url, connect_timeout=2, read_timeout=3)
        first, second = _duplicate(client), _duplicate(client)
    finally:
        server.close()
    assert isinstance(first, Unknown) and first.http_status == 103, first
    assert isinstance(second, Approved) and second.tx == "999", second
    assert server.connections == 2


def test_a_connection_is_reused_only_after_a_whole_answer() -> None:
    """Keep-alive still works for whole answers: three calls, one connection."""
    server = KeepAliveServer([_ok(b"RESPONSE=00&TX=4242&MONTANT=1.00")])
    try:
        client = KlikAndPayClient(server.url)
        outcomes = [_duplicate(client) for _ in range(3)]
    finally:
        server.close()
    assert all(isinstance(o, Approved) for o in outcomes), outcomes
    assert (server.connections, server.requests) == (1, 3)


def test_credentials_in_the_gateway_url_are_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway URL with ``user:password@`` is sent with basic auth, as requests did."""
    with LoopbackServer(http_answer(200, "RESPONSE=00&TX=1")) as server:
        url = server.url.replace("http://", "http://shop:s3cret@")
        KlikAndPayClient(url).duplicate(
            merchant_id=EUR_MERCHANT, alias="abcdefgh", ip=IP,
            amount=Decimal("1"), private_key=EUR_KEY,
        )  # fmt: skip
        [request] = server.requests
    assert b"Authorization: Basic c2hvcDpzM2NyZXQ=" in request


def test_redirect_is_not_followed_and_is_unknown() -> None:
    def redirect(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")

    with LoopbackServer(redirect) as server:
        outcome = KlikAndPayClient(server.url).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
        assert len(server.requests) == 1
    assert isinstance(outcome, Unknown) and outcome.http_status == 302


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl unavailable: {exc}")
    return cert, key


def _tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def test_charges_trust_what_requests_trusts_not_the_os_store(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The POSTs bypass ``session.post``: they used to skip its ``cert_verify`` and trust
    OpenSSL's default store (``SSL_CERT_FILE``, a host's added CAs), sending the form and its
    private key to a server requests would refuse (found by review)."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # OpenSSL trusts it, certifi not
    with LoopbackServer(http_answer(200, "RESPONSE=00&TX=1"), tls=_tls(certificate)) as server:
        client = KlikAndPayClient(server.url, connect_timeout=2)
        outcome = client.duplicate(
            merchant_id=EUR_MERCHANT, alias="abcdefgh", ip=IP,
            amount=Decimal("1"), private_key=EUR_KEY,
        )  # fmt: skip
        assert server.requests == []
    assert isinstance(outcome, NotSent) and outcome.reason == "TLS handshake failed"
    assert client.poster.route(gateway.SCRIPT_DUPLICATE).pool.ca_certs == requests.certs.where()


def test_https_to_a_plain_server_fails_handshake_not_sent() -> None:
    with LoopbackServer(http_answer(400, "Bad Request"), read_request=False) as server:
        url = server.url.replace("http://", "https://")
        outcome = KlikAndPayClient(url, connect_timeout=2).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
    assert isinstance(outcome, NotSent) and outcome.reason == "TLS handshake failed"


def test_untrusted_certificate_is_not_sent(certificate: tuple[Path, Path]) -> None:
    with LoopbackServer(http_answer(200, "RESPONSE=00&TX=1"), tls=_tls(certificate)) as server:
        outcome = KlikAndPayClient(server.url, connect_timeout=2).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
        assert server.requests == []
    assert isinstance(outcome, NotSent) and outcome.reason == "TLS handshake failed"


def test_tls_handshake_timeout_is_not_sent() -> None:
    """The kernel accepts the TCP connection; nobody ever answers the ClientHello."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        outcome = KlikAndPayClient(url, connect_timeout=0.3, read_timeout=5).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
    finally:
        listener.close()
    assert isinstance(outcome, NotSent) and outcome.reason == "connect timeout"


def test_plain_http_silence_after_sending_is_unknown() -> None:
    """Same silent listener over plain HTTP: the request was written, so UNKNOWN."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        outcome = KlikAndPayClient(url, connect_timeout=0.3, read_timeout=0.3).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
    finally:
        listener.close()
    assert isinstance(outcome, Unknown) and "read timeout" in outcome.reason


@pytest.mark.parametrize(
    ("respond", "kind"),
    [
        (http_answer(200, "RESPONSE=00&TX=77&MONTANT=1.00"), Approved),
        (_close_after_request, Unknown),
        (_cut_body, Unknown),
    ],
)
def test_trusted_tls_answers(
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    respond: Responder,
    kind: type,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    with LoopbackServer(respond, tls=_tls(certificate)) as server:
        outcome = KlikAndPayClient(server.url, connect_timeout=2, read_timeout=2).duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("1"),
            private_key=EUR_KEY,
        )
        assert len(server.requests) == 1
    assert isinstance(outcome, kind), outcome


# --- what is sent -----------------------------------------------------------------------


def _form(request: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(request.split(b"\r\n\r\n", 1)[1].decode()))


def test_fields_and_headers_sent() -> None:
    with LoopbackServer(http_answer(200, "RESPONSE=00&TX=1")) as server:
        client = KlikAndPayClient(server.url + "/paiement/")
        client.duplicate(
            merchant_id=" 1234567 ",
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("30"),
            private_key=EUR_KEY,
        )
        client.duplicate(
            merchant_id=EUR_MERCHANT,
            alias="abcdefgh",
            ip=IP,
            amount=Decimal("30"),
            private_key=EUR_KEY,
            deferred=True,
        )
        client.validate_deferred(
            merchant_id=EUR_MERCHANT, tx="55", amount=Decimal("1.5"), private_key=EUR_KEY
        )
        client.cancel(merchant_id=EUR_MERCHANT, tx="55", amount=Decimal("2"), private_key=EUR_KEY)
        client.direct_payment(
            payment(
                state="IDF",
                company="ACME",
                fax="",
                deferred=True,
                country="de",
                basket=[BasketLine("R", 1, Decimal("1"), "P")],
            )
        )
    lines = [r.split(b"\r\n", 1)[0] for r in server.requests]
    assert lines == [b"POST /paiement/duplicate.pl HTTP/1.1"] * 2 + [
        b"POST /paiement/validedifferee.pl HTTP/1.1",
        b"POST /paiement/cancel_transaction.pl HTTP/1.1",
        b"POST /paiement/server_server.pl HTTP/1.1",
    ]
    assert f"User-Agent: klikandpay-billing/{__version__}".encode() in server.requests[0]
    forms = [_form(r) for r in server.requests]
    assert forms[0] == {
        "ID": "1234567",
        "IP": IP,
        "MONTANT": "30.00",
        "ALIAS": "abcdefgh",
        "PRIVATE_KEY": EUR_KEY,
    }
    assert forms[1]["DIFFERE"] == "1"
    assert forms[2] == {"ID": EUR_MERCHANT, "TX": "55", "MONTANT": "1.50", "PRIVATE_KEY": EUR_KEY}
    assert forms[3]["MONTANT"] == "2.00" and "DIFFERE" not in forms[3]
    direct = forms[4]
    assert direct["PAYS"] == "DE" and direct["DIFFERE"] == "1" and direct["STATE"] == "IDF"
    assert direct["SOCIETE"] == "ACME" and "FAX" not in direct
    assert direct["DETAIL"] == "REF:R%Q:1%PRIX:1.00%PROD:P|"
    assert direct["NUMCARTE"] == VISA and direct["CVV"] == "111" and direct["EXPMOIS"] == "12"
    assert set(direct) >= {
        "NOM",
        "PRENOM",
        "ADRESSE",
        "CODEPOSTAL",
        "VILLE",
        "EMAIL",
        "TEL",
        "EXPANNEE",
        "ID",
        "IP",
        "MONTANT",
    }


def test_keep_alive_connections_are_reused(
    client: KlikAndPayClient, sandbox_control: SandboxControl
) -> None:
    aliases = sandbox_control.seed_aliases(EUR_MERCHANT, 20)
    outcomes = [
        client.duplicate(
            merchant_id=EUR_MERCHANT, alias=a, ip=IP, amount=Decimal("1"), private_key=EUR_KEY
        )
        for a in aliases
    ]
    assert all(isinstance(o, Approved) for o in outcomes)
    adapter = client.session.get_adapter(client.base_url)
    pools = adapter.poolmanager.pools  # type: ignore[attr-defined]
    [key] = pools.keys()
    assert pools[key].num_connections == 1 and pools[key].num_requests == 20


def test_session_pool_and_no_retries() -> None:
    client = KlikAndPayClient("https://gateway.example")
    adapter = client.session.get_adapter("https://gateway.example/duplicate.pl")
    assert adapter._pool_maxsize == gateway.POOL_MAXSIZE  # type: ignore[attr-defined]
    assert adapter.max_retries.total == 0  # type: ignore[attr-defined]
    assert client.timeout == (5.0, 30.0)


# --- validation: nothing sent -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"amount": Decimal("0")}, "amount"),
        ({"amount": Decimal("1.234")}, "amount"),
        ({"amount": 29.9}, "amount"),
        ({"amount": "abc"}, "amount"),
        ({"exp_month": "13"}, "exp_month"),
        ({"exp_month": "2"}, "exp_month"),
        ({"exp_year": "31"}, "exp_year"),
        ({"country": "EN"}, "country"),
        ({"country": "UK"}, "country"),
        ({"ip": "300.1.1.1"}, "ip"),
        ({"ip": ""}, "ip"),
        ({"last_name": " "}, "last_name"),
        ({"merchant_id": ""}, "merchant_id"),
        ({"email": "nobody"}, "email"),
        ({"card_number": "4012-8888"}, "card_number"),
        ({"cvv": "11"}, "cvv"),
        ({"phone": ""}, "phone"),
        ({"basket": ["x"]}, "basket"),
    ],
)
def test_direct_payment_validation(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        payment(**overrides)
    assert str(caught.value).startswith(f"{field}:")
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("duplicate:amount=0", "amount"),
        ("duplicate:ip=nope", "ip"),
        ("duplicate:alias=", "alias"),
        ("duplicate:merchant_id=", "merchant_id"),
        ("duplicate:private_key=", "private_key"),
        ("cancel:tx=", "tx"),
        ("cancel:amount=1.001", "amount"),
        ("validate_deferred:tx= ", "tx"),
        ("validate_deferred:private_key=", "private_key"),
    ],
)
def test_invalid_arguments_send_nothing(
    client: KlikAndPayClient, sandbox_control: SandboxControl, call: str, field: str
) -> None:
    method, _, override = call.partition(":")
    name, _, value = override.partition("=")
    kwargs: dict[str, object] = {
        "merchant_id": EUR_MERCHANT,
        "amount": Decimal("5"),
        "private_key": EUR_KEY,
    }
    if method == "duplicate":
        kwargs.update(alias="abcdefgh", ip=IP)
    else:
        kwargs["tx"] = "100000001"
    kwargs[name] = Decimal(value) if name == "amount" else value
    with pytest.raises(InvalidInput, match=f"^{field}:"):
        getattr(client, method)(**kwargs)
    assert sandbox_control.calls() == []


def test_iso_country_table() -> None:
    assert len(ISO_COUNTRIES) == 249
    assert {"FR", "DE", "GB", "US", "SS", "XK"} - ISO_COUNTRIES == {"XK"}
    assert "EN" not in ISO_COUNTRIES and "UK" not in ISO_COUNTRIES


def test_basket_line_validation() -> None:
    with pytest.raises(InvalidInput, match=r"^basket\.quantity"):
        BasketLine("R", 0, Decimal("1"), "P")
    with pytest.raises(InvalidInput, match=r"^basket\.price"):
        BasketLine("R", 1, Decimal("-1"), "P")
    with pytest.raises(InvalidInput, match=r"^basket\.ref"):
        BasketLine("", 1, Decimal("1"), "P")


def test_bad_base_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        KlikAndPayClient("ftp://gateway")
    with pytest.raises(ConfigError):
        KlikAndPayClient("https://gateway", read_timeout=0)


# --- one client per process -------------------------------------------------------------


def test_get_client_is_cached_per_settings_and_reset_on_fork() -> None:
    a = Settings(gateway_url="http://127.0.0.1:1/")
    same = Settings(gateway_url="http://127.0.0.1:1")
    other = Settings(gateway_url="http://127.0.0.1:1", decline_codes={"05": "hard"})
    client = get_client(a)
    assert get_client(same) is client
    assert get_client(other) is not client
    assert get_client(other).decline_overrides == {"05": "hard"}
    assert client.base_url == "http://127.0.0.1:1"

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a fresh client, not the parent's
        try:
            fresh = get_client(a)
            os.write(write, b"1" if fresh is not client and get_client(a) is fresh else b"0")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
    assert get_client(a) is client


def test_from_settings() -> None:
    settings = Settings(
        gateway_url="http://127.0.0.1:2",
        connect_timeout=1.5,
        read_timeout=7,
        decline_codes={"51": "hard"},
    )
    client = KlikAndPayClient.from_settings(settings)
    assert client.base_url == "http://127.0.0.1:2"
    assert client.timeout == (1.5, 7.0)
    assert client.decline_overrides == {"51": "hard"}
