"""Every CLI command given a missing ID, a wrong type or an impossible amount answers with one
clear line on stderr and exit status 2, never a traceback.

The commands are not listed here: they are read from the ``billing`` app itself (the tree
``billing --help`` shows), so a command added later is covered without touching this file.
A command takes an ID when it has a required argument whose help says "id", "ID", "number"
or "reference"; it takes an amount when it has an option named ``amount``.

Most cases run ``billing.cli.main`` in this process (the console script's own function, so
its error handling is what is tested); a few run the installed ``billing`` end to end.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from billing import migrate
from billing.cli import app, main
from billing.db import session_scope
from billing.models import Charge, ChargeState, Subscription, utcnow
from billing.settings import get_settings
from tests.fixtures.engine import ENGINE_PLANS

BILLING = str(Path(sys.executable).with_name("billing"))
ID_HELP = re.compile(r"\b(id|ID|number|reference)\b")

#: Options a command needs before it looks its ID up (a reason, a choice).
NEEDS = {
    ("failed", "resolve"): ["--declined"],
    ("failed", "discard"): ["--reason", "test"],
    ("failed", "review"): ["--reason", "test"],
    ("cancel",): ["--reason", "test"],
}
MISSING_IDS = ["999999", "424242"]
#: Values that are no ID at all: words, fractions, signs, overflows, blanks; "²" passes
#: str.isdigit and fails int(); 5000 digits fail int() too; "\udcff" is what Python makes of a
#: command-line byte that is not UTF-8.
WRONG_IDS = [
    "abc", "1.5", "0x10", "-1", "99999999999999999999", " ", "１２", "1; DROP TABLE x",
    "²", "9" * 5000, "\udcff",
]  # fmt: skip
IMPOSSIBLE_AMOUNTS = ["-5", "0", "abc", "12.345", "1e9999", "NaN", "Infinity", "1000000.00"]


INT4_MAX = 2**31 - 1
#: Commands whose records have 64-bit IDs on PostgreSQL (events): 2**31 is an ordinary ID.
BIGINT_IDS = {("events", "show"), ("events", "redeliver")}


def _leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name, sub in sorted(subcommands.items()):
            yield from _leaves(sub, (*path, name))
    else:
        yield path, command


COMMANDS = dict(_leaves(get_command(app)))


def _id_argument(command: Any) -> Any | None:
    for param in command.params:
        if (
            param.param_type_name == "argument"
            and param.required
            and ID_HELP.search(getattr(param, "help", None) or "")
        ):
            return param
    return None


ID_COMMANDS = sorted(path for path, cmd in COMMANDS.items() if _id_argument(cmd) is not None)
AMOUNT_COMMANDS = sorted(
    path
    for path, cmd in COMMANDS.items()
    if any(p.param_type_name == "option" and p.name == "amount" for p in cmd.params)
)
INT_OPTIONS = sorted(
    (path, param.opts[0])
    for path, cmd in COMMANDS.items()
    for param in cmd.params
    if param.param_type_name == "option" and param.name in ("limit", "port", "timeout")
)
DAY_OPTIONS = sorted(
    (path, param.opts[0])
    for path, cmd in COMMANDS.items()
    for param in cmd.params
    if param.param_type_name == "option" and param.name in ("since", "until", "older_than")
)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def assert_one_clear_line(self, *mentions: str) -> str:
        shown = f"exit {self.code}\nstderr:\n{self.err}\nstdout:\n{self.out}"
        assert "Traceback" not in self.err + self.out, shown
        assert self.code == 2, shown
        assert len(self.lines) == 1, shown
        line = self.lines[0]
        for text in mentions:
            assert text.lower() in line.lower(), shown
        return line


def offline_env(url: str) -> dict[str, str]:
    """Settings for the CLI on the database at ``url`` that reach nothing outside."""
    return {
        "BILLING_DATABASE_URL": url,
        "BILLING_PLANS_FILE": str(ENGINE_PLANS),
        # Nothing may leave the machine: a closed port for the gateway and the broker.
        "BILLING_GATEWAY_URL": "http://127.0.0.1:9",
        "BILLING_BROKER_URL": "redis://127.0.0.1:9/0",
        "BILLING_CONNECT_TIMEOUT": "0.5",
        "KLIKANDPAY_KEY_EUR": "test-key-eur",
        "KLIKANDPAY_KEY_USD": "test-key-usd",
    }


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A SQLite database with two settled charges, and settings that reach nothing outside."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'billing.db'}"
    migrate.upgrade(url)
    now = utcnow()
    with session_scope(url) as session:
        for number, (plan, amount, deferred, state) in enumerate(
            [("monthly", "29.90", False, ChargeState.APPROVED),
             ("deferred", "120.00", True, ChargeState.AUTHORIZED)],
            start=1,
        ):  # fmt: skip
            sub = Subscription(
                external_ref=f"shop-{number}", plan=plan, alias=f"ab12cd34ef56{number:04d}",
                customer_ip="203.0.113.7", anchor_at=now - timedelta(days=1), next_period=1,
                next_charge_at=now + timedelta(days=30), status="active", last_charged_at=now,
            )  # fmt: skip
            session.add(sub)
            session.flush()
            session.add(
                Charge(
                    subscription_id=sub.id, period=0, due_at=now, plan=plan, plan_version=1,
                    amount=Decimal(amount), currency="EUR", merchant_id="1234567",
                    deferred=deferred, state=state, attempts=1, tx=f"10000000{number}",
                    collected_amount=None if deferred else Decimal(amount),
                    authorized_amount=Decimal(amount) if deferred else None,
                )
            )  # fmt: skip
    env = offline_env(url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        yield env
    get_settings.cache_clear()


@pytest.fixture
def run(cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]):
    """``billing ARGS`` through ``billing.cli.main`` in this process."""

    def run_(*args: str) -> Ran:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        argv, sys.argv = sys.argv, ["billing", *args]
        get_settings.cache_clear()
        capsys.readouterr()
        code = 0
        crash = ""
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # what the console script would print before exiting with 1
            code, crash = 1, traceback.format_exc()
        finally:
            sys.argv = argv
            root.handlers[:] = handlers
            root.setLevel(level)
            logging.captureWarnings(False)
            get_settings.cache_clear()
        out, err = capsys.readouterr()
        return Ran(code, out, err + crash)

    return run_


def _name(path: tuple[str, ...]) -> str:
    return " ".join(path)


def test_the_commands_are_found(run) -> None:
    """The tree read here is the one ``billing --help`` lists, and it has ID commands."""
    help_text = run("--help").out
    for top in {path[0] for path in COMMANDS}:
        assert re.search(rf"\b{re.escape(top)}\b", help_text), top
    assert ("failed", "show") in ID_COMMANDS
    assert ("subscriptions", "show") in ID_COMMANDS
    assert ("deadletters", "requeue") in ID_COMMANDS


@pytest.mark.parametrize("path", ID_COMMANDS, ids=_name)
@pytest.mark.parametrize("value", MISSING_IDS)
def test_a_missing_id_is_one_line_and_exit_2(run, path: tuple[str, ...], value: str) -> None:
    line = run(*path, value, *NEEDS.get(path, [])).assert_one_clear_line(value)
    assert re.search(r"not exist|not found|no such|unknown|\bno \w+ with", line, re.I), line


@pytest.mark.parametrize(
    ("path", "value"),
    [(path, value) for path in ID_COMMANDS for value in WRONG_IDS],
    ids=lambda v: _name(v) if isinstance(v, tuple) else repr(v)[:24],
)
def test_a_wrong_id_is_one_line_and_exit_2(run, path: tuple[str, ...], value: str) -> None:
    run(*path, value, *NEEDS.get(path, [])).assert_one_clear_line()


@pytest.mark.parametrize(
    "path",
    ID_COMMANDS,
    ids=_name,
)
def test_an_id_just_beyond_postgresqls_integer_is_one_line_and_exit_2(
    run, path: tuple[str, ...], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite takes any 64-bit integer; PostgreSQL's ``integer`` columns stop at 2**31 - 1."""
    monkeypatch.setenv("BILLING_DATABASE_URL", pg_url)
    run(*path, str(INT4_MAX + 1), *NEEDS.get(path, [])).assert_one_clear_line()


