"""Delivery to a real HTTP receiver on loopback: signatures, retries, order, leases, dead
events, and the ``billing events`` commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import select
from sqlalchemy.orm import joinedload
from typer.testing import CliRunner

from billing import broker, defaults, webhooks
from billing.cli import app
from billing.db import session_scope
from billing.errors import ConfigError, InvalidInput, NotFound, StateError
from billing.models import (
    DeadLetter,
    Event,
    EventDelivery,
    EventStatus,
    SubscriptionStatus,
    utcnow,
)
from billing.settings import Settings, get_settings, load_settings
from schedules.beat import DELIVER_EVENTS, build_beat_schedule
from tests.fixtures import outbox
from tests.fixtures.engine import ENGINE_PLANS
from tests.fixtures.processes import Cluster, wait_until

ROOT = Path(__file__).resolve().parents[1]
BILLING = str(ROOT / ".venv" / "bin" / "billing")
SECRET = "whsec-test-0123456789abcdef"
#: Where the README section lives until it is merged into README.md.
README_DRAFT = Path("/work/brief/webhooks-readme.md")


# ------------------------------------------------------------------- the receiver


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A shop's endpoint: answers from a script (status codes, or "hang" until released)."""

    script: list[int | str] = field(default_factory=list)
    default: int = 200
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def answer(self) -> int | str:
        return self.script.pop(0) if self.script else self.default

    def ids(self) -> list[str]:
        return [r.headers[webhooks.EVENT_ID_HEADER] for r in self.requests]


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    """A receiver listening on a free loopback port until the block ends."""
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state.requests.append(Received(time.time(), dict(self.headers), body))
                answer = state.answer()
            if answer == "hang":
                state.release.wait(60)
                return
            self.send_response(int(answer))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/billing"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


def _settings(url: str, receiver: Receiver | None, **extra: Any) -> Settings:
    values: dict[str, Any] = {"database_url": url, "webhook_timeout": 2, **extra}
    if receiver is not None:
        values.update(webhook_url=receiver.url, webhook_secret=SECRET)
    return Settings(**values)


# --------------------------------------------------------------------- the events


def _subscription(url: str, ref: str) -> int:
    return outbox.subscription(url, ref)


def _set_status(url: str, ref: str, *statuses: str) -> None:
    """One committed status change (hence one event) per status."""
    outbox.set_status(url, ref, *statuses)


def _events(url: str) -> list[Event]:
    with session_scope(url) as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


def _deliveries(url: str, endpoint: str = "default") -> list[EventDelivery]:
    """Each event's delivery to ``endpoint`` (the event loaded too), oldest event first."""
    with session_scope(url) as session:
        query = (
            select(EventDelivery)
            .options(joinedload(EventDelivery.event))
            .where(EventDelivery.endpoint == endpoint)
            .order_by(EventDelivery.event_id)
        )
        return list(session.scalars(query))


def _readme_snippet() -> str:
    """The Python block of the README that defines ``verify_signature``."""
    for path in (ROOT / "README.md", README_DRAFT):
        if path.exists():
            for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
                if "def verify_signature(" in block:
                    return block
    raise AssertionError("no README section shows verify_signature in a ```python block")


# -------------------------------------------------------------------------- tests


def test_a_delivery_run_against_a_hanging_endpoint_stops_claiming_after_its_time(
    pg_url, receiver, monkeypatch
):
    """A task holds its message while it runs; RabbitMQ closes a consumer that holds one
    for 30 minutes, and 100 posts to a shop that never answers would take longer."""
    monkeypatch.setattr(defaults, "WEBHOOK_RUN_SECONDS", 2.5)
    receiver.script = ["hang"] * 10
    for n in range(10):  # one event each: a subscription's events go out in order
        _subscription(pg_url, f"shop-{n}")
        _set_status(pg_url, f"shop-{n}", SubscriptionStatus.PAST_DUE)

    started = time.monotonic()
    result = webhooks.deliver_due(pg_url, _settings(pg_url, receiver, webhook_timeout=1))

    assert result.posted == len(receiver.requests) == 3  # at 0, 1 and 2 s; none at 3 s
    assert time.monotonic() - started < 5
    assert webhooks.deliver_due(pg_url, _settings(pg_url, receiver, webhook_timeout=1)).posted


