"""Hostile gateway answers: whatever comes back, and however it is cut, a call ends in one of
the four outcomes, never an exception; what cannot be read is unknown, never approved and
never sent again by itself.

``tests/test_answers.py`` covers the parser's shapes; this file throws the rest at it: every
status from 100 to 599, random bytes decoded the ways a client may decode them, every cut
of a real approval, and the same over real HTTP with broken framing and bogus charsets.
"""

from __future__ import annotations

import re
import socket
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from billing.answers import RAW_LIMIT, TX_PATTERN, classify, parse_body
from billing.gateway import MAX_ANSWER_BYTES, KlikAndPayClient, _decode
from billing.models import ChargeState, utcnow
from billing.outcomes import Approved, Declined, NotSent, Unknown
from billing.sandbox import GARBAGE_BODY
from tests.fixtures.sandbox import LoopbackServer

OUTCOMES = (Approved, Declined, NotSent, Unknown)
NOT_SENT_STATUSES = (429, 503)

statuses = st.integers(100, 599)
bodies = st.one_of(
    st.text(),
    st.binary().map(lambda raw: raw.decode("utf-8", "replace")),
    st.binary().map(lambda raw: raw.decode("latin-1")),
    st.sampled_from(
        [GARBAGE_BODY, "", "null", "[]", "{}", "RESPONSE", "RESPONSE:00", "<RESPONSE>00</RESPONSE>",
         "\ufeff", "%", "=", "&&&", "{\"RESPONSE\": ", "\x00" * 50, "VALIDATIONYES|30|2"]
    ),
)  # fmt: skip


def _check_rules(status: int, outcome: object, body: str) -> None:
    """The classifier's rules, stated from the outside: an answer in the body decides
    whatever the status; without one, 429/503 are not sent and other statuses unknown."""
    assert isinstance(outcome, OUTCOMES)
    fields = parse_body(body)
    answered = bool(fields.get("RESPONSE") or fields.get("TX") or fields.get("NUMXKP"))
    if answered:
        assert not isinstance(outcome, NotSent), "an answer was taken for a call never sent"
    elif status in NOT_SENT_STATUSES:
        assert isinstance(outcome, NotSent)
    else:
        assert isinstance(outcome, Unknown)
    if isinstance(outcome, Approved):
        assert fields.get("RESPONSE") == "00" and re.fullmatch(TX_PATTERN, outcome.tx)
    # Only a call that provably never reached the script may be sent again.
    assert outcome.retry_safe is isinstance(outcome, NotSent)
    assert len(outcome.raw) <= RAW_LIMIT


@given(statuses, bodies)
def test_any_status_and_any_body_end_in_one_outcome(status: int, body: str) -> None:
    _check_rules(status, classify(status, body), body)


@given(st.integers(200, 299), bodies)
def test_garbage_is_unknown_never_approved_never_retried(status: int, body: str) -> None:
    fields = parse_body(body)
    assume(not {"RESPONSE", "TX", "NUMXKP"} & set(fields))
    outcome = classify(status, body)
    assert isinstance(outcome, Unknown)
    assert not outcome.retry_safe


# --- truncations ----------------------------------------------------------------------

TX = "100000123"


def _approval(shape: str, alias: str, amount: Decimal) -> str:
    fields = [("RESPONSE", "00"), ("TX", TX), ("ALIAS", alias), ("MONTANT", f"{amount}"),
              ("MESSAGE", "Transaction%20acceptee")]  # fmt: skip
    if shape == "json":
        return "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields) + "}"
    if shape == "tx-last":
        fields = fields[:1] + fields[2:] + fields[1:2]
    return ("\n" if shape == "lines" else "&").join(f"{k}={v}" for k, v in fields)


approvals = st.builds(
    _approval,
    st.sampled_from(["form", "lines", "json", "tx-last"]),
    st.from_regex(r"[a-f0-9]{20}", fullmatch=True),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("9999"), places=2),
)


@given(approvals, st.data())
def test_any_cut_of_an_approval_ends_in_one_outcome(body: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(body)))
    status = data.draw(st.sampled_from([200, 201, 206, 500, 502, 503]))
    outcome = classify(status, body[:cut])
    _check_rules(status, outcome, body[:cut])
    if 200 <= status <= 299:
        assert not isinstance(outcome, NotSent)
        if isinstance(outcome, Approved):
            # A cut inside TX shortens it; it can never invent another number.
            assert TX.startswith(outcome.tx)


