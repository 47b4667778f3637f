"""The console's subscription page changes a subscription (issue 18): a new card, another
plan or a new price, through ``billing.changes.update_subscription``, on PostgreSQL and
SQLite, with the engine calling the sandbox over HTTP.
"""

from __future__ import annotations

from sqlalchemy import select

from billing.db import session_scope
from billing.models import Subscription
from tests.fixtures.web import Console
from tests.test_ops import add_subscription


def _status(console: Console, sub_id: int) -> str:
    with session_scope(console.url) as session:
        return session.get_one(Subscription, sub_id).status


def test_a_subscription_page_is_the_one_of_its_id_not_of_a_reference_that_reads_so(
    console: Console,
) -> None:
    """A shop may use numbers as references: ``/subscriptions/1`` is still id 1."""
    with session_scope(console.url) as session:
        first = add_subscription(session, "cust-a", status="active")
        second = add_subscription(session, str(first.id), status="active")
        first_id, second_id = first.id, second.id
    web = console.as_role("operator")
    page = web.get(f"/subscriptions/{first_id}").text
    assert "Subscription cust-a" in page
    assert web.flash(web.post(f"/subscriptions/{first_id}/pause", {"reason": "x"})).startswith("ok")
    assert (_status(console, first_id), _status(console, second_id)) == ("paused", "active")
    with session_scope(console.url) as session:
        assert session.scalars(select(Subscription.id).where(Subscription.status == "paused")).one()
