"""The web console's security, through Starlette's TestClient on PostgreSQL and SQLite.

Each test signs real accounts in (argon2 hashes in the real database) and drives the real
app; the engine behind the actions is ``make_harness``'s, calling the sandbox over HTTP.
What is checked, as an attacker would try it: every page needs a session; sign-out and
idle expiry end a session server-side (an old cookie is worth nothing); 5 failed sign-ins
in a row lock an account and an address out; a POST without the session's CSRF token, with
another session's, or from another origin changes nothing; each role is refused (403,
nothing written) what it may not do; every answer carries the CSP and refuses framing.

The fixtures (``console``, ``Web``) are in ``tests/fixtures/web.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from billing import accounts, deadletters
from billing.db import session_scope
from billing.models import Charge, ChargeState, Subscription
from billing.web.security import HEADERS, NEEDS, Action
from tests.fixtures import outbox
from tests.fixtures.sandbox import EUR_MERCHANT, SandboxControl
from tests.fixtures.web import (
    PASSWORDS,
    USER_OF,
    Console,
    Web,
    failed_charge,
)
from tests.test_ops import add_charge, add_subscription

# --- sessions -------------------------------------------------------------------------------

PAGES = [
    "/", "/failed", "/failed.csv", "/charges/1", "/subscriptions", "/subscriptions/1",
    "/deadletters", "/deadletters/1", "/events", "/events/1", "/ledger", "/ledger/export",
    "/plans", "/users",
]  # fmt: skip


def test_every_page_sends_a_stranger_to_sign_in(console: Console) -> None:
    anonymous = console.client()
    for path in PAGES:
        answer = anonymous.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next="), path
    assert anonymous.get("/login").status_code == 200
    assert anonymous.get("/healthz").text == "ok"


def test_a_forged_or_unknown_session_cookie_is_worth_nothing(console: Console) -> None:
    web = console.client()
    for value in ("x", "a" * 43 + ".forged", console.app.console.keys.cookie_value("no-such")):
        web.cookies.set("kpb_session", value)
        assert web.get("/").status_code == 303


def test_sign_in_sets_a_hardened_cookie_and_sign_out_ends_the_session_server_side(
    console: Console,
) -> None:
    web = Web(console.client(), console)
    answer = web.sign_in("otto", PASSWORDS["otto"])
    cookie = answer.headers["set-cookie"]
    assert "kpb_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would be lost
    stolen = web.http.cookies["kpb_session"]
    assert web.get("/").status_code == 200

    out = web.post("/logout")
    assert out.status_code == 303 and out.headers["location"] == "/login"
    replay = console.client()
    replay.cookies.set("kpb_session", stolen)
    assert replay.get("/").status_code == 303  # the copied cookie no longer opens anything
    with session_scope(console.url) as session:
        row = session.scalars(select(accounts.WebSession)).one()
        assert row.end_reason == "signed_out" and row.ended_at is not None
        assert stolen.split(".")[0] not in row.token_hash  # only a hash of the token is kept


def test_over_https_the_cookie_is_secure(console: Console) -> None:
    web = Web(console.client(https=True), console)
    answer = web.sign_in("vera", PASSWORDS["vera"])
    assert "Secure" in answer.headers["set-cookie"]
    assert answer.headers["strict-transport-security"].startswith("max-age=")


def test_an_idle_session_expires_and_says_so(console: Console) -> None:
    web = console.signed_in("vera")
    console.clock.advance(accounts.IDLE_TIMEOUT - timedelta(seconds=5))
    assert web.get("/").status_code == 200  # still alive, and this request counts as use
    console.clock.advance(accounts.IDLE_TIMEOUT - timedelta(seconds=5))
    assert web.get("/").status_code == 200
    console.clock.advance(accounts.IDLE_TIMEOUT + timedelta(seconds=1))
    answer = web.get("/failed")
    assert answer.status_code == 303 and "expired=1" in answer.headers["location"]
    page = web.get(answer.headers["location"])
    assert "Your session ended" in page.text
    with session_scope(console.url) as session:
        assert session.scalars(select(accounts.WebSession.end_reason)).one() == "idle"


def test_five_failures_in_a_row_lock_the_account_whatever_the_password(console: Console) -> None:
    web = Web(console.client(), console)
    for _ in range(accounts.SIGN_IN_LIMIT - 1):
        answer = web.sign_in("otto", "wrong-password")
        assert answer.status_code == 401 and "Wrong user name or password" in answer.text
    answer = web.sign_in("otto", "wrong-password")
    assert answer.status_code == 429 and "Too many failed sign-ins" in answer.text
    right = web.sign_in("otto", PASSWORDS["otto"])
    assert right.status_code == 429 and "refused for this account or address" in right.text
    assert "kpb_session" not in web.http.cookies

    console.clock.advance(accounts.LOCKOUT + timedelta(seconds=1))
    assert web.sign_in("otto", PASSWORDS["otto"]).status_code == 303


def test_failures_from_one_address_lock_it_for_every_account(console: Console) -> None:
    web = Web(console.client(), console)
    for i in range(accounts.SIGN_IN_LIMIT):
        web.sign_in(f"guess{i}", "wrong-password")  # a different name each time
    assert web.sign_in("ada", PASSWORDS["ada"]).status_code == 429


def test_an_unknown_name_and_a_wrong_password_get_the_same_answer(console: Console) -> None:
    web = Web(console.client(), console)
    unknown = web.sign_in("nobody", "whatever-123")
    wrong = web.sign_in("vera", "whatever-123")
    strip = lambda html: re.sub(r'value="[^"]*"', "", html)  # noqa: E731
    assert unknown.status_code == wrong.status_code == 401
    assert strip(unknown.text).replace("nobody", "vera") == strip(wrong.text)


def test_a_disabled_account_is_signed_out_and_cannot_sign_in(console: Console) -> None:
    web = console.signed_in("otto")
    with session_scope(console.url) as session:
        accounts.set_disabled(session, "otto", disabled=True)
    assert web.get("/").status_code == 303
    assert Web(console.client(), console).sign_in("otto", PASSWORDS["otto"]).status_code == 401


def test_a_new_role_applies_at_the_next_request(console: Console) -> None:
    charge_id = failed_charge(console.url)
    web = console.signed_in("otto")
    with session_scope(console.url) as session:
        accounts.set_role(session, "otto", "viewer")
    answer = web.post(f"/charges/{charge_id}/discard", {"reason": "no"})
    assert answer.status_code == 403
    assert console.charge(charge_id).state == ChargeState.FAILED


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil"])
def test_sign_in_never_redirects_to_another_site(console: Console, target: str) -> None:
    web = Web(console.client(), console)
    page = web.http.get("/login", params={"next": target})
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    answer = web.http.post(
        "/login",
        data={"login_token": token.group(1), "username": "vera", "password": PASSWORDS["vera"],
              "next": target},
    )  # fmt: skip
    assert answer.status_code == 303 and answer.headers["location"] == "/"


def test_a_sign_in_form_from_another_site_is_refused(console: Console) -> None:
    """Login CSRF: another site cannot sign a victim's browser in to the attacker's account."""
    anonymous = console.client()
    no_token = anonymous.post("/login", data={"username": "vera", "password": PASSWORDS["vera"]})
    assert no_token.status_code == 403
    page = anonymous.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    cross = anonymous.post(
        "/login",
        data={"login_token": token.group(1), "username": "vera", "password": PASSWORDS["vera"]},
        headers={"origin": "https://evil.example"},
    )
    assert cross.status_code == 403 and "kpb_session" not in anonymous.cookies


# --- CSRF and origin --------------------------------------------------------------------------


def _unchanged(console: Console, charge_id: int, ledger_before: int) -> None:
    assert console.charge(charge_id).state == ChargeState.FAILED
    assert console.ledger_count() == ledger_before


@pytest.mark.parametrize(
    ("case", "data", "headers"),
    [
        ("no token", {"csrf_token": ""}, {}),
        ("wrong token", {"csrf_token": "0" * 64}, {}),
        ("other origin", {}, {"origin": "https://evil.example"}),
        ("null origin", {}, {"origin": "null"}),
        ("other referer", {}, {"origin": "", "referer": "https://evil.example/page"}),
        ("cross-site fetch", {}, {"sec-fetch-site": "cross-site"}),
    ],
)
def test_a_post_without_the_sessions_token_or_from_another_site_changes_nothing(
    console: Console, case: str, data: dict[str, str], headers: dict[str, str]
) -> None:
    charge_id = failed_charge(console.url)
    web = console.signed_in("ada")
    before = console.ledger_count()
    if headers.get("origin") == "":
        # A Referer alone (no Origin): the client must not add its own Origin.
        answer = web.http.post(
            f"/charges/{charge_id}/discard",
            data={"csrf_token": web.csrf, "reason": "gone"},
            headers={"referer": headers["referer"]},
        )
    else:
        answer = web.post(
            f"/charges/{charge_id}/discard", {"reason": "gone", **data}, headers=headers
        )
    assert answer.status_code == 403, case
    _unchanged(console, charge_id, before)


def test_another_sessions_token_is_refused(console: Console) -> None:
    charge_id = failed_charge(console.url)
    attacker, victim = console.signed_in("ada"), console.signed_in("otto")
    before = console.ledger_count()
    victim.csrf = attacker.csrf  # a token the attacker saw in their own page
    assert victim.post(f"/charges/{charge_id}/discard", {"reason": "x"}).status_code == 403
    _unchanged(console, charge_id, before)


def test_sign_out_needs_the_token_too(console: Console) -> None:
    web = console.signed_in("vera")
    web.csrf = "0" * 64
    assert web.post("/logout").status_code == 403
    assert web.get("/").status_code == 200  # still signed in: a link cannot sign anyone out


def test_a_get_never_changes_anything(console: Console) -> None:
    charge_id = failed_charge(console.url)
    web = console.signed_in("ada")
    before = console.ledger_count()
    for path in (f"/charges/{charge_id}/discard?reason=x", f"/charges/{charge_id}/retry"):
        assert web.get(path).status_code in (404, 405)
    _unchanged(console, charge_id, before)


# --- roles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One action: how to set it up, the form that asks it, and how to tell it was done."""

    path: Callable[[Console], str]
    form: dict[str, str]
    done: Callable[[Console], bool]


