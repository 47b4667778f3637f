"""``billing events list|show|redeliver``: what each endpoint was (or will be) told.

Events are recorded whether or not an endpoint is configured, so ``list`` also shows what
would have been sent. Every event has one delivery per endpoint that receives it
(``default`` for ``BILLING_WEBHOOK_URL``, plus the plans file's ``[webhooks.NAME]``), each
with its own state; ``--endpoint NAME`` narrows any command to one. ``redeliver`` sends a
dead or delivered event again under the same event ID; the endpoint's duplicate check
makes that safe.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from billing import webhooks
from billing.cli import params
from billing.cli.failed import By, actor
from billing.db import session_scope
from billing.errors import BillingError
from billing.events import DEFAULT_ENDPOINT, iso
from billing.models import Event, EventDelivery, EventStatus
from billing.plans import get_plans
from billing.settings import Settings, get_settings

events_app = typer.Typer(
    help="Webhook events for the shop: list, show, redeliver.", no_args_is_help=True
)
out = Console(highlight=False, soft_wrap=True)

EventRef = Annotated[
    str,
    params.argument(
        "event", params.EVENT_REF, help="Event number (see billing events list) or event ID (UUID)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]
EndpointOption = Annotated[
    str | None,
    params.option(
        "--endpoint",
        params.TEXT,
        help=f'Only this endpoint ("{DEFAULT_ENDPOINT}" = BILLING_WEBHOOK_URL, or a plans-file '
        "[webhooks.NAME]).",
    ),
]


def _delivery(delivery: EventDelivery) -> dict[str, Any]:
    return {
        "endpoint": delivery.endpoint,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at)
        if delivery.status == EventStatus.PENDING
        else None,
        "last_attempt_at": iso(delivery.last_attempt_at),
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "url": delivery.url,
        "delivered_at": iso(delivery.delivered_at),
        "dead_at": iso(delivery.dead_at),
        "redelivered_at": iso(delivery.redelivered_at),
        "redelivered_by": delivery.redelivered_by,
    }


def _summary(event: Event, deliveries: list[EventDelivery]) -> dict[str, Any]:
    return {
        "id": event.id,
        "event_id": event.event_id,
        "type": event.type,
        "subscription": event.external_ref,
        "charge_id": event.charge_id,
        "created_at": iso(event.created_at),
        "deliveries": [_delivery(delivery) for delivery in deliveries],
        "payload": event.payload,
    }


def _when(row: dict[str, Any]) -> str:
    stamp = row["delivered_at"] or row["dead_at"] or row["next_attempt_at"] or ""
    return stamp[:19].replace("T", " ")


def _last(row: dict[str, Any]) -> str:
    if row["last_error"]:
        return str(row["last_error"])[:60]
    return f"HTTP {row['last_status']}" if row["last_status"] else ""


def _unposted(settings: Settings, names: set[str]) -> list[str]:
    """Why some of ``names`` are not posted to: not configured where this CLI looks."""
    notes = []
    if DEFAULT_ENDPOINT in names and not settings.webhook_url:
        notes.append("no BILLING_WEBHOOK_URL")
    others = names - {DEFAULT_ENDPOINT}
    if others:
        try:
            configured = set(get_plans(settings).webhooks)
        except BillingError:  # a broken plans file: ``billing plans check`` says why
            return notes
        for name in sorted(others - configured):
            notes.append(f"{name} not in the plans file")
    return notes


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "created (UTC)", "type", "subscription", "charge", "endpoint", "status",
                  "tries", "next / done (UTC)", "last answer")  # fmt: skip
    for row in rows:
        first = True
        for delivery in row["deliveries"]:
            event_cells = (
                str(row["id"]),
                row["created_at"][:19].replace("T", " "),
                escape(row["type"]),
                escape(row["subscription"] or ""),
                str(row["charge_id"] or ""),
            )
            table.add_row(
                *(event_cells if first else ("",) * len(event_cells)),
                escape(delivery["endpoint"]),
                escape(delivery["status"]),
                str(delivery["attempts"]),
                _when(delivery),
                escape(_last(delivery)),
            )
            first = False
    return table


@events_app.command("list")
def list_(
    status: Annotated[
        str | None,
        params.option("--status", params.TEXT, help="Only pending, delivered or dead deliveries."),
    ] = None,
    type_: Annotated[
        str | None,
        params.option(
            "--type",
            params.TEXT,
            help='Only this type ("charge.approved"), or a prefix ("charge.").',
        ),
    ] = None,
    subscription: Annotated[
        str | None,
        params.option("--subscription", params.TEXT, help="Only this subscription's reference."),
    ] = None,
    endpoint: EndpointOption = None,
    limit: Annotated[int, params.option("--limit", params.LIMIT, help="Latest N events.")] = 100,
    as_json: AsJson = False,
    payloads: Annotated[
        bool,
        typer.Option("--payloads", help="Print each event's body as posted, one per line."),
    ] = False,
) -> None:
    """The latest events, oldest first, with each endpoint's delivery."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        found = webhooks.list_events(
            session, status=status, type_=type_, subscription=subscription,
            endpoint=endpoint, limit=limit,
        )  # fmt: skip
        rows = [
            _summary(event, webhooks.deliveries_of(event, status=status, endpoint=endpoint))
            for event in found
        ]
        bodies = [webhooks.body_of(event.payload).decode() for event in found]
    if payloads:
        for body in bodies:
            typer.echo(body)
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    out.print(_table(rows))
    names = {delivery["endpoint"] for row in rows for delivery in row["deliveries"]}
    notes = _unposted(settings, names)
    suffix = f" ({', '.join(notes)}: not posted)" if notes else ""
    out.print(f"{len(rows)} event(s){suffix}", markup=False)