@pytest.mark.parametrize("shape", ["form", "lines", "tx-last"])
def test_no_cut_of_an_approval_is_a_decline_that_would_be_retried(shape: str) -> None:
    body = _approval(shape, "ab12cd34ef56ab12cd34", Decimal("29.90"))
    declined = [
        body[:cut]
        for cut in range(len(body) + 1)
        if isinstance(classify(200, body[:cut]), Declined)
    ]
    assert declined == []


# --- the same over real HTTP ------------------------------------------------------------


def _answer(status: int, body: bytes, framing: str, charset: str) -> bytes:
    head = f"HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain; charset={charset}\r\n"
    if framing == "length":
        head += f"Content-Length: {len(body)}\r\n"
    elif framing == "short":  # announces more than it sends, then closes
        head += f"Content-Length: {len(body) + 10}\r\n"
    return (head + "Connection: close\r\n\r\n").encode("latin-1") + body


def test_the_client_ends_any_http_answer_in_one_outcome() -> None:
    answer = {"bytes": b""}
    lock = threading.Lock()

    def respond(conn: socket.socket, _request: bytes) -> None:
        with lock:
            data = answer["bytes"]
        conn.sendall(data)

    with LoopbackServer(respond) as server:
        client = KlikAndPayClient(server.url, connect_timeout=2, read_timeout=2)

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            status=st.integers(200, 599),
            body=st.one_of(
                st.binary(max_size=400),
                st.sampled_from([b"RESPONSE=00&TX=1", b"RESPONSE=05&MESSAGE=x", b"\xff\xfe\x00"]),
            ),
            framing=st.sampled_from(["length", "close", "short"]),
            charset=st.sampled_from(["utf-8", "latin-1", "utf-16", "bogus-charset", ""]),
        )
        def check(status: int, body: bytes, framing: str, charset: str) -> None:
            with lock:
                answer["bytes"] = _answer(status, body, framing, charset)
            outcome = client.duplicate(
                merchant_id="1234567", alias="ab12cd34ef56", ip="203.0.113.7",
                amount=Decimal("29.90"), private_key="test-key-eur",
            )  # fmt: skip
            # A bodiless status decides nothing; a cut answer neither, whatever its status.
            if status in (204, 304) or framing == "short":
                assert isinstance(outcome, Unknown), outcome
            else:
                type_ = f"text/plain; charset={charset}"
                _check_rules(status, outcome, _decode(body[:MAX_ANSWER_BYTES], type_))
            assert "test-key-eur" not in outcome.raw

        check()


# --- and in the engine: never sent again by itself ----------------------------------------


@pytest.mark.parametrize("behaviour", ["garbage", "error_500_after_record"])
def test_a_garbled_answer_leaves_the_charge_unknown_and_it_is_never_sent_again(
    pg_url, gateway, make_harness, behaviour
):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, **{behaviour: True})
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.reason) == (ChargeState.UNKNOWN, "unknown_outcome")
    gateway.clear_behaviours()
    for days in (0, 1, 40, 70):  # engine sweeps and plan sweeps, now and periods later
        later = utcnow() + timedelta(days=days, seconds=1)
        h.engine.engine_sweep(later)
        h.engine.sweep_plan("monthly", later)
        h.run_sent()
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1
    assert h.charge(sub_id).state == ChargeState.UNKNOWN
    assert [e.outcome for e in h.ledger(sub_id)] == ["unknown"]


@pytest.mark.parametrize(
    "tx",
    ["test-key-eur", "x-test-key-eur", "test%2Dkey%2Deur", "4012888888881881x"],
)
def test_a_transaction_number_that_carries_a_secret_is_never_kept(tx: str) -> None:
    """A TX is stored, logged and sent to the shop as it is: a hostile answer echoing the
    private key (in any encoding) or a card number in its place used to be approved with
    it (found by review)."""
    outcome = classify(200, f"RESPONSE=00&TX={tx}&MONTANT=1.00", secrets=("test-key-eur",))
    assert isinstance(outcome, Unknown), outcome
    assert outcome.tx is None
    for secret in ("test-key-eur", "4012888888881881"):
        assert secret not in repr(outcome)
