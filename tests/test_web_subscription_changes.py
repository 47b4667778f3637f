"""The console's subscription page changes a subscription (issue 18): a new card, another
plan or a new price, each form one call to ``billing.changes.update_subscription``, on
PostgreSQL and SQLite, with the engine calling the sandbox over HTTP.

What a careless or hostile person could send is tried at each field: a refused change
answers 4xx on the page it came from, the error naming the field, and writes nothing.
No page, no flash cookie, no export holds a full alias, old or new, in any encoding.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from billing.db import session_scope
from billing.models import (
    ChargeState,
    Event,
    LedgerEntry,
    Subscription,
    SubscriptionChange,
    SubscriptionStatus,
    utcnow,
)
from billing.redact import mask_alias
from billing.web.app import FLASH_COOKIE
from tests.fixtures.sandbox import EUR_MERCHANT, SandboxControl
from tests.fixtures.web import Console
from tests.test_ops import add_subscription

OLD = "ab12cd34ef56gh78"
NEW = "zz98yy76xx54ww32"
CARD = "4012888888881881"
HOSTILE_ALIAS = "<script>alert(1)</script>"
HOSTILE_REASON = '<img src=x onerror="alert(2)">'
HOSTILE_IP = '"><script>alert(3)</script>'


@dataclass(frozen=True)
class Written:
    """What a refused change must leave as it was: the rows it would write, the fields."""

    ledger: int
    events: int
    changes: int
    sub: tuple[Any, ...]


def written(console: Console, sub_id: int) -> Written:
    with session_scope(console.url) as session:
        sub = session.get_one(Subscription, sub_id)
        return Written(
            session.scalar(select(func.count()).select_from(LedgerEntry)) or 0,
            session.scalar(select(func.count()).select_from(Event)) or 0,
            session.scalar(select(func.count()).select_from(SubscriptionChange)) or 0,
            (sub.alias, sub.customer_ip, sub.plan, sub.amount_override, sub.status),
        )


def sub_row(console: Console, sub_id: int) -> Subscription:
    with session_scope(console.url) as session:
        return session.get_one(Subscription, sub_id)


def later_sub(console: Console, ref: str = "shop-1", alias: str = OLD) -> int:
    """An active subscription due in three days: no charge yet."""
    return console.harness.subscribe(ref, alias, next_charge_at=utcnow() + timedelta(days=3))


def flash_in(html: str) -> tuple[str, str]:
    """(kind, text) of the flash message a page shows."""
    found = re.search(r'<p class="flash flash-(\w+)"[^>]*>(.*?)</p>', html, re.S)
    assert found, "no flash message in the page"
    return found.group(1), found.group(2)


def no_alias_in(text: str, *aliases: str) -> None:
    for alias in aliases:
        for encoded in (
            alias,
            base64.b64encode(alias.encode()).decode(),
            base64.urlsafe_b64encode(alias.encode()).decode().rstrip("="),
            urllib.parse.quote(alias),
            json.dumps(alias)[1:-1],
        ):
            assert encoded not in text, alias[:4]


# --------------------------------------------------------------------------- who may


def test_a_subscription_page_is_the_one_of_its_id_not_of_a_reference_that_reads_so(
    console: Console,
) -> None:
    """A shop may use numbers as references: ``/subscriptions/1`` is still id 1."""
    with session_scope(console.url) as session:
        first = add_subscription(session, "cust-a", status="active")
        second = add_subscription(session, str(first.id), status="active")
        first_id, second_id = first.id, second.id
    web = console.as_role("operator")
    assert "Subscription cust-a" in web.get(f"/subscriptions/{first_id}").text
    assert web.flash(web.post(f"/subscriptions/{first_id}/pause", {"reason": "x"})).startswith("ok")
    assert (sub_row(console, first_id).status, sub_row(console, second_id).status) == (
        "paused", "active",
    )  # fmt: skip
    done = web.flash(web.post(f"/subscriptions/{first_id}/card", {"alias": NEW, "reason": "x"}))
    assert done.startswith("ok") and "subscription cust-a: card updated" in done
    assert (sub_row(console, first_id).alias, sub_row(console, second_id).alias) != (NEW, NEW)
    assert sub_row(console, first_id).alias == NEW


CHANGES = {
    "card": {"alias": NEW, "customer_ip": "198.51.100.4", "reason": "card expired"},
    "terms": {"amount": "24.90", "reason": "loyalty price"},
}


@pytest.mark.parametrize("form", sorted(CHANGES))
def test_a_viewer_sees_no_change_form_and_is_refused_with_nothing_written(
    console: Console, form: str
) -> None:
    sub_id = later_sub(console)
    web = console.as_role("viewer")
    page = web.get(f"/subscriptions/{sub_id}").text
    assert f'action="/subscriptions/{sub_id}/{form}"' not in page
    assert "Plan and price changes" in page and "Cards (aliases masked)" in page  # reading
    before = written(console, sub_id)
    answer = web.post(f"/subscriptions/{sub_id}/{form}", CHANGES[form])
    assert answer.status_code == 403
    assert "may not change " in answer.text and "needs operator" in answer.text
    assert written(console, sub_id) == before


@pytest.mark.parametrize("role", ["operator", "admin"])
def test_an_operator_or_admin_changes_the_card_and_the_price_named_in_the_ledger(
    console: Console, role: str
) -> None:
    sub_id = later_sub(console)
    web = console.as_role(role)
    page = web.get(f"/subscriptions/{sub_id}").text
    assert 'action="/subscriptions/1/card"' in page and 'action="/subscriptions/1/terms"' in page
    name = "otto" if role == "operator" else "ada"

    card = web.flash(web.post(f"/subscriptions/{sub_id}/card", CHANGES["card"]))
    terms = web.flash(web.post(f"/subscriptions/{sub_id}/terms", CHANGES["terms"]))

    assert (
        card
        == f"ok: subscription shop-1: card updated to {mask_alias(NEW)} (was {mask_alias(OLD)})"
    )
    assert terms.startswith("ok: subscription shop-1: price, 29.90 -&gt; 24.90 EUR, from period 0")
    sub = sub_row(console, sub_id)
    assert (sub.alias, sub.customer_ip) == (NEW, "198.51.100.4")
    rows = [(e.outcome, e.actor, e.reason) for e in console.ledger()]
    assert rows == [
        ("subscription_card_updated", f"console:{name}", "card expired"),
        ("subscription_price_changed", f"console:{name}", "loyalty price"),
    ]
    # Pressed twice (a double click, the back button): nothing more is written.
    before = written(console, sub_id)
    again = web.flash(web.post(f"/subscriptions/{sub_id}/card", CHANGES["card"]))
    assert again == "ok: subscription shop-1: nothing changed (it is already as asked)"
    assert written(console, sub_id) == before


def test_each_form_changes_only_what_it_is_for(console: Console) -> None:
    """A hand-made POST adding another form's fields: they are not read."""
    sub_id = later_sub(console)
    web = console.as_role("operator")
    web.post(f"/subscriptions/{sub_id}/terms", {"amount": "24.90", "alias": NEW, "reason": "x"})
    web.post(f"/subscriptions/{sub_id}/card", {"alias": NEW, "plan": "strict", "reason": "x"})
    with session_scope(console.url) as session:
        (change,) = session.scalars(select(SubscriptionChange))
        assert (change.plan, change.amount_override) == ("monthly", Decimal("24.90"))
    assert sub_row(console, sub_id).alias == NEW  # from the card form only
    assert [e.outcome for e in console.ledger()] == [
        "subscription_price_changed", "subscription_card_updated",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "data", "headers"),
    [
        ("no token", {"csrf_token": ""}, {}),
        ("wrong token", {"csrf_token": "0" * 64}, {}),
        ("other origin", {}, {"origin": "https://evil.example"}),
        ("cross-site fetch", {}, {"sec-fetch-site": "cross-site"}),
    ],
)
@pytest.mark.parametrize("form", sorted(CHANGES))
def test_a_change_without_the_sessions_token_or_from_another_site_is_refused(
    console: Console, form: str, case: str, data: dict[str, str], headers: dict[str, str]
) -> None:
    sub_id = later_sub(console)
    web = console.as_role("admin")
    before = written(console, sub_id)
    answer = web.post(f"/subscriptions/{sub_id}/{form}", {**CHANGES[form], **data}, headers=headers)
    assert answer.status_code == 403, case
    assert written(console, sub_id) == before