@events_app.command()
def show(event: EventRef, endpoint: EndpointOption = None, as_json: AsJson = False) -> None:
    """One event: each endpoint's delivery state and the exact body posted."""
    with session_scope(get_settings().database_url) as session:
        found = webhooks.get_event(session, event)
        if endpoint is not None:
            webhooks.get_delivery(session, event, endpoint)  # NotFound names where it goes
        data = _summary(found, webhooks.deliveries_of(found, endpoint=endpoint))
        body = webhooks.body_of(found.payload).decode()
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    fields = Table("field", "value", show_header=False)
    for key, value in data.items():
        if key not in ("payload", "deliveries"):
            fields.add_row(key, escape("" if value is None else str(value)))
    out.print(fields)
    deliveries = Table("endpoint", "status", "tries", "next / done (UTC)", "last answer",
                       "posted to", "redelivered by")  # fmt: skip
    for row in data["deliveries"]:
        deliveries.add_row(
            escape(row["endpoint"]),
            escape(row["status"]),
            str(row["attempts"]),
            _when(row),
            escape(_last(row)),
            escape(row["url"] or ""),
            escape(row["redelivered_by"] or ""),
        )
    out.print(deliveries)
    out.print("body:", markup=False)
    out.print(json.dumps(json.loads(body), indent=2, ensure_ascii=False), markup=False)


@events_app.command()
def redeliver(
    event: EventRef,
    endpoint: EndpointOption = None,
    by: By = None,
) -> None:
    """Send a dead or delivered event again, same event ID, from its first try: to one
    endpoint, or to every endpoint it is not still pending for."""
    who = actor(by)
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        done = webhooks.redeliver(session, event, by=who, endpoint=endpoint)
        found = done[0].event
        number, event_id, type_ = found.id, found.event_id, found.type
        names = [delivery.endpoint for delivery in done]
    notes = _unposted(settings, set(names))
    note = f" ({', '.join(notes)}: it waits)" if notes else ""
    out.print(
        f"event {number} {type_} ({event_id}) will be sent again to {', '.join(names)}{note}",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    """Add ``billing events ...`` to the billing app."""
    app.add_typer(events_app, name="events")
