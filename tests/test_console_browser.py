"""The console in a real browser: Playwright for Python driving Debian's Chromium.

The fast test serves the console with uvicorn on loopback over the ``console`` fixture
(real PostgreSQL, the engine calling the sandbox over HTTP, no worker process) and does
what the person on call does: sign in, find the unknown charge from the queue, read the
back-office box, try Retry without the confirmation (refused) and with it (queued, the
ledger names them), bulk-discard a filtered selection, export the CSV, give the charge
left a new card from its subscription's page (re-opened and sent), sign out. On the way
it checks the pages a phone shows (nothing wider than 390 px, the queue's cells on screen)
and saves screenshots of the overview, the queue and a charge page to ``SCREENSHOTS_DIR``.
The README's pictures come from ``make screenshots`` (``billing.web.screenshots``: a
seeded database of a month), which a test here runs too.

The slow test runs ``billing demo --serve`` (real sandbox, worker, beat and console
processes) and handles every failed charge the demo makes from the browser alone.

Where ``/usr/bin/chromium`` is absent these tests skip, saying so; with
``BILLING_REQUIRE_BROWSER=1`` (set by ``.ci/run``) they fail instead, so CI never passes
on a skipped browser.
"""

from __future__ import annotations

import csv
import io
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from billing import ledger
from billing.db import session_scope
from billing.harness.ports import free_port
from billing.models import ChargeState, LedgerEntry
from billing.web import screenshots
from billing.web.screenshots import CHROMIUM, CHROMIUM_ARGS, PHONE, overflow
from tests.fixtures.sandbox import EUR_MERCHANT, SandboxControl
from tests.fixtures.web import PASSWORDS, Console, failed_charge
from tests.test_ops import add_charge, add_subscription

pytestmark = pytest.mark.browser

REQUIRE = os.environ.get("BILLING_REQUIRE_BROWSER") == "1"
BILLING = str(Path(sys.executable).with_name("billing"))
NEW_ALIAS = "zz98yy76xx54ww32"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)"
        if REQUIRE:
            pytest.fail(f"browser tests required (BILLING_REQUIRE_BROWSER=1) but {message}")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def served(console: Console) -> Iterator[str]:
    """The console app on a real loopback port (uvicorn in a thread)."""
    with screenshots.serving(console.app) as base:
        yield base


def _sign_in(page: Any, base: str, name: str, password: str) -> None:
    page.goto(f"{base}/failed")
    assert "/login" in page.url
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/failed$"))


def _unknown_charge(console: Console) -> int:
    h = console.harness
    control = SandboxControl(h.engine.settings.gateway_url)
    alias = control.seed_aliases(EUR_MERCHANT, 1)[0]
    control.set_behaviour(alias, drop_after_record=True)
    sub_id = h.subscribe("shop-lost", alias, plan="strict")
    h.engine.sweep_plan("strict")
    h.run_sent()
    charge = h.charge(sub_id)
    assert charge.state == ChargeState.UNKNOWN
    return charge.id


def _approved(console: Console, ref: str) -> None:
    h = console.harness
    alias = SandboxControl(h.engine.settings.gateway_url).seed_aliases(EUR_MERCHANT, 1)[0]
    h.subscribe(ref, alias, plan="monthly")
    h.engine.sweep_plan("monthly")
    h.run_sent()


