"""What the gateway answers is data, not trust (issue 14, items 1 to 4).

An answer in a 503 is still an answer; a value wider than its column is cut, never the
reason an approval is lost; a transaction number that has no transaction number's shape
makes the outcome unknown; an approval for another amount than asked is flagged for a
person. Each case through the classifier and through the engine, on both databases.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from billing import ops, widths
from billing.answers import TX_PATTERN, classify, parse_amount_lenient
from billing.db import get_engine, session_scope
from billing.errors import ConfigError
from billing.gateway import _decode
from billing.models import ChargeState
from billing.outcomes import Approved, Declined, NotSent, Unknown
from billing.settings import Settings, load_settings
from tests.fixtures.sandbox import LoopbackServer, http_answer

# --- 1. an answer in a 503 or 429 is still an answer ------------------------------------


@pytest.mark.parametrize("status", [429, 503, 500, 502, 302])
def test_an_approval_in_any_status_is_an_approval(status: int) -> None:
    outcome = classify(status, "RESPONSE=00&TX=100000001&MONTANT=29.90")
    assert isinstance(outcome, Approved)
    assert (outcome.tx, outcome.http_status) == ("100000001", status)


@pytest.mark.parametrize("status", [429, 503])
def test_a_decline_in_a_503_is_a_decline_not_a_call_to_send_again(status: int) -> None:
    outcome = classify(status, "RESPONSE=05&MESSAGE=Refusee")
    assert isinstance(outcome, Declined) and not outcome.retry_safe


@pytest.mark.parametrize("body", ["TX=100000001", "NUMXKP=100000001&MESSAGE=en cours"])
def test_a_transaction_number_without_response_in_a_503_is_unknown(body: str) -> None:
    outcome = classify(503, body)
    assert isinstance(outcome, Unknown) and not outcome.retry_safe


def test_an_approval_answered_in_a_503_is_charged_once(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, answer_status=503)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")

    assert h.run_sent() == ["done"]

    charge = h.charge(sub_id)
    assert charge.state == ChargeState.APPROVED and charge.collected_amount == Decimal("29.90")
    assert len(gateway.calls(alias=alias, script="duplicate")) == 1


def test_a_refund_answered_in_a_503_is_not_sent_again(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    gateway.set_behaviour(alias, answer_status=503)

    result = h.engine.settlement.cancel(h.charge(sub_id).id, amount="10.00", reason="goodwill")

    assert (result.outcome, result.retry_in) == ("approved", None)
    assert h.charge(sub_id).refunded_amount == Decimal("10.00")
    assert len(gateway.calls(alias=alias, script="cancel_transaction")) == 1


# --- 2. values wider than their columns -------------------------------------------------


def test_a_long_message_and_code_are_cut_to_their_columns_with_a_marker() -> None:
    outcome = classify(200, f"RESPONSE={'A' * 20}&MESSAGE={'m' * 600}")
    assert isinstance(outcome, Declined)
    assert len(outcome.message) == widths.MESSAGE and widths.was_cut(outcome.message)


def test_an_approval_with_a_message_wider_than_its_column_is_recorded(pg_url, make_harness):
    body = "RESPONSE=00&TX=100000042&MONTANT=29.90&MESSAGE=" + "Transaction acceptee " * 20
    with LoopbackServer(http_answer(200, body)) as server:
        h = make_harness(pg_url, gateway_url=server.url)
        sub_id = h.subscribe("shop-1", "ab12cd34ef56ab12")
        h.engine.sweep_plan("monthly")

        assert h.run_sent() == ["done"]

    charge = h.charge(sub_id)
    assert (charge.state, charge.tx) == (ChargeState.APPROVED, "100000042")
    assert charge.last_message is not None and widths.was_cut(charge.last_message)
    (row,) = h.ledger(sub_id)
    assert (row.outcome, row.amount) == ("approved", Decimal("29.90"))


@pytest.fixture
def ledger_refuses(db_url: str):
    """The database itself refuses any ledger row whose message mentions 'refuse-me':
    a failure of recording that is not a lost connection."""
    engine = get_engine(db_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION refuse_me() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.message LIKE '%refuse-me%' THEN RAISE EXCEPTION 'refused'; "
                    "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_me BEFORE INSERT ON ledger "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_me()"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_me BEFORE INSERT ON ledger "
                    "WHEN NEW.message LIKE '%refuse-me%' "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
    yield db_url
    with engine.begin() as conn:
        conn.execute(
            text(
                "DROP TRIGGER IF EXISTS refuse_me"
                + (" ON ledger" if engine.dialect.name == "postgresql" else "")
            )
        )


def test_an_answer_that_cannot_be_recorded_is_still_recorded_as_unknown(
    ledger_refuses, make_harness
):
    body = "RESPONSE=00&TX=100000043&MONTANT=29.90&MESSAGE=ok refuse-me"
    with LoopbackServer(http_answer(200, body)) as server:
        h = make_harness(ledger_refuses, gateway_url=server.url)
        sub_id = h.subscribe("shop-1", "ab12cd34ef56ab12")
        h.engine.sweep_plan("monthly")

        statuses = h.run_sent()

    assert statuses == ["done"]
    charge = h.charge(sub_id)
    assert (charge.state, charge.reason) == (ChargeState.UNKNOWN, "unknown_outcome")
    assert "could not be recorded" in (charge.last_message or "")
    (row,) = h.ledger(sub_id)
    assert row.outcome == "unknown" and "100000043" in (row.raw or "")  # the evidence kept
    assert "could not be recorded" in (row.reason or "")


# --- 3. the transaction number is data, not trust -----------------------------------------


@pytest.mark.parametrize(
    "tx",
    ["<script>alert(1)</script>", "1 2 3", "A" * 100, "TX%26ID%3D2", "4012888888881881", "'; --"],
)
def test_an_approval_whose_tx_has_no_transaction_numbers_shape_is_unknown(tx: str) -> None:
    outcome = classify(200, f"RESPONSE=00&TX={tx}&MONTANT=29.90")
    assert isinstance(outcome, Unknown)
    assert outcome.tx is None
    assert "4012888888881881" not in outcome.raw


def test_the_shape_of_a_transaction_number_is_a_setting(monkeypatch) -> None:
    assert isinstance(classify(200, "RESPONSE=00&TX=KP-1", tx_pattern=r"KP-\d+"), Approved)
    assert isinstance(classify(200, "RESPONSE=00&TX=100", tx_pattern=r"KP-\d+"), Unknown)
    monkeypatch.setenv("BILLING_TX_PATTERN", "[0-9]{9}")
    assert load_settings().tx_pattern == "[0-9]{9}"
    monkeypatch.setenv("BILLING_TX_PATTERN", "([")
    with pytest.raises(ConfigError, match="BILLING_TX_PATTERN"):
        load_settings()


def test_a_charge_answered_with_a_bad_tx_is_unknown_and_never_sent_again(
    db_url, gateway, make_harness
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, answer_tx="<b>100</b>")
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.tx) == (ChargeState.UNKNOWN, None)
    assert h.engine.dispatch_due() == 0
    assert "transaction number" in (charge.last_message or "")
    (row,) = h.ledger(sub_id)
    assert row.tx is None and "transaction number" in (row.reason or "")


# --- 4. the amount answered is checked ----------------------------------------------------


def test_an_unreadable_montant_keeps_its_evidence() -> None:
    outcome = classify(200, "RESPONSE=00&TX=100000001&MONTANT=1E%2B30")
    assert isinstance(outcome, Approved)
    assert (outcome.amount, outcome.amount_text) == (None, "1E+30")
    assert parse_amount_lenient("1E+30") is None and parse_amount_lenient("NaN") is None


@pytest.mark.parametrize(("said", "answered"), [("+1.00", "30.90"), ("1E+30", "1E+30")])
def test_an_approval_for_another_amount_is_flagged_for_a_person(
    db_url, gateway, make_harness, said, answered
):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, answer_amount=said)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charge = h.charge(sub_id)
    assert (charge.state, charge.review) == (ChargeState.APPROVED, "amount_mismatch")
    assert charge.collected_amount == Decimal("29.90")  # the books hold what was asked
    (row,) = h.ledger(sub_id)
    assert row.details["answered_amount_raw"] == answered
    with session_scope(db_url) as session:
        (queued,) = ops.list_failed(session)
    assert (queued.charge_id, queued.review) == (charge.id, "amount_mismatch")
    with session_scope(db_url) as session:
        ops.review(session, charge.id, by="alice", reason="the back office shows 29.90")
    with session_scope(db_url) as session:
        assert ops.list_failed(session) == []


# --- the classifier, searched -------------------------------------------------------------

encodings = st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252", "utf-8-sig", "ascii"])
answer_pieces = st.lists(
    st.sampled_from(
        ["RESPONSE=00", "RESPONSE=05", "TX=100000001", "TX=<b>", "NUMXKP=A1", "MONTANT=29.90",
         "MONTANT=1E+30", "MESSAGE=ok", "RESPONSE=", "TX=", "ALIAS=ab12cd34"]
    ),
    max_size=6,
).map("&".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(0, 999),
    body=st.one_of(answer_pieces, st.text(max_size=300)),
    encoding=encodings,
)
def test_any_status_and_any_bytes_approve_only_a_well_formed_approval(
    status: int, body: str, encoding: str
) -> None:
    data = body.encode(encoding, "replace")
    decoded = _decode(data, f"text/plain; charset={encoding}")
    outcome = classify(status, decoded)
    assert isinstance(outcome, Approved | Declined | NotSent | Unknown)
    if isinstance(outcome, Approved):
        assert re.fullmatch(TX_PATTERN, outcome.tx)
        assert "RESPONSE=00" in decoded.replace(" ", "")


def test_settings_default_to_the_documented_pattern() -> None:
    assert Settings().tx_pattern == TX_PATTERN


def test_an_approval_naming_a_tx_another_charge_holds_is_flagged(db_url, gateway, make_harness):
    """A transaction number is one payment: a second charge answered with it is either a
    gateway that repeats itself or one payment booked twice; a person looks (tx_reused)."""
    h = make_harness(db_url)
    first, second = gateway.seed_aliases("1234567", 2)
    for alias in (first, second):
        gateway.set_behaviour(alias, answer_tx="71000123")
    one = h.subscribe("shop-1", first)
    two = h.subscribe("shop-2", second)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    charges = sorted([h.charge(one), h.charge(two)], key=lambda c: c.id)
    assert [(c.state, c.tx) for c in charges] == [(ChargeState.APPROVED, "71000123")] * 2
    assert [c.review for c in charges] == [None, "tx_reused"]
    with session_scope(db_url) as session:
        (queued,) = ops.list_failed(session)
    assert (queued.charge_id, queued.review) == (charges[1].id, "tx_reused")