def test_the_signature_verifies_with_the_documented_snippet(db_url, receiver):
    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE)

    result = webhooks.deliver_due(db_url, _settings(db_url, receiver))

    assert (result.posted, result.delivered) == (1, 1)
    (request,) = receiver.requests
    (event,) = _events(db_url)
    headers = request.headers
    assert headers[webhooks.EVENT_ID_HEADER] == event.event_id
    assert headers[webhooks.EVENT_TYPE_HEADER] == "subscription.past_due"
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"v1=[0-9a-f]{64}", headers[webhooks.SIGNATURE_HEADER])
    assert json.loads(request.body) == event.payload

    snippet = _readme_snippet()
    # The README shows the very function the project ships, not a look-alike.
    import inspect

    assert inspect.getsource(webhooks.verify_signature) in snippet
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    verify = namespace["verify_signature"]
    ts, sig = headers[webhooks.TIMESTAMP_HEADER], headers[webhooks.SIGNATURE_HEADER]
    assert verify(SECRET, ts, request.body, sig) is True
    assert verify("another-secret-0123456789", ts, request.body, sig) is False
    assert verify(SECRET, ts, request.body.replace(b"past_due", b"active__"), sig) is False
    assert verify(SECRET, str(int(ts) + 1), request.body, sig) is False
    with freeze_time(datetime.fromtimestamp(int(ts)) + timedelta(minutes=10)):
        assert verify(SECRET, ts, request.body, sig) is False  # a replay, too late


def test_500_three_times_then_200_is_delivered_once_in_four_posts(db_url, receiver):
    receiver.script = [500, 500, 500, 200]
    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.CANCELLED)
    settings = _settings(db_url, receiver)
    at = utcnow()
    assert webhooks.deliver_due(db_url, settings, now=at).posted == 1
    # Each retry waits its backoff (30 s, 2 min, 10 min): no post before it, one after.
    for delay in settings.webhook_backoff[:3]:
        (sent,) = _deliveries(db_url)
        assert (sent.status, sent.last_status) == ("pending", 500)
        assert sent.next_attempt_at == at + delay and sent.last_error.startswith("HTTP 500")
        assert webhooks.deliver_due(db_url, settings, now=at + delay / 2).posted == 0
        at = at + delay + timedelta(seconds=1)
        assert webhooks.deliver_due(db_url, settings, now=at).posted == 1
    later = webhooks.deliver_due(db_url, settings, now=utcnow() + timedelta(days=2))

    (sent,) = _deliveries(db_url)
    event = sent.event
    assert later.posted == 0
    assert (sent.status, sent.attempts, sent.last_status) == ("delivered", 4, 200)
    assert sent.delivered_at is not None and sent.last_error is None
    assert len(receiver.requests) == 4
    assert set(receiver.ids()) == {event.event_id}
    assert [r.headers[webhooks.ATTEMPT_HEADER] for r in receiver.requests] == ["1", "2", "3", "4"]
    assert len({r.body for r in receiver.requests}) == 1  # the same bytes every time


def test_events_of_one_subscription_go_in_order_others_do_not_wait(pg_url, receiver):
    _subscription(pg_url, "shop-a")
    _subscription(pg_url, "shop-b")
    _set_status(pg_url, "shop-a", SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED)
    _set_status(pg_url, "shop-b", SubscriptionStatus.PAST_DUE)
    _set_status(pg_url, "shop-a", SubscriptionStatus.ACTIVE)
    a1, a2, b1, a3 = _events(pg_url)
    receiver.script = [500]  # shop-a's first event fails once
    settings = _settings(pg_url, receiver)
    now = utcnow()

    first = webhooks.deliver_due(pg_url, settings, now=now)
    # a1 failed; a2 and a3 wait behind it; b1 went.
    assert receiver.ids() == [a1.event_id, b1.event_id]
    assert (first.posted, first.delivered, first.retrying) == (2, 1, 1)
    assert webhooks.deliver_due(pg_url, settings, now=now + timedelta(seconds=10)).posted == 0

    webhooks.deliver_due(pg_url, settings, now=now + timedelta(seconds=31))
    assert receiver.ids() == [a1.event_id, b1.event_id, a1.event_id, a2.event_id, a3.event_id]
    assert {d.status for d in _deliveries(pg_url)} == {"delivered"}
    types = [json.loads(r.body)["type"] for r in receiver.requests[2:]]
    assert types == ["subscription.past_due", "subscription.suspended", "subscription.reactivated"]


