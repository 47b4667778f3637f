"""Several endpoints from the plans file, each with its own secret, filter and delivery
state, posted to real loopback receivers: filters, signatures, a failing or hanging
endpoint holding back no other, endpoints added and removed, dead deliveries per endpoint,
the ``billing events`` commands per endpoint, and the 0003 migration's data."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from billing import migrate, webhooks
from billing.db import get_engine, session_scope
from billing.errors import InvalidInput, NotFound, StateError
from billing.models import (
    Charge,
    DeadLetter,
    EventDelivery,
    SubscriptionStatus,
    UTCDateTime,
    WebhookEndpointRecord,
    utcnow,
)
from billing.plans import PlanSet, parse_plans
from billing.settings import Settings, get_settings
from tests.fixtures.engine import ENGINE_PLANS
from tests.fixtures.outbox import approve, refund, set_status, subscription
from tests.test_webhooks import BILLING, SECRET, Receiver, running_receiver

CRM_SECRET = "crm-secret-0123456789abcdef"
OPS_SECRET = "ops-secret-fedcba9876543210"


# --------------------------------------------------------------------------- set-up


@pytest.fixture
def crm() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


@pytest.fixture
def ops() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


@pytest.fixture
def shop() -> Iterator[Receiver]:
    """The default endpoint's receiver (BILLING_WEBHOOK_URL)."""
    with running_receiver() as state:
        yield state


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_WEBHOOK_SECRET", CRM_SECRET)
    monkeypatch.setenv("OPS_WEBHOOK_SECRET", OPS_SECRET)


def plans_text(crm: Receiver | None, ops: Receiver | None) -> str:
    """The engine's plans plus crm (charge.approved only) and ops (subscription.*)."""
    text = ENGINE_PLANS.read_text()
    if crm is not None:
        text += (
            f'\n[webhooks.crm]\nurl = "{crm.url}"\nsecret_env = "CRM_WEBHOOK_SECRET"\n'
            'events = ["charge.approved"]\n'
        )
    if ops is not None:
        text += (
            f'\n[webhooks.ops]\nurl = "{ops.url}"\nsecret_env = "OPS_WEBHOOK_SECRET"\n'
            'events = ["subscription.*"]\n'
        )
    return text


def plans_with(crm: Receiver | None, ops: Receiver | None) -> PlanSet:
    return parse_plans(plans_text(crm, ops))


def settings_for(url: str, default: Receiver | None = None, **extra: Any) -> Settings:
    values: dict[str, Any] = {"database_url": url, "webhook_timeout": 2, **extra}
    if default is not None:
        values.update(webhook_url=default.url, webhook_secret=SECRET)
    return Settings(**values)


def deliveries(url: str, endpoint: str) -> list[EventDelivery]:
    with session_scope(url) as session:
        query = (
            select(EventDelivery)
            .options(joinedload(EventDelivery.event))
            .where(EventDelivery.endpoint == endpoint)
            .order_by(EventDelivery.event_id)
        )
        return list(session.scalars(query))


def types(receiver: Receiver) -> list[str]:
    return [json.loads(r.body)["type"] for r in receiver.requests]


def headers(receiver: Receiver, index: int) -> tuple[str, bytes, str]:
    request = receiver.requests[index]
    return (
        request.headers[webhooks.TIMESTAMP_HEADER],
        request.body,
        request.headers[webhooks.SIGNATURE_HEADER],
    )


# -------------------------------------------------------------------------- delivery


