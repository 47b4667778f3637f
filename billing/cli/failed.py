"""``billing failed list|show|retry|resolve|discard|review``: the failed-charge queue.

Charges the engine will not touch again by itself wait here (state ``failed`` or
``unknown``), and charges flagged for a person whatever their state (a late approval, a
possible double charge, another amount than asked). Every action says who did it (``--by``,
default: the operating-system user) and why, in the ledger, in one transaction. Aliases
are shown masked.
"""

from __future__ import annotations

import getpass
import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from billing import broker, ops
from billing.cli import params
from billing.db import session_scope
from billing.durations import format_delay
from billing.errors import InvalidInput
from billing.money import format_amount
from billing.plans import PlanSet, get_plans, load_plans
from billing.settings import get_settings
from billing.vocabulary import ChargeState

failed_app = typer.Typer(
    help="The failed-charge queue: charges waiting for a person.", no_args_is_help=True
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ChargeId = Annotated[
    int, params.argument("charge id", params.RECORD_ID, help="Charge id (see billing failed list).")
]
By = Annotated[
    str | None,
    params.option("--by", params.ACTOR, help="Who does this (default: the operating-system user)."),
]
Reason = Annotated[str | None, params.option("--reason", params.TEXT, help="Why (in the ledger).")]
PlansFile = Annotated[
    Path | None, typer.Option("--plans", help="Plans file (default: BILLING_PLANS_FILE).")
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


def actor(by: str | None) -> str:
    """``--by`` (read by ``params.ACTOR``, so never blank), else the operating-system user."""
    return by.strip() if by else getpass.getuser()


def _plans(path: Path | None) -> PlanSet:
    return load_plans(path) if path is not None else get_plans(get_settings())


def _age(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@failed_app.command("list")
def list_(
    plan: Annotated[
        str | None, params.option("--plan", params.TEXT, help="Only this plan.")
    ] = None,
    reason: Annotated[
        str | None,
        params.option(
            "--reason", params.TEXT, help=f"Only this reason ({', '.join(ops.REASONS)})."
        ),
    ] = None,
    state: Annotated[
        str | None,
        params.option("--state", params.TEXT, help="Only this state (failed, unknown, ...)."),
    ] = None,
    older_than: Annotated[
        timedelta | None,
        params.option(
            "--older-than", params.DELAY, help='Only charges waiting longer than this ("2 days").'
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """The charges waiting for a person, oldest first (flagged charges too)."""
    delay = older_than
    with session_scope(get_settings().database_url) as session:
        rows = ops.list_failed(session, plan=plan, reason=reason, state=state, older_than=delay)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2, ensure_ascii=False))
        return
    table = Table(
        "id", "reference", "plan", "amount", "state", "reason", "attempts", "code", "message",
        "waiting",
    )  # fmt: skip
    for r in rows:
        table.add_row(
            str(r.charge_id),
            escape(r.external_ref),
            escape(r.plan),
            f"{format_amount(r.amount)} {r.currency}",
            r.state,
            (r.reason or "") + (f" [review: {r.review}]" if r.review else ""),
            str(r.attempts),
            escape(r.last_code or ""),
            escape(r.last_message or ""),
            _age(r.age),
        )
    out.print(table)
    suffix = f" waiting longer than {format_delay(delay)}" if delay is not None else ""
    out.print(f"{len(rows)} charge(s){suffix}", markup=False)


@failed_app.command()
def show(charge: ChargeId, as_json: AsJson = False) -> None:
    """One charge: its subscription (alias masked), every gateway call, every ledger row."""
    with session_scope(get_settings().database_url) as session:
        data = ops.charge_story(session, charge).as_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    _fields(data["charge"], "charge")
    _fields(data["subscription"], "subscription")
    calls = Table("#", "operation", "amount", "worker", "started", "finished", "outcome", "code")
    for a in data["attempts"]:
        calls.add_row(
            str(a["number"]), a["operation"], a["amount"], escape(a["worker"]),
            a["started_at"] or "", a["finished_at"] or "", a["outcome"] or "", a["code"] or "",
        )  # fmt: skip
    out.print(calls if data["attempts"] else "no gateway calls", markup=False)
    entries = Table("at", "outcome", "operation", "amount", "tx", "code", "actor", "reason")
    for e in data["ledger"]:
        entries.add_row(
            e["at"], e["outcome"], e["operation"], f"{e['amount']} {e['currency']}",
            escape(e["tx"] or ""), escape(e["code"] or ""), escape(e["actor"]),
            escape(e["reason"] or e["message"] or ""),
        )  # fmt: skip
    out.print(entries if data["ledger"] else "no ledger rows", markup=False)


def _fields(data: dict[str, Any], title: str) -> None:
    table = Table("field", "value", title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, escape("" if value is None else str(value)))
    out.print(table)


@failed_app.command()
def retry(
    charge: ChargeId,
    confirm_not_charged: Annotated[
        bool,
        typer.Option(
            "--confirm-not-charged",
            help="For an unknown outcome: you checked the Klik & Pay back office and the "
            "card was not charged.",
        ),
    ] = False,
    attempt: Annotated[
        int | None,
        params.option(
            "--attempt",
            params.count(1, 1_000_000),
            help="The attempt you checked in the back office (see billing failed show): the "
            "retry is refused if the charge made another attempt since.",
        ),
    ] = None,
    reason: Reason = None,
    by: By = None,
) -> None:
    """Send a charge again now (the velocity guard does not apply to it)."""
    with session_scope(get_settings().database_url) as session:
        done = ops.retry(
            session, charge, by=actor(by), confirm_not_charged=confirm_not_charged,
            attempt=attempt, reason=reason,
        )  # fmt: skip
    if done.charge.state == ChargeState.AUTHORIZED:
        out.print(
            f"charge {charge}: its failed call is tried again by the next engine sweep "
            "(the card's authorization is kept, never renewed)",
            markup=False,
        )
        return
    out.print(f"charge {charge} put back in line", markup=False)
    out.print(_dispatch(charge), markup=False)


def _dispatch(number: int) -> str:
    """Hand the retried charge to the workers now (see ``billing.broker``)."""
    return broker.send_retried(number, get_settings())


@failed_app.command()
def resolve(
    charge: ChargeId,
    approved: Annotated[
        bool, typer.Option("--approved", help="The back office shows it paid (needs --tx).")
    ] = False,
    declined: Annotated[
        bool, typer.Option("--declined", help="The back office shows it declined.")
    ] = False,
    tx: Annotated[
        str | None,
        params.option("--tx", params.TX, help="Klik & Pay transaction number of the payment."),
    ] = None,
    reason: Reason = None,
    by: By = None,
    plans_file: PlansFile = None,
) -> None:
    """Record what the Klik & Pay back office shows for a charge: approved or declined."""
    if approved == declined:
        raise InvalidInput(f"charge {charge}: give either --approved --tx TX or --declined")
    plans = _plans(plans_file)
    with session_scope(get_settings().database_url) as session:
        done = ops.resolve(
            session, charge, approved=approved, tx=tx, by=actor(by), reason=reason, plans=plans
        )
        sub = done.subscription
        line = (
            f"charge {charge} is {done.charge.state}; subscription {sub.external_ref} is "
            f"{sub.status}"
        )
        if approved:
            line += f", next charge (period {sub.next_period}) at {sub.next_charge_at.isoformat()}"
    out.print(line, markup=False)


@failed_app.command()
def discard(
    charge: ChargeId,
    reason: Annotated[
        str | None,
        params.option("--reason", params.TEXT, help="Why this period is given up (required)."),
    ] = None,
    by: By = None,
    plans_file: PlansFile = None,
) -> None:
    """Give up on a charge's period: it is never charged and the subscription moves on."""
    if reason is None or not reason.strip():
        raise InvalidInput(f"charge {charge}: --reason is required to discard a charge")
    plans = _plans(plans_file)
    with session_scope(get_settings().database_url) as session:
        done = ops.discard(session, charge, by=actor(by), reason=reason, plans=plans)
        sub = done.subscription
        line = (
            f"charge {charge} discarded; subscription {sub.external_ref} is {sub.status}, "
            f"next charge (period {sub.next_period}) at {sub.next_charge_at.isoformat()}"
        )
    out.print(line, markup=False)


@failed_app.command()
def review(
    charge: ChargeId,
    reason: Annotated[
        str | None,
        params.option("--reason", params.TEXT, help="What was done to reconcile it (required)."),
    ] = None,
    by: By = None,
) -> None:
    """Clear a charge's review flags once it is reconciled (a late approval, a possible
    double charge, an amount other than asked): say what was done."""
    if reason is None or not reason.strip():
        raise InvalidInput(f"charge {charge}: --reason is required: say what was done")
    with session_scope(get_settings().database_url) as session:
        ops.review(session, charge, by=actor(by), reason=reason)
    out.print(f"charge {charge} reviewed", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``billing failed ...`` to the billing app."""
    app.add_typer(failed_app, name="failed")