@pytest.mark.parametrize("path", ID_COMMANDS, ids=_name)
def test_no_id_at_all_is_exit_2_without_traceback(run, path: tuple[str, ...]) -> None:
    ran = run(*path)
    assert ran.code == 2 and "Traceback" not in ran.err, ran


@pytest.mark.parametrize(
    ("path", "amount"),
    [(path, amount) for path in AMOUNT_COMMANDS for amount in IMPOSSIBLE_AMOUNTS],
    ids=lambda v: _name(v) if isinstance(v, tuple) else repr(v),
)
def test_an_impossible_amount_is_one_line_and_exit_2(run, path: tuple[str, ...], amount: str):
    # Charge 1 is collected (29.90), charge 2 authorized (120.00): one of them is what the
    # command works on, and neither can take this amount.
    answers = [run(*path, charge, "--amount", amount, *NEEDS.get(path, [])) for charge in "12"]
    lines = [ran.assert_one_clear_line() for ran in answers]
    assert any("amount" in line.lower() for line in lines), lines


@pytest.mark.parametrize(("path", "option"), INT_OPTIONS, ids=str)
def test_a_word_for_a_number_option_is_one_line_and_exit_2(run, path, option) -> None:
    run(*path, option, "abc").assert_one_clear_line()


@pytest.mark.parametrize(("path", "option"), DAY_OPTIONS, ids=str)
def test_a_bad_day_is_one_line_and_exit_2(run, path, option) -> None:
    # Other day options the command requires get a good day, so only this one is wrong.
    others = [
        arg
        for param in COMMANDS[path].params
        if param.param_type_name == "option" and param.required and param.opts[0] != option
        for arg in (param.opts[0], "2030-01-01")
    ]
    run(*path, option, "2030-13-45", *others).assert_one_clear_line()


