"""Console operators: accounts, roles, passwords, web sessions and the sign-in rate limit.

Why it lives in the database rather than in a file or the web process:
- every ``billing web`` process (and the CLI that manages accounts) sees the same accounts,
  the same sessions and the same failure counts, so signing out, disabling an account or a
  lockout holds everywhere at once;
- a session is a row, so signing out ends it *server-side*: a copied cookie is worth
  nothing afterwards. Only a SHA-256 of each session token is stored, so reading the
  table does not hand out live sessions;
- passwords are stored as argon2id hashes (argon2-cffi's defaults, rehashed on sign-in
  when those defaults grow), never in clear, never logged, never in a repr.

The sign-in rate limit counts failures in a row per account *and* per address: after
``SIGN_IN_LIMIT`` of them, either key is refused for ``LOCKOUT`` whatever the password,
and a success resets the keys it used. An unknown account name is counted like a known
one and costs the same argon2 verification, so the answers do not tell which names exist.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import ForeignKey, Integer, String, case, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from billing.errors import InvalidInput, NotFound, StateError
from billing.models import Base, utcnow


class Role(enum.StrEnum):
    """What an operator may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"  # reads every page
    OPERATOR = "operator"  # also retries, resolves, discards, pauses, resumes, requeues, redelivers
    ADMIN = "admin"  # also captures, cancels and refunds, cancels subscriptions, manages accounts


#: Order of the roles, lowest first.
ROLES: tuple[Role, ...] = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)

#: Failed sign-ins in a row (per account, per address) before that key is locked out.
SIGN_IN_LIMIT = 5
#: How long a locked key is refused, whatever the password: long enough to make guessing
#: hopeless (5 tries per 15 minutes), short enough for a person who mistyped to wait it out.
LOCKOUT = timedelta(minutes=15)
#: Failures further apart than this are not "in a row": the count starts again.
FAILURE_WINDOW = timedelta(hours=1)
#: Failure counts untouched this long are deleted (each guessed name leaves a row).
FORGET_AFTER = timedelta(days=1)
#: A session not used for this long is ended (the console's idle expiry).
IDLE_TIMEOUT = timedelta(minutes=30)
#: A session ends this long after sign-in however busy it is: a stolen cookie dies too.
SESSION_LIFETIME = timedelta(hours=12)
#: Seconds between two writes of a session's ``last_seen_at`` (each page would write else).
TOUCH_EVERY = timedelta(seconds=30)
#: Shortest password accepted: long enough that the lockout makes guessing it hopeless.
MIN_PASSWORD = 10
#: Longest password accepted (argon2 takes any length; a megabyte would only cost CPU).
MAX_PASSWORD = 1024

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account does not exist, so that costs as much as a real
    one (made at the first sign-in, not at import: every ``billing`` command imports this)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


class Operator(Base):
    """A person who signs in to the console."""

    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    #: argon2id, in the PHC string format argon2-cffi writes.
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled_at: Mapped[datetime | None]
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    sessions: Mapped[list[WebSession]] = relationship(back_populates="user")

    def __repr__(self) -> str:
        # Never the hash: it is what an attacker would try to crack offline.
        state = "disabled" if self.disabled_at else "active"
        return f"Operator(id={self.id}, name={self.name!r}, role={self.role!r}, {state})"