def _seed_sub(console: Console, status: str) -> int:
    with session_scope(console.url) as session:
        return add_subscription(session, "sub-1", status=status).id


def _sub_status(console: Console) -> str:
    return str(_sub_field(console, "status"))


def _sub_field(console: Console, name: str) -> Any:
    with session_scope(console.url) as session:
        return session.scalars(select(getattr(Subscription, name))).one()


def _plan_change_stored(console: Console) -> bool:
    from billing.models import SubscriptionChange

    with session_scope(console.url) as session:
        return session.scalars(select(SubscriptionChange.plan)).all() == ["strict"]


def _charge_path(action: str, **fields: Any) -> Callable[[Console], str]:
    def make(console: Console) -> str:
        return f"/charges/{failed_charge(console.url, **fields)}/{action}"

    return make


def _approved_charge(console: Console, *, deferred: bool) -> int:
    """A charge the sandbox really approved (or authorized), so it has a TX to settle."""
    h = console.harness
    control = SandboxControl(h.engine.settings.gateway_url)
    card = control.seed_aliases(EUR_MERCHANT, 1)[0]
    sub_id = h.subscribe("sub-1", card, plan="deferred" if deferred else "monthly")
    h.engine.sweep_plan("deferred" if deferred else "monthly")
    h.run_sent()
    charge = h.charge(sub_id)
    assert charge.state == (ChargeState.AUTHORIZED if deferred else ChargeState.APPROVED)
    return charge.id


