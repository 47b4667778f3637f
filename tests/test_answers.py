"""Parsing and classifying gateway answers: tolerant reading, conservative decisions."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.answers import (
    RAW_LIMIT,
    classify,
    parse_amount_lenient,
    parse_body,
    parse_verification,
)
from billing.outcomes import Approved, Declined, NotSent, Unknown

OUTCOME_TYPES = (Approved, Declined, NotSent, Unknown)


# --- parse_body -------------------------------------------------------------------------


def test_ampersand_pairs() -> None:
    assert parse_body("RESPONSE=00&TX=123&ALIAS=ab12&MONTANT=29.90&MESSAGE=ok") == {
        "RESPONSE": "00",
        "TX": "123",
        "ALIAS": "ab12",
        "MONTANT": "29.90",
        "MESSAGE": "ok",
    }


def test_newline_pairs_any_case_blanks_and_crlf() -> None:
    body = "  response = 05 \r\n tx=77\nMessage= Carte refusee \n\n"
    assert parse_body(body) == {"RESPONSE": "05", "TX": "77", "MESSAGE": "Carte refusee"}


def test_url_encoding_is_decoded_but_plus_is_kept() -> None:
    parsed = parse_body("RESPONSE=00&MESSAGE=Transaction%20accept%C3%A9e&ALIAS=ab%2Bcd+ef")
    assert parsed["MESSAGE"] == "Transaction acceptée"
    assert parsed["ALIAS"] == "ab+cd+ef"


def test_value_may_contain_equals_sign() -> None:
    assert parse_body("ALIAS=abc==&RESPONSE=00")["ALIAS"] == "abc=="


def test_json_object_values_are_stringified_exactly() -> None:
    body = '{"response": "00", "tx": 123456, "montant": 29.90, "ok": true, "x": null, "n": [1]}'
    assert parse_body(body) == {
        "RESPONSE": "00",
        "TX": "123456",
        "MONTANT": "29.90",
        "OK": "true",
        "X": "",
        "N": "[1]",
    }


def test_first_value_of_a_repeated_key_wins() -> None:
    assert parse_body("RESPONSE=05&RESPONSE=00")["RESPONSE"] == "05"


@pytest.mark.parametrize(
    "body",
    [
        "",
        "   ",
        "garbage",
        "<html><body>Erreur</body></html>",
        "{not json",
        "[1,2]",
        "=x&=y",
        "\x00\x01",
        "{" * 5000,
        "VALIDATIONYES|30|2",
    ],
)
def test_garbage_gives_nothing_usable(body: str) -> None:
    parsed = parse_body(body)
    assert "RESPONSE" not in parsed


def test_html_wrapped_pairs_do_not_produce_a_response_key() -> None:
    assert "RESPONSE" not in parse_body("<html>RESPONSE=00&TX=1</html>")


@given(st.text())
def test_parse_body_never_raises(body: str) -> None:
    result = parse_body(body)
    assert isinstance(result, dict)
    assert all(isinstance(k, str) and k == k.upper() for k in result)
    assert all(isinstance(v, str) for v in result.values())


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9 .,-]{0,20}", fullmatch=True),
        max_size=8,
    ),
    st.sampled_from(["&", "\n", "\r\n"]),
)
def test_round_trip_of_well_formed_pairs(pairs: dict[str, str], separator: str) -> None:
    unique: dict[str, str] = {}
    for key, value in pairs.items():
        unique.setdefault(key.upper(), value.strip())
    body = separator.join(f"{k}={v}" for k, v in unique.items())
    assert parse_body(body) == unique


# --- amounts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", Decimal("30.00")),
        ("29.90", Decimal("29.90")),
        ("29,90", Decimal("29.90")),
        (" 29.9 ", Decimal("29.90")),
        ("0", Decimal("0.00")),
    ],
)
def test_lenient_amounts(text: str, expected: Decimal) -> None:
    assert parse_amount_lenient(text) == expected


@pytest.mark.parametrize("text", [None, "", "abc", "-5", "1.234", "NaN", "Infinity", "1e400x"])
def test_unreadable_amounts(text: str | None) -> None:
    assert parse_amount_lenient(text) is None


# --- classify ---------------------------------------------------------------------------


def test_approved_with_tx_amount_alias() -> None:
    outcome = classify(200, "RESPONSE=00&TX=100000007&ALIAS=abcdef123456&MONTANT=29,90&MESSAGE=ok")
    assert isinstance(outcome, Approved)
    assert outcome.tx == "100000007"
    assert outcome.amount == Decimal("29.90")
    assert outcome.alias == "abcdef123456"
    assert outcome.http_status == 200
    assert "abcdef123456" not in outcome.raw
    assert "RESPONSE=00" in outcome.raw


def test_approved_whole_amount_and_numxkp() -> None:
    outcome = classify(200, "RESPONSE=00&NUMXKP=99&MONTANT=30")
    assert isinstance(outcome, Approved)
    assert outcome.tx == "99"
    assert outcome.amount == Decimal("30.00")


def test_approved_with_unreadable_amount_is_still_approved() -> None:
    outcome = classify(200, "RESPONSE=00&TX=5&MONTANT=lots")
    assert isinstance(outcome, Approved)
    assert outcome.amount is None


def test_approved_from_json() -> None:
    outcome = classify(200, '{"RESPONSE": "00", "TX": 42, "MONTANT": 12.5}')
    assert isinstance(outcome, Approved)
    assert outcome.tx == "42"
    assert outcome.amount == Decimal("12.50")


def test_approved_without_tx_is_unknown() -> None:
    outcome = classify(200, "RESPONSE=00&MONTANT=30")
    assert isinstance(outcome, Unknown)
    assert "transaction number" in outcome.reason


@pytest.mark.parametrize(
    ("code", "soft"),
    [("05", True), ("51", True), ("REFUSED", True), ("54", False), ("ALIAS", False), ("Z9", True)],
)
def test_declines(code: str, soft: bool) -> None:
    outcome = classify(200, f"RESPONSE={code}&MESSAGE=Carte%20refusee")
    assert isinstance(outcome, Declined)
    assert outcome.code == code
    assert outcome.soft is soft
    assert outcome.message == "Carte refusee"


def test_decline_overrides() -> None:
    outcome = classify(200, "RESPONSE=05", decline_overrides={"05": "hard"})
    assert isinstance(outcome, Declined)
    assert outcome.soft is False


def test_message_plus_becomes_space() -> None:
    outcome = classify(200, "RESPONSE=05&MESSAGE=Carte+refusee")
    assert isinstance(outcome, Declined)
    assert outcome.message == "Carte refusee"


def test_awaiting_is_not_final() -> None:
    outcome = classify(200, "RESPONSE=AWAITING&TX=9")
    assert isinstance(outcome, Unknown)
    assert outcome.tx == "9"


def test_conflicting_response_is_unknown() -> None:
    assert isinstance(classify(200, "RESPONSE=00&TX=1&RESPONSE=05"), Unknown)
    assert isinstance(classify(200, "RESPONSE=00&TX=1&TX=2"), Unknown)


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    "body", ["", "Service Unavailable", "<html><h1>503 Service Temporarily Unavailable</h1>"]
)
def test_429_and_503_without_an_answer_are_not_sent(status: int, body: str) -> None:
    outcome = classify(status, body)
    assert isinstance(outcome, NotSent)
    assert outcome.http_status == status
    assert outcome.retry_safe


@pytest.mark.parametrize("status", [500, 502, 504, 400, 401, 403, 404, 405, 409, 301, 302, 100])
def test_other_statuses_without_an_answer_are_unknown(status: int) -> None:
    outcome = classify(status, "<html>Internal error</html>")
    assert isinstance(outcome, Unknown)
    assert outcome.http_status == status


@pytest.mark.parametrize("status", [0, -1, 99, 600, 10**9])
def test_impossible_statuses_are_unknown(status: int) -> None:
    assert isinstance(classify(status, "RESPONSE=00&TX=1"), Unknown)


@pytest.mark.parametrize("body", ["", "<html>Erreur</html>", "TX=1&MESSAGE=ok", "RESPONSE="])
def test_2xx_without_response_is_unknown(body: str) -> None:
    outcome = classify(200, body)
    assert isinstance(outcome, Unknown)
    assert outcome.http_status == 200


def test_raw_is_redacted_and_truncated() -> None:
    body = (
        "RESPONSE=05&NUMCARTE=4012888888881881&CVV=111&PRIVATE_KEY=topsecret-key"
        "&EXPMOIS=12&EXPANNEE=2031&ECHO=my-private-key-value&" + "X" * 10_000
    )
    outcome = classify(200, body, secrets=("my-private-key-value",))
    assert isinstance(outcome, Declined)
    assert len(outcome.raw) <= RAW_LIMIT
    for secret in (
        "4012888888881881",
        "CVV=111",
        "topsecret-key",
        "my-private-key-value",
        "EXPANNEE=2031",
    ):
        assert secret not in outcome.raw
    assert "RESPONSE=05" in outcome.raw


def test_secret_in_message_is_scrubbed() -> None:
    outcome = classify(
        200, "RESPONSE=05&MESSAGE=card 4012888888881881 key s3cr3t-key", secrets=("s3cr3t-key",)
    )
    assert isinstance(outcome, Declined)
    assert "4012888888881881" not in outcome.message
    assert "s3cr3t-key" not in outcome.message


def test_non_str_inputs_do_not_raise() -> None:
    assert isinstance(classify("200", "RESPONSE=00&TX=1"), Unknown)  # type: ignore[arg-type]
    assert isinstance(classify(200, None), Unknown)  # type: ignore[arg-type]
    assert isinstance(classify(200, b"RESPONSE=00&TX=1"), Unknown)  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------------

statuses = st.one_of(st.integers(), st.sampled_from([200, 201, 204, 429, 500, 503]))
garbage = st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1")))


@given(statuses, garbage)
def test_any_body_any_status_gives_one_outcome(status: int, body: str) -> None:
    outcome = classify(status, body)
    assert isinstance(outcome, OUTCOME_TYPES)
    assert len(outcome.raw) <= RAW_LIMIT


@given(garbage)
def test_random_garbage_is_never_approved(body: str) -> None:
    assert not isinstance(classify(200, body), Approved)


approved_bodies = st.builds(
    lambda tx, amount, alias, sep: sep.join(
        ["RESPONSE=00", f"TX={tx}", f"ALIAS={alias}", f"MONTANT={amount}", "MESSAGE=ok"]
    ),
    st.integers(1, 10**12),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99999"), places=2),
    st.from_regex(r"[a-f0-9]{20}", fullmatch=True),
    st.sampled_from(["&", "\n"]),
)


@given(approved_bodies, st.integers(0, 300), statuses)
def test_any_truncation_of_an_answer_gives_one_outcome(body: str, cut: int, status: int) -> None:
    outcome = classify(status, body[:cut])
    assert isinstance(outcome, OUTCOME_TYPES)
    if isinstance(outcome, NotSent):  # only a status without any answer in its body
        assert not {"RESPONSE", "TX", "NUMXKP"} & set(parse_body(body[:cut]))


@given(approved_bodies)
def test_well_formed_approvals_are_approved(body: str) -> None:
    assert isinstance(classify(200, body), Approved)


@settings(max_examples=50)
@given(st.text(), st.text())
def test_random_decline_codes_are_declined_or_unknown(code: str, message: str) -> None:
    outcome = classify(200, f"RESPONSE={code}&MESSAGE={message}")
    assert isinstance(outcome, Declined | Unknown | Approved)
    if isinstance(outcome, Approved):
        raise AssertionError("a body without TX cannot be approved")


# --- veriftransaction -------------------------------------------------------------------


def test_verification_found() -> None:
    found = parse_verification("VALIDATIONYES|30|12\n")
    assert found.found
    assert found.amount == Decimal("30.00")
    assert found.age == "12"


@pytest.mark.parametrize("body", ["VALIDATIONNO", "", "garbage", "validationyes"])
def test_verification_not_found_or_bare(body: str) -> None:
    result = parse_verification(body)
    assert result.found is (body.upper() == "VALIDATIONYES")


@given(st.text())
def test_verification_never_raises(body: str) -> None:
    parse_verification(body)