#: Commands that start a server or processes when their values are good: tested one by one.
LONG_RUNNING = {("worker",), ("beat",), ("sandbox",), ("metrics",), ("demo",)}
#: Options that take free text (a filter, a reason, a name), by parameter name.
TEXT_NAMES = {
    "plan",
    "status",
    "reason",
    "type_",
    "subscription",
    "endpoint",
    "outcome",
    "by",
    "tx",
}
TEXT_OPTIONS = sorted(
    (path, param.opts[0])
    for path, cmd in COMMANDS.items()
    if path not in LONG_RUNNING
    for param in cmd.params
    if param.param_type_name == "option" and param.name in TEXT_NAMES and not param.is_flag
)
#: Out of bounds, or not ASCII digits: typer's int() took "1_000" and "１２"; a number of
#: twenty digits overflowed SQLite's INTEGER (OverflowError) in a --limit.
NUMBERS_OUT_OF_BOUNDS = ["99999999999999999999", "9" * 5000, "1_000", "１２", "nan", "1e3"]


def _required_ids(path: tuple[str, ...], option: str) -> list[str]:
    """A missing ID for each required argument, and what the command needs besides."""
    ids = ["999999"] * sum(
        1
        for param in COMMANDS[path].params
        if param.param_type_name == "argument" and param.required
    )
    needs = NEEDS.get(path, [])
    return ids + ([] if option in needs else needs)


@pytest.mark.parametrize(
    ("path", "option", "value"),
    [(path, option, value) for path, option in INT_OPTIONS for value in NUMBERS_OUT_OF_BOUNDS],
    ids=lambda v: _name(v) if isinstance(v, tuple) else repr(v)[:24],
)
def test_a_number_out_of_bounds_is_one_line_naming_the_option(run, path, option, value) -> None:
    run(*path, option, value).assert_one_clear_line(option)