def test_another_sessions_token_changes_nothing(console: Console) -> None:
    sub_id = later_sub(console)
    attacker, victim = console.as_role("viewer"), console.as_role("admin")
    victim.csrf = attacker.csrf
    before = written(console, sub_id)
    assert victim.post(f"/subscriptions/{sub_id}/card", CHANGES["card"]).status_code == 403
    assert written(console, sub_id) == before


# --------------------------------------------------------------------------- a new card


def _declined(console: Console, behaviour: dict[str, Any]) -> tuple[int, int, str]:
    """A subscription whose first charge the sandbox answered as ``behaviour`` says, and a
    second card of the same merchant: (subscription, charge, new alias)."""
    h = console.harness
    control = SandboxControl(h.engine.settings.gateway_url)
    old, new = control.seed_aliases(EUR_MERCHANT, 2)
    control.set_behaviour(old, **behaviour)
    sub_id = h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    h.run_sent()
    return sub_id, h.charge(sub_id).id, new


def test_a_new_card_retries_a_hard_declined_charge_at_once_through_the_sandbox(
    console: Console,
) -> None:
    sub_id, charge_id, new = _declined(console, {"decline": "54"})
    charge = console.charge(charge_id)
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "hard_decline")
    assert sub_row(console, sub_id).status == SubscriptionStatus.SUSPENDED
    web = console.as_role("operator")

    done = web.flash(web.post(f"/subscriptions/{sub_id}/card", {"alias": new, "reason": "new"}))

    assert done.startswith("ok: subscription shop-1: card updated to ")
    assert f"charge {charge_id} (period 0) re-opened for one try with it now" in done
    assert f"charge {charge_id}: sent to the workers" in done  # as the console's Retry does
    assert console.harness.sent == [charge_id]
    assert console.harness.run_sent() == ["done"]  # the worker charges it with the new card
    charge = console.charge(charge_id)
    assert (charge.state, charge.collected_amount) == (ChargeState.APPROVED, Decimal("29.90"))
    assert sub_row(console, sub_id).status == SubscriptionStatus.ACTIVE
    control = SandboxControl(console.harness.engine.settings.gateway_url)
    assert [c["amount"] for c in control.calls(alias=new, script="duplicate")] == ["29.90"]
    page = web.get(f"/subscriptions/{sub_id}").text
    history = page.split("<h2>Cards (aliases masked)</h2>", 1)[1].split("</table>", 1)[0]
    assert f"<code>{mask_alias(new)}</code>" in history and "console:otto" in history
    assert f'href="/charges/{charge_id}">charge {charge_id}</a>' in history
    no_alias_in(page, new)