def test_each_endpoint_gets_its_filtered_events_signed_with_its_own_secret(
    db_url, shop, crm, ops, secrets
):
    plans = plans_with(crm, ops)
    settings = settings_for(db_url, shop)
    # The first run registers crm and ops: events written from now on are theirs too.
    first = webhooks.deliver_due(db_url, settings, plans=plans)
    assert (first.configured, first.posted) == (True, 0)
    assert [r.name for r in first.endpoints] == ["default", "crm", "ops"]

    sub_id = subscription(db_url)
    set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE)
    approve(db_url, sub_id, 0)
    set_status(db_url, "shop-1", SubscriptionStatus.ACTIVE)
    with session_scope(db_url) as session:
        charge_id = session.scalars(select(Charge.id)).one()
    refund(db_url, charge_id, "5.00")

    result = webhooks.deliver_due(db_url, settings, plans=plans)

    everything = ["subscription.past_due", "charge.approved", "subscription.reactivated",
                  "charge.refunded"]  # fmt: skip
    assert types(shop) == everything
    assert types(crm) == ["charge.approved"]
    assert types(ops) == ["subscription.past_due", "subscription.reactivated"]
    by_name = {r.name: (r.posted, r.delivered) for r in result.endpoints}
    assert by_name == {"default": (4, 4), "crm": (1, 1), "ops": (2, 2)}
    assert (result.posted, result.delivered) == (7, 7)
    # Deliveries exist exactly where the filter takes the type, all delivered.
    assert [d.event.type for d in deliveries(db_url, "crm")] == ["charge.approved"]
    assert [d.status for d in deliveries(db_url, "ops")] == ["delivered", "delivered"]
    # The same event ID and body everywhere; each endpoint's signature with its own secret.
    assert crm.ids()[0] == shop.ids()[1] and crm.requests[0].body == shop.requests[1].body
    for receiver, own, others in ((crm, CRM_SECRET, (OPS_SECRET, SECRET)),
                                  (ops, OPS_SECRET, (CRM_SECRET, SECRET)),
                                  (shop, SECRET, (CRM_SECRET, OPS_SECRET))):  # fmt: skip
        for index in range(len(receiver.requests)):
            ts, body, signature = headers(receiver, index)
            assert webhooks.verify_signature(own, ts, body, signature) is True
            assert not any(webhooks.verify_signature(o, ts, body, signature) for o in others)


def test_an_endpoint_answering_500_holds_back_only_itself(db_url, crm, ops, secrets):
    crm.default = 500
    plans = plans_with(crm, ops)
    settings = settings_for(db_url)  # no BILLING_WEBHOOK_URL: plans-file endpoints only
    webhooks.deliver_due(db_url, settings, plans=plans)
    sub_id = subscription(db_url)
    approve(db_url, sub_id, 0)  # crm: fails
    set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE)  # ops
    approve(db_url, sub_id, 1)  # crm: waits behind the failed one (same subscription)
    set_status(db_url, "shop-1", SubscriptionStatus.ACTIVE)  # ops
    now = utcnow()

    run = webhooks.deliver_due(db_url, settings, plans=plans, now=now)

    assert types(ops) == ["subscription.past_due", "subscription.reactivated"]
    assert len(crm.requests) == 1
    by_name = {r.name: (r.posted, r.delivered, r.retrying) for r in run.endpoints}
    assert by_name == {"crm": (1, 0, 1), "ops": (2, 2, 0)}
    first, second = deliveries(db_url, "crm")
    assert (first.status, first.attempts, first.last_status) == ("pending", 1, 500)
    assert first.next_attempt_at == now + timedelta(seconds=30)
    assert (second.status, second.attempts) == ("pending", 0)
    assert {d.status for d in deliveries(db_url, "ops")} == {"delivered"}
    # Nothing of crm before its backoff; then in order, once it answers 200 again.
    early = webhooks.deliver_due(db_url, settings, plans=plans, now=now + timedelta(seconds=10))
    assert early.posted == 0
    crm.default = 200
    webhooks.deliver_due(db_url, settings, plans=plans, now=now + timedelta(seconds=31))
    assert crm.ids() == [first.event.event_id, first.event.event_id, second.event.event_id]
    assert [d.status for d in deliveries(db_url, "crm")] == ["delivered", "delivered"]
    assert len(ops.requests) == 2  # delivered once, never again


def test_a_hanging_endpoint_does_not_make_the_others_wait(db_url, crm, ops, secrets):
    crm.script = ["hang"]
    plans = plans_with(crm, ops)
    settings = settings_for(db_url, webhook_timeout=2)
    webhooks.deliver_due(db_url, settings, plans=plans)
    sub_id = subscription(db_url)
    approve(db_url, sub_id, 0)
    set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED,
               SubscriptionStatus.ACTIVE)  # fmt: skip

    run = webhooks.deliver_due(db_url, settings, plans=plans)

    # crm is first in the file and hangs until its 2 s timeout; ops is posted meanwhile
    # (one after the other, ops would get its first post 2 s after crm's).
    assert len(ops.requests) == 3 and len(crm.requests) == 1
    assert ops.requests[0].at < crm.requests[0].at + 1.5
    by_name = {r.name: (r.posted, r.delivered, r.retrying) for r in run.endpoints}
    assert by_name == {"crm": (1, 0, 1), "ops": (3, 3, 0)}
    (hung,) = deliveries(db_url, "crm")
    assert hung.status == "pending" and hung.last_error is not None
    assert hung.last_error.startswith(("ReadTimeout", "Timeout"))