def _letter(console: Console) -> int:
    with session_scope(console.url) as session:
        sub = add_subscription(session, "sub-1")
        charge_id = add_charge(session, sub, state=ChargeState.FAILED).id
    return deadletters.record(
        console.url, task_name="billing.charge", task_id="t1", args=[charge_id], kwargs={},
        exc=RuntimeError("boom"),
    )  # fmt: skip


def _dead_event(console: Console) -> int:
    from billing.models import Event, EventDelivery, EventStatus

    sub_id = _seed_sub(console, "active")
    with session_scope(console.url) as session:
        ref = session.get_one(Subscription, sub_id).external_ref
    outbox.set_status(console.url, ref, "paused")  # makes subscription.paused
    with session_scope(console.url) as session:
        event = session.scalars(select(Event).order_by(Event.id)).first()
        assert event is not None
        for d in session.scalars(select(EventDelivery).where(EventDelivery.event_id == event.id)):
            d.status = EventStatus.DEAD
        return event.id


def _event_pending(console: Console) -> bool:
    from billing.models import EventDelivery, EventStatus

    with session_scope(console.url) as session:
        return session.scalars(select(EventDelivery.status)).first() == EventStatus.PENDING


def _charge_review(console: Console) -> str | None:
    with session_scope(console.url) as session:
        return session.scalars(select(Charge.review).order_by(Charge.id.desc())).first()


