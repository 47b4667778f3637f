"""``billing plans check [FILE]``: validate the plans file before a worker trips over it."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from billing.durations import format_delay
from billing.errors import BillingError, ConfigError, PlanFileError
from billing.events import DEFAULT_ENDPOINT
from billing.money import format_amount
from billing.plans import Plan, PlanSet, WebhookEndpoint, load_plans
from billing.webhooks import endpoint_label

plans_app = typer.Typer(help="The plans file: accounts, prices, intervals.", no_args_is_help=True)


def _sweep(plan: Plan) -> str:
    if isinstance(plan.sweep, timedelta):
        return f"every {format_delay(plan.sweep)}"
    return str(plan.sweep)


def _deferred(plan: Plan) -> str:
    return f"yes, capture after {format_delay(plan.capture_after)}" if plan.deferred else "no"


def _ladder(plan: Plan) -> str:
    return ", ".join(format_delay(delay) for delay in plan.retry_ladder) or "no retries"


def _catch_up(plan: Plan) -> str:
    if plan.catch_up == "all":
        return f"all, {format_delay(plan.catch_up_spacing)} apart"
    return plan.catch_up


_HEADERS = (
    "plan",
    "amount",
    "currency",
    "merchant ID",
    "every",
    "sweep",
    "timezone",
    "deferred",
    "retry ladder",
    "after ladder",
    "catch-up",
)


def _row(plans: PlanSet, plan: Plan) -> tuple[str, ...]:
    return (
        plan.name,
        format_amount(plan.amount),
        plan.currency,
        plans.account_for(plan).merchant_id,
        str(plan.every),
        _sweep(plan),
        plan.timezone.key,
        _deferred(plan),
        _ladder(plan),
        plan.after_ladder,
        _catch_up(plan),
    )


def _table(plans: PlanSet) -> Table:
    table = Table(title=f"Plans in {escape(plans.path)}", title_justify="left")
    for header in _HEADERS:
        table.add_column(header, no_wrap=header in ("plan", "amount", "merchant ID"))
    for plan in plans.plans.values():
        table.add_row(*(escape(cell) for cell in _row(plans, plan)))
    return table


def _cards(plans: PlanSet) -> list[Table]:
    """The same facts one plan per small table, for terminals too narrow for the wide one."""
    cards = []
    for plan in plans.plans.values():
        card = Table(title=plan.name, title_justify="left", show_header=False)
        card.add_column(style="bold")
        card.add_column()
        for header, cell in zip(_HEADERS[1:], _row(plans, plan)[1:], strict=True):
            card.add_row(header, escape(cell))
        cards.append(card)
    return cards


def _webhooks(plans: PlanSet) -> Table | None:
    """The endpoints that receive events: ``default`` (if BILLING_WEBHOOK_URL is set here),
    then the file's. Only the URL's scheme, host and path are shown."""
    endpoints = list(plans.webhooks.values())
    try:
        from billing.settings import get_settings

        url = get_settings().webhook_url
    except BillingError:  # bad BILLING_* settings: the file is what is checked here
        url = None
    if url:
        endpoints.insert(0, WebhookEndpoint(DEFAULT_ENDPOINT, url, "BILLING_WEBHOOK_SECRET"))
    if not endpoints:
        return None
    table = Table(title="Webhook endpoints", title_justify="left")
    for header in ("endpoint", "url", "secret from", "events"):
        table.add_column(header, no_wrap=header != "events")
    for endpoint in endpoints:
        table.add_row(
            escape(endpoint.name),
            escape(endpoint_label(endpoint.url)),
            escape(endpoint.secret_env),
            escape(", ".join(endpoint.events) or "every event"),
        )
    return table


def _console() -> Console:
    # A pipe or a log gets the whole table on one line per plan, not rich's 80 columns.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=400)
    return console


@plans_app.command()
def check(
    file: Path | None = typer.Argument(
        None, help="Plans file to check (default: BILLING_PLANS_FILE, schedules/plans.toml)."
    ),
) -> None:
    """Validate a plans file: print its plans, or every problem (exit status 2)."""
    if file is None:
        from billing.settings import get_settings

        file = get_settings().plans_file
    out = _console()
    err = Console(stderr=True, highlight=False)
    try:
        plans = load_plans(file)
    except PlanFileError as exc:
        if len(exc.problems) == 1:  # one problem, one line
            raise ConfigError(f"{exc.path}: {exc.problems[0]}") from None
        for problem in exc.problems:
            err.print(f"{exc.path}: {problem}", markup=False, soft_wrap=True)
        count = len(exc.problems)
        # Raised, not typer.Exit: main() turns a BillingError into its exit status (2).
        raise ConfigError(f"{exc.path}: {count} problem{'s' if count != 1 else ''}") from None
    table = _table(plans)
    if Measurement.get(out, out.options.update_width(10_000), table).maximum <= out.width:
        out.print(table)
    else:
        for card in _cards(plans):
            out.print(card)
    webhooks = _webhooks(plans)
    if webhooks is not None:
        out.print(webhooks)
    for warning in plans.warnings():
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    endpoints = f", {len(plans.webhooks)} webhook endpoint(s)" if plans.webhooks else ""
    out.print(
        f"{escape(plans.path)}: OK, {len(plans.plans)} plan(s), {len(plans.accounts)} account(s)"
        + endpoints
    )


def register(app: typer.Typer) -> None:
    """Add ``billing plans ...`` to the billing app."""
    app.add_typer(plans_app, name="plans")
