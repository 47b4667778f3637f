"""The dead-letter table: tasks that raised something nobody planned for.

Nothing is silently dropped: the task's name, arguments and traceback are kept until a
person requeues it (after fixing the cause) from ``billing deadletters``.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db import checked_id, session_scope
from billing.errors import BillingError, NotFound, StateError
from billing.models import DeadLetter, utcnow
from billing.redact import redact


def record(
    url: str,
    *,
    task_name: str,
    task_id: str | None,
    args: list[Any] | tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: BaseException,
    traceback: str | None = None,
) -> int:
    """Store one failed task; return its dead-letter ID."""
    text = traceback or "".join(tb.format_exception(exc))
    with session_scope(url) as session:
        letter = DeadLetter(
            task_name=task_name,
            task_id=task_id,
            args={"args": list(args), "kwargs": dict(kwargs)},
            exc_type=type(exc).__qualname__,
            exc_message=redact(str(exc))[:4000],
            traceback=redact(text)[-20000:],
        )
        session.add(letter)
        session.flush()
        return letter.id


def list_letters(session: Session, *, include_requeued: bool = False) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.id)
    if not include_requeued:
        query = query.where(DeadLetter.requeued_at.is_(None))
    return list(session.scalars(query))


def get(session: Session, letter_id: int) -> DeadLetter:
    letter = session.get(DeadLetter, checked_id(letter_id, "dead letter"))
    if letter is None:
        raise NotFound(f"dead letter {letter_id} does not exist")
    return letter


def mark_requeued(session: Session, letter_id: int, *, by: str) -> DeadLetter:
    """Flag a letter as requeued; the caller sends the task again after this commits."""
    letter = get(session, letter_id)
    if letter.requeued_at is not None:
        raise StateError(
            f"dead letter {letter_id} was already requeued at {letter.requeued_at:%Y-%m-%d %H:%M}"
            f" by {letter.requeued_by}"
        )
    letter.requeued_at = utcnow()
    letter.requeued_by = by
    return letter


def requeue(
    url: str,
    letter_id: int,
    *,
    by: str,
    send: Callable[[str, list[Any], dict[str, Any]], str],
) -> tuple[str, str]:
    """Mark a letter requeued, then send its task again with ``send(name, args, kwargs)``.

    The mark commits first, so two people requeueing at once send it once; if the task
    cannot be sent the mark is taken back and the letter stays listed for a later requeue.
    Returns (task name, new task ID).
    """
    with session_scope(url) as session:
        found = mark_requeued(session, letter_id, by=by)
        name, args = found.task_name, found.args
    try:
        task_id = send(name, args.get("args", []), args.get("kwargs", {}))
    except Exception as exc:
        with session_scope(url) as session:
            found = get(session, letter_id)
            found.requeued_at = None
            found.requeued_by = None
        raise BillingError(f"dead letter {letter_id} was not requeued: {exc}") from None
    return name, task_id