@pytest.mark.parametrize(
    ("path", "option"),
    [(path, option) for path, option in DAY_OPTIONS if option == "--older-than"],
    ids=str,
)
@pytest.mark.parametrize("value", ["99999999999 days", "9" * 5000 + " days", "３ days"], ids=len)
def test_a_delay_out_of_bounds_is_one_line_naming_the_option(run, path, option, value) -> None:
    """timedelta() overflowed on the first, "now - delay" on a slightly smaller one."""
    run(*path, option, value).assert_one_clear_line(option)


@pytest.mark.parametrize(("path", "option"), DAY_OPTIONS, ids=str)
@pytest.mark.parametrize("value", ["0001-01-01T00:00+01:00", "9999-12-31", "0001-01-01"])
def test_a_day_at_the_end_of_the_calendar_stands_for_that_end(run, path, option, value) -> None:
    """Converting to UTC underflowed, and "the next midnight" of 9999-12-31 overflowed."""
    if option == "--older-than":
        return
    widest = {"--from": "0001-01-01", "--to": "9999-12-31"}
    others = [
        arg
        for param in COMMANDS[path].params
        if param.param_type_name == "option" and param.required and param.opts[0] != option
        for arg in (param.opts[0], widest[param.opts[0]])
    ]
    ran = run(*path, option, value, *others)
    if ran.code:  # "--to 0001-01-01T00:00+01:00": a period that ends before it starts
        ran.assert_one_clear_line("period")
    assert ran.code in (0, 2) and "Traceback" not in ran.err, ran


@pytest.mark.parametrize(("path", "option"), TEXT_OPTIONS, ids=str)
def test_a_text_option_that_is_not_utf8_is_one_line_naming_the_option(run, path, option) -> None:
    """A byte that is not UTF-8 reached the database driver: UnicodeEncodeError."""
    run(*path, *_required_ids(path, option), option, "\udcff").assert_one_clear_line(option)


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
@pytest.mark.parametrize(
    "revision", ["nonsense", "0001:0002", "+99999999999999999999", "", "@", "head+1"]
)
def test_an_unknown_revision_is_one_line(run, command: str, revision: str) -> None:
    """alembic's CommandError was a traceback, and so was its AssertionError for "" or
    "head+1" (found by the CLI fuzz). (Alembic logs its INFO lines on the way.)"""
    ran = run("db", command, revision)
    errors = [line for line in ran.lines if line.startswith("error:")]
    assert ran.code == 2 and "Traceback" not in ran.err and len(errors) == 1, ran
    assert "revision" in errors[0], ran


@pytest.mark.parametrize("host", ["a" * 300, "\udcff", "a..b"])
def test_a_host_that_is_no_name_is_one_line(run, host: str) -> None:
    """getaddrinfo() raised UnicodeError (a label past 63 characters) past ``except gaierror``."""
    run("metrics", "--host", host).assert_one_clear_line("--host")


@pytest.mark.parametrize("value", ["-5", "1_000", "99999999999999999999"])
def test_a_bad_concurrency_is_refused_before_the_worker_starts(
    run, value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A missing plans file stops the worker even if the value were taken.
    monkeypatch.setenv("BILLING_PLANS_FILE", str(tmp_path / "none.toml"))
    run("worker", "--concurrency", value).assert_one_clear_line("--concurrency")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e400"])
def test_a_sandbox_latency_that_is_no_number_is_refused_before_it_listens(
    cli_env: dict[str, str], value: str
) -> None:
    """ "nan" passed ``latency_ms < 0`` and the sandbox listened with a latency of NaN."""
    done = subprocess.run(
        [BILLING, "sandbox", "--port", "0", "--latency-ms", value],
        env={**os.environ, **cli_env}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    Ran(done.returncode, done.stdout, done.stderr).assert_one_clear_line("--latency-ms")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "99999999999999999999"])
def test_a_demo_timeout_that_is_no_number_is_refused_before_it_starts(run, value, tmp_path):
    run("demo", "--workdir", str(tmp_path / "demo"), "--timeout", value).assert_one_clear_line(
        "--timeout"
    )
    assert not (tmp_path / "demo").exists()