def _charge_state(console: Console) -> str:
    with session_scope(console.url) as session:
        return session.scalars(select(Charge.state).order_by(Charge.id.desc())).first() or ""


CASES: dict[Action, Case] = {
    Action.RETRY: Case(
        _charge_path("retry"), {"reason": "card updated"},
        lambda c: _charge_state(c) in ("pending", "queued"),
    ),
    Action.RESOLVE: Case(
        _charge_path("resolve"), {"outcome": "declined", "reason": "back office: declined"},
        lambda c: _charge_state(c) == "declined",
    ),
    Action.DISCARD: Case(
        _charge_path("discard"), {"reason": "moved to yearly"},
        lambda c: _charge_state(c) == "discarded",
    ),
    Action.REVIEW: Case(
        _charge_path("review", state=ChargeState.APPROVED, reason=None, review="amount_mismatch"),
        {"reason": "back office shows 29.90"},
        lambda c: _charge_review(c) is None,
    ),
    Action.PAUSE: Case(
        lambda c: f"/subscriptions/{_seed_sub(c, 'active')}/pause", {"reason": "holiday"},
        lambda c: _sub_status(c) == "paused",
    ),
    Action.RESUME: Case(
        lambda c: f"/subscriptions/{_seed_sub(c, 'paused')}/resume", {"reason": "back"},
        lambda c: _sub_status(c) == "active",
    ),
    Action.CHANGE_CARD: Case(
        lambda c: f"/subscriptions/{_seed_sub(c, 'active')}/card",
        {"alias": "zz98yy76xx54ww32", "reason": "card expired"},
        lambda c: _sub_field(c, "alias") == "zz98yy76xx54ww32",
    ),
    Action.CHANGE_PLAN: Case(
        lambda c: f"/subscriptions/{_seed_sub(c, 'active')}/terms",
        {"plan": "strict", "reason": "cheaper plan"}, _plan_change_stored,
    ),
    Action.CANCEL_SUBSCRIPTION: Case(
        lambda c: f"/subscriptions/{_seed_sub(c, 'active')}/cancel", {"reason": "asked to"},
        lambda c: _sub_status(c) == "cancelled",
    ),
    Action.REQUEUE: Case(
        lambda c: f"/deadletters/{_letter(c)}/requeue", {}, lambda c: bool(c.sent_tasks)
    ),
    Action.REDELIVER: Case(
        lambda c: f"/events/{_dead_event(c)}/redeliver", {}, _event_pending
    ),
    Action.CAPTURE: Case(
        lambda c: f"/charges/{_approved_charge(c, deferred=True)}/capture",
        {"amount": "120.00", "reason": "shipped"}, lambda c: _charge_state(c) == "approved",
    ),
    Action.CANCEL_CHARGE: Case(
        lambda c: f"/charges/{_approved_charge(c, deferred=False)}/cancel",
        {"amount": "10.00", "reason": "goodwill"},
        lambda c: any(e.outcome == "refunded" for e in c.ledger()),
    ),
}  # fmt: skip


