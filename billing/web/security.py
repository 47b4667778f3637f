"""Who may do what, and how a request proves it: cookies, CSRF, Origin, roles, headers.

- The session cookie carries a random token signed with the console's key (itsdangerous);
  the session itself is a database row (``billing.accounts``), so signing out ends it.
  The cookie is HttpOnly, SameSite=Lax, Secure when the request came over HTTPS.
- Every state-changing request is a POST carrying a CSRF token: an HMAC of the session's
  token under the console's key, so it is bound to that session and needs no storage. A
  POST whose ``Origin`` (or, without one, ``Referer``) names another site, or whose browser
  says ``Sec-Fetch-Site: cross-site``, is refused before its form is even read.
- The sign-in form has its own token, bound to a short-lived random cookie, so another
  site cannot sign a victim in to an account of the attacker's ("login CSRF").
- Roles: each ``Action`` needs a role; a role may do everything the ones below it may.
- Every answer carries a Content-Security-Policy without inline scripts or styles, refuses
  framing (``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``), and is not cached.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature, Signer
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.accounts import Role, SignedIn
from billing.web.config import ConsoleSettings

SESSION_COOKIE = "kpb_session"
LOGIN_COOKIE = "kpb_login"
#: Seconds the sign-in form's cookie lives: time enough to type a password.
LOGIN_COOKIE_SECONDS = 15 * 60
CSRF_FIELD = "csrf_token"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    "cache-control": "no-store",
}


class Action(enum.StrEnum):
    """Everything a person can change from the console."""

    RETRY = "retry"
    RESOLVE = "resolve"
    DISCARD = "discard"
    REVIEW = "review"
    PAUSE = "pause"
    RESUME = "resume"
    CHANGE_CARD = "change_card"
    CHANGE_PLAN = "change_plan"
    REQUEUE = "requeue"
    REDELIVER = "redeliver"
    CAPTURE = "capture"
    CANCEL_CHARGE = "cancel_charge"
    CANCEL_SUBSCRIPTION = "cancel_subscription"
    MANAGE_USERS = "manage_users"


#: The role each action needs (the issue's table: operators act on the queue and change a
#: subscription's card, plan or price; admins move money back or for good and manage
#: accounts).
NEEDS: dict[Action, Role] = {
    Action.RETRY: Role.OPERATOR,
    Action.RESOLVE: Role.OPERATOR,
    Action.DISCARD: Role.OPERATOR,
    Action.REVIEW: Role.OPERATOR,
    Action.PAUSE: Role.OPERATOR,
    Action.RESUME: Role.OPERATOR,
    Action.CHANGE_CARD: Role.OPERATOR,
    Action.CHANGE_PLAN: Role.OPERATOR,
    Action.REQUEUE: Role.OPERATOR,
    Action.REDELIVER: Role.OPERATOR,
    Action.CAPTURE: Role.ADMIN,
    Action.CANCEL_CHARGE: Role.ADMIN,
    Action.CANCEL_SUBSCRIPTION: Role.ADMIN,
    Action.MANAGE_USERS: Role.ADMIN,
}


def may(user: SignedIn, action: Action) -> bool:
    return user.may(NEEDS[action])


class SignInNeeded(Exception):
    """No live session: the person is sent to /login (``expired`` says why, if known)."""

    def __init__(self, expired: bool = False) -> None:
        super().__init__("sign in needed")
        self.expired = expired


class Refused(Exception):
    """The request is not allowed: answered 403 and nothing is written."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Keys:
    """The console's key and what is derived from it."""

    def __init__(self, settings: ConsoleSettings) -> None:
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        self._key = (secret or secrets.token_urlsafe(32)).encode()
        self.generated = secret is None
        self._signer = Signer(self._key, salt="kpb.session")

    def __repr__(self) -> str:
        return f"Keys(generated={self.generated})"

    def cookie_value(self, token: str) -> str:
        return self._signer.sign(token).decode()

    def token_of(self, cookie: str | None) -> str | None:
        """The session token a cookie carries, or None if it is missing or forged."""
        if not cookie:
            return None
        try:
            return self._signer.unsign(cookie).decode()
        except (BadSignature, UnicodeDecodeError):
            return None

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def csrf(self, token: str) -> str:
        """The CSRF token of the session whose token is ``token``."""
        return self._mac("csrf", token)

    def login_token(self, nonce: str) -> str:
        return self._mac("login", nonce)

    def check(self, expected: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(expected, str(given))


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site.

    Browsers send ``Origin`` with every cross-site POST; ``Referer`` stands in for it where
    an older one does not; ``Sec-Fetch-Site`` says it outright. A request with none of
    them (curl) passes here and still needs its CSRF token.
    """
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    host = request.headers.get("host", "")
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value is None:
            continue
        if value == "null":
            return False
        parts = urlsplit(value)
        return bool(parts.netloc) and parts.netloc.lower() == host.lower()
    return True


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def secure_cookie(request: Request, settings: ConsoleSettings) -> bool:
    if settings.secure_cookies == "auto":
        return is_https(request)
    return settings.secure_cookies == "always"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never ``//evil`` or a URL)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    if any(c in target for c in "\r\n\\") or target.startswith("/login"):
        return "/"
    return target


class SecurityHeaders:
    """Adds ``HEADERS`` to every HTTP answer, whatever produced it (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: The console behind it (``billing.web.app.Console``), for tests and the CLI.
        self.console: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                if scope.get("scheme") == "https":
                    headers["strict-transport-security"] = "max-age=31536000"
            await send(message)

        await self.app(scope, receive, with_headers)
