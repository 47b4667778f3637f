"""No card number, CVV or private key in any log file, any database table or the ledger.

First the scanner itself (``chaos.scan``): it must find each kind of secret and must not
cry wolf at what logs and tables are full of (UUIDs, timings, timestamps, hex aliases).
Then a real flow: first payments with the guide's test cards, charges that are approved,
declined, garbled, and answered by a hostile gateway that echoes every field it was sent;
afterwards every log line, every row of every table and the ledger export are scanned.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from billing.db import session_scope
from billing.gateway import DirectPayment, KlikAndPayClient
from billing.logs import configure_logging
from billing.models import DeadLetter, LedgerEntry
from billing.outcomes import Approved, Declined
from billing.settings import Settings
from chaos.scan import (
    PATTERNS,
    TEST_CARDS,
    TEST_KEYS,
    dump_database,
    log_files,
    luhn_valid,
    scan,
    scan_database,
    scan_text,
)
from tests.fixtures.engine import ENGINE_PLANS
from tests.fixtures.sandbox import LoopbackServer

BILLING = str(Path(sys.executable).with_name("billing"))

# --- the scanner -------------------------------------------------------------------------


def test_luhn() -> None:
    assert all(luhn_valid(card) for card in TEST_CARDS)
    assert luhn_valid("378282246310005")  # an Amex test number, 15 digits
    assert not luhn_valid("4012888888881882")
    assert not luhn_valid("123456789012")  # too short to be a card


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("NUMCARTE=4012888888881881&CVV=111", "test card number"),
        ("card x4012888888881881y inside a token", "test card number"),
        ("paid with 4111111111111111.", "card number (Luhn-valid run of 13-19 digits)"),
        ('{"pan": "378282246310005"}', "card number (Luhn-valid run of 13-19 digits)"),
        ("card 4012 8888 8888 1881 ok", "card number in digit groups"),
        ("card 5555-5555-5555-4444 ok", "card number in digit groups"),
        ("CVV=111", "CVV value"),
        ('{"cvv": "111"}', "CVV value"),
        ("cvc2: 9876", "CVV value"),
        ("key test-key-eur used", "test private key"),
        ("BENCH: bench-key", "test private key"),
        ("chaos-key-usd", "test private key"),
        ("ID=1&PRIVATE_KEY=s3cr3t&MONTANT=1", "unredacted PRIVATE_KEY field"),
        ('{"private_key": "s3cr3t"}', "unredacted PRIVATE_KEY field"),
    ],
)
def test_each_kind_of_secret_is_found(text: str, pattern: str) -> None:
    found = scan_text(text, "sample")
    assert pattern in {f.pattern for f in found}, found
    for finding in found:  # a finding never repeats the secret
        assert "4012888888881881" not in str(finding) and "s3cr3t" not in str(finding)


@pytest.mark.parametrize(
    "text",
    [
        "Task billing.charge[1df905fe-4939-4424-ad70-3ec24e50fa9d] succeeded in "
        "0.012345678901234567s: 'done'",
        "task id 12345678-1234-1234-1234-123456789012",
        "2030-01-15 09:00:00.123456+00:00 at 2030-01-15T09:00:00Z",
        "alias=ab12345678901234567c tx=100000001 amount=29.90",
        "epoch 1715000000.1234567890123",
        "NUMCARTE=[redacted]&CVV=[redacted]&PRIVATE_KEY=[redacted]",
        "card [redacted-pan], private_key_env = KLIKANDPAY_KEY_EUR",
        "private_key: must be a non-empty string",
        "counter 1234567890123 is not Luhn-valid",
        "at 2030-01-15T09%3A00%3A00.123456%2B00%3A00 and 2030-01-15 09:00:00.123456+00:00",
        "ids 12345678-1234-1234-1234-123456789012 and 43215678-1234-5678-1234-567812345678",
        "Task x succeeded in 0.012345678901234567s; epoch 1715000000.1234567890123",
        "RESPONSE=00&TX=123456789&MONTANT=29.90&MESSAGE=Paiement%20accept%C3%A9",
        "phone +33 1 00 00 00 00, ip 203.0.113.7, amounts 12.00 29.90 100.00 1.50",
    ],
)
def test_what_logs_are_full_of_is_not_a_secret(text: str) -> None:
    assert scan_text(text, "sample") == []


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("NUMCARTE=4111%201111%201111%201111", "card number in digit groups"),
        ("ECHO=4111+1111+1111+1111&x=1", "card number in digit groups"),
        ("card 4111.1111.1111.1111 ok", "card number in digit groups"),
        ("paid 29.90 4111 1111 1111 1111", "card number in digit groups"),
        ('"m": "4111\\u00201111\\u00201111\\u00201111"', "card number in digit groups"),
        ("card 3782 822463 10005 ok", "card number in digit groups"),
        ("MESSAGE=Refus%20378282246310005", "card number (Luhn-valid run of 13-19 digits)"),
        ("%34%31%31%31111111111111 echoed", "card number (Luhn-valid run of 13-19 digits)"),
        ('{"m": "{\\"cvv\\": \\"987\\"}"}', "CVV value"),
        ("CVV%3D987&x=1", "CVV value"),
        ("key test%2Dkey%2Deur", "test private key"),
        ("PRIVATE_KEY%3Ds3cr3t", "unredacted PRIVATE_KEY field"),
    ],
)
def test_each_kind_of_secret_is_found_in_every_decoded_form(text: str, pattern: str) -> None:
    """Before: the scan looked at text as stored, so a card grouped with ``%20``, ``+``
    or dots, or a key percent-encoded, passed it."""
    found = scan_text(text, "sample")
    assert pattern in {f.pattern for f in found}, found


@pytest.mark.parametrize(
    "stored", ["Zk9+ab/Q1w==", "Zk9 ab/Q1w==", "Zk9%2Bab%2FQ1w%3D%3D", "Zk9%2bab%2fQ1w%3d%3d"]
)
def test_a_given_secret_is_found_in_every_decoded_form(stored: str) -> None:
    found = scan_text(f"MESSAGE=bad key {stored}&x=1", "sample", extra_secrets=["Zk9+ab/Q1w=="])
    assert [f.pattern for f in found] == ["given secret"]
    assert "Zk9" not in str(found[0])


def test_findings_in_decoded_forms_keep_their_line() -> None:
    found = scan_text("fine\nfine %0A 4111%2B1111%2B1111%2B1111\nfine", "f.log")
    assert [(f.where, f.pattern) for f in found] == [("f.log:2", "card number in digit groups")]


def test_every_pattern_is_exercised() -> None:
    samples = [
        "4012888888881881", "4111111111111111", "4012 8888 8888 1881", "CVV=111",
        "test-key-eur", "PRIVATE_KEY=x1",
    ]  # fmt: skip
    covered = {f.pattern for text in samples for f in scan_text(text, "t")}
    assert covered == {p.name for p in PATTERNS}
    assert set(TEST_KEYS) >= {"test-key-eur", "test-key-usd", "bench-key", "chaos-key"}


def test_findings_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text("fine\nfine\nCVV=123\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.log").write_bytes(b"\xff\xfe chaos-key \n")
    (tmp_path / "schedule.db").write_text("CVV=123")  # not a log file: not read
    found = scan([tmp_path])
    assert sorted(f.where for f in found) == [f"{tmp_path}/a.log:3", f"{tmp_path}/sub/b.log:1"]
    assert log_files(tmp_path) == [tmp_path / "a.log", tmp_path / "sub" / "b.log"]


def test_the_database_dump_covers_every_table_and_finds_a_planted_cvv(pg_url: str) -> None:
    with session_scope(pg_url) as session:
        session.add(
            DeadLetter(
                task_name="billing.charge", task_id="x", args={"args": [1]},
                exc_type="ValueError", exc_message="bad CVV=321 in message",
                traceback="Traceback ...",
            )
        )  # fmt: skip
    tables = {where.split(" row ")[0] for where, _ in dump_database(pg_url)}
    assert "table dead_letters" in tables
    found = scan_database(pg_url)
    assert [(f.where, f.pattern) for f in found] == [("table dead_letters row 1", "CVV value")]


# --- a real flow, then the scan ----------------------------------------------------------

IP = "203.0.113.7"


def _payment(card: str, cvv: str = "111", merchant_id: str = "1234567") -> DirectPayment:
    return DirectPayment(
        merchant_id=merchant_id, ip=IP, last_name="Martin", first_name="Claire",
        address="1 rue de la Paix", postcode="75002", city="Paris", country="FR",
        email="claire@example.org", phone="+33100000000", amount=Decimal("29.90"),
        card_number=card, exp_month="12", exp_year=str(time.gmtime().tm_year + 3), cvv=cvv,
    )  # fmt: skip


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    """Every record of this process, at DEBUG, through the project's own log handler."""
    folder = tmp_path / "logs"
    folder.mkdir()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with open(folder / "billing.log", "w", encoding="utf-8") as stream:
        configure_logging(Settings(), level="DEBUG", stream=stream)
        try:
            yield folder
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            logging.captureWarnings(False)


