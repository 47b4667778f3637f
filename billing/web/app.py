"""The console's Starlette application: routes, sign-in, and how each request is checked.

Every route but ``/login``, ``/healthz`` and ``/static`` needs a live session. Every POST
is checked in one order before anything is read or written: a live session, the same
origin, the form's CSRF token, then the role the action needs. A refusal answers 403 and
writes nothing. Database work runs in Starlette's thread pool (the service layer is
synchronous); each action's transaction commits before anything is sent to the workers.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from billing import accounts
from billing.accounts import SignedIn
from billing.durations import format_delay
from billing.errors import BillingError, InvalidInput, NotFound
from billing.money import format_amount
from billing.redact import redact
from billing.settings import Settings
from billing.web import service
from billing.web.chart import day_chart
from billing.web.config import (
    LEDGER_MAX,
    LEDGER_PAGE,
    MAX_FORM_BYTES,
    PAGE_SIZE,
    ConsoleSettings,
)
from billing.web.security import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    LOGIN_COOKIE_SECONDS,
    NEEDS,
    SESSION_COOKIE,
    Action,
    Keys,
    Refused,
    SecurityHeaders,
    SignInNeeded,
    may,
    safe_next,
    same_origin,
    secure_cookie,
)

log = logging.getLogger("billing.web")

HERE = Path(__file__).resolve().parent
FLASH_COOKIE = "kpb_flash"
#: Seconds a flash message (the result of an action, shown on the next page) is valid.
FLASH_SECONDS = 60


@dataclass(frozen=True)
class Visit:
    """A request from a signed-in person: who, and the session token (for its CSRF)."""

    user: SignedIn
    token: str


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else ""


def _age(value: timedelta | None) -> str:
    """``3d 4h``, ``5h 12m``, ``7m``, ``30s``: how long something has waited."""
    if value is None:
        return "none"
    seconds = int(value.total_seconds())
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{seconds}s"


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, every value: nothing from outside is trusted
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        age=_age,
        money=lambda value: format_amount(Decimal(value or 0)),
        percent=_percent,
        delay=lambda v: format_delay(v) if isinstance(v, timedelta) else str(v),
        tojson_pretty=lambda value: json.dumps(value, indent=2, ensure_ascii=False, default=str),
        qs=lambda params: urlencode({k: v for k, v in params.items() if v}),
    )
    return env


class Console:
    """The application's state: the service backend, the console's settings and keys."""

    def __init__(self, backend: service.Backend, settings: ConsoleSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.keys = Keys(settings)
        self.env = _environment()
        secret = self.keys.csrf("flash")  # a key of its own, derived from the console's
        self._flash = URLSafeTimedSerializer(secret, salt="kpb.flash")

    # ------------------------------------------------------------------ rendering

    def page(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any],
        *,
        visit: Visit | None = None,
        status: int = 200,
        flash: Mapping[str, str] | None = None,
    ) -> HTMLResponse:
        """``name`` rendered; ``flash`` is shown instead of the one a redirect left."""
        left = self._read_flash(request)
        full = {
            "request": request,
            "user": visit.user if visit else None,
            "csrf": self.keys.csrf(visit.token) if visit else "",
            "csrf_field": CSRF_FIELD,
            "can": (lambda action: may(visit.user, Action(action))) if visit else (lambda a: False),
            "flash": flash if flash is not None else left,
            "path": request.url.path,
            **context,
        }
        response = HTMLResponse(self.env.get_template(name).render(full), status_code=status)
        if left is not None:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    def redirect_with(
        self, request: Request, url: str, done: service.Done | None = None, error: str = ""
    ) -> RedirectResponse:
        response = RedirectResponse(url, status_code=303)
        if done is not None or error:
            kind = "error" if error or (done is not None and not done.ok) else "ok"
            text = error or (done.message if done else "")
            response.set_cookie(
                FLASH_COOKIE,
                self._flash.dumps({"kind": kind, "text": text[:2000]}),
                max_age=FLASH_SECONDS,
                path="/",
                httponly=True,
                samesite="lax",
                secure=secure_cookie(request, self.settings),
            )
        return response

    def _read_flash(self, request: Request) -> dict[str, str] | None:
        raw = request.cookies.get(FLASH_COOKIE)
        if not raw:
            return None
        try:
            data = self._flash.loads(raw, max_age=FLASH_SECONDS)
        except BadSignature:
            return None
        return data if isinstance(data, dict) else None

    # ------------------------------------------------------------------ checking

    async def visit(self, request: Request) -> Visit:
        """The signed-in person, or ``SignInNeeded``."""
        cookie = request.cookies.get(SESSION_COOKIE)
        token = self.keys.token_of(cookie)
        if token is None:
            raise SignInNeeded(expired=False)

        def look() -> SignedIn | None:
            with self.backend.session() as session:
                return accounts.current(
                    session, token, now=self.backend.clock(), idle=self.settings.idle
                )

        user = await run_in_threadpool(look)
        if user is None:
            raise SignInNeeded(expired=True)
        return Visit(user, token)

    async def checked_form(self, request: Request, visit: Visit | None) -> FormData:
        """The form of a POST that passed the Origin and CSRF checks."""
        if not same_origin(request):
            raise Refused("This request came from another site: refused, nothing was changed.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
            raise Refused("This form is too large: refused, nothing was changed.")
        form = await request.form(max_files=0, max_fields=2 * 1000, max_part_size=64 * 1024)
        if visit is not None:
            expected = self.keys.csrf(visit.token)
            if not self.keys.check(expected, _text(form, CSRF_FIELD)):
                raise Refused(
                    "This form's security token is missing or does not belong to your "
                    "session (it may be from before you signed in again): reload the page "
                    "and try again. Nothing was changed."
                )
        return form

    async def acting(self, request: Request, action: Action) -> tuple[Visit, FormData]:
        """A POST of ``action``: signed in, same origin, right token, right role."""
        visit = await self.visit(request)
        form = await self.checked_form(request, visit)
        self.require(visit, action)
        return visit, form

    def require(self, visit: Visit, action: Action) -> None:
        """``Refused`` unless the signed-in person's role may do ``action``."""
        if may(visit.user, action):
            return
        log.warning("console: %s (%s) was refused %s", visit.user.name, visit.user.role, action)
        raise Refused(
            f"Your role ({visit.user.role}) may not {action.value.replace('_', ' ')}: "
            f"that needs {NEEDS[action].value}. Nothing was changed."
        )

    # ------------------------------------------------------------------ errors

    def refused(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return self.page(
            request, "error.html", {"title": "Refused", "message": exc.message}, status=403
        )

    def sign_in_needed(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInNeeded)
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        params = {"next": target if request.method == "GET" else "/"}
        if exc.expired:
            params["expired"] = "1"
        response = RedirectResponse("/login?" + urlencode(params), status_code=303)
        if request.cookies.get(SESSION_COOKIE):
            response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def billing_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BillingError)
        return self.page(
            request,
            "error.html",
            {"title": "Cannot show this", "message": str(exc)},
            status=error_status(exc),
        )

    def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.page(
            request,
            "error.html",
            {"title": f"Error {exc.status_code}", "message": exc.detail},
            status=exc.status_code,
        )

    def server_error(self, request: Request, exc: Exception) -> Response:
        log.exception("console: %s %s failed", request.method, request.url.path)
        return PlainTextResponse(
            "Something went wrong on the console's side; the error is in its log.",
            status_code=500,
        )


