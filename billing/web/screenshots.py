"""``python -m billing.web.screenshots OUTDIR`` (``make screenshots``): the README's pictures.

The README shows the console as the person on call sees it, so its pictures must come
from a database that looks like a merchant's on an ordinary morning, not from a test's
five rows, and anybody must be able to make them again after changing a template. This
module does that on one machine, with nothing of its own faked:

- a fresh SQLite database at the head migration and ``billing sandbox`` in a process of
  its own (``billing.harness``), with the demo's plans (``schedules/demo.toml``: two
  monthly/yearly EUR plans and a weekly USD one, on two merchant accounts);
- 30 days of history, inserted directly as the rows the engine and a person would have
  written (the engine stamps its rows with the time of the call, so it cannot be run in
  the past): approved and declined charge calls on each UTC day, a few hard declines a
  person discarded, one still waiting for days, and an answer lost last night, so the
  overview's chart, decline rate and oldest unknown charge have something to show;
- this morning's run made by the real engine calling the sandbox over HTTP: approvals in
  both currencies, a deferred authorization, hard declines, a soft decline that ran out
  its retry ladder, and answers lost or garbled after the gateway recorded the charge
  (``unknown_outcome``), one of them after an earlier soft decline, so its timeline has
  two calls;
- the console itself (``billing.web.app``) on a loopback port, signed in as an operator
  through ``/login``, photographed by Debian's Chromium through Playwright (the
  browser tests' own launcher): ``overview.png``, ``failed-queue.png``, ``charge.png`` (an
  unknown charge with its back-office box) and ``charge-phone.png`` (the same at 390x844).

It fails, saying so, when a page is wider than a phone's screen or a picture weighs more
than ``MAX_PNG_BYTES``: both are what a person would call broken.

It needs the dev extras (Playwright) and ``/usr/bin/chromium``; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from billing import accounts, ledger
from billing.dates import due_at
from billing.db import session_scope
from billing.demo import DEMO_PLANS, KEYS
from billing.engine import Engine
from billing.gateway import KlikAndPayClient
from billing.harness.base import HarnessError
from billing.harness.databases import sqlite_database
from billing.harness.ports import free_port
from billing.harness.sandbox import SandboxControl, SandboxProcess
from billing.models import Attempt, Charge, ChargeState, Subscription, SubscriptionStatus, utcnow
from billing.plans import PlanSet, load_plans
from billing.settings import Settings

CHROMIUM = "/usr/bin/chromium"
#: How the console's browser tests and this module start Debian's Chromium.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
#: A picture heavier than this is too heavy for a README.
MAX_PNG_BYTES = 300_000
#: The operator the pictures are taken as (a new password each run, never shown).
USER = "maria"
#: The engine's name in the ledger, as a worker on a host called ``billing-1`` writes it.
WORKER = "worker:billing-1:4121"
HISTORY_DAYS = 30
PICTURES = ("overview.png", "failed-queue.png", "charge.png", "charge-phone.png")


class ScreenshotError(Exception):
    """What stops the pictures, in one line."""


# --- the database ---------------------------------------------------------------------------


@dataclass
class Seeded:
    """What the pictures show: the unknown charge whose page is photographed."""

    unknown_charge: int
    counts: dict[str, int] = field(default_factory=dict)


def _ip(n: int) -> str:
    return f"198.51.100.{10 + n % 240}"


def _subscription(
    session: Any,
    plans: PlanSet,
    ref: str,
    plan: str,
    alias: str,
    anchor: datetime,
    n: int,
    *,
    now: datetime | None = None,
    **values: Any,
) -> Subscription:
    """A subscription anchored at ``anchor``; with ``now``, its periods up to ``now`` were
    charged (its next charge is the first one after ``now``)."""
    p = plans.plans[plan]
    period = 0
    while now is not None and due_at(anchor, p.every, period, p.timezone) <= now:
        period += 1
    sub = Subscription(
        external_ref=ref, plan=plan, alias=alias, customer_ip=_ip(n), anchor_at=anchor,
        next_period=period, next_charge_at=due_at(anchor, p.every, period, p.timezone),
        email=f"{ref}@customers.example", created_at=anchor, updated_at=anchor,
        **{"status": SubscriptionStatus.ACTIVE, **values},
    )  # fmt: skip
    session.add(sub)
    session.flush()
    return sub


#: The sandbox's words for a decline, as the engine records them.
DECLINED = "Transaction refusee"


def _history(url: str, plans: PlanSet, control: SandboxControl, now: datetime) -> int:
    """The last 30 UTC days as the engine left them: each day's charges, their declines and
    approvals, the few hard declines a person discarded or has not looked at yet, and one
    answer lost last night. Rows are written whole (the ORM would stamp a changed row with
    the time of writing)."""
    written = 0
    day0 = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC)
    aliases = {
        a.merchant_id: control.seed_aliases(a.merchant_id, 1)[0] for a in plans.accounts.values()
    }
    with session_scope(url) as session:
        n = 0
        for back in range(HISTORY_DAYS - 1, 0, -1):
            day = day0 - timedelta(days=back)
            # A weekday/weekend rhythm and some noise, the same for the same day.
            many = 6 + (day.toordinal() * 7) % 5 + (4 if day.weekday() < 5 else 0)
            for i in range(many):
                n += 1
                plan = "starter-weekly" if i % 3 == 1 else "pro-monthly"
                p = plans.plans[plan]
                merchant = plans.account_for(p).merchant_id
                at = day + timedelta(hours=6, minutes=(i * 13) % 50, seconds=n % 60)
                soft = (n * 5) % 7 == 0  # declined first, approved at the retry
                hard = (n * 3) % 19 == 0  # refused for good
                waiting = hard and back <= 3  # still in the queue
                last = at + timedelta(hours=2) if soft else at
                sub = _subscription(
                    session, plans, f"shop-{40000 + n}", plan, aliases[merchant], at, n,
                    now=None if hard else now, last_charged_at=None if hard else last,
                    status=SubscriptionStatus.SUSPENDED if waiting else SubscriptionStatus.ACTIVE,
                )  # fmt: skip
                tx = f"{day.toordinal() % 1000:03d}{n:06d}"
                charge = Charge(
                    subscription_id=sub.id, period=0, due_at=at, plan=plan, plan_version=1,
                    amount=p.amount, currency=p.currency, merchant_id=merchant, deferred=False,
                    attempts=1 + soft, declines=int(soft or hard), created_at=at,
                    state=ChargeState.FAILED if waiting else
                    ChargeState.DISCARDED if hard else ChargeState.APPROVED,
                    reason="hard_decline" if waiting else None,
                    last_code="54" if hard else None, last_message=DECLINED if hard else None,
                    tx=None if hard else tx, collected_amount=None if hard else p.amount,
                    updated_at=last + timedelta(hours=20) if hard and not waiting else last,
                )  # fmt: skip
                session.add(charge)
                session.flush()
                rows: list[dict[str, Any]] = []
                if soft:
                    rows.append({"outcome": "declined", "code": "51", "at": at})
                if hard:
                    rows.append({"outcome": "declined", "code": "54", "at": last})
                    if not waiting:
                        rows.append({
                            "outcome": "discarded", "operation": "discard",
                            "actor": f"console:{USER}", "at": charge.updated_at,
                            "reason": "card expired; the shop emails the customer",
                        })  # fmt: skip
                else:
                    rows.append({
                        "outcome": "approved", "amount": p.amount, "tx": tx, "at": last,
                        "message": "Transaction acceptee",
                    })  # fmt: skip
                for row in rows:
                    if row["outcome"] == "declined":
                        row["message"] = DECLINED
                    ledger.append(
                        session, **{"operation": "duplicate", "actor": WORKER, **row},
                        charge=charge, subscription=sub,
                    )  # fmt: skip
                written += len(rows)
        written += _lost_last_night(session, plans, aliases, day0 - timedelta(hours=1, minutes=40))
    return written


def _lost_last_night(session: Any, plans: PlanSet, aliases: dict[str, str], at: datetime) -> int:
    """A charge whose answer never came back last night: what the on-call person sees first
    (the oldest unknown charge)."""
    p = plans.plans["pro-monthly"]
    merchant = plans.account_for(p).merchant_id
    sub = _subscription(session, plans, "shop-48800", "pro-monthly", aliases[merchant], at, 99)
    charge = Charge(
        subscription_id=sub.id, period=0, due_at=at, plan=p.name, plan_version=1,
        amount=p.amount, currency=p.currency, merchant_id=merchant, deferred=False, attempts=1,
        state=ChargeState.UNKNOWN, reason="unknown_outcome", created_at=at,
        last_message="read timeout after the request was sent (ReadTimeout)",
        updated_at=at + timedelta(seconds=30),
    )  # fmt: skip
    session.add(charge)
    session.flush()
    attempt = Attempt(
        charge_id=charge.id, number=1, operation="duplicate", amount=p.amount, worker=WORKER,
        started_at=at, finished_at=charge.updated_at, outcome="unknown",
    )  # fmt: skip
    session.add(attempt)
    session.flush()
    ledger.append(
        session, outcome="unknown", operation="duplicate", actor=WORKER, charge=charge,
        subscription=sub, message=charge.last_message, at=charge.updated_at,
    )  # fmt: skip
    return 1


@dataclass
class Run:
    """This morning's run: the real engine, calling the sandbox over HTTP."""

    engine: Engine
    control: SandboxControl
    url: str
    plans: PlanSet
    sent: list[int] = field(default_factory=list)
    n: int = 0

    def customer(self, ref: str, plan: str, **behaviour: Any) -> tuple[int, str]:
        """A subscription due a minute ago with a card the sandbox issued (and what the
        sandbox will do with it); its ID and alias."""
        merchant = self.plans.account_for(self.plans.plans[plan]).merchant_id
        (alias,) = self.control.seed_aliases(merchant, 1)
        if behaviour:
            self.control.set_behaviour(alias, **behaviour)
        self.n += 1
        with session_scope(self.url) as session:
            sub = _subscription(
                session, self.plans, ref, plan, alias, utcnow() - timedelta(minutes=1), self.n
            )
            return sub.id, alias

    def work(self) -> None:
        """Dispatch what is due and play the worker."""
        self.engine.dispatch_due()
        while self.sent:
            ids, self.sent[:] = list(self.sent), []
            for charge_id in ids:
                self.engine.charge(charge_id)

    def charge_of(self, sub_id: int) -> Charge:
        with session_scope(self.url) as session:
            return session.scalars(select(Charge).where(Charge.subscription_id == sub_id)).one()


