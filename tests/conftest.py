"""Shared fixtures. Each area keeps its own fixtures in ``tests/fixtures/``."""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.sandbox",
    "tests.fixtures.processes",
    "tests.fixtures.engine",
    "tests.fixtures.web",
]
