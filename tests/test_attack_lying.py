"""Attack review: answers that lie.

The charge path flags an approval for another amount (``amount_mismatch``), but it takes any
transaction number the answer carries, even one the books already hold for another charge.
A gateway (or a proxy, or a cache in front of it) answering with an earlier transaction
means this period was most likely *not* charged; the books then say it was, and a later
refund of this charge refunds the other charge's money.

The answer is handed to ``Engine.record`` (the record step the facade offers for tools),
on a real claim, so only the gateway's words are made up.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal

from billing.answers import classify
from billing.models import ChargeState
from billing.outcomes import Approved
from tests.test_charge_races import _person_retries, _unknown_with_a_held_call


# SHOWS (wrong books, unflagged): charge B is booked approved and collected under charge A's
# TX; nothing is flagged for a person.
# FAILS today on PostgreSQL and SQLite.
def test_an_approval_carrying_another_charges_tx_is_flagged(db_url, gateway, make_harness):
    h = make_harness(db_url)
    a_alias, b_alias = gateway.seed_aliases("1234567", 2)
    a_sub = h.subscribe("shop-a", a_alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    a = h.charge(a_sub)
    assert a.state == ChargeState.APPROVED and a.tx
    b_sub = h.subscribe("shop-b", b_alias)
    h.engine.sweep_plan("monthly")
    (b_id,) = h.take_sent()

    claim = h.engine.claim(b_id)
    replayed = Approved(
        tx=a.tx, amount=Decimal("29.90"), code="00", message="Transaction acceptee",
        raw=f"RESPONSE=00&TX={a.tx}&MONTANT=29.90", http_status=200,
    )  # fmt: skip
    h.engine.record(claim, replayed)  # type: ignore[arg-type]

    b = h.charge(b_sub)
    assert b.review is not None or b.state != ChargeState.APPROVED, (
        f"charge {b.id} booked approved under TX {b.tx}, which is charge {a.id}'s"
    )


# SHOWS (lost outcome, degraded to the stuck sweep's "unknown"): an answer whose MESSAGE (or
# TX) carries a percent-encoded NUL is parsed into a str with "\x00"; PostgreSQL refuses NUL
# in text (a DataError, not an OperationalError), so ``record`` fails, and ``record_unknown``
# -- the "never lost" last resort -- writes the same NUL into the ledger and fails too. The
# attempt stays unfinished, the charge ``in_flight``, the decline (a safe, known outcome) is
# nowhere in the database; an approval's TX would be lost the same way.
# FAILS today on PostgreSQL (SQLite stores NUL).
def test_an_answer_with_a_nul_byte_is_still_recorded(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    claim = h.engine.claim(charge_id)
    answer = classify(200, "RESPONSE=51&MESSAGE=Provision%00insuffisante&MONTANT=29.90")
    assert answer.kind == "declined"

    with contextlib.suppress(Exception):  # what Calls.charge does with the call's answer
        h.engine.calls.record_surely(claim, answer, retries=0, duration=0.1)  # type: ignore[arg-type]

    charge = h.charge(sub_id)
    assert charge.state != ChargeState.IN_FLIGHT, "the answer was recorded nowhere"


# SHOWS (misleading ops view): ``charges.review`` holds one concern and ``lifecycle.flag``
# overwrites it. Attempt 2 is approved for 299.00 instead of 29.90 (``amount_mismatch``);
# then attempt 1's late approval turns the flag into ``possible_double_charge``. The person
# refunds one 29.90 and clears the flag with ``failed review``: the 269.10 taken too much
# is no longer flagged anywhere.
# FAILS today on PostgreSQL and SQLite.
def test_a_second_flag_never_hides_the_first(db_url, gateway, make_harness):
    h = make_harness(db_url, read_timeout=20)
    (alias,) = gateway.seed_aliases("1234567", 1)
    charge_id, first = _unknown_with_a_held_call(h, gateway, alias)
    _person_retries(db_url, charge_id)
    h.engine.dispatch_due()
    h.take_sent()
    claim = h.engine.claim(charge_id)
    too_much = Approved(
        tx="T-2", amount=Decimal("299.00"), code="00", message="Transaction acceptee",
        raw="RESPONSE=00&TX=T-2&MONTANT=299.00", http_status=200,
    )  # fmt: skip
    h.engine.record(claim, too_much)  # type: ignore[arg-type]
    assert h.charge(h.charge_sub(charge_id)).review == "amount_mismatch"

    gateway.release(alias)  # attempt 1's approval arrives late
    first.join()

    charge = h.charge(h.charge_sub(charge_id))
    assert "amount_mismatch" in (charge.review or ""), (
        f"the amount mismatch flag was replaced by {charge.review!r}"
    )


# SHOWS (wrong books, unflagged): the parser keeps a TX of up to 100 characters
# (answers.TX_LIMIT), the column 64 (widths.TX); calls._approved stores
# ``widths.fit(tx)``: a 70-character TX is booked as 58 characters and "…[cut]". Every
# later validation or refund of the charge is sent with a TX the gateway never issued
# (a deferred charge can then never be validated; ``failed retry`` repeats the same call).
# Nothing is flagged. (widths.py promises "the parser and the column can never disagree".)
# FAILS today on PostgreSQL and SQLite.
def test_an_approval_whose_tx_does_not_fit_is_never_booked_cut(db_url, gateway, make_harness):
    h = make_harness(db_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    claim = h.engine.claim(charge_id)
    long_tx = "7" * 70
    # Even a pattern that would take it: a TX wider than its column is no TX to book.
    answer = classify(200, f"RESPONSE=00&TX={long_tx}&MONTANT=29.90", tx_pattern=r"\d+")
    assert answer.kind == "unknown"
    h.engine.record(claim, answer)  # type: ignore[arg-type]

    charge = h.charge(sub_id)
    assert (charge.state, charge.tx) == (ChargeState.UNKNOWN, None)