class WebSession(Base):
    """One signed-in browser. Ended (``ended_at``) by sign-out, idle expiry or lifetime."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: SHA-256 of the token the cookie carries; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("console_users.id"), index=True)
    address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    #: signed_out | idle | lifetime | disabled | password_changed
    end_reason: Mapped[str | None] = mapped_column(String(24))

    user: Mapped[Operator] = relationship(back_populates="sessions")

    def __repr__(self) -> str:
        return f"WebSession(id={self.id}, user_id={self.user_id}, ended={self.end_reason!r})"


class SignInFailure(Base):
    """Failed sign-ins in a row for one key: ``user:NAME`` or ``addr:ADDRESS``."""

    __tablename__ = "console_sign_in_failures"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failed_at: Mapped[datetime]
    locked_until: Mapped[datetime | None]


# --- accounts -----------------------------------------------------------------------------


def checked_name(name: str) -> str:
    """An account name as stored (lower case), refused in one line when it cannot be one."""
    cleaned = name.strip().lower()
    if not _NAME.fullmatch(cleaned):
        raise InvalidInput(
            f'user name "{name}" must be 1 to 64 letters, digits, ".", "_" or "-", '
            "starting with a letter or digit"
        )
    return cleaned


def checked_role(role: str) -> Role:
    try:
        return Role(role.strip().lower())
    except ValueError:
        known = "|".join(r.value for r in ROLES)
        raise InvalidInput(f'role "{role}" is not one of {known}') from None


def _checked_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise InvalidInput(f"the password must have at most {MAX_PASSWORD} characters")
    if password != password.strip():
        raise InvalidInput("the password must not start or end with spaces")
    return password


def hash_password(password: str) -> str:
    """The argon2id hash stored for ``password`` (checked for length first)."""
    return _HASHER.hash(_checked_password(password))


def get_user(session: Session, name: str) -> Operator:
    found = session.scalars(select(Operator).where(Operator.name == checked_name(name))).first()
    if found is None:
        raise NotFound(f'no console user "{name.strip()}"')
    return found


def list_users(session: Session) -> list[Operator]:
    return list(session.scalars(select(Operator).order_by(Operator.name)))


def add_user(session: Session, name: str, *, role: str, password: str) -> Operator:
    """A new account; its password is hashed here and never kept in clear."""
    clean = checked_name(name)
    chosen = checked_role(role)
    secret = _checked_password(password)
    if session.scalars(select(Operator.id).where(Operator.name == clean)).first() is not None:
        raise StateError(f'console user "{clean}" exists already (billing users passwd changes it)')
    user = Operator(name=clean, role=chosen, password_hash=hash_password(secret))
    session.add(user)
    session.flush()
    return user


def set_role(session: Session, name: str, role: str) -> Operator:
    """Change an account's role; it applies at its sessions' next request."""
    user = get_user(session, name)
    user.role = checked_role(role)
    return user


def set_password(
    session: Session, name: str, password: str, *, now: datetime | None = None
) -> Operator:
    """Change an account's password and end every one of its sessions."""
    now = now or utcnow()
    user = get_user(session, name)
    user.password_hash = hash_password(password)
    user.password_changed_at = now
    end_sessions_of(session, user, "password_changed", now)
    return user


def set_disabled(
    session: Session, name: str, *, disabled: bool, now: datetime | None = None
) -> Operator:
    """Disable an account (every session ends now) or enable it again."""
    now = now or utcnow()
    user = get_user(session, name)
    if disabled:
        user.disabled_at = user.disabled_at or now
        end_sessions_of(session, user, "disabled", now)
    else:
        user.disabled_at = None
    return user


def end_sessions_of(session: Session, user: Operator, why: str, now: datetime) -> int:
    done = session.execute(
        update(WebSession)
        .where(WebSession.user_id == user.id, WebSession.ended_at.is_(None))
        .values(ended_at=now, end_reason=why)
    )
    return int(getattr(done, "rowcount", 0) or 0)


# --- signing in -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SignIn:
    """What a sign-in attempt came to. ``token`` (for the cookie) only when it succeeded."""

    ok: bool
    #: Why it was refused, in words for the person: never which of name or password was wrong.
    message: str = ""
    token: str | None = None
    #: The account signed in, or (refused) the existing account that was tried, for the log.
    user: str | None = None
    locked_until: datetime | None = None

    def __repr__(self) -> str:
        return f"SignIn(ok={self.ok}, user={self.user!r}, locked_until={self.locked_until})"


def _keys(name: str, address: str | None) -> list[str]:
    keys = [f"user:{name.strip().lower()[:150]}"]
    if address:
        keys.append(f"addr:{address[:150]}")
    return keys


def _locked(session: Session, keys: list[str], now: datetime) -> datetime | None:
    until = session.scalars(
        select(SignInFailure.locked_until).where(
            SignInFailure.key.in_(keys), SignInFailure.locked_until > now
        )
    ).all()
    return max((u for u in until if u is not None), default=None)


