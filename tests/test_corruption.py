"""Random corruptions of good input files: a named error or success, never a traceback, never
a partial write.

A corruption is what a tired person or a broken transfer does to a file: a character
deleted, inserted or replaced, two lines swapped, a line repeated, the file cut short, bytes
that are not UTF-8.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from billing.db import session_scope
from billing.errors import ImportRejected, PlanFileError
from billing.intake import import_subscriptions
from billing.models import Subscription
from billing.plans import PlanSet, load_plans, parse_plans

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PLAN_FILES = [ROOT / "schedules" / "plans.toml", DATA / "engine_plans.toml"]

# Characters that matter to TOML, CSV and JSON, plus any other.
special = st.sampled_from([*"=[]\"'#.,{}:\n\r\t \\", "\x00", "\ufeff", "é", "\u2028"])
chars = st.one_of(special, st.characters(codec="utf-8"))
#: For the import: without NUL, whose handling is a known problem with its own test below.
import_chars = st.one_of(
    special.filter(lambda c: c != "\x00"), st.characters(codec="utf-8", exclude_characters="\x00")
)


@st.composite
def corrupted(draw: st.DrawFn, text: str, alphabet: st.SearchStrategy[str] = chars) -> str:
    """``text`` with one to three random corruptions (inserted characters from ``alphabet``)."""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "swap", "repeat", "cut"]))
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        if kind == "delete" and text:
            text = text[:at] + text[at + 1 :]
        elif kind == "insert":
            text = text[:at] + draw(alphabet) + text[at:]
        elif kind == "replace" and text:
            text = text[:at] + draw(alphabet) + text[at + 1 :]
        elif kind == "swap" and len(lines) > 1:
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
        elif kind == "repeat" and lines:
            i = draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[: i + 1] + lines[i:])
        elif kind == "cut":
            text = text[:at]
    return text


# --- the plans file -----------------------------------------------------------------------

#: Every problem says where it is: a TOML position, or the table and key it is about.
_NAMED = re.compile(
    r"(line \d+|end of document|^(plans|accounts)\b|top-level key|not UTF-8 text \(byte \d+\))"
)


def _check_plan_error(exc: PlanFileError, source: str) -> None:
    assert str(exc).startswith(f"{source}: ")
    assert exc.problems
    for problem in exc.problems:
        assert problem.strip()
        assert _NAMED.search(problem), f"problem does not say where: {problem!r}"


@pytest.mark.parametrize("path", PLAN_FILES, ids=lambda p: p.name)
def test_the_good_plan_files_load(path: Path) -> None:
    assert isinstance(load_plans(path), PlanSet)


@pytest.mark.parametrize("path", PLAN_FILES, ids=lambda p: p.name)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_corrupted_plans_file_loads_or_names_its_problem(path: Path, data: st.DataObject):
    text = data.draw(corrupted(path.read_text(encoding="utf-8")))
    try:
        plans = parse_plans(text, source="plans.toml")
    except PlanFileError as exc:
        event("plans rejected")
        _check_plan_error(exc, "plans.toml")
    else:
        event("plans still valid")
        assert plans.plans  # a corruption that still makes sense is a valid file


@settings(max_examples=40, deadline=None)
@given(
    cut=st.integers(0, 5000),
    junk=st.binary(min_size=1, max_size=8),
)
def test_bytes_that_are_not_text_give_a_named_error(cut: int, junk: bytes) -> None:
    raw = PLAN_FILES[0].read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plans.toml"
        path.write_bytes(raw[:cut] + junk + raw[cut:])
        try:
            load_plans(path)
        except PlanFileError as exc:
            _check_plan_error(exc, str(path))


# --- the import -----------------------------------------------------------------------------


def _valid_csv(rows: int = 12) -> str:
    lines = ["external_ref,plan,alias,customer_ip,next_charge_at,email,amount"]
    for i in range(rows):
        plan = "pro-monthly" if i % 2 else "basic-weekly"
        amount = "" if i % 3 else "19.90"
        email = f"c{i}@example.com" if i % 4 else ""
        lines.append(
            f"REF-{i},{plan},ab12cd34ef56{i:04d},203.0.113.{i + 1},"
            f"2031-0{1 + i % 9}-15T09:00:00+01:00,{email},{amount}"
        )
    return "\n".join(lines) + "\n"


def _valid_jsonl() -> str:
    return (DATA / "intake_valid.jsonl").read_text(encoding="utf-8")


def _count(url: str) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(Subscription)) or 0)


@pytest.fixture
def intake_plans() -> PlanSet:
    return load_plans(DATA / "intake_plans.toml")


def _import_or_reject(url: str, text: str, suffix: str, plans: PlanSet) -> str:
    """Import ``text``; return ``"accepted"`` or ``"rejected"`` after checking the table."""
    before = _count(url)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"subscriptions{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            result = import_subscriptions(url, path, plans)
        except ImportRejected as exc:
            assert exc.problems and all(p.strip() for p in exc.problems)
            assert str(exc).startswith(f"{path}: ")
            assert _count(url) == before, "a rejected import wrote rows"
            return "rejected"
        assert _count(url) == before + result.created
        return "accepted"


def test_the_good_import_files_import(pg_url: str, intake_plans: PlanSet) -> None:
    assert _import_or_reject(pg_url, _valid_csv(), ".csv", intake_plans) == "accepted"
    assert _import_or_reject(pg_url, _valid_jsonl(), ".jsonl", intake_plans) == "accepted"
    assert _count(pg_url) == 12 + sum(1 for line in _valid_jsonl().splitlines() if line.strip())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_corrupted_csv_imports_whole_or_writes_nothing(
    pg_url: str, intake_plans: PlanSet, data: st.DataObject
) -> None:
    # Fresh references per example: rows a previous example imported never collide.
    text = _valid_csv().replace("REF-", f"{uuid.uuid4().hex[:8]}-")
    outcome = _import_or_reject(
        pg_url, data.draw(corrupted(text, import_chars)), ".csv", intake_plans
    )
    event(f"import {outcome}")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_corrupted_jsonl_imports_whole_or_writes_nothing(
    pg_url: str, intake_plans: PlanSet, data: st.DataObject
) -> None:
    prefix = uuid.uuid4().hex[:8]
    text = re.sub(r'"external_ref": "', f'"external_ref": "{prefix}-', _valid_jsonl())
    outcome = _import_or_reject(
        pg_url, data.draw(corrupted(text, import_chars)), ".jsonl", intake_plans
    )
    event(f"import {outcome}")


def test_a_rejected_import_after_valid_rows_writes_none_of_them(
    pg_url: str, intake_plans: PlanSet
) -> None:
    text = _valid_csv(30) + "LAST,pro-monthly,zz,203.0.113.200,not a date,,\n"
    with tempfile.TemporaryDirectory() as folder, pytest.raises(ImportRejected, match="line 32"):
        path = Path(folder) / "s.csv"
        path.write_text(text)
        import_subscriptions(pg_url, path, intake_plans)
    assert _count(pg_url) == 0


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_nul_character_in_a_field_is_a_named_problem(
    pg_url: str, intake_plans: PlanSet, suffix: str
) -> None:
    if suffix == ".csv":
        text = _valid_csv(2).replace("c1@example.com", "\x00c1@example.com")
    else:
        text = _valid_jsonl().replace("ann@example.com", "\\u0000ann@example.com")
    assert _import_or_reject(pg_url, text, suffix, intake_plans) == "rejected"
