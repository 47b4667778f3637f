"""The dead-letter table: tasks that raised something nobody planned for.

Nothing is silently dropped: the task's name, arguments and traceback are kept until a
person requeues it (after fixing the cause) from ``billing deadletters``.

What is kept of the arguments is what the task takes, never what a message carried: a
task message comes from outside (a shop sends ``billing.add_subscription``) and may hold
card fields it should never have sent. Each task's parameters (and, for a dict parameter,
its known keys) are in :data:`TASKS`; anything else is dropped, every string is redacted
and aliases are masked, and the exception text and traceback are scrubbed of the values
that were removed. A letter whose arguments were changed so says (``masked``), and
:func:`mark_requeued` refuses it: re-sending a masked alias would fail or, worse, act on
the wrong card. The person is told what to do instead.

Each letter says who gave up on it (``source``): ``task`` — the task raised; ``redis`` —
the message's deliveries kept dying (its task killed the worker process) past the delivery
limit, counted by the workers (``billing.deliveries``); ``rabbitmq`` — RabbitMQ's own
delivery limit sent it to the dead-letter queue, and it was moved here from there
(``billing.broker.drain_dead_letters``). All three are listed, shown and requeued alike.
A letter of either delivery limit is stored by ``billing.broker.record_poison``, which also
moves the charges of a charge message still ``queued`` to the failed-charge queue
(``poison``) in the letter's transaction.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.changes import FIELDS as CHANGE_FIELDS
from billing.db import checked_id, session_scope
from billing.errors import BillingError, NotFound, StateError
from billing.intake import FIELDS as SUBSCRIPTION_FIELDS
from billing.models import DeadLetter, utcnow
from billing.redact import PAN_MARK, mask_alias, mask_aliases, redact
from billing.webhooks import REDELIVER_TASK
from schedules.beat import DELIVER_EVENTS, ENGINE_SWEEP, SWEEP_PLAN

#: Characters kept of an exception's message and of a traceback (its end: the cause).
MESSAGE_LIMIT = 4000
TRACEBACK_LIMIT = 20000
#: Names of parameters and dict keys whose value is an alias, kept masked.
ALIAS_KEYS = frozenset({"alias"})
#: Values removed from a letter's arguments that are also looked for, in every encoding,
#: in its exception text: a message of thousands of unknown fields must not cost minutes.
MAX_SCRUBBED_VALUES = 32
#: Who gave up on a letter (its ``source``), and what that means, for a person.
SOURCE_TASK = "task"
SOURCE_REDIS = "redis"
SOURCE_RABBITMQ = "rabbitmq"
SOURCES = {
    SOURCE_TASK: "the task raised",
    SOURCE_REDIS: "delivery limit (counted by the workers on Redis)",
    SOURCE_RABBITMQ: "delivery limit (RabbitMQ's dead-letter queue)",
}
#: What a person does instead of requeueing a letter whose arguments were masked.
RESEND = "send the task again from where it came, with its real arguments"


@dataclass(frozen=True)
class TaskArguments:
    """What a task takes: its parameters in order, the keys of its dict parameters, and
    what to do instead of a requeue once its arguments were masked."""

    params: tuple[str, ...]
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    instead: str = RESEND


#: Every task of ``tasks/`` (a test checks this against their signatures).
TASKS: Mapping[str, TaskArguments] = {
    SWEEP_PLAN: TaskArguments(("plan",)),
    ENGINE_SWEEP: TaskArguments(()),
    "billing.charge": TaskArguments(("charge_id",)),
    "billing.charge_batch": TaskArguments(("charge_ids",)),
    "billing.noop": TaskArguments(("charge_id",)),
    "billing.capture": TaskArguments(("charge_id",)),
    "billing.add_subscription": TaskArguments(
        ("data",),
        {"data": SUBSCRIPTION_FIELDS},
        "send billing.add_subscription again from the shop with the real alias, or add the "
        "subscription with billing subscriptions import",
    ),
    "billing.update_subscription": TaskArguments(
        ("data",),
        {"data": CHANGE_FIELDS},
        "send billing.update_subscription again from the shop with the real alias, or run "
        "billing subscriptions update",
    ),
    DELIVER_EVENTS: TaskArguments(()),
    REDELIVER_TASK: TaskArguments(("event_id", "endpoint")),
}


@dataclass
class _Kept:
    """What was changed to store a letter's arguments (paths, for the person), and the
    values removed or masked (scrubbed by value from the exception text too)."""

    masked: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)

    def dropped(self, path: str, what: str, values: list[Any]) -> None:
        self.masked.append(f"{path}: {what} dropped")
        self._remove(values)

    def value(self, path: str, name: str, value: Any, keys: tuple[str, ...] | None) -> Any:
        """One argument (or dict field) called ``name``, as it may be stored."""
        if name in ALIAS_KEYS and isinstance(value, str):
            self.masked.append(path)
            self.aliases.append(value)
            return mask_alias(value)
        if isinstance(value, dict):
            if keys is not None:
                unknown = [k for k in value if k not in keys]
                if unknown:
                    self.dropped(
                        path, f"{len(unknown)} unknown key(s)", [value[k] for k in unknown]
                    )
            return {
                redact(str(k)): self.value(f"{path}.{k}", str(k), v, None)
                for k, v in value.items()
                if keys is None or k in keys
            }
        if isinstance(value, list | tuple):
            return [self.value(f"{path}[{n}]", "", item, None) for n, item in enumerate(value)]
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            cleaned = redact(value)
            return value if cleaned == value else self._changed(path, value, cleaned)
        if isinstance(value, int | float):  # a card number may come as a number
            unchanged = redact(str(value)) == str(value)
            return value if unchanged else self._changed(path, value, PAN_MARK)
        return self._changed(path, value, redact(repr(value)))  # not JSON: its text, redacted

    def _changed(self, path: str, value: Any, stored: Any) -> Any:
        self.masked.append(path)
        self._remove([value])
        return stored

    def _remove(self, values: list[Any]) -> None:
        room = MAX_SCRUBBED_VALUES - len(self.removed)
        self.removed += [text for text in _strings(values) if len(text) >= 4][: max(room, 0)]


def _strings(values: list[Any]) -> list[str]:
    """Every string (and number) in ``values``, at any depth."""
    found: list[str] = []
    for value in values:
        if isinstance(value, dict):
            found += _strings(list(value.values()))
        elif isinstance(value, list | tuple):
            found += _strings(list(value))
        elif value is not None:
            found.append(str(value))
    return found


def stored_arguments(
    task_name: str, args: list[Any] | tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], _Kept]:
    """The ``args`` column of a letter of ``task_name``, and what was changed to make it."""
    shape = TASKS.get(task_name)
    kept = _Kept()
    params = shape.params if shape is not None else None
    fields = shape.fields if shape is not None else {}
    positional: list[Any] = []
    for i, value in enumerate(args):
        if params is not None and i >= len(params):
            kept.dropped(f"args[{i}:]", f"{len(args) - i} extra argument(s)", list(args[i:]))
            break
        name = params[i] if params is not None else ""
        positional.append(kept.value(f"args[{i}]", name, value, fields.get(name)))
    taken = set(params[: len(positional)]) if params is not None else set()
    known = {k: v for k, v in kwargs.items() if params is None or (k in params and k not in taken)}
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        kept.dropped(
            "kwargs", f"{len(unknown)} unknown key(s)", [*unknown, *map(kwargs.get, unknown)]
        )
    named = {k: kept.value(f"kwargs.{k}", k, v, fields.get(k)) for k, v in known.items()}
    stored: dict[str, Any] = {"args": positional, "kwargs": named}
    if kept.masked:
        stored["masked"] = [redact(path)[:120] for path in kept.masked[:20]]
    return stored, kept


def _scrubbed(text: str, kept: _Kept) -> str:
    return mask_aliases(redact(text, secrets=kept.removed), kept.aliases)


def record(
    url: str,
    *,
    task_name: str,
    task_id: str | None,
    args: list[Any] | tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: BaseException,
    traceback: str | None = None,
    source: str = SOURCE_TASK,
    then: Callable[[Session, int], None] | None = None,
) -> int:
    """Store one failed task, its arguments as :func:`stored_arguments` keeps them and its
    exception scrubbed of the values removed; return its dead-letter ID.

    ``then(session, letter_id)`` runs in the letter's own transaction, for what must land
    with it or not at all (``billing.broker.record_poison``: the letter's charges).
    """
    stored, kept = stored_arguments(task_name, args, kwargs)
    text = traceback or "".join(tb.format_exception(exc))
    with session_scope(url) as session:
        letter = DeadLetter(
            task_name=task_name[:128],
            task_id=task_id,
            args=stored,
            exc_type=type(exc).__qualname__[:128],
            exc_message=_scrubbed(str(exc), kept)[:MESSAGE_LIMIT],
            traceback=_scrubbed(text, kept)[-TRACEBACK_LIMIT:],
            source=source,
        )
        session.add(letter)
        session.flush()
        if then is not None:
            then(session, letter.id)
        return letter.id


def has_letter(url: str, task_id: str, source: str) -> bool:
    """Whether a letter of task ``task_id`` from ``source`` is stored already."""
    with session_scope(url) as session:
        found = session.scalars(
            select(DeadLetter.id).where(DeadLetter.task_id == task_id, DeadLetter.source == source)
        ).first()
        return found is not None


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


def masked(letter: DeadLetter) -> list[str]:
    """What was changed in the letter's arguments before they were stored (empty: none)."""
    found = (letter.args or {}).get("masked") or []
    return [str(item) for item in found]


def mark_requeued(session: Session, letter_id: int, *, by: str) -> DeadLetter:
    """Flag a letter as requeued; the caller sends the task again after this commits.

    Refused for a letter whose arguments were masked: they are not the task's any more.
    """
    letter = get(session, letter_id)
    if letter.requeued_at is not None:
        raise StateError(
            f"dead letter {letter_id} was already requeued at {letter.requeued_at:%Y-%m-%d %H:%M}"
            f" by {letter.requeued_by}"
        )
    changed = masked(letter)
    if changed:
        shape = TASKS.get(letter.task_name)
        instead = shape.instead if shape is not None else RESEND
        raise StateError(
            f"dead letter {letter_id} cannot be requeued: its arguments were masked before "
            f"they were stored ({', '.join(changed[:3])}); {instead}"
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