def _upsert_failure(session: Session, key: str, now: datetime) -> None:
    """One more failure for ``key``, atomically (two sign-ins at once both count). A run of
    failures older than ``FAILURE_WINDOW`` is forgotten: the count starts again at 1."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(SignInFailure).values(key=key, failures=1, last_failed_at=now)
    stale = SignInFailure.last_failed_at < now - FAILURE_WINDOW
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[SignInFailure.key],
            set_={
                "failures": case((stale, 1), else_=SignInFailure.failures + 1),
                "last_failed_at": now,
            },
        )
    )
    session.execute(
        update(SignInFailure)
        .where(SignInFailure.key == key, SignInFailure.failures >= SIGN_IN_LIMIT)
        .values(locked_until=now + LOCKOUT)
    )
    # Names an attacker guessed would otherwise stay forever, one row each.
    session.execute(
        delete(SignInFailure).where(
            SignInFailure.last_failed_at < now - FORGET_AFTER,
            or_(SignInFailure.locked_until.is_(None), SignInFailure.locked_until < now),
        )
    )


def _locked_message(until: datetime, now: datetime) -> str:
    minutes = max(1, int((until - now).total_seconds() + 59) // 60)
    return (
        f"Too many failed sign-ins in a row ({SIGN_IN_LIMIT}): signing in is refused for this "
        f"account or address for {minutes} more minute(s), whatever the password."
    )


def sign_in(
    session: Session,
    name: str,
    password: str,
    *,
    address: str | None,
    now: datetime | None = None,
) -> SignIn:
    """Check a name and password; on success, start a session and return its token.

    The caller commits ``session`` whatever the result, so failures are counted.
    """
    now = now or utcnow()
    keys = _keys(name, address)
    until = _locked(session, keys, now)
    if until is not None:
        return SignIn(False, _locked_message(until, now), locked_until=until)
    user = None
    with contextlib.suppress(InvalidInput, NotFound):
        user = get_user(session, name)
    stored = user.password_hash if user is not None else _dummy_hash()
    try:
        good: bool = _HASHER.verify(stored, password[:MAX_PASSWORD])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        good = False
    if not good or user is None or user.disabled_at is not None:
        for key in keys:
            _upsert_failure(session, key, now)
        until = _locked(session, keys, now)
        known = user.name if user is not None else None  # for the log: never a typed name
        if until is not None:
            return SignIn(False, _locked_message(until, now), user=known, locked_until=until)
        return SignIn(False, "Wrong user name or password, or the account is disabled.", user=known)
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    session.execute(
        update(SignInFailure)
        .where(SignInFailure.key.in_(keys))
        .values(failures=0, locked_until=None)
    )
    token = secrets.token_urlsafe(32)
    session.add(
        WebSession(
            token_hash=token_hash(token),
            user_id=user.id,
            address=address[:64] if address else None,
            created_at=now,
            last_seen_at=now,
        )
    )
    session.flush()
    return SignIn(True, token=token, user=user.name)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SignedIn:
    """The operator behind a live session, as each request sees it."""

    session_id: int
    user_id: int
    name: str
    role: Role

    def may(self, needed: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)


def current(
    session: Session,
    token: str,
    *,
    now: datetime | None = None,
    idle: timedelta = IDLE_TIMEOUT,
    lifetime: timedelta = SESSION_LIFETIME,
) -> SignedIn | None:
    """The live session of ``token``, or None (ending it if it just expired)."""
    now = now or utcnow()
    row = session.scalars(
        select(WebSession).where(WebSession.token_hash == token_hash(token))
    ).first()
    if row is None or row.ended_at is not None:
        return None
    user = row.user
    why = None
    if user.disabled_at is not None:
        why = "disabled"
    elif now - row.last_seen_at >= idle:
        why = "idle"
    elif now - row.created_at >= lifetime:
        why = "lifetime"
    if why is not None:
        row.ended_at, row.end_reason = now, why
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        row.last_seen_at = now
    return SignedIn(session_id=row.id, user_id=user.id, name=user.name, role=Role(user.role))


def sign_out(session: Session, token: str, *, now: datetime | None = None) -> bool:
    """End the session of ``token`` for good; False when there was none live."""
    done = session.execute(
        update(WebSession)
        .where(WebSession.token_hash == token_hash(token), WebSession.ended_at.is_(None))
        .values(ended_at=now or utcnow(), end_reason="signed_out")
    )
    return bool(getattr(done, "rowcount", 0))


def user_summary(user: Operator) -> dict[str, Any]:
    """An account as plain data: never its hash."""
    return {
        "name": user.name,
        "role": user.role,
        "disabled": user.disabled_at is not None,
        "created_at": user.created_at.isoformat(),
        "password_changed_at": user.password_changed_at.isoformat(),
    }


__all__ = [
    "IDLE_TIMEOUT",
    "LOCKOUT",
    "ROLES",
    "SIGN_IN_LIMIT",
    "Operator",
    "Role",
    "SignIn",
    "SignInFailure",
    "SignedIn",
    "WebSession",
    "add_user",
    "current",
    "list_users",
    "set_disabled",
    "set_password",
    "set_role",
    "sign_in",
    "sign_out",
]