def error_status(exc: BillingError) -> int:
    """The answer's status for a refusal of the service layer: 404, 400 or 409."""
    return 404 if isinstance(exc, NotFound) else 400 if isinstance(exc, InvalidInput) else 409


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _attempt(form: FormData) -> int | None:
    """The attempt number the page showed (a hidden field), when it is one."""
    value = _text(form, "attempt")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


def _ids(form: FormData) -> list[int]:
    out = []
    for value in form.getlist("charge"):
        if not isinstance(value, str) or not value.isdigit() or len(value) > 12:
            raise InvalidInput(f'charge "{value}" is not a charge id')
        out.append(int(value))
    return out


@dataclass(frozen=True)
class SubChange:
    """A form of the subscription page that changes it (``billing.changes``): the action
    it needs, the fields it reads (named as ``changes.FIELDS`` names them) and the service."""

    action: Action
    fields: tuple[str, ...]
    run: Callable[..., service.Done]


#: ``POST /subscriptions/{id}/NAME``: one line adds a form's route.
SUB_CHANGES: dict[str, SubChange] = {
    "card": SubChange(Action.CHANGE_CARD, ("alias", "customer_ip", "reason"), service.change_card),
    "terms": SubChange(
        Action.CHANGE_PLAN, ("plan", "amount", "effective_from", "reason"), service.change_plan
    ),
}
#: Fields a page never shows back, not even to the person who typed them.
WRITE_ONLY = frozenset({"alias"})


