"""``billing deadletters list|show|requeue``: tasks that failed in a way nobody planned for.

A dead letter keeps the task's name, arguments and (redacted) traceback. Once the cause is
fixed, ``requeue`` sends the same task again. That is safe for charges: a charge task
claims its charge atomically and does nothing when the charge has moved on. A letter whose
arguments were masked before they were stored (an alias, fields the task does not take)
is listed with what was masked and is not requeued: the error says what to do instead.

One view for every broker: on RabbitMQ, the poison messages the quorum queue dead-lettered
(its delivery limit) are moved from the dead-letter queue into the table first (the engine
sweep does so too), so that they are listed, shown and requeued like the others; each
letter says where it came from (``from``: the task raised, or which delivery limit).

A poison charge message has moved its charges still queued to the failed-charge queue
(``poison``): requeueing its letter sends a task that leaves them as they are, and
``requeue`` says so; ``billing failed retry`` sends such a charge again.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from billing import broker, deadletters
from billing.cli import params
from billing.cli.failed import By, actor
from billing.db import session_scope
from billing.models import DeadLetter
from billing.redact import redact
from billing.settings import get_settings

letters_app = typer.Typer(
    help="Tasks that failed unexpectedly, kept for a person to requeue.", no_args_is_help=True
)
out = Console(highlight=False, soft_wrap=True)
err = Console(highlight=False, soft_wrap=True, stderr=True)

LetterId = Annotated[
    int,
    params.argument(
        "dead-letter id", params.RECORD_ID, help="Dead-letter id (see billing deadletters list)."
    ),
]


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _summary(letter: DeadLetter) -> dict[str, Any]:
    # A letter stored before arguments were masked on the way in is masked for display.
    shown, _ = deadletters.stored_arguments(
        letter.task_name, letter.args.get("args", []), letter.args.get("kwargs", {})
    )
    return {
        "id": letter.id,
        "task_name": letter.task_name,
        "task_id": letter.task_id,
        "args": shown["args"],
        "kwargs": shown["kwargs"],
        "exc_type": letter.exc_type,
        "masked": deadletters.masked(letter),
        "exc_message": redact(letter.exc_message),
        "created_at": _time(letter.created_at),
        "requeued_at": _time(letter.requeued_at),
        "requeued_by": letter.requeued_by,
        "source": letter.source,
        "from": deadletters.SOURCES.get(letter.source, letter.source),
    }


def _args_cell(row: dict[str, Any]) -> str:
    shown = json.dumps(row["args"], ensure_ascii=False)
    return shown + (" (masked: not requeueable)" if row["masked"] else "")


@letters_app.command("list")
def list_(
    include_requeued: Annotated[
        bool, typer.Option("--all", help="Include letters already requeued.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Dead letters not yet requeued, oldest first: tasks that raised and poison messages."""
    note = broker.move_dead_letters(get_settings())
    with session_scope(get_settings().database_url) as session:
        rows = [
            _summary(letter)
            for letter in deadletters.list_letters(session, include_requeued=include_requeued)
        ]
    if note:
        err.print(note, markup=False)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("id", "created (UTC)", "task", "from", "args", "error", "requeued")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["created_at"][:19].replace("T", " "),
            escape(row["task_name"]),
            escape(row["source"]),
            escape(_args_cell(row)),
            escape(f"{row['exc_type']}: {row['exc_message']}"[:120]),
            escape(f"{row['requeued_at'][:16]} by {row['requeued_by']}")
            if row["requeued_at"]
            else "",
        )
    out.print(table)
    out.print(f"{len(rows)} dead letter(s)", markup=False)


@letters_app.command()
def show(
    letter: LetterId,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of text.")] = False,
) -> None:
    """One dead letter with its full traceback and where it came from."""
    note = broker.move_dead_letters(get_settings())
    if note:
        err.print(note, markup=False)
    with session_scope(get_settings().database_url) as session:
        found = deadletters.get(session, letter)
        data = {**_summary(found), "traceback": redact(found.traceback)}
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    fields = Table("field", "value", show_header=False)
    for key, value in data.items():
        if key != "traceback":
            shown = (
                json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value
            )
            fields.add_row(key, escape("" if shown is None else str(shown)))
    out.print(fields)
    out.print(data["traceback"], markup=False)


@letters_app.command()
def requeue(letter: LetterId, by: By = None) -> None:
    """Send the task again, with the same arguments, after its cause was fixed."""
    number = letter
    name, task_id = deadletters.requeue(
        get_settings().database_url,
        number,
        by=actor(by),
        send=lambda name, args, kwargs: broker.send_task(get_settings(), name, args, kwargs),
    )
    out.print(f"dead letter {number}: {name} sent again as task {task_id}", markup=False)
    note = broker.requeued_charges(get_settings().database_url, number)
    if note:
        out.print(f"note: {note}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``billing deadletters ...`` to the billing app."""
    app.add_typer(letters_app, name="deadletters")
