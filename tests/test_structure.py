"""The architecture, checked: one owner of the charge's state, no import cycles, `billing`
never imports `tasks`, and one vocabulary that every listing of reasons reads.

These read the source (the AST), so a new module that breaks a rule fails here at once
rather than in a race nobody thought to test.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from typer.testing import CliRunner

from billing import metrics, ops
from billing.cli import app
from billing.vocabulary import QUEUE_REASONS, FailureReason, Review

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("billing", "tasks", "schedules")
#: The one module that writes a charge's state and a subscription's status.
LIFECYCLE = ROOT / "billing" / "charging" / "lifecycle.py"
#: The lifecycle's claim and on-time approval as one statement each (PostgreSQL): its moves
#: read their sources and targets from ``lifecycle.TRANSITIONS``, and ``test_hotpath.py``
#: checks they write what the lifecycle's general path writes.
HOTPATH = ROOT / "billing" / "charging" / "hotpath.py"
OWNERS = (LIFECYCLE, HOTPATH)
MODELS = {"Charge", "Subscription"}


def _sources(*packages: str) -> Iterator[Path]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _updates_of(call: ast.Call) -> set[str]:
    """The models an ``update(Model)...values(...)`` chain updates."""
    found: set[str] = set()
    node: ast.AST = call.func
    while isinstance(node, ast.Attribute | ast.Call):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "update" and node.args:
                found |= _names(node.args[0])
            node = node.func
        else:
            node = node.value
    return found


def _table_names(tree: ast.AST) -> set[str]:
    """The models, and the names given to their tables (``C = cast(Table, Charge.__table__)``)."""
    names = set(MODELS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _names(node.value) & MODELS:
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _state_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    tables = _table_names(tree)
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr == "state"
                and not (isinstance(target.value, ast.Name) and target.value.id == "self")
            ):
                found.append(f"{path.name}:{node.lineno} assigns .state")
            if (
                isinstance(target, ast.Attribute)
                and target.attr == "status"
                and "SubscriptionStatus" in _names(node)
            ):
                found.append(f"{path.name}:{node.lineno} assigns a subscription's .status")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "values"
            and _updates_of(node) & tables
        ):
            written = {k.arg for k in node.keywords}
            if written & {"state", "status"}:
                found.append(f"{path.name}:{node.lineno} updates state/status in SQL")
    return found


def test_only_the_lifecycle_writes_a_charges_state_or_a_subscriptions_status() -> None:
    found = [
        problem
        for path in _sources("billing", "tasks")
        if path not in OWNERS
        for problem in _state_writes(path)
    ]
    assert found == []


def test_the_rule_above_catches_what_it_is_for(tmp_path: Path) -> None:
    """The check itself can fail: each kind of write it looks for is found."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "charge.state = 'approved'\n"
        "sub.status = SubscriptionStatus.ACTIVE\n"
        "session.execute(update(Charge).where(Charge.id == 1).values(state='failed'))\n"
        "session.execute(update(Subscription).values(status='active'))\n"
        "session.execute(update(Charge).values(next_attempt_at=None))\n"
        "C = cast(Table, Charge.__table__)\n"
        "conn.execute(update(C).where(C.c.id == 1).values(state='queued'))\n"
    )
    assert len(_state_writes(sample)) == 5


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (at any depth, TYPE_CHECKING blocks aside);
    ``from package import module`` imports the module, not the package's other names."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {_module(path): path for path in _sources(*PACKAGES)}
    known = set(modules)
    return {
        name: {dep for dep in _imports(path, known) if dep in modules and dep != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_in_billing_tasks_and_schedules() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_billing_never_imports_tasks() -> None:
    found = [
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        if name.startswith("billing")
        for dep in deps
        if dep.split(".")[0] == "tasks"
    ]
    assert found == []


def test_celery_is_imported_by_one_module_of_billing() -> None:
    users = sorted(
        _module(path)
        for path in _sources("billing")
        if any(
            isinstance(node, ast.Import | ast.ImportFrom)
            and any(
                (getattr(node, "module", None) or alias.name).split(".")[0] in ("celery", "kombu")
                for alias in node.names
            )
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users == ["billing.broker"]


def test_every_reason_is_in_the_metrics_and_the_cli_help() -> None:
    everything = {r.value for r in FailureReason} | {r.value for r in Review}
    assert everything == set(QUEUE_REASONS) == set(metrics.QUEUE_REASONS) == set(ops.REASONS)
    shown = CliRunner().invoke(app, ["failed", "list", "--help"], terminal_width=400)
    assert shown.exit_code == 0
    help_text = " ".join(shown.output.split())
    missing = [r for r in everything if r not in help_text]
    assert missing == []


def _readme_tests(text: str) -> list[tuple[str, str]]:
    """Each ``tests/x.py::name`` the README names, and each ``::name`` after one (same file)."""
    import re

    found: list[tuple[str, str]] = []
    current = ""
    for match in re.finditer(r"`(tests/[\w/]+\.py)?(::(\w+))?`", text):
        path, name = match[1], match[3]
        if path:
            current = path
        if current and name:
            found.append((current, name))
    return found


def test_every_test_the_readme_names_exists() -> None:
    """The Guarantees section names a test for each promise: each of them is there."""
    named = _readme_tests((ROOT / "README.md").read_text())
    assert len(named) > 40
    missing = []
    for path, name in named:
        source = ROOT / path
        tree = ast.parse(source.read_text()) if source.exists() else ast.Module([], [])
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if name not in defined:
            missing.append(f"{path}::{name}")
    assert missing == []


def test_the_readme_check_finds_a_missing_test() -> None:
    named = _readme_tests(
        "`tests/test_structure.py::nope` and `::test_the_readme_check_finds_a_missing_test`"
    )
    assert named == [
        ("tests/test_structure.py", "nope"),
        ("tests/test_structure.py", "test_the_readme_check_finds_a_missing_test"),
    ]