# --- the routes ---------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def routes(c: Console) -> list[Route | Mount]:
    b = c.backend

    async def login_page(request: Request) -> Response:
        try:
            await c.visit(request)
            return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        except SignInNeeded:
            pass
        return _login_form(request, message="", status=200)

    def _login_form(request: Request, *, message: str, status: int, name: str = "") -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        fresh = len(nonce) < 20
        if fresh:
            nonce = secrets.token_urlsafe(24)
        expired = request.query_params.get("expired") == "1" and not message
        response = c.page(
            request,
            "login.html",
            {
                "message": message,
                "expired": expired,
                "login_token": c.keys.login_token(nonce),
                "next": safe_next(request.query_params.get("next")),
                "name": name,
            },
            status=status,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_COOKIE_SECONDS,
            path="/login",
            httponly=True,
            samesite="strict",
            secure=secure_cookie(request, c.settings),
        )
        return response

    async def login(request: Request) -> Response:
        form = await c.checked_form(request, None)
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        if not nonce or not c.keys.check(c.keys.login_token(nonce), _text(form, "login_token")):
            raise Refused(
                "This sign-in form is out of date or came from another site: reload the "
                "sign-in page and try again."
            )
        name, password = _text(form, "username"), _text(form, "password")
        address = request.client.host if request.client else None

        def attempt() -> accounts.SignIn:
            with b.session() as session:
                return accounts.sign_in(session, name, password, address=address, now=b.clock())

        result = await run_in_threadpool(attempt)
        if not result.ok:
            # The name typed is logged only when it is an account: people type passwords there.
            log.warning(
                "console: failed sign-in, account=%s, from %s%s",
                result.user or "-", address,
                " (locked out)" if result.locked_until else "",
            )  # fmt: skip
            status = 429 if result.locked_until else 401
            return _login_form(request, message=result.message, status=status, name=name[:64])
        assert result.token is not None
        log.info("console: %s signed in from %s", result.user, address)
        response = RedirectResponse(safe_next(_text(form, "next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            c.keys.cookie_value(result.token),
            path="/",
            httponly=True,
            samesite="lax",
            secure=secure_cookie(request, c.settings),
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(request: Request) -> Response:
        visit = await c.visit(request)
        await c.checked_form(request, visit)

        def end() -> None:
            with b.session() as session:
                accounts.sign_out(session, visit.token, now=b.clock())

        await run_in_threadpool(end)
        log.info("console: %s signed out", visit.user.name)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---------------------------------------------------------------- reading pages

    async def overview(request: Request) -> Response:
        visit = await c.visit(request)

        def read() -> service.Overview:
            with b.session() as session:
                return service.overview(session, b.clock())

        data = await run_in_threadpool(read)
        return c.page(
            request, "overview.html", {"o": data, "chart": day_chart(data.days)}, visit=visit
        )

    async def failed(request: Request) -> Response:
        visit = await c.visit(request)
        query = service.QueueQuery.from_params(request.query_params)
        page_no = _page_number(request.query_params.get("page"))

        def read() -> tuple[list[Any], list[tuple[service.QueueFilter, list[str] | None]]]:
            plans = b.plans()
            with b.session() as session:
                rows = service.failed_queue(session, query, b.clock())
            choices = [
                (f, list(f.choices(plans)) if f.choices else None) for f in service.QUEUE_FILTERS
            ]
            return rows, choices

        rows, choices = await run_in_threadpool(read)
        pages = max(1, -(-len(rows) // PAGE_SIZE))
        page_no = min(page_no, pages)
        shown = rows[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE]
        return c.page(
            request,
            "failed.html",
            {
                "rows": shown,
                "total": len(rows),
                "page_no": page_no,
                "pages": pages,
                "query": query,
                "filters": choices,
                "columns": service.PAGE_COLUMNS,
            },
            visit=visit,
        )

    async def failed_csv(request: Request) -> Response:
        await c.visit(request)
        query = service.QueueQuery.from_params(request.query_params)

        def read() -> str:
            with b.session() as session:
                return service.queue_csv(service.failed_queue(session, query, b.clock()))

        body = await run_in_threadpool(read)
        stamp = b.clock().strftime("%Y%m%dT%H%M%SZ")
        return Response(
            body,
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="failed-{stamp}.csv"'},
        )

    async def bulk(request: Request) -> Response:
        visit = await c.visit(request)
        form = await c.checked_form(request, visit)
        action_name = _text(form, "action")
        action = {"retry": Action.RETRY, "discard": Action.DISCARD}.get(action_name)
        if action is None:
            raise InvalidInput(f'action: "{action_name}" is not retry or discard')
        c.require(visit, action)
        # "reason" is the queue filter (why charges failed); "why" is the person's reason.
        reason = _text(form, "why")
        confirm = _text(form, "confirm_not_charged") == "yes"
        if _text(form, "step") != "apply":
            query = service.QueueQuery.from_params(form)

            def read() -> list[Any]:
                with b.session() as session:
                    return service.failed_queue(session, query, b.clock())

            rows = await run_in_threadpool(read)
            return c.page(
                request,
                "bulk_confirm.html",
                {
                    "rows": rows,
                    "action": action_name,
                    "reason": reason,
                    "confirm": confirm,
                    "query": query,
                    "unknown": sum(1 for r in rows if r.state == "unknown"),
                },
                visit=visit,
            )
        ids = _ids(form)
        lines = await run_in_threadpool(
            service.bulk,
            b,
            visit.user,
            action_name,
            ids,
            reason=reason,
            confirm_not_charged=confirm,
        )
        return c.page(
            request, "bulk_done.html", {"lines": lines, "action": action_name}, visit=visit
        )

    async def charge(request: Request) -> Response:
        visit = await c.visit(request)
        number = int(request.path_params["charge_id"])

        def read() -> service.ChargePage:
            with b.session() as session:
                return service.charge_page(session, number, b.settings)

        data = await run_in_threadpool(read)
        return c.page(request, "charge.html", {"p": data, "c": data.story.charge}, visit=visit)

    def charge_action(
        action: Action, run: Callable[[SignedIn, int, FormData], service.Done]
    ) -> Handler:
        async def handle(request: Request) -> Response:
            visit, form = await c.acting(request, action)
            number = int(request.path_params["charge_id"])
            back = f"/charges/{number}"
            try:
                done = await run_in_threadpool(run, visit.user, number, form)
            except BillingError as exc:
                return c.redirect_with(request, back, error=str(exc))
            log.info("console: %s did %s on charge %s", visit.user.name, action, number)
            return c.redirect_with(request, back, done)

        return handle

    def _retry(user: SignedIn, number: int, form: FormData) -> service.Done:
        return service.retry(
            b,
            user,
            number,
            confirm_not_charged=_text(form, "confirm_not_charged") == "yes",
            attempt=_attempt(form),
            reason=_text(form, "reason"),
        )

    def _resolve(user: SignedIn, number: int, form: FormData) -> service.Done:
        return service.resolve(
            b,
            user,
            number,
            outcome=_text(form, "outcome"),
            tx=_text(form, "tx"),
            reason=_text(form, "reason"),
        )

    def _discard(user: SignedIn, number: int, form: FormData) -> service.Done:
        return service.discard(b, user, number, reason=_text(form, "reason"))

    def _review(user: SignedIn, number: int, form: FormData) -> service.Done:
        return service.review(b, user, number, reason=_text(form, "reason"))

    def _capture(user: SignedIn, number: int, form: FormData) -> service.Done:
        return service.capture(
            b, user, number, amount=_text(form, "amount"), reason=_text(form, "reason")
        )

    def _cancel(user: SignedIn, number: int, form: FormData) -> service.Done:
        return service.cancel_charge(
            b,
            user,
            number,
            amount=_text(form, "amount"),
            reason=_text(form, "reason"),
            again=_text(form, "again") == "yes",
        )

    async def subscriptions(request: Request) -> Response:
        visit = await c.visit(request)
        params = request.query_params
        ref = (params.get("ref") or "").strip() or None
        plan = (params.get("plan") or "").strip() or None
        status = (params.get("status") or "").strip() or None

        def read() -> tuple[list[service.SubscriptionRow], list[str]]:
            plans = sorted(b.plans().plans)
            with b.session() as session:
                return service.find_subscriptions(session, ref=ref, plan=plan, status=status), plans

        try:
            rows, plan_names = await run_in_threadpool(read)
        except NotFound as exc:
            rows, plan_names, missing = [], sorted(b.plans().plans), str(exc)
        else:
            missing = ""
        if ref and len(rows) == 1 and not missing:
            return RedirectResponse(f"/subscriptions/{rows[0].id}", status_code=303)
        return c.page(
            request,
            "subscriptions.html",
            {
                "rows": rows,
                "ref": ref or "",
                "plan": plan or "",
                "status": status or "",
                "plans": plan_names,
                "statuses": service.SUBSCRIPTION_STATUSES,
                "missing": missing,
            },
            visit=visit,
        )

    async def subscription(request: Request) -> Response:
        visit = await c.visit(request)
        return await subscription_page(request, visit, int(request.path_params["sub_id"]))

    async def subscription_page(
        request: Request,
        visit: Visit,
        number: int,
        *,
        error: BillingError | None = None,
        kept: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Response:
        """The page; after a refused change, with the error and the form as it was typed
        (``kept``: by form, without the alias, which is never shown back)."""

        def read() -> service.SubscriptionPage:
            with b.session() as session:
                return service.subscription_page(session, number, b.plans())

        data = await run_in_threadpool(read)
        return c.page(
            request,
            "subscription.html",
            {"p": data, "s": data.sub, "kept": kept or {}},
            visit=visit,
            status=error_status(error) if error is not None else 200,
            flash={"kind": "error", "text": str(error)} if error is not None else None,
        )

    def sub_action(action: Action, run: Callable[..., service.Done]) -> Handler:
        async def handle(request: Request) -> Response:
            visit, form = await c.acting(request, action)
            number = int(request.path_params["sub_id"])
            back = f"/subscriptions/{number}"
            try:
                done = await run_in_threadpool(
                    run, b, visit.user, number, reason=_text(form, "reason")
                )
            except BillingError as exc:
                return c.redirect_with(request, back, error=str(exc))
            log.info("console: %s did %s on subscription %s", visit.user.name, action, number)
            return c.redirect_with(request, back, done)

        return handle

    def sub_change(name: str, change: SubChange) -> Handler:
        async def handle(request: Request) -> Response:
            visit, form = await c.acting(request, change.action)
            number = int(request.path_params["sub_id"])
            fields = {field: _text(form, field) for field in change.fields}
            try:
                done = await run_in_threadpool(change.run, b, visit.user, number, **fields)
            except BillingError as exc:
                # Shown on the page it came from, its status saying it was refused (the
                # change wrote nothing), the form as typed: but for the alias, and with any
                # card number a person typed by mistake blanked.
                typed = {k: redact(v) for k, v in fields.items() if k not in WRITE_ONLY}
                return await subscription_page(
                    request, visit, number, error=exc, kept={name: typed}
                )
            log.info(
                "console: %s did %s on subscription %s", visit.user.name, change.action, number
            )
            return c.redirect_with(request, f"/subscriptions/{number}", done)

        return handle

    async def letters(request: Request) -> Response:
        visit = await c.visit(request)
        everything = request.query_params.get("all") == "1"

        def read() -> list[Any]:
            with b.session() as session:
                return service.letters(session, include_requeued=everything)

        rows = await run_in_threadpool(read)
        return c.page(request, "deadletters.html", {"rows": rows, "all": everything}, visit=visit)

    async def letter(request: Request) -> Response:
        visit = await c.visit(request)
        number = int(request.path_params["letter_id"])

        def read() -> Any:
            with b.session() as session:
                return service.letter(session, number)

        found = await run_in_threadpool(read)
        return c.page(request, "deadletter.html", {"l": found}, visit=visit)

    async def requeue(request: Request) -> Response:
        visit, _form = await c.acting(request, Action.REQUEUE)
        number = int(request.path_params["letter_id"])
        back = f"/deadletters/{number}"
        try:
            done = await run_in_threadpool(service.requeue, b, visit.user, number)
        except BillingError as exc:
            return c.redirect_with(request, back, error=str(exc))
        return c.redirect_with(request, back, done)

    async def events(request: Request) -> Response:
        visit = await c.visit(request)
        params = request.query_params
        status = (params.get("status") or "").strip() or None
        endpoint = (params.get("endpoint") or "").strip() or None
        type_ = (params.get("type") or "").strip() or None

        def read() -> tuple[list[Any], list[str]]:
            with b.session() as session:
                found = service.events(session, status=status, endpoint=endpoint, type_=type_)
                return found, service.endpoints(session)

        rows, names = await run_in_threadpool(read)
        return c.page(
            request,
            "events.html",
            {
                "rows": rows,
                "status": status or "",
                "endpoint": endpoint or "",
                "type": type_ or "",
                "statuses": service.EVENT_STATUSES,
                "endpoints": names,
                "types": service.EVENT_TYPES,
            },
            visit=visit,
        )

    async def event(request: Request) -> Response:
        visit = await c.visit(request)
        ref = str(request.path_params["ref"])

        def read() -> tuple[Any, list[Any]]:
            with b.session() as session:
                return service.event(session, ref)

        found, deliveries = await run_in_threadpool(read)
        return c.page(request, "event.html", {"e": found, "deliveries": deliveries}, visit=visit)

    async def redeliver(request: Request) -> Response:
        visit, form = await c.acting(request, Action.REDELIVER)
        ref = str(request.path_params["ref"])
        back = f"/events/{ref}" if ref.isdigit() else "/events"
        try:
            done = await run_in_threadpool(
                service.redeliver, b, visit.user, ref, endpoint=_text(form, "endpoint")
            )
        except BillingError as exc:
            return c.redirect_with(request, back, error=str(exc))
        return c.redirect_with(request, back, done)

    async def ledger_page(request: Request) -> Response:
        visit = await c.visit(request)
        query = service.LedgerQuery.from_params(request.query_params)
        last = min(LEDGER_MAX, LEDGER_PAGE * _page_number(request.query_params.get("more")))

        def read() -> tuple[list[Any], int, list[str]]:
            plans = sorted(b.plans().plans)
            with b.session() as session:
                rows, total = service.ledger_page(session, query, last)
            return rows, total, plans

        rows, total, plans = await run_in_threadpool(read)
        return c.page(
            request,
            "ledger.html",
            {
                "rows": rows,
                "total": total,
                "query": query,
                "plans": plans,
                "outcomes": service.OUTCOMES,
                "more": last // LEDGER_PAGE,
                "can_more": total > len(rows) and last < LEDGER_MAX,
            },
            visit=visit,
        )

    async def ledger_export(request: Request) -> Response:
        await c.visit(request)
        query = service.LedgerQuery.from_params(request.query_params)
        fmt = request.query_params.get("format", "csv")
        chunks = await run_in_threadpool(service.ledger_export, b, query, fmt)
        stamp = b.clock().strftime("%Y%m%dT%H%M%SZ")
        media = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return StreamingResponse(
            chunks,
            media_type=f"{media}; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="ledger-{stamp}.{fmt}"'},
        )

    async def plans(request: Request) -> Response:
        visit = await c.visit(request)
        view = await run_in_threadpool(service.plans_view, b)
        return c.page(request, "plans.html", {"v": view}, visit=visit)

    async def users(request: Request) -> Response:
        visit = await c.visit(request)
        c.require(visit, Action.MANAGE_USERS)

        def read() -> list[dict[str, Any]]:
            with b.session() as session:
                return [accounts.user_summary(u) for u in accounts.list_users(session)]

        rows = await run_in_threadpool(read)
        return c.page(request, "users.html", {"rows": rows, "roles": accounts.ROLES}, visit=visit)

    async def users_change(request: Request) -> Response:
        visit, form = await c.acting(request, Action.MANAGE_USERS)
        what = str(request.path_params["what"])

        def change() -> service.Done:
            name = _text(form, "name")
            with b.session() as session:
                if what == "add":
                    accounts.add_user(
                        session, name, role=_text(form, "role"), password=_text(form, "password")
                    )
                    return service.Done(f"console user {name} added")
                if what == "role":
                    user = accounts.set_role(session, name, _text(form, "role"))
                    return service.Done(f"console user {user.name} is now {user.role}")
                if what in ("disable", "enable"):
                    if what == "disable" and name.strip().lower() == visit.user.name:
                        raise InvalidInput("you cannot disable your own account")
                    user = accounts.set_disabled(session, name, disabled=what == "disable")
                    return service.Done(f"console user {user.name} {what}d")
            raise NotFound(f"no such change: {what}")

        try:
            done = await run_in_threadpool(change)
        except BillingError as exc:
            return c.redirect_with(request, "/users", error=str(exc))
        log.info("console: %s changed accounts (%s)", visit.user.name, what)
        return c.redirect_with(request, "/users", done)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    charge_actions = {
        "retry": (Action.RETRY, _retry),
        "resolve": (Action.RESOLVE, _resolve),
        "discard": (Action.DISCARD, _discard),
        "review": (Action.REVIEW, _review),
        "capture": (Action.CAPTURE, _capture),
        "cancel": (Action.CANCEL_CHARGE, _cancel),
    }
    sub_actions = {
        "pause": (Action.PAUSE, service.pause),
        "resume": (Action.RESUME, service.resume),
        "cancel": (Action.CANCEL_SUBSCRIPTION, service.cancel_subscription),
    }
    return [
        _get("/login", login_page),
        _post("/login", login),
        _post("/logout", logout),
        _get("/", overview),
        _get("/failed", failed),
        _get("/failed.csv", failed_csv),
        _post("/failed/bulk", bulk),
        _get("/charges/{charge_id:int}", charge),
        *(
            _post(f"/charges/{{charge_id:int}}/{name}", charge_action(action, run))
            for name, (action, run) in charge_actions.items()
        ),
        _get("/subscriptions", subscriptions),
        _get("/subscriptions/{sub_id:int}", subscription),
        *(
            _post(f"/subscriptions/{{sub_id:int}}/{name}", sub_action(action, run))
            for name, (action, run) in sub_actions.items()
        ),
        *(
            _post(f"/subscriptions/{{sub_id:int}}/{name}", sub_change(name, change))
            for name, change in SUB_CHANGES.items()
        ),
        _get("/deadletters", letters),
        _get("/deadletters/{letter_id:int}", letter),
        _post("/deadletters/{letter_id:int}/requeue", requeue),
        _get("/events", events),
        _get("/events/{ref}", event),
        _post("/events/{ref}/redeliver", redeliver),
        _get("/ledger", ledger_page),
        _get("/ledger/export", ledger_export),
        _get("/plans", plans),
        _get("/users", users),
        _post("/users/{what}", users_change),
        _get("/healthz", healthz),
        _get("/favicon.ico", no_icon),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def _get(path: str, handler: Handler) -> Route:
    return Route(path, handler, methods=["GET"])


def _post(path: str, handler: Handler) -> Route:
    return Route(path, handler, methods=["POST"])


def _page_number(text: str | None) -> int:
    if not text:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise InvalidInput(f'page "{text}" must be a whole number from 1')
    return int(text)


def create_app(
    settings: Settings,
    console_settings: ConsoleSettings | None = None,
    *,
    backend: service.Backend | None = None,
) -> SecurityHeaders:
    """The console as an ASGI application, the security headers around everything (so a
    500 answer has them too). ``.console`` is its ``Console``."""
    c = Console(
        backend or service.Backend.from_settings(settings), console_settings or ConsoleSettings()
    )
    if c.keys.generated:
        log.warning(
            "console: BILLING_CONSOLE_SECRET_KEY is not set; a random key signs this "
            "process's sessions (everybody signs in again after a restart)"
        )
    app = Starlette(
        routes=routes(c),
        exception_handlers={
            SignInNeeded: c.sign_in_needed,
            Refused: c.refused,
            BillingError: c.billing_error,
            HTTPException: c.http_error,
            Exception: c.server_error,
        },
    )
    wrapped = SecurityHeaders(app)
    wrapped.console = c
    return wrapped
