"""``billing subscriptions import|list|show|update|pause|resume|cancel``.

Aliases are always shown masked. An import with bad rows prints every problem, one per
line, and exits with status 2 having written nothing; so does an update with a bad field.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select

from billing import broker, changes, intake
from billing import subscriptions as subs
from billing.cli import params
from billing.db import session_scope
from billing.errors import ImportRejected, InvalidInput
from billing.models import Charge, Subscription, SubscriptionChange
from billing.money import format_amount
from billing.plans import PlanSet, get_plans, load_plans
from billing.redact import mask_alias
from billing.settings import get_settings

subs_app = typer.Typer(help="Import, list and manage subscriptions.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Files with fewer rows than this import too fast to need a progress bar.
PROGRESS_FROM_ROWS = 1000

By = Annotated[
    str | None,
    params.option("--by", params.ACTOR, help="Who does this (default: the operating-system user)."),
]
Ref = Annotated[
    str, params.argument("subscription", params.SUBSCRIPTION_REF, help="External reference or id.")
]


def _plans(path: Path | None) -> PlanSet:
    return load_plans(path) if path is not None else get_plans(get_settings())


def _actor(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no name
        return "unknown"


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _summary(sub: Subscription) -> dict[str, Any]:
    """A subscription as plain data, alias masked."""
    return {
        "id": sub.id,
        "external_ref": sub.external_ref,
        "plan": sub.plan,
        "status": sub.status,
        "alias": mask_alias(sub.alias),
        "customer_ip": sub.customer_ip,
        "email": sub.email,
        "amount_override": (
            format_amount(sub.amount_override) if sub.amount_override is not None else None
        ),
        "anchor_at": _time(sub.anchor_at),
        "anchor_period": sub.anchor_period,
        "next_period": sub.next_period,
        "next_charge_at": _time(sub.next_charge_at),
        "paused_at": _time(sub.paused_at),
        "last_charged_at": _time(sub.last_charged_at),
        "created_at": _time(sub.created_at),
        "updated_at": _time(sub.updated_at),
    }


def _charge_summary(charge: Charge) -> dict[str, Any]:
    return {
        "id": charge.id,
        "period": charge.period,
        "due_at": _time(charge.due_at),
        "state": charge.state,
        "amount": format_amount(charge.amount),
        "currency": charge.currency,
        "attempts": charge.attempts,
        "declines": charge.declines,
        "tx": charge.tx,
        "last_code": charge.last_code,
        "reason": charge.reason,
    }


@subs_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="CSV (with a header) or JSON-lines file.")],
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Reject rows due more than one period ago (else warn)."),
    ] = False,
    plans_file: Annotated[
        Path | None, typer.Option("--plans", help="Plans file (default: BILLING_PLANS_FILE).")
    ] = None,
) -> None:
    """Create the subscriptions of FILE, all or nothing; importing it again changes nothing."""
    plans = _plans(plans_file)
    url = get_settings().database_url
    total = intake.count_rows(file) if intake.file_problem(file) is None else 0
    bar = Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=total < PROGRESS_FROM_ROWS or not err.is_terminal,
    )
    task = bar.add_task("import", total=total)
    try:
        with bar:
            result = intake.import_subscriptions(
                url, file, plans, strict=strict, progress=lambda n: bar.advance(task, n)
            )
    except ImportRejected as exc:
        if len(exc.problems) == 1:  # one problem, one line
            raise InvalidInput(f"{exc.path}: {exc.problems[0]}; nothing was imported") from None
        # Every problem on its own line; main() then prints the summary and exits with 2.
        for problem in exc.problems:
            err.print(problem, markup=False)
        raise InvalidInput(
            f"{exc.path}: {len(exc.problems)} problem(s), nothing was imported"
        ) from None
    for warning in result.warnings:
        err.print(f"warning: {warning}", style="yellow", markup=False)
    out.print(f"{result.created} created, {result.unchanged} unchanged", markup=False)


@subs_app.command("list")
def list_(
    plan: Annotated[
        str | None, params.option("--plan", params.TEXT, help="Only this plan.")
    ] = None,
    status: Annotated[
        str | None,
        params.option(
            "--status", params.TEXT, help="Only this status (active, past_due, paused, ...)."
        ),
    ] = None,
    limit: Annotated[int, params.option("--limit", params.LIMIT, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """List subscriptions (aliases masked)."""
    with session_scope(get_settings().database_url) as session:
        rows = [
            _summary(s)
            for s in subs.list_subscriptions(session, plan=plan, status=status, limit=limit)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("id", "reference", "plan", "status", "next charge (UTC)", "alias", "amount")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["external_ref"],
            row["plan"],
            row["status"],
            row["next_charge_at"][:16].replace("T", " "),
            row["alias"],
            row["amount_override"] or "(plan)",
        )
    out.print(table)
    out.print(f"{len(rows)} subscription(s)", markup=False)


def _change_summary(change: SubscriptionChange) -> dict[str, Any]:
    return {
        "id": change.id,
        "plan": change.plan,
        "amount_override": (
            format_amount(change.amount_override) if change.amount_override is not None else None
        ),
        "effective_at": _time(change.effective_at),
        "created_at": _time(change.created_at),
        "created_by": change.created_by,
        "applied_at": _time(change.applied_at),
        "applied_period": change.applied_period,
    }


@subs_app.command()
def show(
    ref: Ref,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
) -> None:
    """Every field of one subscription (alias masked), its scheduled changes and charges."""
    with session_scope(get_settings().database_url) as session:
        sub = subs.get_subscription(session, ref)
        data = _summary(sub)
        charges = [_charge_summary(c) for c in sorted(sub.charges, key=lambda c: c.period)]
        scheduled = [
            _change_summary(c)
            for c in session.scalars(
                select(SubscriptionChange)
                .where(SubscriptionChange.subscription_id == sub.id)
                .order_by(SubscriptionChange.effective_at, SubscriptionChange.id)
            )
        ]
    if as_json:
        typer.echo(
            json.dumps(
                {**data, "changes": scheduled, "charges": charges}, indent=2, ensure_ascii=False
            )
        )
        return
    fields = Table("field", "value", show_header=False)
    for key, value in data.items():
        fields.add_row(key, "" if value is None else str(value))
    out.print(fields)
    if scheduled:
        table = Table("from", "plan", "amount", "by", "applied", title="plan and price changes")
        for c in scheduled:
            applied = f"period {c['applied_period']}" if c["applied_at"] else "pending"
            table.add_row(
                c["effective_at"], c["plan"], c["amount_override"] or "(plan)", c["created_by"],
                applied,
            )  # fmt: skip
        out.print(table)
    if not charges:
        out.print("no charges yet")
        return
    table = Table(
        "period", "due", "state", "amount", "attempts", "tx", "code", "reason", title="charges"
    )
    for c in charges:
        table.add_row(
            str(c["period"]),
            c["due_at"],
            c["state"],
            f"{c['amount']} {c['currency']}",
            str(c["attempts"]),
            c["tx"] or "",
            c["last_code"] or "",
            c["reason"] or "",
        )
    out.print(table)


@subs_app.command()
def update(
    ref: Ref,
    alias: Annotated[
        str | None,
        params.option(
            "--alias", params.TEXT, help="The new card's alias (from its first payment); at once."
        ),
    ] = None,
    ip: Annotated[
        str | None,
        params.option(
            "--ip", params.TEXT, help="customer_ip: the IP of the payment that gave the new alias."
        ),
    ] = None,
    plan: Annotated[
        str | None,
        params.option("--plan", params.TEXT, help="Another plan, in the same currency."),
    ] = None,
    amount: Annotated[
        str | None, params.option("--amount", params.TEXT, help="A new price, such as 24.90.")
    ] = None,
    effective_from: Annotated[
        str | None,
        params.option(
            "--from",
            params.TEXT,
            help="effective_from: the plan or price counts for the charges due from this day "
            "(2026-07-01, the plan's time zone) or time (with offset); default: next period.",
        ),
    ] = None,
    reason: Annotated[
        str | None, params.option("--reason", params.TEXT, help="Why (required; in the ledger).")
    ] = None,
    by: By = None,
    plans_file: Annotated[
        Path | None, typer.Option("--plans", help="Plans file (default: BILLING_PLANS_FILE).")
    ] = None,
) -> None:
    """A new card (at once; a declined charge is tried with it now), another plan or a new
    price (from the next period; the current one keeps its amount)."""
    plans = _plans(plans_file)
    with session_scope(get_settings().database_url) as session:
        done = changes.update_subscription(
            session, plans, ref, by=_actor(by), reason=reason, alias=alias, customer_ip=ip,
            plan=plan, amount=amount, effective_from=effective_from,
        )  # fmt: skip
    for line in done.lines():
        out.print(line, markup=False)
    if done.card is not None and done.card.retried is not None:
        out.print(broker.send_retried(done.card.retried.charge.id, get_settings()), markup=False)


@subs_app.command()
def pause(ref: Ref, by: By = None) -> None:
    """Stop charging a subscription until it is resumed."""
    with session_scope(get_settings().database_url) as session:
        sub = subs.pause(session, ref, by=_actor(by))
        out.print(f"subscription {sub.external_ref} paused", markup=False)


@subs_app.command()
def resume(
    ref: Ref,
    by: By = None,
    plans_file: Annotated[
        Path | None, typer.Option("--plans", help="Plans file (default: BILLING_PLANS_FILE).")
    ] = None,
) -> None:
    """Charge again from the first period due after now; periods while paused are skipped."""
    plans = _plans(plans_file)
    with session_scope(get_settings().database_url) as session:
        sub = subs.resume(session, ref, plans, by=_actor(by))
        out.print(
            f"subscription {sub.external_ref} active; next charge (period {sub.next_period})"
            f" at {sub.next_charge_at.isoformat()}",
            markup=False,
        )


@subs_app.command()
def cancel(
    ref: Ref,
    reason: Annotated[
        str | None, params.option("--reason", params.TEXT, help="Why (logged).")
    ] = None,
    by: By = None,
) -> None:
    """End a subscription for good."""
    with session_scope(get_settings().database_url) as session:
        sub = subs.cancel(session, ref, by=_actor(by), reason=reason)
        out.print(f"subscription {sub.external_ref} cancelled", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``billing subscriptions ...`` to the billing app."""
    app.add_typer(subs_app, name="subscriptions")