def test_an_endpoint_gets_the_events_written_after_it_was_first_seen(db_url, crm, secrets):
    plans = plans_with(crm, None)
    settings = settings_for(db_url)
    sub_id = subscription(db_url)
    approve(db_url, sub_id, 0)  # before crm was ever seen: default only
    seen_at = utcnow()
    webhooks.deliver_due(db_url, settings, plans=plans, now=seen_at)
    approve(db_url, sub_id, 1)  # crm's first event
    with session_scope(db_url) as session:
        record = session.get_one(WebhookEndpointRecord, "crm")
        assert (record.first_seen_at, record.removed_at) == (seen_at, None)
        assert record.events == ["charge.approved"] and record.url == crm.url

    crm.default = 500  # keep its delivery pending
    webhooks.deliver_due(db_url, settings, plans=plans)
    # Removed from the file: its pending delivery waits, new events are not for it.
    removed_at = utcnow()
    webhooks.deliver_due(db_url, settings, plans=plans_with(None, None), now=removed_at)
    approve(db_url, sub_id, 2)
    with session_scope(db_url) as session:
        assert session.get_one(WebhookEndpointRecord, "crm").removed_at == removed_at
    assert len(crm.requests) == 1

    # Back under the same name: the waiting delivery goes, the event of its absence not.
    crm.default = 200
    back = webhooks.deliver_due(db_url, settings, plans=plans, now=utcnow() + timedelta(minutes=1))
    assert back.delivered == 1
    periods = [json.loads(r.body)["charge"]["period"] for r in crm.requests]
    assert periods == [1, 1]
    assert [d.event.payload["charge"]["period"] for d in deliveries(db_url, "crm")] == [1]
    assert len(deliveries(db_url, "default")) == 3  # default: every event, even unconfigured
    with session_scope(db_url) as session:
        record = session.get_one(WebhookEndpointRecord, "crm")
        assert (record.first_seen_at, record.removed_at) == (seen_at, None)
    approve(db_url, sub_id, 3)
    assert len(deliveries(db_url, "crm")) == 2


def test_an_endpoint_without_its_secret_waits_and_the_others_go(sqlite_url, crm, ops, monkeypatch):
    db_url = sqlite_url
    monkeypatch.setenv("OPS_WEBHOOK_SECRET", OPS_SECRET)
    monkeypatch.delenv("CRM_WEBHOOK_SECRET", raising=False)
    plans = plans_with(crm, ops)
    settings = settings_for(db_url)
    webhooks.deliver_due(db_url, settings, plans=plans)
    sub_id = subscription(db_url)
    approve(db_url, sub_id, 0)
    set_status(db_url, "shop-1", SubscriptionStatus.PAUSED)

    run = webhooks.deliver_due(db_url, settings, plans=plans)

    errors = {r.name: r.error for r in run.endpoints}
    assert errors["ops"] is None
    assert errors["crm"] is not None and "CRM_WEBHOOK_SECRET is not set" in errors["crm"]
    assert run.delivered == 1 and types(ops) == ["subscription.paused"] and crm.requests == []
    ((waiting),) = deliveries(db_url, "crm")
    assert (waiting.status, waiting.attempts) == ("pending", 0)


def test_nothing_configured_posts_nothing_and_an_unknown_endpoint_is_not_run(sqlite_url, crm):
    db_url = sqlite_url
    assert webhooks.deliver_due(db_url, settings_for(db_url)) == webhooks.DeliveryResult(False)
    only = webhooks.deliver_due(db_url, settings_for(db_url, crm), endpoint="crm")
    assert only == webhooks.DeliveryResult(False)


# ---------------------------------------------------- dead deliveries and the commands


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from typer.testing import CliRunner

    from billing.cli import app

    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "200")
    for name in [k for k in os.environ if k.startswith("BILLING_WEBHOOK")]:
        monkeypatch.delenv(name)

    def invoke(url: str, plans_file: Path, *args: str) -> Any:
        monkeypatch.setenv("BILLING_DATABASE_URL", url)
        monkeypatch.setenv("BILLING_PLANS_FILE", str(plans_file))
        get_settings.cache_clear()
        return runner.invoke(app, list(args))

    yield invoke
    get_settings.cache_clear()