def _history(console: Console) -> None:
    """Ledger rows of the last four weeks, so the overview's chart has something to draw."""
    now = datetime.now(UTC)
    with session_scope(console.url) as session:
        sub = add_subscription(session, "shop-history")
        charge = add_charge(session, sub, state=ChargeState.APPROVED)
        for day in range(1, 29):
            rows = [("approved", "29.90")] * (2 + day * 7 % 5) + [("declined", "0.00")] * (day % 3)
            for outcome, amount in rows:
                ledger.append(
                    session, outcome=outcome, operation="duplicate", actor="test", charge=charge,
                    amount=Decimal(amount), at=now - timedelta(days=day),
                )  # fmt: skip


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_person_on_call_in_a_browser(
    console: Console, served: str, browser: Any, page: Any, shots: Path, tmp_path: Path
) -> None:
    _history(console)
    for i in range(3):
        _approved(console, f"shop-10{i}")
    unknown = _unknown_charge(console)
    declined = [failed_charge(console.url, f"shop-20{i}") for i in range(3)]
    spent = failed_charge(console.url, "shop-300", reason="ladder_exhausted")

    _sign_in(page, served, "otto", PASSWORDS["otto"])
    page.goto(f"{served}/")
    page.screenshot(path=str(shots / "overview.png"), full_page=True)
    # The chart's table for screen readers takes no room: the page ends with the chart
    # (a table is as tall as its rows whatever height it is given).
    bottom = page.evaluate(
        "document.querySelector('svg.chart').getBoundingClientRect().bottom + window.scrollY"
    )
    assert page.evaluate("document.documentElement.scrollHeight") <= bottom + 40

    # The queue, filtered to unknown outcomes; the charge is one click away.
    page.goto(f"{served}/failed")
    page.get_by_label("State").select_option("unknown")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"state=unknown"))
    page.goto(f"{served}/failed")
    page.screenshot(path=str(shots / "failed-queue.png"), full_page=True)
    page.get_by_label("State").select_option("unknown")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("link", name=str(unknown), exact=True).click()
    page.wait_for_url(re.compile(rf"/charges/{unknown}$"))

    box = page.locator("section.backoffice")
    assert "Look this up in the Klik & Pay back office" in box.inner_text()
    for expected in (EUR_MERCHANT, "9.99 EUR", "203.0.113.7"):
        assert expected in box.inner_text()
    page.screenshot(path=str(shots / "charge.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.screenshot(path=str(shots / "charge-phone.png"), full_page=True)
    wide = page.evaluate("document.documentElement.scrollWidth")
    assert wide <= 390, f"the charge page is {wide}px wide on a 390px phone"
    page.set_viewport_size({"width": 1280, "height": 900})
    _on_a_phone(browser, page, served, unknown)

    # Retry without ticking the box: refused, nothing changes.
    page.get_by_role("button", name="Retry").click()
    assert "tick the box" in page.locator(".flash").inner_text()
    assert console.charge(unknown).state == ChargeState.UNKNOWN
    # Ticked: queued, and the ledger names the person.
    page.get_by_label("The Klik & Pay back office shows no charge for this attempt").check()
    page.get_by_label("Reason (optional, written to the ledger)").fill("back office: no charge")
    page.get_by_role("button", name="Retry").click()
    assert "sent to the workers" in page.locator(".flash").inner_text()
    assert console.charge(unknown).state == ChargeState.QUEUED
    with session_scope(console.url) as session:
        row = session.scalars(
            select(LedgerEntry).where(LedgerEntry.outcome == "retry_requested")
        ).one()
        assert row.actor == "console:otto" and "back office: no charge" in (row.reason or "")

    # Bulk discard of the hard declines only.
    page.goto(f"{served}/failed?reason=hard_decline")
    assert "3 charge(s) waiting match the filter" in page.content()
    page.get_by_label("discard", exact=True).check()
    page.get_by_label("Reason (written to the ledger of each charge)").fill("customers left")
    page.get_by_role("button", name="Review selection").click()
    page.get_by_role("button", name="Discard 3 charge(s)").click()
    assert "Discard: 3 of 3 done" in page.locator("h1").inner_text()
    assert [console.charge(i).state for i in declined] == [ChargeState.DISCARDED] * 3
    assert console.charge(spent).state == ChargeState.FAILED

    # CSV export of what is left.
    page.goto(f"{served}/failed")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    saved = tmp_path / "failed.csv"
    download.value.save_as(saved)
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [int(r["charge_id"]) for r in rows] == [spent]

    # A new card for the spent charge's subscription: re-opened for one try, and sent.
    page.goto(f"{served}/charges/{spent}")
    page.get_by_role("link", name="shop-300", exact=True).click()
    card = page.locator("form[action$='/card']")
    card.get_by_label(re.compile("^New alias")).fill(NEW_ALIAS)
    card.get_by_label(re.compile("^Reason")).fill("customer gave a new card")
    card.get_by_role("button", name="Update card").click()
    flash = page.locator(".flash").inner_text()
    assert "re-opened for one try" in flash and "sent to the workers" in flash, flash
    assert console.charge(spent).state == ChargeState.QUEUED
    assert NEW_ALIAS not in page.content()
    page.screenshot(path=str(shots / "subscription.png"), full_page=True)

    # Sign out ends the session: the queue is behind the sign-in page again.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/login$"))
    page.goto(f"{served}/failed")
    assert "/login" in page.url


def _on_a_phone(browser: Any, signed_in: Any, base: str, charge_id: int) -> None:
    """The overview, the queue and a charge on a 390 px phone (a mobile viewport, which
    widens its layout to whatever overflows): nothing wider than the screen, and every
    charge's state, reason and message on screen without scrolling sideways."""
    phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        phone.add_cookies(signed_in.context.cookies())
        page = phone.new_page()
        for path in ("/", "/failed", f"/charges/{charge_id}"):
            page.goto(base + path)
            assert overflow(page) == 0, f"{path} is {overflow(page)} px wider than the phone"
        page.goto(f"{base}/failed")
        cells = page.locator(
            "table.queue tbody td.c-state, table.queue tbody td.c-reason, "
            "table.queue tbody td.c-last_message, table.queue tbody td.c-age"
        )
        assert cells.count() >= 4
        for i in range(cells.count()):
            box = cells.nth(i).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (
                f"{cells.nth(i).inner_text()!r} is off a 390 px screen: {box}"
            )
    finally:
        phone.close()


def test_the_readme_screenshots_are_made_from_a_seeded_console(
    browser: Any, tmp_path: Path
) -> None:
    """``make screenshots``: a seeded database, the console over it, four pictures that
    fit a phone and a README (``make_screenshots`` fails otherwise)."""
    saved = screenshots.make_screenshots(tmp_path / "shots", browser=browser, say=lambda line: None)
    assert [p.name for p in saved] == list(screenshots.PICTURES)
    for picture in saved:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < picture.stat().st_size < screenshots.MAX_PNG_BYTES


# --- the whole demo, from the browser alone ------------------------------------------------


@pytest.mark.slow
def test_make_console_lets_a_person_handle_every_failed_charge_of_the_demo(
    page: Any, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        [BILLING, "demo", "--serve", "--workdir", str(tmp_path / "demo"),
         "--console-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )  # fmt: skip
    try:
        out = _read_until(process, "Ctrl-C stops them all", timeout=120)
        url = re.search(r"console\s+(http://\S+)/login", out)
        user = re.search(r"user\s+(\S+)", out)
        password = re.search(r"password\s+(\S+)", out)
        calls = re.search(r"(http://\S+/_sandbox/calls)", out)
        assert url and user and password and calls, out[-2000:]
        base = url.group(1)
        _sign_in(page, base, user.group(1), password.group(1))
        handled = 0
        while True:
            page.goto(f"{base}/failed")
            links = page.locator("table.queue tbody a[href^='/charges/']")
            if links.count() == 0:
                break
            links.first.click()
            state = page.locator("h1 .badge").inner_text()
            if state == "unknown":
                # The back office (the sandbox's call log) shows whether it was charged.
                tx = _charged_tx(calls.group(1), page.locator("section.backoffice").inner_text())
                if tx:
                    page.get_by_label("approved", exact=True).check()
                    page.get_by_label(re.compile("^TX")).fill(tx)
                    page.get_by_label("Reason (written to the ledger)").nth(0).fill("seen paid")
                    page.get_by_role("button", name="Resolve").click()
                else:
                    page.get_by_label(re.compile("shows no charge")).check()
                    page.get_by_role("button", name="Retry").click()
            else:
                page.locator("form[action$='/discard'] input[name=reason]").fill("card refused")
                page.get_by_role("button", name="Discard").click()
            assert "ok" in (page.locator(".flash").get_attribute("class") or "")
            handled += 1
            assert handled < 10
        assert handled == 2  # the hard decline and the lost answer
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0


def _read_until(process: subprocess.Popen[bytes], needle: str, *, timeout: float) -> str:
    assert process.stdout is not None
    fd = process.stdout.fileno()  # read the pipe itself: a buffered readline would hide lines
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle.encode() not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and process.poll() is None, seen[-3000:].decode(errors="replace")
            if selector.select(min(left, 1.0)):
                seen += os.read(fd, 65536)
    return seen.decode(errors="replace")


def _charged_tx(calls_url: str, box: str) -> str | None:
    """The TX the sandbox recorded for the alias and amount of the back-office box."""
    import requests

    amount = re.search(r"Amount\s+(\d+\.\d\d)", box)
    masked = re.search(r"Card alias\s+(\S+)…(\S+)", box)
    assert amount and masked, box
    for call in requests.get(calls_url, timeout=5).json()["calls"]:
        alias = call.get("alias") or ""
        if (
            call.get("recorded")
            and alias.startswith(masked.group(1))
            and alias.endswith(masked.group(2))
            and call.get("amount") == amount.group(1)
        ):
            return str(call.get("tx"))
    return None
