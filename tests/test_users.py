"""``billing users``: accounts of the web console, through the real CLI on both databases.

The password comes on standard input (or a hidden prompt) and must never be printed,
stored in clear or shown in a repr; what is stored is an argon2id hash.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from billing import accounts
from billing.cli import app
from billing.db import get_engine, session_scope
from billing.settings import get_settings

PASSWORD = "a long passphrase 42"


@pytest.fixture
def users(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("BILLING_DATABASE_URL", db_url)
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None) -> Any:
        return runner.invoke(app, ["users", *args], input=stdin)

    yield run
    get_settings.cache_clear()


def test_add_reads_the_password_from_stdin_and_stores_only_an_argon2_hash(
    users: Any, db_url: str
) -> None:
    done = users("add", "Alice", "--role", "operator", "--password-stdin", stdin=PASSWORD + "\n")
    assert done.exit_code == 0, done.output
    assert "console user alice added (operator)" in done.output
    assert PASSWORD not in done.output
    with session_scope(db_url) as session:
        user = accounts.get_user(session, "alice")
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        assert "argon2" not in repr(user) and PASSWORD not in repr(user)
    dump = "\n".join(
        str(row)
        for row in get_engine(db_url).connect().execute(text("SELECT * FROM console_users"))
    )
    assert PASSWORD not in dump


def test_list_set_role_disable_enable_and_passwd(users: Any, db_url: str) -> None:
    users("add", "bob", "--role", "viewer", "--password-stdin", stdin=PASSWORD)
    listed = users("list", "--json")
    assert '"role": "viewer"' in listed.output and "hash" not in listed.output
    assert users("set-role", "bob", "admin").exit_code == 0
    with session_scope(db_url) as session:
        token = accounts.sign_in(session, "bob", PASSWORD, address="127.0.0.1").token
    assert token is not None
    assert "disabled; its sessions are ended" in users("disable", "bob").output
    with session_scope(db_url) as session:
        assert accounts.current(session, token) is None
        assert not accounts.sign_in(session, "bob", PASSWORD, address="127.0.0.2").ok
    assert users("enable", "bob").exit_code == 0
    new = "another passphrase 7"
    assert users("passwd", "bob", "--password-stdin", stdin=new + "\n").exit_code == 0
    with session_scope(db_url) as session:
        assert not accounts.sign_in(session, "bob", PASSWORD, address="127.0.0.3").ok
        assert accounts.sign_in(session, "bob", new, address="127.0.0.4").ok
    table = users("list").output
    assert "bob" in table and "admin" in table and "1 account(s)" in table


@pytest.mark.parametrize(
    ("args", "stdin", "problem"),
    [
        (("add", "x", "--role", "root", "--password-stdin"), PASSWORD, 'role "root" is not one of'),
        (("add", "x", "--role", "viewer", "--password-stdin"), "short", "at least 10 characters"),
        (("add", "x", "--role", "viewer", "--password-stdin"), "", "standard input is empty"),
        (("add", "bad name", "--role", "viewer", "--password-stdin"), PASSWORD, "user name"),
        (("add", "x", "--role", "viewer"), None, "pass --password-stdin"),
        (("set-role", "ghost", "admin"), None, 'no console user "ghost"'),
        (("disable", "ghost"), None, 'no console user "ghost"'),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    users: Any, db_url: str, args: tuple[str, ...], stdin: str | None, problem: str
) -> None:
    done = users(*args, stdin=stdin)
    assert done.exit_code != 0
    assert problem in str(done.exception) or problem in done.output
    with session_scope(db_url) as session:
        assert list(session.scalars(select(accounts.Operator))) == []


def test_a_second_account_of_the_same_name_is_refused(users: Any) -> None:
    users("add", "carol", "--role", "viewer", "--password-stdin", stdin=PASSWORD)
    again = users("add", "CAROL", "--role", "admin", "--password-stdin", stdin=PASSWORD)
    assert again.exit_code != 0 and "exists already" in str(again.exception)