def test_the_demo_never_empties_a_folder_that_is_not_a_demos(run, tmp_path: Path) -> None:
    """The demo starts with rmtree(workdir): ``--workdir ~`` emptied the home folder."""
    (tmp_path / "thesis.txt").write_text("years of work")
    run("demo", "--workdir", str(tmp_path)).assert_one_clear_line("--workdir")
    assert (tmp_path / "thesis.txt").read_text() == "years of work"


def test_a_path_that_is_not_utf8_is_printed_where_stdout_is_strict(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Under a UTF-8 locale stdout refuses the surrogate a byte 0xff becomes: a traceback
    after the work was done, on the line that reports it."""
    name = os.fsencode(tmp_path) + b"/plans-\xff.toml"
    Path(os.fsdecode(name)).write_bytes(ENGINE_PLANS.read_bytes())
    env = {**os.environ, **cli_env, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run(
        [BILLING, "plans", "check", name], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert b"OK, 4 plan(s)" in done.stdout, done.stdout


@pytest.mark.parametrize("name", ["9" * 256, ".", "/", "no-such-folder/ledger.csv"])
def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(
    run, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the CLI fuzz: the cleanup's unlink() raised the OSError that stopped the
    write a second time; "." and "/" have no name to add ".partial" to (ValueError)."""
    monkeypatch.chdir(tmp_path)
    run("ledger", "export", "--output", name).assert_one_clear_line("--output")
    assert list(tmp_path.iterdir()) == []


def test_an_export_to_the_longest_name_is_written(run, tmp_path: Path) -> None:
    """ "NAME.partial" beside a name of 250 bytes was too long for the folder."""
    out = tmp_path / ("9" * 250)
    ran = run("ledger", "export", "--output", str(out))
    assert ran.code == 0 and "Traceback" not in ran.err, ran
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize(
    "args",
    [["subscriptions", "import"], ["plans", "check"], ["subscriptions", "resume", "x", "--plans"]],
    ids=" ".join,
)
@pytest.mark.parametrize("name", ["x" * 300, "/dev/null", "/", "\x1b[31mred"], ids=len)
def test_a_file_that_cannot_be_read_is_one_line(run, args: list[str], name: str) -> None:
    """Found by the CLI fuzz: Path.is_file() raises for a name past 255 bytes, and a path
    holding a control character (ESC, U+001E) was echoed raw, splitting the error line."""
    line = run(*args, name).assert_one_clear_line()
    assert "\x1b" not in line and "\x1e" not in line, line


def test_an_impossible_amount_in_an_import_file_names_the_line(run, tmp_path: Path) -> None:
    """A file may hold many bad rows: one line each, then one error line; exit 2."""
    path = tmp_path / "subs.csv"
    path.write_text(
        "external_ref,plan,alias,customer_ip,next_charge_at,email,amount\n"
        "x-1,monthly,ab12cd34ef56,203.0.113.7,2031-01-01T00:00:00Z,,-5\n"
    )
    ran = run("subscriptions", "import", str(path))
    assert ran.code == 2 and "Traceback" not in ran.err, ran
    assert any("line 2" in line and "amount" in line for line in ran.lines), ran
    assert ran.lines[-1].startswith("error:"), ran


# --- the installed command, end to end ----------------------------------------------------


def test_the_installed_command_end_to_end(cli_env: dict[str, str]) -> None:
    """The console script itself, several at once against one database."""
    env = {**os.environ, **cli_env}
    argvs = [
        ["failed", "show", "abc"],
        ["failed", "retry", "999999"],
        ["subscriptions", "show", "no-such-reference"],
        ["deadletters", "requeue", "999999"],
    ]

    def one(args: list[str]) -> Ran:
        done = subprocess.run(
            [BILLING, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        return Ran(done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(len(argvs)) as pool:
        for args, ran in zip(argvs, pool.map(one, argvs), strict=True):
            ran.assert_one_clear_line(args[-1])