def _echo(conn: socket.socket, request: bytes) -> None:
    """A hostile gateway: declines and repeats every field it was sent, as sent, with
    every character percent-encoded (lower case), \\u-escaped, and a card grouped by %20."""
    from urllib.parse import parse_qsl

    body = request.split(b"\r\n\r\n", 1)[1]
    values = "|".join(value for _, value in parse_qsl(body.decode()))
    percent = "".join(f"%{byte:02x}" for byte in values.encode())
    escaped = "".join(f"\\u{ord(char):04x}" for char in values)
    answer = b"RESPONSE=05&MESSAGE=Refus%20" + body + b"&" + body
    answer += f"&LOWER={percent}&JSON={escaped}&CARD=4111%201111%201111%201111".encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(answer)}\r\n\r\n".encode()
        + answer
    )


def test_after_a_real_flow_no_secret_is_in_logs_database_or_ledger(
    pg_url, gateway, make_harness, log_dir: Path, tmp_path: Path
) -> None:
    # First payments with the guide's test cards (one refused for its CVV).
    with KlikAndPayClient(gateway.url, connect_timeout=2, read_timeout=5) as client:
        first = client.direct_payment(_payment("4012888888881881"))
        grouped = client.direct_payment(_payment("5555 5555 5555 4444"))
        refused = client.direct_payment(_payment("5555555555554444", cvv="123"))
    assert isinstance(first, Approved) and isinstance(grouped, Approved)
    assert isinstance(refused, Declined)
    logging.getLogger("test").info("first payments: %r %r %r", first, grouped, refused)

    # Rebilling through the engine: approved, soft-declined then approved, garbled, lost.
    h = make_harness(pg_url)
    assert first.alias and grouped.alias
    aliases = [first.alias, grouped.alias, *gateway.seed_aliases("1234567", 2)]
    gateway.set_behaviour(aliases[1], decline="51", times=1)
    gateway.set_behaviour(aliases[2], garbage=True)
    gateway.set_behaviour(aliases[3], error_500_after_record=True)
    for number, alias in enumerate(aliases):
        h.subscribe(f"shop-{number}", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()

    # A gateway that echoes the private key, the card and the CVV back.
    with LoopbackServer(_echo) as echo:
        hostile = make_harness(pg_url, gateway_url=echo.url)
        hostile.subscribe("shop-echo", "ee11ff22aa33bb44")
        hostile.engine.sweep_plan("monthly")
        hostile.run_sent()
        with KlikAndPayClient(echo.url, connect_timeout=2, read_timeout=5) as client:
            echoed = client.direct_payment(_payment("4012888888881881"))
    assert isinstance(echoed, Declined)
    assert scan_text(f"{echoed!r} {echoed.raw} {echoed.message}", "outcome") == []

    with session_scope(pg_url) as session:
        outcomes = sorted(session.scalars(select(LedgerEntry.outcome)))
    assert outcomes == ["approved", "declined", "declined", "unknown", "unknown"]

    # The ledger as a person exports it.
    export = subprocess.run(
        [BILLING, "ledger", "export", "--format", "jsonl"],
        env={**os.environ, "BILLING_DATABASE_URL": pg_url, "BILLING_PLANS_FILE": str(ENGINE_PLANS)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    assert len(export.stdout.splitlines()) == len(outcomes)
    (log_dir / "ledger-export.log").write_text(export.stdout + export.stderr)

    log_text = (log_dir / "billing.log").read_text()
    assert "duplicate.pl" in log_text and "server_server.pl" in log_text  # the logs did fill
    findings = scan([log_dir], pg_url)
    assert findings == [], "\n".join(map(str, findings))