def _today(run: Run) -> int:
    """This morning's sweep of every plan; the unknown charge whose page is shown."""
    for i in range(12):
        run.customer(f"shop-5{i:04d}", "pro-monthly")
    for i in range(7):
        run.customer(f"shop-7{i:04d}", "starter-weekly")
    run.customer("shop-60001", "team-yearly")  # deferred: authorized, captured later
    run.customer("shop-50101", "pro-monthly", decline="54")
    run.customer("shop-50102", "pro-monthly", decline="41")
    run.customer("shop-70101", "starter-weekly", decline="57")
    spent, _ = run.customer("shop-50103", "pro-monthly", decline="51")
    lost, lost_alias = run.customer("shop-50104", "pro-monthly", decline="05", times=1)
    run.customer("shop-70102", "starter-weekly", error_500_after_record=True)
    run.customer("shop-50105", "pro-monthly", garbage=True)
    for plan in ("pro-monthly", "starter-weekly", "team-yearly"):
        run.engine.sweep_plan(plan)
    run.work()
    # The retry ladder (3 s, 3 s in the demo's plans), waited for: the timeline shows the
    # calls as far apart as the plan puts them.
    run.control.set_behaviour(lost_alias, drop_after_record=True)
    for delay in run.plans.plans["pro-monthly"].retry_ladder:
        time.sleep(delay.total_seconds() + 0.5)
        run.work()
    unknown = run.charge_of(lost)
    if unknown.state != ChargeState.UNKNOWN or run.charge_of(spent).reason != "ladder_exhausted":
        raise ScreenshotError(
            f"the seeded run did not end as planned (charge {unknown.id} is {unknown.state}, "
            f"the soft decline's reason is {run.charge_of(spent).reason})"
        )
    return unknown.id


