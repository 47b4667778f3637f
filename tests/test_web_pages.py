"""The console's pages and actions on real data: charges the engine made against the sandbox
(and against a hostile gateway on loopback), on PostgreSQL and SQLite.

Escaping is checked with strings that came from outside the way they do in production: a
decline message and a code from a gateway answer, an HTML error page the gateway sent
instead of an answer, a shop reference from the import. None of them may reach a page as
markup, and no page may hold a private key, a webhook secret or a full alias.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import urllib.parse
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from billing import reports
from billing.db import session_scope
from billing.gateway import KlikAndPayClient
from billing.models import ChargeState, LedgerEntry
from billing.plans import parse_plans
from billing.settings import Settings
from tests.fixtures.engine import ENGINE_PLANS
from tests.fixtures.sandbox import EUR_MERCHANT, LoopbackServer, SandboxControl, http_answer
from tests.fixtures.web import Console, failed_charge

HOSTILE_MESSAGE = "<script>alert(document.cookie)</script>"
HOSTILE_REF = '<img src=x onerror="alert(1)">'


def _charge_with_gateway(console: Console, ref: str, answer: str) -> int:
    """A charge sent by the real engine to a loopback gateway that answers ``answer``."""
    with LoopbackServer(http_answer(200, answer)) as server:
        h = console.harness
        values = h.engine.settings.model_dump()
        values["gateway_url"] = server.url
        settings = Settings(**values)
        h.engine.ctx.client = KlikAndPayClient.from_settings(settings)
        control = SandboxControl(console.backend.settings.gateway_url)
        alias = control.seed_aliases(EUR_MERCHANT, 1)[0]
        sub_id = h.subscribe(ref, alias, plan="strict")
        h.engine.sweep_plan("strict")
        h.run_sent()
        h.engine.ctx.client = KlikAndPayClient.from_settings(h.engine.settings)
        return h.charge(sub_id).id


def _sandbox_charge(console: Console, ref: str, **behaviour: Any) -> int:
    """A charge the engine sent to the sandbox, which behaves as told for this card."""
    h = console.harness
    control = SandboxControl(h.engine.settings.gateway_url)
    alias = control.seed_aliases(EUR_MERCHANT, 1)[0]
    if behaviour:
        control.set_behaviour(alias, **behaviour)
    sub_id = h.subscribe(ref, alias, plan="strict")
    h.engine.sweep_plan("strict")
    h.run_sent()
    return h.charge(sub_id).id


def _no_markup_from_outside(html: str) -> None:
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert "<h1>Erreur</h1>" not in html
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None


def test_hostile_gateway_strings_and_references_are_shown_escaped(console: Console) -> None:
    message = urllib.parse.quote(HOSTILE_MESSAGE)
    declined = _charge_with_gateway(console, HOSTILE_REF, f"RESPONSE=05&MESSAGE={message}")
    coded = _sandbox_charge(console, "shop-code", decline="<b>x</b><script>")
    garbled = _sandbox_charge(console, "shop-garbage", garbage=True)
    assert console.charge(declined).last_message == HOSTILE_MESSAGE  # stored as it came
    assert console.charge(garbled).state == ChargeState.UNKNOWN
    web = console.as_role("admin")
    pages = {
        "/": web.get("/"),
        "/failed": web.get("/failed"),
        f"/charges/{declined}": web.get(f"/charges/{declined}"),
        f"/charges/{coded}": web.get(f"/charges/{coded}"),
        f"/charges/{garbled}": web.get(f"/charges/{garbled}"),
        "/subscriptions": web.get("/subscriptions"),
        "/ledger": web.get("/ledger"),
        "/events": web.get("/events"),
    }
    for path, page in pages.items():
        assert page.status_code == 200, path
        _no_markup_from_outside(page.text)
    assert (
        "&lt;script&gt;alert(document.cookie)&lt;/script&gt;" in pages[f"/charges/{declined}"].text
    )
    assert "&lt;img src=x onerror=" in pages["/failed"].text
    assert (
        "&lt;h1&gt;Erreur&lt;/h1&gt;" in pages["/ledger"].text
        or "Erreur" not in pages["/ledger"].text
    )
    # In the CSV export it is plain text, as it came.
    rows = csv.DictReader(io.StringIO(web.get("/failed.csv").text))
    assert HOSTILE_REF in [r["external_ref"] for r in rows]


def test_no_secret_and_no_full_alias_in_any_page(console: Console, monkeypatch: Any) -> None:
    secret = "whsec-console-test-0123456789"
    crm_secret = "crm-secret-console-0123456789"
    monkeypatch.setenv("CRM_SECRET", crm_secret)
    values = console.backend.settings.model_dump()
    values.update(webhook_url="http://127.0.0.1:9/hooks", webhook_secret=secret)
    console.backend.settings = Settings(**values)
    text = ENGINE_PLANS.read_text() + (
        '\n[webhooks.crm]\nurl = "http://127.0.0.1:9/crm"\nsecret_env = "CRM_SECRET"\n'
    )
    plans = parse_plans(text, source="plans-with-webhooks.toml")
    console.backend.plans = lambda: plans
    key = "test-key-eur"  # the harness's private key for EUR (tests.fixtures.engine)
    approved = _sandbox_charge(console, "shop-ok")
    unknown = _sandbox_charge(console, "shop-lost", drop_after_record=True)
    with session_scope(console.url) as session:
        from billing.models import Subscription

        aliases = list(session.scalars(select(Subscription.alias)))
    web = console.as_role("admin")
    bodies = []
    for path in (
        "/", "/failed", "/failed.csv", f"/charges/{approved}", f"/charges/{unknown}",
        "/subscriptions", "/subscriptions/1", "/subscriptions/2", "/events", "/events/1",
        "/ledger", "/ledger/export?format=csv", "/ledger/export?format=jsonl", "/plans",
        "/deadletters", "/users",
    ):  # fmt: skip
        answer = web.get(path)
        assert answer.status_code == 200, path
        bodies.append(answer.text)
    text = "\n".join(bodies)
    for value in (key, secret, crm_secret, *aliases):
        for encoded in (
            value,
            base64.b64encode(value.encode()).decode(),
            urllib.parse.quote(value),
            json.dumps(value)[1:-1],
        ):
            assert encoded not in text, value[:6]
    assert "KLIKANDPAY_KEY_EUR" in text  # the variable's name is shown, never its value
    assert "CRM_SECRET" in text and "http://127.0.0.1:9/hooks" in text


def test_the_back_office_box_of_an_unknown_charge(console: Console) -> None:
    charge_id = _sandbox_charge(console, "shop-lost", drop_after_record=True)
    charge = console.charge(charge_id)
    assert charge.state == ChargeState.UNKNOWN
    page = console.as_role("viewer").get(f"/charges/{charge_id}").text
    box = page.split("Look this up in the Klik &amp; Pay back office", 1)[1].split("</section>")[0]
    assert EUR_MERCHANT in box and "9.99 EUR" in box and "203.0.113.7" in box
    with session_scope(console.url) as session:
        from billing.models import Subscription

        alias = session.scalars(select(Subscription.alias)).one()
    assert f"{alias[:4]}…{alias[-2:]}" in box and alias not in page
    window = re.sub(r"<[^>]+>", "", box)  # each instant is kept on one line by a span
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ to \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", window)
    # The timeline: the call, its ledger row and its event, in order.
    timeline = page.split("<h2>Timeline</h2>", 1)[1]
    assert timeline.index("call #1: duplicate") < timeline.index("ledger: unknown")
    assert "event: charge.unknown" in timeline


def test_retry_of_an_unknown_needs_the_box_then_queues_and_the_ledger_names_the_user(
    console: Console,
) -> None:
    charge_id = _sandbox_charge(console, "shop-lost", drop_after_record=True)
    web = console.as_role("operator")
    refused = web.flash(web.post(f"/charges/{charge_id}/retry", {"reason": "checked"}))
    assert refused.startswith("error") and "tick the box" in refused
    assert console.charge(charge_id).state == ChargeState.UNKNOWN
    done = web.flash(
        web.post(
            f"/charges/{charge_id}/retry",
            {"reason": "back office: nothing", "confirm_not_charged": "yes"},
        )
    )
    assert done.startswith("ok") and "sent to the workers" in done
    assert console.charge(charge_id).state == ChargeState.QUEUED
    assert console.harness.sent == [charge_id]
    row = [e for e in console.ledger() if e.outcome == "retry_requested"][-1]
    assert row.actor == "console:otto" and "back office: nothing" in (row.reason or "")


def test_resolve_approved_needs_a_tx_then_moves_the_subscription_on(console: Console) -> None:
    charge_id = failed_charge(console.url, state=ChargeState.UNKNOWN, reason="unknown_outcome")
    web = console.as_role("operator")
    missing = web.flash(
        web.post(f"/charges/{charge_id}/resolve", {"outcome": "approved", "reason": "seen"})
    )
    assert missing.startswith("error") and "--tx" in missing
    done = web.flash(
        web.post(
            f"/charges/{charge_id}/resolve",
            {"outcome": "approved", "tx": "20261128-000123", "reason": "seen in back office"},
        )
    )
    assert done.startswith("ok") and "is approved" in done
    row = console.ledger()[-1]
    assert (row.outcome, row.tx, row.actor) == (
        "resolved_approved",
        "20261128-000123",
        "console:otto",
    )


def test_discard_needs_a_reason(console: Console) -> None:
    charge_id = failed_charge(console.url)
    web = console.as_role("operator")
    answer = web.flash(web.post(f"/charges/{charge_id}/discard", {"reason": "  "}))
    assert answer.startswith("error") and "reason" in answer
    assert console.charge(charge_id).state == ChargeState.FAILED


def test_bulk_discard_of_a_filtered_selection_names_its_count_then_does_exactly_that(
    console: Console,
) -> None:
    hard = [failed_charge(console.url, f"shop-{i}") for i in range(3)]
    other = failed_charge(console.url, "shop-x", reason="ladder_exhausted")
    web = console.as_role("operator")
    page = web.get("/failed", params={"reason": "hard_decline"}).text
    assert "3 charge(s) waiting match the filter" in page
    confirm = web.post(
        "/failed/bulk",
        {"action": "discard", "why": "customer left", "step": "review", "reason": "hard_decline"},
    )
    assert confirm.status_code == 200 and "Discard 3 charge(s)" in confirm.text
    ids = sorted(map(int, re.findall(r'name="charge" value="(\d+)"', confirm.text)))
    assert ids == sorted(hard)
    assert console.ledger_count() == 0  # reviewing changed nothing
    done = web.post(
        "/failed/bulk",
        {
            "action": "discard",
            "why": "customer left",
            "step": "apply",
            "charge": [str(i) for i in ids],
        },
    )
    assert done.status_code == 200 and "Discard: 3 of 3 done" in done.text
    assert [console.charge(i).state for i in hard] == [ChargeState.DISCARDED] * 3
    assert console.charge(other).state == ChargeState.FAILED
    rows = [e for e in console.ledger() if e.outcome == "discarded"]
    assert {(e.actor, e.reason) for e in rows} == {("console:otto", "customer left")}


def test_bulk_applies_to_the_ids_it_confirmed_one_refusal_leaves_the_rest_done(
    console: Console,
) -> None:
    hard = [failed_charge(console.url, f"shop-{i}") for i in range(2)]
    unknown = failed_charge(
        console.url, "shop-u", state=ChargeState.UNKNOWN, reason="unknown_outcome"
    )
    other = failed_charge(console.url, "shop-x", reason="ladder_exhausted")
    web = console.as_role("operator")
    answer = web.post(
        "/failed/bulk",
        {"action": "retry", "why": "cards updated", "step": "apply",
         "charge": [str(i) for i in (*hard, unknown)]},
    )  # fmt: skip
    assert answer.status_code == 200
    assert "Retry: 2 of 3 done" in answer.text
    assert "unknown outcome" in answer.text
    assert [console.charge(i).state for i in hard] == [ChargeState.QUEUED] * 2
    assert console.charge(unknown).state == ChargeState.UNKNOWN
    assert console.charge(other).state == ChargeState.FAILED  # not selected, untouched


def test_a_viewer_cannot_bulk_anything(console: Console) -> None:
    charge_id = failed_charge(console.url)
    web = console.as_role("viewer")
    answer = web.post(
        "/failed/bulk",
        {"action": "discard", "why": "x", "step": "apply", "charge": [str(charge_id)]},
    )
    assert answer.status_code == 403 and console.charge(charge_id).state == ChargeState.FAILED


def test_failed_queue_filters_sort_pages_and_csv(console: Console) -> None:
    ids = [failed_charge(console.url, f"shop-{i:02}", attempts=i + 1) for i in range(3)]
    unknown = failed_charge(
        console.url, "shop-u", state=ChargeState.UNKNOWN, reason="unknown_outcome"
    )
    web = console.as_role("viewer")
    page = web.get("/failed", params={"state": "unknown"}).text
    assert f'href="/charges/{unknown}"' in page and f'href="/charges/{ids[0]}"' not in page
    by_attempts = web.get("/failed", params={"sort": "attempts", "order": "asc"}).text
    positions = [by_attempts.index(f'href="/charges/{i}"') for i in ids]
    assert positions == sorted(positions)
    assert web.get("/failed", params={"sort": "nope"}).status_code == 400
    assert web.get("/failed", params={"older_than": "soon"}).status_code == 400
    assert web.get("/failed", params={"older_than": "1 day"}).text.count('href="/charges/') == 0
    rows = list(
        csv.DictReader(io.StringIO(web.get("/failed.csv", params={"reason": "hard_decline"}).text))
    )
    assert sorted(int(r["charge_id"]) for r in rows) == sorted(ids)
    assert rows[0]["amount"] == "29.90" and rows[0]["last_code"] == "05"


def test_a_csv_cell_that_looks_like_a_formula_is_neutralised(console: Console) -> None:
    failed_charge(console.url, '=HYPERLINK("http://evil")')
    text = console.as_role("viewer").get("/failed.csv").text
    assert "'=HYPERLINK" in text


def test_capture_and_refund_go_through_the_sandbox_as_admin(console: Console) -> None:
    from tests.test_web import _approved_charge

    deferred = _approved_charge(console, deferred=True)
    web = console.as_role("admin")
    page = web.get(f"/charges/{deferred}").text
    assert ">Capture</button>" in page and ">Cancel</button>" in page
    done = web.flash(
        web.post(f"/charges/{deferred}/capture", {"amount": "100.00", "reason": "partial"})
    )
    assert done.startswith("ok") and "validated 100.00" in done
    charge = console.charge(deferred)
    assert charge.state == ChargeState.APPROVED and str(charge.collected_amount) == "100.00"
    refund = web.flash(web.post(f"/charges/{deferred}/cancel", {"amount": "200.00", "reason": "x"}))
    assert refund.startswith("error") and "exceeds" in refund
    refund = web.flash(
        web.post(f"/charges/{deferred}/cancel", {"amount": "25.00", "reason": "goodwill"})
    )
    assert refund.startswith("ok") and "refunded 25.00" in refund
    again = web.flash(
        web.post(f"/charges/{deferred}/cancel", {"amount": "25.00", "reason": "goodwill"})
    )
    assert again.startswith("error") and "--again" in again
    rows = [e for e in console.ledger() if e.actor == "console:ada"]
    assert [e.outcome for e in rows] == ["validated", "refunded"]


def test_subscription_pages_search_and_actions(console: Console) -> None:
    charge_id = failed_charge(console.url, "cust-4711", status="past_due")
    web = console.as_role("admin")
    found = web.get("/subscriptions", params={"ref": "cust-4711"})
    assert found.status_code == 303
    page = web.get(found.headers["location"]).text
    assert f'href="/charges/{charge_id}"' in page and ">Pause</button>" in page
    missing = web.get("/subscriptions", params={"ref": "nobody"}).text
    assert "no subscription with reference" in missing
    sub_path = found.headers["location"]
    assert web.flash(web.post(f"{sub_path}/pause", {"reason": "holiday"})).startswith("ok")
    twice = web.flash(web.post(f"{sub_path}/pause", {"reason": "holiday"}))
    assert twice.startswith("error") and "only active or past_due" in twice
    assert web.flash(web.post(f"{sub_path}/resume", {"reason": "back"})).startswith("ok")
    outcomes = [(e.outcome, e.actor, e.reason) for e in console.ledger() if e.operation == "person"]
    assert ("subscription_paused", "console:ada", "holiday") in outcomes
    assert ("subscription_resumed", "console:ada", "back") in outcomes


def test_dead_letters_list_show_and_requeue_once(console: Console) -> None:
    from tests.test_web import _letter

    number = _letter(console)
    web = console.as_role("operator")
    assert "RuntimeError: boom" in web.get("/deadletters").text
    assert "Traceback" in web.get(f"/deadletters/{number}").text
    assert web.flash(web.post(f"/deadletters/{number}/requeue")).startswith("ok")
    assert console.sent_tasks == [("billing.charge", [1], {})]
    again = web.flash(web.post(f"/deadletters/{number}/requeue"))
    assert again.startswith("error") and "already requeued" in again
    assert len(console.sent_tasks) == 1


def test_events_list_show_and_redeliver(console: Console) -> None:
    _sandbox_charge(console, "shop-ok")
    web = console.as_role("operator")
    listing = web.get("/events", params={"type": "charge.approved"}).text
    number = re.search(r'href="/events/(\d+)"', listing)
    assert number is not None
    shown = web.get(f"/events/{number.group(1)}").text
    assert "charge.approved" in shown and "&#34;amount&#34;: &#34;9.99&#34;" in shown
    event_id = re.search(r"<code>([0-9a-f-]{36})</code>", shown)
    assert event_id is not None
    assert web.get(f"/events/{event_id.group(1)}").status_code == 200  # by its event ID too
    assert web.get("/events/not-an-id").status_code == 400
    assert web.get("/favicon.ico").status_code == 204
    pending = web.flash(web.post(f"/events/{number.group(1)}/redeliver"))
    assert pending.startswith("error") and "pending" in pending  # not yet delivered
    assert web.get("/events", params={"status": "bogus"}).status_code == 400


def test_ledger_page_filters_and_exports_exactly_what_the_cli_exports(console: Console) -> None:
    _sandbox_charge(console, "shop-ok")
    _sandbox_charge(console, "shop-no", decline="05")
    web = console.as_role("viewer")
    page = web.get("/ledger", params={"outcome": "declined"}).text
    assert "shop-no" in page and "shop-ok" not in page
    assert web.get("/ledger", params={"from": "tomorrow"}).status_code == 400
    assert web.get("/ledger", params={"subscription": "nobody"}).status_code == 404
    for fmt in ("csv", "jsonl"):
        exported = web.get("/ledger/export", params={"format": fmt, "subscription": "shop-ok"})
        assert exported.status_code == 200
        assert "attachment" in exported.headers["content-disposition"]
        with session_scope(console.url) as session:
            out = io.StringIO()
            reports.export(reports.ledger_rows(session, subscription="shop-ok"), fmt, out)
        assert exported.text == out.getvalue()
    assert web.get("/ledger/export", params={"format": "xml"}).status_code == 400


def test_plans_page_shows_the_loaded_file(console: Console) -> None:
    page = console.as_role("viewer").get("/plans").text
    for text in ("monthly", "29.90 EUR", "1234567", "2 seconds, 2 seconds", "KLIKANDPAY_KEY_EUR"):
        assert text in page
    assert "test-key-eur" not in page


def test_overview_shows_queue_money_and_the_chart(console: Console) -> None:
    _sandbox_charge(console, "shop-ok")
    _sandbox_charge(console, "shop-no", decline="05")
    _sandbox_charge(console, "shop-lost", drop_after_record=True)
    page = console.as_role("viewer").get("/").text
    assert '<a href="/failed">2</a>' in page  # the declined one (no ladder) and the lost one
    assert "unknown_outcome" in page
    assert "9.99" in page  # collected today, EUR
    assert "50.0 %" in page  # one of the two answered charge calls was declined
    assert page.count('<rect class="bar collected"') == 30
    assert page.count('<rect class="bar failed"') == 30
    with session_scope(console.url) as session:
        assert session.scalars(select(LedgerEntry.id)).first() is not None
    _ = timedelta  # (imported for symmetry with the other web tests)


def test_a_hostile_webhook_answer_is_shown_escaped(console: Console) -> None:
    """The shop's endpoint answers an error page with a script: the event page and the dead
    letter show it as text."""
    from billing import webhooks

    _sandbox_charge(console, "shop-ok")
    body = "<script>alert('hook')</script><iframe src=//evil>"
    with LoopbackServer(http_answer(500, body, reason="Oops")) as shop:
        values = console.backend.settings.model_dump()
        values.update(
            webhook_url=f"{shop.url}/hooks", webhook_secret="hook-secret-0123456789",
            webhook_backoff=[],
        )  # fmt: skip
        settings = Settings(**values)
        webhooks.deliver_due(console.url, settings, plans=console.harness.plans)
    web = console.as_role("operator")
    with session_scope(console.url) as session:
        from billing.models import EventDelivery

        errors = [d.last_error or "" for d in session.scalars(select(EventDelivery))]
    assert any("<script>alert('hook')" in e for e in errors)  # stored as it came
    listing = web.get("/events", params={"status": "dead"}).text
    number = re.search(r'href="/events/(\d+)"', listing)
    assert number is not None
    letter = re.search(r'href="/deadletters/(\d+)"', web.get("/deadletters").text)
    assert letter is not None
    for page in (
        web.get(f"/events/{number.group(1)}").text,
        web.get(f"/deadletters/{letter.group(1)}").text,
    ):
        _no_markup_from_outside(page)
        assert "<iframe" not in page
        assert "&lt;script&gt;alert(&#39;hook&#39;)&lt;/script&gt;" in page
