"""``billing users add|list|set-role|disable|enable|passwd``: the console's operators.

A password is read from standard input (``--password-stdin``, for scripts and secrets
managers) or asked twice at a hidden prompt; it is never an option (it would stay in the
shell's history and in ``ps``), never printed, and stored only as an argon2id hash.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from billing import accounts
from billing.db import session_scope
from billing.errors import InvalidInput
from billing.settings import get_settings

users_app = typer.Typer(
    help="Console operators: accounts, roles (viewer|operator|admin), passwords.",
    no_args_is_help=True,
)
out = Console(highlight=False, soft_wrap=True)

Name = Annotated[str, typer.Argument(help="Account name (letters, digits, '.', '_', '-').")]
PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from standard input (one line)."),
]
ROLE_HELP = "viewer (reads), operator (also acts on charges), admin (also money and accounts)."


def read_password(from_stdin: bool) -> str:
    """The new password: standard input's first line, or a hidden prompt asked twice."""
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise InvalidInput("--password-stdin: standard input is empty")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise InvalidInput(
            "no terminal to ask the password at: pass --password-stdin and pipe it in"
        )
    value: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@users_app.command()
def add(
    name: Name,
    role: Annotated[str, typer.Option("--role", help=ROLE_HELP)],
    password_stdin: PasswordStdin = False,
) -> None:
    """Create an account."""
    clean = accounts.checked_name(name)
    chosen = accounts.checked_role(role)
    password = read_password(password_stdin)
    with session_scope(get_settings().database_url) as session:
        accounts.add_user(session, clean, role=chosen, password=password)
    out.print(f"console user {clean} added ({chosen})", markup=False)


@users_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Every account with its role and whether it is disabled."""
    with session_scope(get_settings().database_url) as session:
        rows = [accounts.user_summary(u) for u in accounts.list_users(session)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "role", "state", "created (UTC)", "password changed (UTC)")
    for row in rows:
        table.add_row(
            row["name"], row["role"], "disabled" if row["disabled"] else "active",
            row["created_at"][:16].replace("T", " "),
            row["password_changed_at"][:16].replace("T", " "),
        )  # fmt: skip
    out.print(table)
    out.print(f"{len(rows)} account(s)", markup=False)


@users_app.command("set-role")
def set_role(
    name: Name, role: Annotated[str, typer.Argument(help=ROLE_HELP, show_default=False)]
) -> None:
    """Change an account's role (its sessions get the new role at their next request)."""
    with session_scope(get_settings().database_url) as session:
        user = accounts.set_role(session, name, role)
        line = f"console user {user.name} is now {user.role}"
    out.print(line, markup=False)


@users_app.command()
def disable(name: Name) -> None:
    """Refuse an account's sign-ins and end its sessions now."""
    with session_scope(get_settings().database_url) as session:
        user = accounts.set_disabled(session, name, disabled=True)
        line = f"console user {user.name} disabled; its sessions are ended"
    out.print(line, markup=False)


@users_app.command()
def enable(name: Name) -> None:
    """Let a disabled account sign in again."""
    with session_scope(get_settings().database_url) as session:
        user = accounts.set_disabled(session, name, disabled=False)
        line = f"console user {user.name} enabled"
    out.print(line, markup=False)


@users_app.command()
def passwd(name: Name, password_stdin: PasswordStdin = False) -> None:
    """Set a new password; every session of the account ends."""
    accounts.checked_name(name)
    password = read_password(password_stdin)
    with session_scope(get_settings().database_url) as session:
        user = accounts.set_password(session, name, password)
        line = f"password of console user {user.name} changed; its sessions are ended"
    out.print(line, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``billing users ...`` to the billing app."""
    app.add_typer(users_app, name="users")