def test_every_action_has_a_case() -> None:
    assert set(CASES) | {Action.MANAGE_USERS} == set(Action)


ROLES = ("viewer", "operator", "admin")
#: Every (action, role) pair: refused below the role the action needs, allowed from it on.
REFUSED = [(a, r) for a in CASES for r in ROLES if ROLES.index(r) < ROLES.index(NEEDS[a])]
ALLOWED = [(a, r) for a in CASES for r in ROLES if ROLES.index(r) >= ROLES.index(NEEDS[a])]


@pytest.mark.parametrize(("action", "role"), REFUSED, ids=lambda v: str(v))
def test_a_role_below_the_one_needed_is_refused_and_writes_nothing(
    console: Console, action: Action, role: str
) -> None:
    case = CASES[action]
    path = case.path(console)
    web = console.as_role(role)
    before = console.ledger_count()
    answer = web.post(path, case.form)
    assert answer.status_code == 403
    assert f"may not {action.value.replace('_', ' ')}" in answer.text
    assert console.ledger_count() == before and not case.done(console)
    assert not console.sent_tasks


@pytest.mark.parametrize(("action", "role"), ALLOWED, ids=lambda v: str(v))
def test_a_role_that_may_acts_and_the_ledger_names_the_person(
    console: Console, action: Action, role: str
) -> None:
    case = CASES[action]
    path = case.path(console)
    name = USER_OF[role]
    web = console.signed_in(name)
    before = console.ledger_count()
    message = web.flash(web.post(path, case.form))
    assert message.startswith("ok: "), message
    assert case.done(console)
    if action not in (Action.REQUEUE, Action.REDELIVER):
        # Dead letters and events keep who asked on their own rows (requeued_by, ...).
        new = console.ledger()[before:]
        mine = [e for e in new if e.actor == f"console:{name}"]
        assert mine, [(e.outcome, e.actor) for e in new]
        assert case.form["reason"] in " ".join(e.reason or "" for e in mine)


def test_a_viewer_sees_no_buttons_and_an_operator_no_money_buttons(console: Console) -> None:
    charge_id = failed_charge(console.url, state=ChargeState.UNKNOWN, reason="unknown_outcome")
    viewer = console.as_role("viewer").get(f"/charges/{charge_id}").text
    for button in (">Retry</button>", ">Resolve</button>", ">Discard</button>"):
        assert button not in viewer
    assert "Look this up in the Klik &amp; Pay back office" in viewer  # reading is allowed
    operator = console.as_role("operator").get(f"/charges/{charge_id}").text
    for button in (">Retry</button>", ">Resolve</button>", ">Discard</button>"):
        assert button in operator
    assert 'href="/users"' not in operator
    assert console.as_role("operator").get("/users").status_code == 403
    assert 'href="/users"' in console.as_role("admin").get("/").text


def test_an_operator_cannot_manage_accounts(console: Console) -> None:
    web = console.as_role("operator")
    answer = web.post("/users/role", {"name": "otto", "role": "admin"})
    assert answer.status_code == 403
    with session_scope(console.url) as session:
        assert accounts.get_user(session, "otto").role == "operator"


def test_an_admin_manages_accounts_from_the_console(console: Console) -> None:
    web = console.as_role("admin")
    added = web.flash(
        web.post("/users/add", {"name": "nina", "role": "viewer", "password": "nina-pass-123"})
    )
    assert added.startswith("ok"), added
    assert web.flash(web.post("/users/role", {"name": "nina", "role": "operator"})).startswith("ok")
    assert web.flash(web.post("/users/disable", {"name": "ada"})).startswith("error")  # oneself
    assert Web(console.client(), console).sign_in("nina", "nina-pass-123").status_code == 303
    assert web.flash(web.post("/users/disable", {"name": "nina"})).startswith("ok")
    assert Web(console.client(), console).sign_in("nina", "nina-pass-123").status_code == 401
    assert web.flash(web.post("/users/enable", {"name": "nina"})).startswith("ok")
    short = web.flash(web.post("/users/add", {"name": "tom", "role": "viewer", "password": "x"}))
    assert short.startswith("error") and "at least 10 characters" in short
    assert web.post("/users/rename", {"name": "nina"}).status_code == 303  # no such change
    page = web.get("/users").text
    assert "nina-pass-123" not in page and "argon2" not in page


