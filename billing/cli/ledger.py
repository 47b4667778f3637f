"""``billing ledger list|export`` and ``billing report``: the ledger, read back.

Dates are UTC. ``--from DAY`` starts at that day's midnight; ``--to DAY`` includes the
whole day (up to the next midnight), so ``--from 2025-01-01 --to 2025-01-31`` is January.
A full ISO 8601 time (``2025-01-15T12:00:00+01:00``) is taken as the exact instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from billing import reports
from billing.cli import params
from billing.db import session_scope
from billing.durations import quote
from billing.errors import InvalidInput
from billing.models import LedgerEntry
from billing.settings import get_settings

ledger_app = typer.Typer(help="The append-only ledger: list and export.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Subscription = Annotated[
    str | None,
    params.option("--subscription", params.TEXT, help="Only this subscription (external ref)."),
]
PlanOpt = Annotated[str | None, params.option("--plan", params.TEXT, help="Only this plan.")]
Outcome = Annotated[
    str | None,
    params.option("--outcome", params.TEXT, help="Only this outcome (approved, declined, ...)."),
]
FROM_HELP = "From this day (YYYY-MM-DD, UTC) or ISO time."
TO_HELP = "To this day, included (YYYY-MM-DD, UTC), or ISO time."
From = Annotated[datetime | None, params.option("--from", params.SINCE, help=FROM_HELP)]
To = Annotated[datetime | None, params.option("--to", params.UNTIL, help=TO_HELP)]


@ledger_app.command("list")
def list_(
    subscription: Subscription = None,
    plan: PlanOpt = None,
    outcome: Outcome = None,
    since: From = None,
    until: To = None,
    limit: Annotated[
        int, params.option("--limit", params.LIMIT, help="At most this many (the newest).")
    ] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Ledger rows in order (the last LIMIT of those matching); aliases masked."""
    start, stop = since, until
    filters: dict[str, Any] = {
        "subscription": subscription, "plan": plan, "outcome": outcome,
        "since": start, "until": stop,
    }  # fmt: skip
    with session_scope(get_settings().database_url) as session:
        total = reports.count_ledger_rows(session, **filters)
        rows = reports.ledger_rows(session, **filters, last=limit)
        wanted = [reports.entry_dict(e) for e in rows]
    if as_json:
        typer.echo(json.dumps(wanted, indent=2, ensure_ascii=False))
        return
    table = Table(
        "id", "at (UTC)", "outcome", "op", "reference", "plan", "period", "amount", "tx",
        "alias", "actor", "reason / message",
    )  # fmt: skip
    for e in wanted:
        table.add_row(
            str(e["id"]), e["at"][:19].replace("T", " "), e["outcome"], e["operation"],
            escape(e["external_ref"] or ""), escape(e["plan"] or ""),
            "" if e["period"] is None else str(e["period"]), f"{e['amount']} {e['currency']}",
            escape(e["tx"] or ""), escape(e["alias_masked"] or ""), escape(e["actor"]),
            escape(e["reason"] or e["message"] or ""),
        )  # fmt: skip
    out.print(table)
    shown = f"last {len(wanted)} of {total}" if len(wanted) < total else str(total)
    out.print(f"{shown} ledger row(s)", markup=False)


@ledger_app.command()
def export(
    fmt: Annotated[str, params.option("--format", params.TEXT, help="csv or jsonl.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: standard output).")
    ] = None,
    subscription: Subscription = None,
    plan: PlanOpt = None,
    outcome: Outcome = None,
    since: From = None,
    until: To = None,
) -> None:
    """Every matching ledger row as CSV (with a header) or JSON lines, amounts as "29.90"."""
    if fmt not in reports.FORMATS:
        raise InvalidInput(f"--format: {quote(fmt)} is not one of: {', '.join(reports.FORMATS)}")
    start, stop = since, until
    filters: dict[str, Any] = {
        "subscription": subscription, "plan": plan, "outcome": outcome,
        "since": start, "until": stop,
    }  # fmt: skip
    with session_scope(get_settings().database_url) as session:
        if output is None:
            rows = reports.ledger_rows(session, **filters)
            reports.export(rows, fmt, typer.get_text_stream("stdout"))
            return
        total = reports.count_ledger_rows(session, **filters)
        rows = reports.ledger_rows(session, **filters)
        written = _export_to_file(rows, fmt, output, total)
    err.print(f"{written} ledger row(s) written to {output}", markup=False)


def _export_to_file(rows: Iterator[LedgerEntry], fmt: str, output: Path, total: int) -> int:
    """Write to a temporary file beside ``output``, renamed at the end: never half a file.

    The temporary name is short and fixed in shape: "NAME.partial" would not fit beside a
    name of 250 bytes, and "." or "/" have no name to add to.
    """
    partial = output.parent / f".ledger-export-{uuid.uuid4().hex}.partial"
    bar = Progress(
        TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    )  # fmt: skip
    task = bar.add_task("export", total=total)
    try:
        with bar, partial.open("w", encoding="utf-8", newline="") as handle:
            written = reports.export(rows, fmt, handle, progress=lambda n: bar.advance(task, n))
        os.replace(partial, output)
    except OSError as exc:
        _discard(partial)
        raise InvalidInput(f"--output: cannot write {quote(str(output))}: {exc.strerror}") from None
    except BaseException:
        _discard(partial)
        raise
    return written


def _discard(partial: Path) -> None:
    # Whatever kept the file from being written may keep it from being removed too.
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


def report(
    since: Annotated[
        datetime, params.option("--from", params.SINCE, help="First day (YYYY-MM-DD, UTC).")
    ],
    until: Annotated[
        datetime, params.option("--to", params.UNTIL, help="Last day, included (YYYY-MM-DD, UTC).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Money per plan and currency between two days.

    Collected, authorized, refunded and declined in the period; in dunning and unknown now.
    Late approvals (an attempt given up on, then approved) are shown apart: the card was
    charged but the books do not count it until a person resolves the charge.
    """
    start, stop = since, until
    with session_scope(get_settings().database_url) as session:
        lines = reports.report(session, since=start, until=stop)
    if as_json:
        data = {
            "from": start.isoformat(),
            "to": stop.isoformat(),
            "lines": [line.as_dict() for line in lines],
        }
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    table = Table(
        "plan", "currency", "collected", "authorized", "refunded", "declined",
        "in dunning (now)", "unknown (now)", "late approvals",
        title=f"{start:%Y-%m-%d %H:%M} to {stop:%Y-%m-%d %H:%M} UTC",
    )  # fmt: skip
    for line in lines:
        d = line.as_dict()
        table.add_row(
            escape(d["plan"] or "-"), d["currency"],
            f"{d['collected']} ({d['collected_count']})", d["authorized"], d["refunded"],
            f"{d['declined_amount']} ({d['declined_count']})", str(d["in_dunning"]),
            f"{d['unknown_amount']} ({d['unknown_count']})",
            f"{d['late_approved_amount']} ({d['late_approved_count']})",
        )  # fmt: skip
    out.print(table)
    if not lines:
        out.print("nothing in this period", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``billing ledger ...`` and ``billing report`` to the billing app."""
    app.add_typer(ledger_app, name="ledger")
    app.command()(report)