def test_a_dead_delivery_is_per_endpoint_and_redelivered_per_endpoint(
    pg_url, crm, ops, secrets, run_cli, tmp_path
):
    crm.default = 503
    plans_file = tmp_path / "plans.toml"
    plans_file.write_text(plans_text(crm, ops))
    plans = plans_with(crm, ops)
    settings = settings_for(pg_url, webhook_backoff=["1 second"])
    webhooks.deliver_due(pg_url, settings, plans=plans)
    sub_id = subscription(pg_url)
    approve(pg_url, sub_id, 0)
    set_status(pg_url, "shop-1", SubscriptionStatus.PAST_DUE)
    now = utcnow()
    webhooks.deliver_due(pg_url, settings, plans=plans, now=now)
    dying = webhooks.deliver_due(pg_url, settings, plans=plans, now=now + timedelta(seconds=2))

    assert dying.dead == 1
    ((dead),) = deliveries(pg_url, "crm")
    event = dead.event
    assert (dead.status, dead.last_status, dead.url) == ("dead", 503, crm.url)
    assert [d.status for d in deliveries(pg_url, "ops")] == ["delivered"]
    with session_scope(pg_url) as session:
        (letter,) = session.scalars(select(DeadLetter))
        assert letter.task_name == webhooks.REDELIVER_TASK
        assert letter.args == {"args": [event.event_id], "kwargs": {"endpoint": "crm"}}
        assert "endpoint crm" in letter.exc_message and "--endpoint crm" in letter.traceback

    listed = run_cli(pg_url, plans_file, "events", "list", "--status", "dead", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["event_id"] == event.event_id
    assert [(d["endpoint"], d["status"]) for d in row["deliveries"]] == [("crm", "dead")]
    shown = json.loads(
        run_cli(pg_url, plans_file, "events", "show", str(event.id), "--json").stdout
    )
    assert [(d["endpoint"], d["status"]) for d in shown["deliveries"]] == [
        ("default", "pending"), ("crm", "dead"),
    ]  # fmt: skip
    table = run_cli(pg_url, plans_file, "events", "list", "--endpoint", "ops")
    assert "subscription.past_due" in table.stdout and "charge.approved" not in table.stdout
    everything = run_cli(pg_url, plans_file, "events", "list")
    assert "no BILLING_WEBHOOK_URL: not posted" in everything.stdout
    for args, error, needle in (
        (("list", "--endpoint", "nope"), InvalidInput, 'endpoint "nope" is unknown (known: '
                                                       "default, crm, ops)"),
        (("redeliver", str(event.id), "--endpoint", "ops"), NotFound,
         "has no delivery to endpoint ops (it goes to: default, crm)"),
        (("redeliver", str(event.id), "--endpoint", "default"), StateError, "is pending"),
    ):  # fmt: skip
        result = run_cli(pg_url, plans_file, "events", *args)
        assert isinstance(result.exception, error), result.output
        assert needle in str(result.exception)

    redo = run_cli(pg_url, plans_file, "events", "redeliver", str(event.id), "--endpoint", "crm",
                   "--by", "alice")  # fmt: skip
    assert redo.exit_code == 0, redo.output
    assert f"({event.event_id}) will be sent again to crm" in redo.stdout
    crm.default = 200
    later = webhooks.deliver_due(pg_url, settings, plans=plans, now=now + timedelta(days=1))
    assert (later.delivered, len(ops.requests)) == (1, 1)  # ops was not asked again
    ((sent),) = deliveries(pg_url, "crm")
    assert (sent.status, sent.attempts, sent.redelivered_by) == ("delivered", 1, "alice")
    with session_scope(pg_url) as session:
        assert session.scalars(select(DeadLetter)).one().requeued_by == "alice"


def test_the_requeued_letter_redelivers_to_its_endpoint_only(
    sqlite_url, crm, ops, secrets, monkeypatch, tmp_path
):
    """What ``billing deadletters requeue`` sends: the task with the letter's arguments."""
    db_url = sqlite_url
    crm.default = 500
    plans_file = tmp_path / "plans.toml"
    plans_file.write_text(plans_text(crm, ops))
    settings = settings_for(db_url, webhook_backoff=[])
    webhooks.deliver_due(db_url, settings, plans=plans_with(crm, ops))
    approve(db_url, subscription(db_url), 0)
    assert webhooks.deliver_due(db_url, settings, plans=plans_with(crm, ops)).dead == 1
    with session_scope(db_url) as session:
        letter = session.scalars(select(DeadLetter)).one()
        args, kwargs = letter.args["args"], letter.args["kwargs"]

    crm.default = 200
    monkeypatch.setenv("BILLING_DATABASE_URL", db_url)
    monkeypatch.setenv("BILLING_PLANS_FILE", str(plans_file))
    monkeypatch.setenv("BILLING_WEBHOOK_BACKOFF", "[]")
    for name in ("BILLING_WEBHOOK_URL", "BILLING_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        from tasks.events import redeliver_event

        result = redeliver_event(*args, **kwargs)
    finally:
        get_settings.cache_clear()

    assert [r["name"] for r in result["endpoints"]] == ["crm"]
    assert result["delivered"] == 1 and len(crm.requests) == 2
    ((sent),) = deliveries(db_url, "crm")
    assert (sent.status, sent.redelivered_by) == ("delivered", "billing deadletters requeue")


def test_billing_events_list_per_endpoint_through_the_entry_point(
    pg_url, crm, ops, secrets, tmp_path
):
    db_url = pg_url
    plans_file = tmp_path / "plans.toml"
    plans_file.write_text(plans_text(crm, ops))
    settings = settings_for(db_url)
    webhooks.deliver_due(db_url, settings, plans=plans_with(crm, ops))
    approve(db_url, subscription(db_url), 0)
    webhooks.deliver_due(db_url, settings, plans=plans_with(crm, ops))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(BILLING_DATABASE_URL=db_url, BILLING_PLANS_FILE=str(plans_file), COLUMNS="200")

    listed = subprocess.run([BILLING, "events", "list", "--endpoint", "crm", "--json"],
                            env=env, capture_output=True, text=True)  # fmt: skip

    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    (delivery,) = row["deliveries"]
    assert (row["type"], delivery["endpoint"], delivery["status"]) == (
        "charge.approved", "crm", "delivered",
    )  # fmt: skip
    assert delivery["attempts"] == 1 and delivery["last_status"] == 200
    assert delivery["url"] == crm.url


# ------------------------------------------------------------------------- migration


def test_0003_moves_each_events_delivery_state_and_back(db_url, shop):
    """Upgrading keeps what the single endpoint had: delivered is not posted again, pending
    goes out; downgrading puts the default endpoint's state back on the events."""
    migrate.downgrade(db_url, "0002")
    try:
        at = utcnow().replace(microsecond=0)
        events = sa.table(
            "events", sa.column("event_id"), sa.column("type"), sa.column("payload", sa.JSON),
            sa.column("created_at", UTCDateTime()), sa.column("status"),
            sa.column("next_attempt_at", UTCDateTime()), sa.column("attempts"),
            sa.column("last_status"), sa.column("endpoint"),
            sa.column("delivered_at", UTCDateTime()),
        )  # fmt: skip
        rows = [
            ("00000000-0000-4000-8000-000000000001", "delivered", 2, 200, at),
            ("00000000-0000-4000-8000-000000000002", "pending", 1, 500, None),
        ]
        with get_engine(db_url).begin() as conn:
            for event_id, status, attempts, last_status, delivered_at in rows:
                conn.execute(events.insert().values(
                    event_id=event_id, type="charge.approved",
                    payload={"id": event_id, "type": "charge.approved"}, created_at=at,
                    status=status, next_attempt_at=at, attempts=attempts,
                    last_status=last_status, endpoint="https://shop.example/hooks",
                    delivered_at=delivered_at,
                ))  # fmt: skip
        migrate.upgrade(db_url)

        moved = deliveries(db_url, "default")
        assert [(d.status, d.attempts, d.last_status, d.url) for d in moved] == [
            ("delivered", 2, 200, "https://shop.example/hooks"),
            ("pending", 1, 500, "https://shop.example/hooks"),
        ]
        assert moved[0].delivered_at == at and moved[1].next_attempt_at == at
        settings = settings_for(db_url, shop)
        assert webhooks.deliver_due(db_url, settings).delivered == 1
        assert shop.ids() == [rows[1][0]]

        migrate.downgrade(db_url, "0002")
        with get_engine(db_url).connect() as conn:
            back = conn.execute(
                sa.text("SELECT status, attempts, last_status FROM events ORDER BY id")
            ).all()
        assert [tuple(row) for row in back] == [("delivered", 2, 200), ("delivered", 2, 200)]
    finally:
        migrate.upgrade(db_url)