def seed(url: str, plans: PlanSet, settings: Settings, control: SandboxControl) -> Seeded:
    """History, then this morning's run; the charge to photograph."""
    history = _history(url, plans, control, utcnow())
    run = Run(engine=None, control=control, url=url, plans=plans)  # type: ignore[arg-type]
    run.engine = Engine(
        settings, plans=plans, client=KlikAndPayClient.from_settings(settings),
        dispatcher=run.sent.extend, limiter=None, actor=WORKER,
    )  # fmt: skip
    # The lost and garbled answers are planned: the gateway's warnings about them are not
    # news to whoever makes the pictures.
    gateway_log = logging.getLogger("billing.gateway")
    level = gateway_log.level
    gateway_log.setLevel(logging.ERROR)
    try:
        unknown = _today(run)
    finally:
        gateway_log.setLevel(level)
    with session_scope(url) as session:
        states = session.execute(select(Charge.state)).scalars().all()
    counts = {"history ledger rows": history, "charges": len(states)}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return Seeded(unknown, counts)


# --- the console and the browser ------------------------------------------------------------


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` on a free loopback port (uvicorn in a thread); its base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise ScreenshotError("the console did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright (never a browser Playwright downloads)."""
    if not os.access(CHROMIUM, os.X_OK):
        raise ScreenshotError(f"{CHROMIUM} is absent: install Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ScreenshotError("Playwright is not installed: pip install -e '.[dev]'") from None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Any, base: str, name: str, password: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/login" not in url)


def overflow(page: Any) -> int:
    """How many pixels the page is wider than the screen it was opened on (0 when it
    fits). The screen, not ``innerWidth``: a phone widens its layout to what overflows."""
    wide: int = page.evaluate("document.documentElement.scrollWidth")
    return max(wide - int(page.viewport_size["width"]), 0)


def shoot(browser: Any, base: str, password: str, charge_id: int, out: Path) -> list[Path]:
    """The four pictures, signed in as ``USER``; a page wider than a phone is an error."""
    saved = []
    laptop = browser.new_context(viewport=LAPTOP)
    try:
        page = laptop.new_page()
        page.set_default_timeout(15_000)
        sign_in(page, base, USER, password)
        for path, name in (("/", "overview"), ("/failed", "failed-queue")):
            page.goto(base + path)
            saved.append(out / f"{name}.png")
            page.screenshot(path=str(saved[-1]), full_page=True)
        page.goto(f"{base}/charges/{charge_id}")
        saved.append(out / "charge.png")
        page.screenshot(path=str(saved[-1]), full_page=True)
        cookies = laptop.cookies()
    finally:
        laptop.close()
    phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        phone.add_cookies(cookies)
        page = phone.new_page()
        page.goto(f"{base}/charges/{charge_id}")
        saved.append(out / "charge-phone.png")
        page.screenshot(path=str(saved[-1]), full_page=True)
        too_wide = {}
        for path in ("/", "/failed", f"/charges/{charge_id}"):
            page.goto(base + path)
            if overflow(page):
                too_wide[path] = overflow(page)
        if too_wide:
            raise ScreenshotError(f"pages wider than a {PHONE['width']} px phone: {too_wide}")
    finally:
        phone.close()
    heavy = {p.name: p.stat().st_size for p in saved if p.stat().st_size > MAX_PNG_BYTES}
    if heavy:
        raise ScreenshotError(f"pictures heavier than {MAX_PNG_BYTES} bytes: {heavy}")
    return saved


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment for the block (the plans read their keys there)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_screenshots(
    out: Path, *, browser: Any = None, say: Callable[[str], None] = print
) -> list[Path]:
    """Seed a database, serve the console over it and photograph it into ``out`` with
    ``browser`` (a Playwright browser; Debian's Chromium started for it by default)."""
    from billing.web.app import create_app
    from billing.web.config import ConsoleSettings
    from billing.web.service import Backend

    out.mkdir(parents=True, exist_ok=True)
    keys = {"KLIKANDPAY_KEY_EUR": KEYS["1234567"], "KLIKANDPAY_KEY_USD": KEYS["7654321"]}
    with _environ(keys), tempfile.TemporaryDirectory(prefix="billing-screenshots-") as tmp:
        url = sqlite_database(Path(tmp) / "billing.db")
        with SandboxProcess(KEYS, log=Path(tmp) / "sandbox.log") as sandbox:
            settings = Settings(
                database_url=url, gateway_url=sandbox.url, connect_timeout=2, read_timeout=2,
                broker_url="memory://", plans_file=DEMO_PLANS,
            )  # fmt: skip
            plans = load_plans(DEMO_PLANS)
            seeded = seed(url, plans, settings, sandbox.control)
            say("seeded: " + ", ".join(f"{k} {v}" for k, v in seeded.counts.items()))
            password = secrets.token_urlsafe(16)
            with session_scope(url) as session:
                accounts.add_user(session, USER, role="operator", password=password)
            engine = Engine(settings, plans=plans, limiter=None)
            backend = Backend(
                settings=settings, plans=lambda: plans, engine=lambda: engine,
                send_retried=lambda number: "not sent: no workers run for the screenshots",
                send_task=lambda name, args, kwargs: "not sent",
            )  # fmt: skip
            app = create_app(
                settings, ConsoleSettings(secret_key=secrets.token_urlsafe(32)), backend=backend
            )
            with serving(app) as base:
                if browser is not None:
                    saved = shoot(browser, base, password, seeded.unknown_charge, out)
                else:
                    with chromium() as started:
                        saved = shoot(started, base, password, seeded.unknown_charge, out)
    for path in saved:
        say(f"{path} ({path.stat().st_size // 1000} KB)")
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("error: usage: python -m billing.web.screenshots OUTDIR", file=sys.stderr)
        return 2
    try:
        make_screenshots(Path(args[0]))
    except (ScreenshotError, HarnessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
