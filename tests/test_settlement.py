"""Deferred charges, validation, cancellation and refunds against the sandbox (issue 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from billing import ledger as ledger_mod
from billing.charging.settlement import resolve_unknown
from billing.db import session_scope
from billing.errors import InvalidInput, StateError
from billing.models import ChargeState, LedgerEntry, SubscriptionStatus, utcnow
from tests.fixtures.engine import ENGINE_PLANS

BILLING = str(Path(sys.executable).with_name("billing"))


def _authorized(h, gateway, ref: str = "shop-1"):
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe(ref, alias, plan="deferred")
    h.engine.sweep_plan("deferred")
    h.run_sent()
    charge = h.charge(sub_id)
    assert charge.state == ChargeState.AUTHORIZED
    return sub_id, charge, alias


def _approved(h, gateway):
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    return sub_id, h.charge(sub_id), alias


def test_authorized_then_validated_automatically_after_capture_after(db_url, gateway, make_harness):
    h = make_harness(db_url)
    sub_id, charge, _ = _authorized(h, gateway)
    assert h.sub(sub_id).next_period == 1  # the period is taken; the money is only held
    assert gateway.totals()["1234567"]["collected"] == "0.00"

    assert h.engine.engine_sweep().captures == 0  # capture_after (2 s) has not passed
    with freeze_time(utcnow() + timedelta(seconds=3), tick=True):
        assert h.engine.engine_sweep().captures == 1
        assert h.engine.engine_sweep().captures == 0  # leased: not sent twice
    (charge_id,) = h.captures
    result = h.engine.settlement.capture(charge_id, automatic=True)

    assert (result.kind, result.outcome, result.amount) == (
        "validate",
        "approved",
        Decimal("120.00"),
    )
    charge = h.charge(sub_id)
    assert (charge.state, charge.collected_amount) == (ChargeState.APPROVED, Decimal("120.00"))
    assert [(e.outcome, e.amount) for e in h.ledger(sub_id)] == [
        ("authorized", Decimal("120.00")), ("validated", Decimal("120.00")),
    ]  # fmt: skip
    assert gateway.totals()["1234567"]["collected"] == "120.00"


def test_partial_validation_releases_the_rest(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    sub_id, charge, _ = _authorized(h, gateway)

    result = h.engine.settlement.capture(charge.id, amount="100.00", actor="ops:alice")

    charge = h.charge(sub_id)
    assert result.outcome == "approved"
    assert (charge.collected_amount, charge.released_amount) == (
        Decimal("100.00"),
        Decimal("20.00"),
    )
    entry = h.ledger(sub_id)[-1]
    assert (entry.outcome, entry.amount, entry.actor) == (
        "validated",
        Decimal("100.00"),
        "ops:alice",
    )
    assert entry.details["before"]["authorized"] == "120.00"
    assert entry.details["after"]["released"] == "20.00"
    totals = gateway.totals()["1234567"]
    assert (totals["collected"], totals["released"]) == ("100.00", "20.00")


def test_validation_cannot_exceed_the_authorization(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    _, charge, alias = _authorized(h, gateway)
    with pytest.raises(InvalidInput, match=r"exceeds the 120\.00 EUR"):
        h.engine.settlement.capture(charge.id, amount="120.01")
    assert gateway.calls(alias=alias, script="validedifferee") == []


def test_cancel_before_validation_releases_and_nothing_is_validated(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    sub_id, charge, alias = _authorized(h, gateway)

    result = h.engine.settlement.cancel(charge.id, reason="customer asked", actor="ops:bob")
    with freeze_time(utcnow() + timedelta(days=1), tick=True):
        assert h.engine.engine_sweep().captures == 0

    assert (result.kind, result.outcome) == ("release", "approved")
    charge = h.charge(sub_id)
    assert (charge.state, charge.released_amount) == (ChargeState.CANCELLED, Decimal("120.00"))
    entry = h.ledger(sub_id)[-1]
    assert (entry.outcome, entry.reason, entry.actor) == ("cancelled", "customer asked", "ops:bob")
    assert gateway.calls(alias=alias, script="validedifferee") == []
    assert gateway.totals()["1234567"]["collected"] == "0.00"


def test_partial_refunds_add_up_and_never_exceed_what_was_collected(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    sub_id, charge, _ = _approved(h, gateway)
    settle = h.engine.settlement

    assert settle.cancel(charge.id, amount="10.00", reason="goodwill").outcome == "approved"
    with pytest.raises(StateError, match=r"already had a refund of 10\.00"):
        settle.cancel(charge.id, amount="10.00", reason="goodwill")
    assert settle.cancel(charge.id, amount="10.00", reason="more goodwill", again=True).kind == (
        "refund"
    )
    with pytest.raises(InvalidInput, match=r"exceeds the 9\.90 EUR"):
        settle.cancel(charge.id, amount="9.91", reason="too much")
    settle.cancel(charge.id, amount="9.90", reason="the rest")

    charge = h.charge(sub_id)
    assert (charge.state, charge.refunded_amount) == (ChargeState.APPROVED, Decimal("29.90"))
    refunds = [e.amount for e in h.ledger(sub_id) if e.outcome == "refunded"]
    assert refunds == [Decimal("10.00"), Decimal("10.00"), Decimal("9.90")]
    assert gateway.totals()["1234567"]["refunded"] == "29.90"
    with pytest.raises(StateError, match="nothing left to refund"):
        settle.cancel(charge.id, reason="again", again=True)


def test_the_repeated_refund_command_is_refused_unless_again(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    _, charge, _ = _approved(h, gateway)
    env = {
        **os.environ, "BILLING_DATABASE_URL": pg_url, "BILLING_GATEWAY_URL": gateway.url,
        "BILLING_PLANS_FILE": str(ENGINE_PLANS), "KLIKANDPAY_KEY_EUR": "test-key-eur",
    }  # fmt: skip
    command = [BILLING, "cancel", str(charge.id), "--amount", "5.00", "--reason", "late delivery"]

    first = subprocess.run(command, env=env, capture_output=True, text=True)
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    third = subprocess.run([*command, "--again"], env=env, capture_output=True, text=True)

    assert first.returncode == 0, first.stderr
    assert "refunded 5.00" in first.stdout
    assert second.returncode == 2
    assert "already had a refund of 5.00" in second.stderr and "--again" in second.stderr
    assert "Traceback" not in second.stderr
    assert third.returncode == 0, third.stderr
    assert gateway.totals()["1234567"]["refunded"] == "10.00"


def test_a_lost_answer_to_a_refund_waits_for_a_person(pg_url, gateway, make_harness):
    h = make_harness(pg_url)
    sub_id, charge, alias = _approved(h, gateway)
    gateway.set_behaviour(alias, drop_after_record=True)

    result = h.engine.settlement.cancel(charge.id, amount="5.00", reason="complaint")

    charge = h.charge(sub_id)
    assert result.outcome == "unknown" and result.retry_in is None
    assert (charge.state, charge.reason) == (ChargeState.UNKNOWN, "refund_unknown")
    assert h.engine.engine_sweep().dispatched == 0
    assert len(gateway.calls(alias=alias, script="cancel_transaction")) == 1
    # A person finds the refund in the back office and records it.
    with session_scope(pg_url) as session:
        resolve_unknown(
            session, charge.id, approved=True, by="ops:carol", reason="seen in back office"
        )
    charge = h.charge(sub_id)
    assert (charge.state, charge.refunded_amount) == (ChargeState.APPROVED, Decimal("5.00"))
    assert [e.outcome for e in h.ledger(sub_id)][-2:] == ["unknown", "resolved_refunded"]


def test_a_cancelled_subscription_has_its_authorization_released_not_validated(
    pg_url, gateway, make_harness
):
    h = make_harness(pg_url)
    sub_id, charge, alias = _authorized(h, gateway)
    with session_scope(pg_url) as session:
        from billing.models import Subscription

        session.get_one(Subscription, sub_id).status = SubscriptionStatus.CANCELLED

    with freeze_time(utcnow() + timedelta(seconds=3), tick=True):
        result = h.engine.engine_sweep()

    assert (result.captures, result.released) == (0, 1)
    charge = h.charge(sub_id)
    assert charge.state == ChargeState.CANCELLED
    entry = h.ledger(sub_id)[-1]
    assert entry.outcome == "cancelled"
    assert "subscription cancelled" in (entry.reason or "")
    assert gateway.calls(alias=alias, script="validedifferee") == []


def test_after_a_mixed_run_the_ledger_equals_the_sandbox_per_merchant(
    pg_url, gateway, make_harness
):
    h = make_harness(pg_url)
    eur = gateway.seed_aliases("1234567", 6)
    usd = gateway.seed_aliases("7654321", 3)
    for i, alias in enumerate(eur[:3]):
        h.subscribe(f"m-{i}", alias)
    for i, alias in enumerate(eur[3:]):
        h.subscribe(f"d-{i}", alias, plan="deferred")
    for i, alias in enumerate(usd):
        h.subscribe(f"w-{i}", alias, plan="weekly-all")
    gateway.set_behaviour(eur[1], decline="51")
    for plan in ("monthly", "deferred", "weekly-all"):
        h.engine.sweep_plan(plan)
    h.run_sent()
    with session_scope(pg_url) as session:
        from billing.models import Charge

        by_state = defaultdict(list)
        for charge in session.scalars(select(Charge)):
            by_state[(charge.plan, charge.state)].append(charge.id)
    settle = h.engine.settlement
    deferred = by_state[("deferred", ChargeState.AUTHORIZED)]
    settle.capture(deferred[0])
    settle.capture(deferred[1], amount="99.99")
    settle.cancel(deferred[2], reason="changed mind")
    monthly = by_state[("monthly", ChargeState.APPROVED)]
    settle.cancel(monthly[0], amount="0.01", reason="rounding")
    settle.cancel(by_state[("weekly-all", ChargeState.APPROVED)][0], reason="duplicate order")

    with session_scope(pg_url) as session:
        entries = session.scalars(select(LedgerEntry)).all()
    net: dict[str, Decimal] = defaultdict(Decimal)
    for entry in entries:
        if entry.outcome in ledger_mod.COLLECTED:
            net[entry.merchant_id] += entry.amount
        elif entry.outcome in ledger_mod.REFUNDED:
            net[entry.merchant_id] -= entry.amount
    sandbox = gateway.totals()
    for merchant in ("1234567", "7654321"):
        held = Decimal(sandbox[merchant]["collected"]) - Decimal(sandbox[merchant]["refunded"])
        assert net[merchant] == held, merchant
    assert net["1234567"] == Decimal("29.90") * 2 - Decimal("0.01") + Decimal("120.00") + Decimal(
        "99.99"
    )
