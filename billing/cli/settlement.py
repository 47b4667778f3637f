"""``billing capture`` and ``billing cancel``: validation, release and refunds by a person."""

from __future__ import annotations

import getpass
import time
from decimal import Decimal
from typing import Annotated

import typer
from rich import print as rprint

from billing.charging.settlement import SettlementResult
from billing.cli import params
from billing.engine import Engine
from billing.errors import BillingError
from billing.settings import get_settings


class CallFailed(BillingError):
    """The gateway declined the call, or its answer was lost."""


def _engine(by: str) -> Engine:
    return Engine(get_settings(), actor=f"ops:{by}")


def _finish(result: SettlementResult, run_again: object) -> None:
    """Retry a NOT SENT call a few times (safe: it never reached the gateway), then report."""
    retries = 0
    while result.outcome == "not_sent" and result.retry_in is not None:
        time.sleep(min(result.retry_in, 10.0))
        retries += 1
        result = run_again(retries)  # type: ignore[operator]
    what = {"validate": "validated", "release": "released", "refund": "refunded"}
    if result.outcome == "approved":
        rprint(f"charge {result.charge_id}: {what[result.kind or 'validate']} {result.amount}")
        return
    if result.outcome == "declined":
        raise CallFailed(f"charge {result.charge_id}: {result.kind} declined: {result.message}")
    if result.outcome == "late":
        raise CallFailed(
            f"charge {result.charge_id}: the {result.kind}'s answer came after the charge had "
            "moved on; it is kept in the ledger and the charge is flagged for review"
        )
    if result.outcome == "unknown":
        raise CallFailed(
            f"charge {result.charge_id}: the gateway's answer to the {result.kind} was lost; "
            "the charge is in the failed-charge queue: check the Klik & Pay back office, then "
            "`billing failed resolve`"
        )
    raise CallFailed(f"charge {result.charge_id}: {result.kind} not sent: {result.message}")


ChargeId = Annotated[int, params.argument("charge id", params.RECORD_ID, help="Charge ID.")]
By = Annotated[
    str | None, params.option("--by", params.ACTOR, help="Who asks (default: your user name).")
]


def capture(
    charge: Annotated[
        int,
        params.argument(
            "charge id", params.RECORD_ID, help="Charge ID (an authorized, deferred charge)."
        ),
    ],
    amount: Annotated[
        Decimal | None,
        params.option("--amount", params.AMOUNT, help="Validate less than authorized, e.g. 19.90."),
    ] = None,
    reason: Annotated[
        str | None, params.option("--reason", params.TEXT, help="Why, for the ledger.")
    ] = None,
    by: By = None,
) -> None:
    """Validate a deferred charge now, whole or in part (the rest is released)."""
    who = by or getpass.getuser()
    settlement = _engine(who).settlement

    def run(retries: int = 0) -> SettlementResult:
        return settlement.capture(
            charge, amount=amount, actor=f"ops:{who}", reason=reason, retries=retries
        )

    _finish(run(), run)


def cancel(
    charge: ChargeId,
    reason: Annotated[
        str, params.option("--reason", params.TEXT, help="Why, for the ledger (required).")
    ],
    amount: Annotated[
        Decimal | None,
        params.option(
            "--amount", params.AMOUNT, help="Part of the amount, e.g. 10.00 (default: all left)."
        ),
    ] = None,
    again: Annotated[
        bool, typer.Option("--again", help="A second refund of the same amount is meant.")
    ] = False,
    by: By = None,
) -> None:
    """Release an authorization, or refund a collected charge, whole or in part."""
    who = by or getpass.getuser()
    settlement = _engine(who).settlement

    def run(retries: int = 0) -> SettlementResult:
        return settlement.cancel(
            charge, amount=amount, reason=reason, actor=f"ops:{who}", again=again, retries=retries
        )

    _finish(run(), run)


def register(app: typer.Typer) -> None:
    app.command()(capture)
    app.command()(cancel)
