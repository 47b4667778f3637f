"""``billing events list|show|redeliver``: what the shop was (or will be) told.

Events are recorded whether or not an endpoint is configured, so ``list`` also shows what
would have been sent. ``redeliver`` sends a dead or delivered event again under the same
event ID; the shop's duplicate check makes that safe.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from billing import webhooks
from billing.cli.failed import actor
from billing.db import session_scope
from billing.events import iso
from billing.models import Event, EventStatus
from billing.settings import get_settings

events_app = typer.Typer(
    help="Webhook events for the shop: list, show, redeliver.", no_args_is_help=True
)
out = Console(highlight=False, soft_wrap=True)

EventRef = Annotated[
    str, typer.Argument(help="Event number (see billing events list) or event ID (UUID).")
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


def _summary(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "event_id": event.event_id,
        "type": event.type,
        "subscription": event.external_ref,
        "charge_id": event.charge_id,
        "status": event.status,
        "created_at": iso(event.created_at),
        "attempts": event.attempts,
        "next_attempt_at": iso(event.next_attempt_at)
        if event.status == EventStatus.PENDING
        else None,
        "last_attempt_at": iso(event.last_attempt_at),
        "last_status": event.last_status,
        "last_error": event.last_error,
        "endpoint": event.endpoint,
        "delivered_at": iso(event.delivered_at),
        "dead_at": iso(event.dead_at),
        "redelivered_at": iso(event.redelivered_at),
        "redelivered_by": event.redelivered_by,
        "payload": event.payload,
    }


def _when(row: dict[str, Any]) -> str:
    stamp = row["delivered_at"] or row["dead_at"] or row["next_attempt_at"] or ""
    return stamp[:19].replace("T", " ")


def _last(row: dict[str, Any]) -> str:
    if row["last_error"]:
        return str(row["last_error"])[:60]
    return f"HTTP {row['last_status']}" if row["last_status"] else ""


@events_app.command("list")
def list_(
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only pending, delivered or dead events."),
    ] = None,
    type_: Annotated[
        str | None,
        typer.Option("--type", help='Only this type ("charge.approved"), or a prefix ("charge.").'),
    ] = None,
    subscription: Annotated[
        str | None, typer.Option("--subscription", help="Only this subscription's reference.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Latest N events.")] = 100,
    as_json: AsJson = False,
    payloads: Annotated[
        bool,
        typer.Option("--payloads", help="Print each event's body as posted, one per line."),
    ] = False,
) -> None:
    """The latest events, oldest first: what the shop was told or will be."""
    with session_scope(get_settings().database_url) as session:
        found = webhooks.list_events(
            session, status=status, type_=type_, subscription=subscription, limit=limit
        )
        rows = [_summary(event) for event in found]
        bodies = [webhooks.body_of(event.payload).decode() for event in found]
    if payloads:
        for body in bodies:
            typer.echo(body)
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("id", "created (UTC)", "type", "subscription", "charge", "status", "tries",
                  "next / done (UTC)", "last answer")  # fmt: skip
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["created_at"][:19].replace("T", " "),
            escape(row["type"]),
            escape(row["subscription"] or ""),
            str(row["charge_id"] or ""),
            escape(row["status"]),
            str(row["attempts"]),
            _when(row),
            escape(_last(row)),
        )
    out.print(table)
    configured = "" if get_settings().webhook_url else " (no BILLING_WEBHOOK_URL: not posted)"
    out.print(f"{len(rows)} event(s){configured}", markup=False)


@events_app.command()
def show(event: EventRef, as_json: AsJson = False) -> None:
    """One event: its delivery state and the exact body posted to the shop."""
    with session_scope(get_settings().database_url) as session:
        found = webhooks.get_event(session, event)
        data = _summary(found)
        body = webhooks.body_of(found.payload).decode()
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    fields = Table("field", "value", show_header=False)
    for key, value in data.items():
        if key != "payload":
            fields.add_row(key, escape("" if value is None else str(value)))
    out.print(fields)
    out.print("body:", markup=False)
    out.print(json.dumps(json.loads(body), indent=2, ensure_ascii=False), markup=False)


@events_app.command()
def redeliver(
    event: EventRef,
    by: Annotated[
        str | None, typer.Option("--by", help="Who does this (default: the operating-system user).")
    ] = None,
) -> None:
    """Send a dead or delivered event again, same event ID, from its first try."""
    who = actor(by)
    with session_scope(get_settings().database_url) as session:
        found = webhooks.redeliver(session, event, by=who)
        number, event_id, type_ = found.id, found.event_id, found.type
    note = "" if get_settings().webhook_url else " (no BILLING_WEBHOOK_URL: it waits for one)"
    out.print(f"event {number} {type_} ({event_id}) will be sent again{note}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``billing events ...`` to the billing app."""
    app.add_typer(events_app, name="events")