def test_a_claim_never_finished_is_posted_again_after_its_lease_with_the_same_id(db_url, receiver):
    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.SUSPENDED)
    settings = _settings(db_url, receiver)  # timeout 2 s: lease 4 s
    now = utcnow()
    lease = timedelta(seconds=4)
    # A worker claims the event, then dies before posting or recording anything.
    claimed = webhooks.claim_next(db_url, now, lease, "dead-worker", "default")
    assert claimed is not None and claimed.attempts == 1

    assert webhooks.deliver_due(db_url, settings, now=now + timedelta(seconds=3)).posted == 0
    result = webhooks.deliver_due(db_url, settings, now=now + timedelta(seconds=5))

    (sent,) = _deliveries(db_url)
    assert result.delivered == 1 and receiver.ids() == [claimed.event_id]
    assert (sent.event.event_id, sent.status, sent.attempts) == (claimed.event_id, "delivered", 2)


def test_without_an_endpoint_events_are_recorded_and_listed_and_nothing_fails(
    db_url, receiver, run
):
    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE)

    result = webhooks.deliver_due(db_url, _settings(db_url, None), now=utcnow())

    assert result == webhooks.DeliveryResult(configured=False)
    (sent,) = _deliveries(db_url)
    event = sent.event
    assert (sent.status, sent.attempts) == ("pending", 0)
    assert receiver.requests == []
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(BILLING_DATABASE_URL=db_url, COLUMNS="200")
    listed = subprocess.run([BILLING, "events", "list"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "subscription.past_due" in listed.stdout and "not posted" in listed.stdout
    bodies = run(db_url, "events", "list", "--payloads")
    assert [json.loads(line) for line in bodies.stdout.splitlines()] == [event.payload]


def test_after_the_last_try_the_event_is_dead_then_redelivered_by_a_person(pg_url, receiver, run):
    receiver.default = 503
    _subscription(pg_url, "shop-1")
    _set_status(pg_url, "shop-1", SubscriptionStatus.CANCELLED)
    settings = _settings(pg_url, receiver, webhook_backoff=["1 second"])
    now = utcnow()
    webhooks.deliver_due(pg_url, settings, now=now)
    dying = webhooks.deliver_due(pg_url, settings, now=now + timedelta(seconds=2))

    (sent,) = _deliveries(pg_url)
    event = sent.event
    assert dying.dead == 1 and len(receiver.requests) == 2
    assert (sent.status, sent.last_status) == ("dead", 503) and sent.dead_at is not None
    with session_scope(pg_url) as session:
        (letter,) = session.scalars(select(DeadLetter))
        assert letter.task_name == webhooks.REDELIVER_TASK
        assert letter.args == {"args": [event.event_id], "kwargs": {}}
        assert "HTTP 503" in letter.exc_message
    later = now + timedelta(days=1)
    assert webhooks.deliver_due(pg_url, settings, now=later).posted == 0  # dead stays dead

    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env["BILLING_DATABASE_URL"] = pg_url
    dead = run(pg_url, "events", "list", "--status", "dead", "--json")
    assert [row["event_id"] for row in json.loads(dead.stdout)] == [event.event_id]
    redo = subprocess.run(
        [BILLING, "events", "redeliver", str(event.id), "--by", "alice"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert redo.returncode == 0, redo.stderr
    assert event.event_id in redo.stdout

    receiver.default = 200
    assert webhooks.deliver_due(pg_url, settings, now=later).delivered == 1
    (sent,) = _deliveries(pg_url)
    event = sent.event
    assert (sent.status, sent.attempts, sent.redelivered_by) == ("delivered", 1, "alice")
    assert set(receiver.ids()) == {event.event_id}
    with session_scope(pg_url) as session:
        (letter,) = session.scalars(select(DeadLetter))
        assert letter.requeued_by == "alice"


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``billing ...`` in this process (no start-up cost), on the test's database."""
    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "200")
    for name in [k for k in os.environ if k.startswith("BILLING_WEBHOOK")]:
        monkeypatch.delenv(name)

    def invoke(url: str, *args: str) -> Any:
        monkeypatch.setenv("BILLING_DATABASE_URL", url)
        get_settings.cache_clear()
        return runner.invoke(app, list(args))

    yield invoke
    get_settings.cache_clear()


def test_events_show_prints_the_body_and_bad_input_is_refused(db_url, run):
    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.PAUSED)
    (event,) = _events(db_url)

    shown = run(db_url, "events", "show", event.event_id, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["payload"] == event.payload
    text = run(db_url, "events", "show", str(event.id))
    assert event.event_id in text.stdout and '"previous_status": "active"' in text.stdout
    listed = run(db_url, "events", "list", "--type", "subscription.", "--json")
    assert [row["id"] for row in json.loads(listed.stdout)] == [event.id]
    assert json.loads(run(db_url, "events", "list", "--type", "charge.", "--json").stdout) == []
    for args, error, needle in (
        (("show", "nope"), InvalidInput, "must be an event number"),
        (("show", "99"), NotFound, "event 99 does not exist"),
        (("list", "--status", "lost"), InvalidInput, "pending, delivered, dead"),
        (("redeliver", str(event.id)), StateError, "is pending"),
    ):
        result = run(db_url, "events", *args)
        assert isinstance(result.exception, error) and needle in str(result.exception)


def test_a_url_without_a_secret_is_refused_and_the_secret_is_never_printed(monkeypatch):
    monkeypatch.setenv("BILLING_WEBHOOK_URL", "https://shop.example/hooks")
    monkeypatch.delenv("BILLING_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"BILLING_WEBHOOK_SECRET: .*must be set"):
        load_settings()
    monkeypatch.setenv("BILLING_WEBHOOK_SECRET", SECRET)
    settings = load_settings()
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


def test_beat_asks_for_deliveries_every_few_seconds():
    from billing.plans import load_plans

    schedule = build_beat_schedule(load_plans(ENGINE_PLANS), Settings(webhook_deliver_seconds=3))
    entry = schedule["deliver-events"]
    assert entry["task"] == DELIVER_EVENTS and entry["schedule"] == timedelta(seconds=3)


@pytest.mark.slow
def test_a_worker_killed_mid_post_is_redelivered_with_the_same_event_id(
    cluster: Cluster, pg_url, receiver
):
    receiver.script = ["hang", 200]
    cluster.env.update(
        BILLING_WEBHOOK_URL=receiver.url,
        BILLING_WEBHOOK_SECRET=SECRET,
        BILLING_WEBHOOK_TIMEOUT="3",  # lease: 6 s
        BILLING_PLANS_FILE=str(ENGINE_PLANS),
    )
    _subscription(pg_url, "shop-1")
    _set_status(pg_url, "shop-1", SubscriptionStatus.PAST_DUE)
    queue = cluster.env["BILLING_QUEUE"]
    sender = broker.sending_app(Settings(broker_url=cluster.env["BILLING_BROKER_URL"], queue=queue))

    first = cluster.worker("w1")
    sender.send_task(DELIVER_EVENTS, queue=queue)
    wait_until(lambda: len(receiver.requests) == 1, timeout=30)
    cluster.kill(first)  # SIGKILL while the shop has the post but has not answered
    (sent,) = _deliveries(pg_url)
    assert (sent.status, sent.attempts) == ("pending", 1) and sent.claimed_until

    cluster.worker("w2")

    def delivered() -> bool:
        sender.send_task(DELIVER_EVENTS, queue=queue)
        time.sleep(0.5)
        return _deliveries(pg_url)[0].status == EventStatus.DELIVERED

    wait_until(delivered, timeout=40, step=0.5)
    (sent,) = _deliveries(pg_url)
    event = sent.event
    assert receiver.ids() == [event.event_id, event.event_id]
    assert receiver.requests[0].body == receiver.requests[1].body
    assert sent.attempts == 2 and sent.last_status == 200
    # Not before the dead worker's lease ran out.
    assert receiver.requests[1].at - receiver.requests[0].at >= 5.0


def test_payload_amounts_are_strings_with_two_decimals():
    """Money in a payload is "29.90", never a float."""
    from billing.events import charge_part
    from billing.models import Charge

    charge = Charge(id=7, period=2, amount=Decimal("5"), currency="EUR", state="approved")
    part = charge_part(charge)
    assert part is not None and part["amount"] == "5.00"


# ------------------------------------------------------- hostile endpoints (issue 14)

TOKEN = "tok-Q1w+9/zz=0123456789"


def _closed_port() -> int:
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return int(closed.getsockname()[1])


def _token_forms() -> list[str]:
    from urllib.parse import quote, quote_plus

    return [TOKEN, quote(TOKEN, safe=""), quote_plus(TOKEN, safe=""), TOKEN.replace("+", " ")]


def _echo_request(conn: Any, request: bytes) -> None:
    """An endpoint that answers 500 with the request line and headers it got."""
    head = request.split(b"\r\n\r\n", 1)[0]
    conn.sendall(
        b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: "
        + str(len(head)).encode()
        + b"\r\n\r\n"
        + head
    )


@pytest.fixture
def project_log() -> Iterator[Any]:
    """Every record of this process at DEBUG (urllib3's request lines included) through
    the project's own handler, as a worker logs; the remembered secrets forgotten after."""
    import io
    import logging

    from billing.logs import configure_logging
    from billing.redact import forget_secrets

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(Settings(), level="DEBUG", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    forget_secrets(*_token_forms(), SECRET)


@pytest.mark.parametrize("endpoint", ["refused", "echo"])
def test_a_token_in_the_endpoint_url_never_reaches_errors_logs_or_dead_letters(
    db_url, endpoint, project_log
):
    """Before: requests' error text names the path and query, so replacing the full URL
    left the token in ``last_error``, the log line and the dead letter."""
    from tests.fixtures.sandbox import LoopbackServer

    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE)
    with LoopbackServer(_echo_request) as echo:
        port = _closed_port() if endpoint == "refused" else echo.port
        url = f"http://127.0.0.1:{port}/hooks/billing?token={TOKEN}&v=2"
        settings = Settings(
            database_url=db_url, webhook_timeout=2, webhook_url=url, webhook_secret=SECRET,
            webhook_backoff=["1 second"],
        )  # fmt: skip
        now = utcnow()
        webhooks.deliver_due(db_url, settings, now=now)
        webhooks.deliver_due(db_url, settings, now=now + timedelta(seconds=2))

    (sent,) = _deliveries(db_url)
    with session_scope(db_url) as session:
        (letter,) = session.scalars(select(DeadLetter))
        texts = [sent.last_error, sent.url, letter.exc_message, letter.traceback]
    assert sent.status == "dead" and sent.url == f"http://127.0.0.1:{port}/hooks/billing"
    if endpoint == "refused":
        assert sent.last_error == "ConnectionError: connection refused"
    else:
        assert sent.last_error.startswith("HTTP 500: POST /hooks/billing?token=[redacted]&")
    log_text = project_log.getvalue()
    assert "not delivered to default" in log_text
    if endpoint == "echo":  # urllib3's request line went through the project's handler
        assert '"POST /hooks/billing?token=[redacted]&v=2 HTTP/1.1" 500' in log_text
    for text in [*texts, log_text]:
        for form in _token_forms():
            assert form not in text, f"{form!r} leaked in {text[:300]!r}"


def _bad_gzip(status: int) -> Any:
    def respond(conn: Any, request: bytes) -> None:
        body = b"this is not gzip"
        conn.sendall(
            f"HTTP/1.1 {status} X\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    return respond


@pytest.mark.parametrize("status", [500, 200, 404])
def test_an_answer_with_a_bad_content_encoding_is_a_failed_try_with_its_backoff(db_url, status):
    """Before: urllib3's DecodeError escaped ``except requests.RequestException``; the
    delivery stayed claimed with no error and was posted again every lease, never dead."""
    from tests.fixtures.sandbox import LoopbackServer

    _subscription(db_url, "shop-1")
    _set_status(db_url, "shop-1", SubscriptionStatus.PAST_DUE)
    with LoopbackServer(_bad_gzip(status)) as hostile:
        settings = Settings(
            database_url=db_url, webhook_timeout=2, webhook_url=hostile.url + "/hooks",
            webhook_secret=SECRET, webhook_backoff=["30 seconds"],
        )  # fmt: skip
        at = utcnow()
        first = webhooks.deliver_due(db_url, settings, now=at)
        (sent,) = _deliveries(db_url)
        if status == 200:  # a 2xx is delivered: its body is never read
            assert (first.delivered, sent.status) == (1, "delivered")
            return
        assert (first.posted, first.retrying) == (1, 1)
        assert (sent.status, sent.attempts, sent.last_status) == ("pending", 1, status)
        assert sent.claimed_until is None and sent.next_attempt_at == at + timedelta(seconds=30)
        assert sent.last_error == f"HTTP {status} (answer unreadable: DecodeError)"
        # Not posted again before its backoff, even once the old lease (2 x timeout) is over.
        assert webhooks.deliver_due(db_url, settings, now=at + timedelta(seconds=10)).posted == 0
        last = webhooks.deliver_due(db_url, settings, now=at + timedelta(seconds=31))
    (sent,) = _deliveries(db_url)
    assert last.dead == 1 and (sent.status, sent.attempts) == ("dead", 2)
    with session_scope(db_url) as session:
        (letter,) = session.scalars(select(DeadLetter))
        assert "answer unreadable" in letter.exc_message
    assert len(hostile.requests) == 2