def test_a_new_card_leaves_an_unknown_charge_to_a_person(console: Console) -> None:
    sub_id, charge_id, new = _declined(console, {"drop_after_record": True})
    assert console.charge(charge_id).state == ChargeState.UNKNOWN
    web = console.as_role("operator")
    done = web.flash(web.post(f"/subscriptions/{sub_id}/card", {"alias": new, "reason": "new"}))
    assert done.startswith("ok: subscription shop-1: card updated to ")
    assert "re-opened" not in done and "sent to the workers" not in done
    assert console.charge(charge_id).state == ChargeState.UNKNOWN
    assert console.harness.sent == []


# --------------------------------------------------------------------------- plan and price


def test_a_price_from_the_next_period_is_shown_as_scheduled_then_applied(console: Console) -> None:
    h = console.harness
    alias = SandboxControl(h.engine.settings.gateway_url).seed_aliases(EUR_MERCHANT, 1)[0]
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    assert h.run_sent() == ["done"]  # period 0 paid: the current period
    web = console.as_role("operator")
    day = (date.today() + timedelta(days=70)).isoformat()

    price = web.flash(
        web.post(f"/subscriptions/{sub_id}/terms", {"amount": "24.90", "reason": "r"})
    )
    plan = web.flash(
        web.post(
            f"/subscriptions/{sub_id}/terms",
            {"plan": "strict", "effective_from": day, "reason": "moves to strict"},
        )
    )

    assert "price, 29.90 -&gt; 24.90 EUR, from period 1" in price
    assert "the charges before it keep their amount" in price
    assert "plan monthly -&gt; strict, 24.90 -&gt; 9.99 EUR, from period" in plan
    page = web.get(f"/subscriptions/{sub_id}").text
    table = page.split("<h2>Plan and price changes</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count('<span class="badge">scheduled</span>') == 2
    assert "24.90" in table and "moves to strict" in table and "console:otto" in table
    assert "29.90 EUR (the plan&#39;s)" in page  # the price now: unchanged until period 1
    assert console.charge(h.charge(sub_id).id).amount == Decimal("29.90")

    h.engine.sweep_plan("monthly", h.sub(sub_id).next_charge_at + timedelta(minutes=1))
    assert h.run_sent() == ["done"]
    assert h.charge(sub_id, 1).amount == Decimal("24.90")
    page = web.get(f"/subscriptions/{sub_id}").text
    table = page.split("<h2>Plan and price changes</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("scheduled</span>") == 1 and "from period 1, " in table
    assert "24.90 EUR (its own price)" in page


# --------------------------------------------------------------------------- bad input

BAD = [
    ("card", {"alias": "ab12 cd34"}, 400, "alias contains white space"),
    ("card", {"alias": CARD}, 400, "alias is a card number, not an alias"),
    ("card", {"alias": "a" * 129}, 400, "alias is longer than 128 characters"),
    ("card", {"alias": "ab\x01cd"}, 400, "alias contains a control character"),
    ("card", {"alias": ""}, 400, "nothing to change"),
    ("card", {"alias": NEW, "customer_ip": "300.1.1.1"}, 400,
     "customer_ip &#34;300.1.1.1&#34; is not an IP address"),
    ("card", {"alias": NEW, "customer_ip": "fe80::1%eth0"}, 400, "has a zone"),
    ("card", {"alias": "", "customer_ip": "198.51.100.4"}, 400, "customer_ip goes with alias"),
    ("card", {"alias": NEW, "reason": " "}, 400, "reason is required"),
    ("card", {"alias": NEW, "reason": "x" * 501}, 400, "reason: at most 500 characters"),
    ("terms", {"plan": "gold"}, 400, "plan &#34;gold&#34; is not in the plans file"),
    ("terms", {"plan": "weekly-all"}, 409, "a change of currency is refused"),
    ("terms", {"amount": "29.999"}, 400, "more than two decimal places"),
    ("terms", {"amount": "2990"}, 400, "was it written in cents"),
    ("terms", {"amount": "-5"}, 400, "must be a positive amount"),
    ("terms", {"amount": "abc"}, 400, "is not a decimal amount"),
    ("terms", {"amount": "24.90", "effective_from": "2020-01-01"}, 400, "is in the past"),
    ("terms", {"amount": "24.90", "effective_from": "2031-02-30"}, 400,
     "effective_from &#34;2031-02-30&#34; is not a date"),
    ("terms", {"amount": "24.90", "effective_from": "next tuesday"}, 400,
     "is not an ISO 8601 time"),
    ("terms", {"effective_from": "2031-01-01"}, 400, "effective_from goes with plan or amount"),
    ("terms", {}, 400, "nothing to change"),
]  # fmt: skip


@pytest.mark.parametrize(("form", "fields", "status", "message"), BAD, ids=lambda v: repr(v)[:30])
def test_bad_input_is_refused_on_the_page_naming_the_field_with_nothing_written(
    console: Console, form: str, fields: dict[str, str], status: int, message: str
) -> None:
    sub_id = later_sub(console)
    web = console.as_role("operator")
    before = written(console, sub_id)

    answer = web.post(f"/subscriptions/{sub_id}/{form}", {"reason": "typed reason", **fields})

    assert answer.status_code == status
    kind, text = flash_in(answer.text)
    assert kind == "error" and message in text, text
    assert written(console, sub_id) == before
    assert f'action="/subscriptions/{sub_id}/{form}"' in answer.text  # the form, to fix it
    if fields.get("reason", "typed reason") == "typed reason":
        assert 'value="typed reason"' in answer.text  # kept as typed...
    no_alias_in(answer.text, NEW, CARD, OLD)  # ...but for the alias, never shown back


def test_an_unknown_or_cancelled_subscription_is_refused(console: Console) -> None:
    sub_id = later_sub(console)
    web = console.as_role("admin")
    missing = web.post("/subscriptions/99999/card", CHANGES["card"])
    assert missing.status_code == 404 and "subscription 99999 does not exist" in missing.text
    assert web.post("/subscriptions/99999999999999/terms", CHANGES["terms"]).status_code == 404
    assert web.flash(web.post(f"/subscriptions/{sub_id}/cancel", {"reason": "gone"}))
    before = written(console, sub_id)
    answer = web.post(f"/subscriptions/{sub_id}/card", CHANGES["card"])
    assert answer.status_code == 409 and "shop-1 is cancelled" in flash_in(answer.text)[1]
    assert written(console, sub_id) == before
    assert 'action="/subscriptions/1/card"' not in web.get(f"/subscriptions/{sub_id}").text


# --------------------------------------------------------------------------- hostile strings


def _no_markup(html: str) -> None:
    assert "<script>alert" not in html and "<img src=x" not in html
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None


def test_a_hostile_alias_and_reason_are_shown_escaped(console: Console) -> None:
    sub_id = later_sub(console)
    web = console.as_role("operator")
    path = f"/subscriptions/{sub_id}"
    assert web.flash(web.post(f"{path}/card", {"alias": HOSTILE_ALIAS, "reason": HOSTILE_REASON}))
    assert web.flash(web.post(f"{path}/terms", {"amount": "24.90", "reason": HOSTILE_REASON}))
    assert sub_row(console, sub_id).alias == HOSTILE_ALIAS  # an alias may hold anything
    refused = web.post(f"{path}/terms", {"amount": "2990", "reason": HOSTILE_REASON})
    assert refused.status_code == 400
    bad_ip = web.post(f"{path}/card", {"alias": NEW, "customer_ip": HOSTILE_IP, "reason": "x"})
    assert bad_ip.status_code == 400 and "&lt;script&gt;alert(3)" in flash_in(bad_ip.text)[1]

    for page in (web.get(path).text, refused.text, bad_ip.text, web.get("/ledger").text):
        _no_markup(page)
    page = web.get(path).text
    assert "<code>&lt;scr…t&gt;</code>" in page  # the alias, masked and escaped
    assert page.count("&lt;img src=x onerror=&#34;alert(2)&#34;&gt;") >= 3  # cards, changes, ledger
    assert 'value="&lt;img src=x onerror=&#34;alert(2)&#34;&gt;"' in refused.text


# --------------------------------------------------------------------------- the full alias


def test_the_full_alias_is_never_in_a_page_an_export_or_a_flash_cookie(console: Console) -> None:
    sub_id, charge_id, new = _declined(console, {"decline": "54"})
    old = sub_row(console, sub_id).alias
    web = console.as_role("admin")
    cookies: list[str] = []

    def post(path: str, data: dict[str, str]) -> Any:
        answer = web.post(path, data)
        cookies.extend(v for k, v in answer.cookies.items() if k == FLASH_COOKIE)
        return answer

    post(f"/subscriptions/{sub_id}/card", {"alias": new, "customer_ip": "300.0.0.1", "reason": "r"})
    post(f"/subscriptions/{sub_id}/card", {"alias": new, "reason": "new card"})
    console.harness.run_sent()
    post(f"/subscriptions/{sub_id}/card", {"alias": old, "reason": "back to the old card"})
    post(f"/subscriptions/{sub_id}/terms", {"amount": "24.90", "reason": "cheaper"})
    assert len(console.ledger()) > 3 and cookies

    with session_scope(console.url) as session:
        events = list(session.scalars(select(Event.id)))
    paths = [
        "/", "/failed", "/failed.csv", f"/charges/{charge_id}", "/subscriptions",
        f"/subscriptions/{sub_id}", "/subscriptions?ref=shop-1", "/events",
        *(f"/events/{e}" for e in events), "/ledger", "/ledger/export?format=csv",
        "/ledger/export?format=jsonl",
    ]  # fmt: skip
    bodies = []
    for path in paths:
        answer = web.get(path)
        assert answer.status_code in (200, 303), path
        bodies.append(answer.text)
    flashes = [console.app.console._flash.loads(c)["text"] for c in cookies]
    no_alias_in("\n".join([*bodies, *cookies, *flashes]), old, new)
    assert mask_alias(new) in bodies[paths.index(f"/subscriptions/{sub_id}")]


def test_a_card_number_typed_in_a_refused_form_is_not_shown_back(console: Console) -> None:
    """The refused form is shown as typed, but a card number in it never reaches the page."""
    sub_id = later_sub(console)
    web = console.as_role("operator")
    spaced = "4012 8888 8888 1881"
    answer = web.post(
        f"/subscriptions/{sub_id}/terms",
        {"amount": "2990", "plan": CARD, "effective_from": CARD, "reason": f"card {spaced}"},
    )
    assert answer.status_code == 400
    card = web.post(f"/subscriptions/{sub_id}/card", {"alias": NEW, "customer_ip": CARD})
    assert card.status_code == 400
    for page in (answer.text, card.text):
        assert CARD not in page and spaced not in page
        no_alias_in(page, CARD, NEW)
    assert 'value="card [redacted-pan]"' in answer.text


def test_a_change_needs_a_post_and_a_huge_one_is_refused_unread(console: Console) -> None:
    sub_id = later_sub(console)
    web = console.as_role("admin")
    before = written(console, sub_id)
    query = {"alias": NEW, "reason": "x", "csrf_token": web.csrf}
    assert web.get(f"/subscriptions/{sub_id}/card", params=query).status_code == 405
    huge = web.post(f"/subscriptions/{sub_id}/card", {"alias": NEW, "reason": "x" * 400_000})
    assert huge.status_code == 403 and "too large" in huge.text
    assert written(console, sub_id) == before
