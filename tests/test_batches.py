"""Several charges per message (issue 15): the broker's and Celery's cost is paid once per
message, and every guarantee of one charge per message still holds for each charge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.broker import batches
from billing.errors import ConfigError
from billing.models import ChargeState


@given(ids=st.lists(st.integers(1, 10**6), unique=True, max_size=300), size=st.integers(1, 64))
def test_batches_hold_each_id_once_and_are_as_even_as_they_can_be(ids: list[int], size: int):
    messages = batches(ids, size)
    assert sorted(i for m in messages for i in m) == sorted(ids)
    assert len(messages) == -(-len(ids) // size)
    assert all(1 <= len(m) <= size for m in messages)
    if messages:
        assert max(map(len, messages)) - min(map(len, messages)) <= 1


def test_a_batch_charges_each_once_and_again_charges_nothing(db_url, gateway, make_harness):
    h = make_harness(db_url)
    aliases = gateway.seed_aliases("1234567", 6)
    gateway.set_behaviour(aliases[0], decline="54")
    subs = [h.subscribe(f"shop-{i}", alias) for i, alias in enumerate(aliases)]
    h.engine.sweep_plan("monthly")
    ids = h.take_sent()

    first = h.engine.charge_many(ids)
    again = h.engine.charge_many(ids)  # the message delivered a second time

    assert sorted(r.charge_id for r in first) == sorted(ids)
    assert sorted(r.status for r in first) == ["done"] * 6
    assert [r.status for r in again] == ["not_claimed"] * 6
    states = sorted(h.charge(sub).state for sub in subs)
    assert states == sorted([ChargeState.FAILED] + [ChargeState.APPROVED] * 5)
    for alias in aliases:
        assert len(gateway.calls(alias=alias, script="duplicate")) == 1


def test_an_error_in_one_charge_of_a_batch_waits_for_the_others_then_is_raised(
    db_url, gateway, make_harness, monkeypatch: pytest.MonkeyPatch
):
    h = make_harness(db_url)
    euro, dollar = gateway.seed_aliases("1234567", 1) + gateway.seed_aliases("7654321", 1)
    eur_sub = h.subscribe("shop-eur", euro)
    usd_sub = h.subscribe("shop-usd", dollar, plan="weekly-all")
    h.engine.sweep_plan("monthly")
    h.engine.sweep_plan("weekly-all")
    ids = h.take_sent()
    monkeypatch.delenv("KLIKANDPAY_KEY_USD")

    with pytest.raises(ConfigError, match="KLIKANDPAY_KEY_USD"):
        h.engine.charge_many(ids)

    assert h.charge(eur_sub).state == ChargeState.APPROVED  # made and recorded all the same
    assert h.charge(usd_sub).state == ChargeState.QUEUED  # claimed nothing: sent again later
    assert gateway.calls(alias=dollar) == []