# --- headers --------------------------------------------------------------------------------


def test_every_answer_has_the_policy_without_inline_script_and_refuses_framing(
    console: Console,
) -> None:
    web = console.signed_in("ada")
    for path in ("/", "/failed", "/login", "/charges/999", "/static/console.css", "/nope"):
        answer = web.get(path)
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy, path
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
    for path in ("/", "/failed", "/login", "/plans"):
        html = web.get(path).text
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, path  # no inline script
        assert " style=" not in html and "<style" not in html, path
        assert re.search(r"\son[a-z]+=", html) is None, path  # no inline handlers
    assert HEADERS["x-frame-options"] == "DENY"


# --- more of what an attacker tries -----------------------------------------------------------


def test_a_cookie_set_before_sign_in_is_not_adopted(console: Console) -> None:
    """Session fixation: a token planted in the victim's browser never becomes a session."""
    planted = console.app.console.keys.cookie_value("planted-token")
    web = Web(console.client(), console)
    web.http.cookies.set("kpb_session", planted, domain="console.test")
    assert web.sign_in("otto", PASSWORDS["otto"]).status_code == 303
    assert web.http.cookies["kpb_session"] != planted
    attacker = console.client()
    attacker.cookies.set("kpb_session", planted)
    assert attacker.get("/").status_code == 303


def test_a_huge_form_is_refused_before_it_is_read(console: Console) -> None:
    charge_id = failed_charge(console.url)
    web = console.signed_in("ada")
    before = console.ledger_count()
    answer = web.post(f"/charges/{charge_id}/discard", {"reason": "x" * 400_000})
    assert answer.status_code == 403 and "too large" in answer.text
    _unchanged(console, charge_id, before)


def test_odd_paths_ids_and_methods_get_plain_refusals(console: Console) -> None:
    web = console.signed_in("ada")
    assert web.get("/charges/99999999999999").status_code == 404
    assert web.get("/static/../app.py").status_code == 404
    assert web.get("/static/%2e%2e/app.py").status_code == 404
    assert web.get("/events/../../etc/passwd").status_code in (400, 404)
    assert web.get("/failed", params={"page": "-1"}).status_code == 400
    assert web.http.delete("/charges/1/discard").status_code == 405
    assert web.http.put("/failed/bulk").status_code == 405
    for answer in (web.get("/charges/99999999999999"), web.get("/failed?page=x")):
        assert "Traceback" not in answer.text and "sqlalchemy" not in answer.text.lower()


def test_failures_far_apart_are_not_in_a_row(console: Console) -> None:
    web = Web(console.client(), console)
    for _ in range(accounts.SIGN_IN_LIMIT + 2):
        assert web.sign_in("otto", "wrong-password").status_code == 401
        console.clock.advance(accounts.FAILURE_WINDOW + timedelta(seconds=1))
    assert web.sign_in("otto", PASSWORDS["otto"]).status_code == 303


def test_a_password_typed_as_the_name_never_reaches_the_log(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    web = Web(console.client(), console)
    with caplog.at_level("INFO"):
        web.sign_in("operator-pass-123", "otto")  # fields swapped: the name is a password
        web.sign_in("otto", "operator-pass-12")  # an account: its name is logged, not the try
    text = caplog.text
    assert "operator-pass-12" not in text
    assert "failed sign-in, account=-, from" in text
    assert "failed sign-in, account=otto, from" in text


def test_old_failure_counts_are_forgotten(console: Console) -> None:
    web = Web(console.client(), console)
    for name in ("guess-a", "guess-b"):
        web.sign_in(name, "wrong-password")
    console.clock.advance(accounts.FORGET_AFTER + timedelta(minutes=1))
    web.sign_in("guess-c", "wrong-password")
    with session_scope(console.url) as session:
        keys = set(session.scalars(select(accounts.SignInFailure.key)))
    assert keys == {"user:guess-c", "addr:testclient"}
