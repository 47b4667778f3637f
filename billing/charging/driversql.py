"""A SQLAlchemy Core statement compiled once, then run as the driver's SQL on the cursor of a
SQLAlchemy connection: how the charge hot path (``billing.charging.hotpath``) runs its two
statements on PostgreSQL.

Why: for a statement built once and run with new values, what SQLAlchemy does at every
execution is work whose answer never changes, and on the hot path it was a visible share of
the CPU per charge (issue 15): the execution context (``_init_compiled``), the walk over
every parameter of the compiled statement (``construct_params``, some seventy for the
approval), the result's metadata, which reads the driver's ``cursor.description`` (psycopg
builds one column object per column at every read: 48 per charge, 47 of them the claim's).

What stays SQLAlchemy's, so that nothing about the statement is defined twice:

- **The statement and its text.** It is a Core statement, built from the lifecycle and the
  models as before, and compiled by SQLAlchemy for the connection's dialect: the very text
  SQLAlchemy sends for it (with its ``::TYPE`` casts), compiled once per dialect.
- **The parameters' conversions.** Each parameter goes through its type's own bind processor,
  the function SQLAlchemy applies (a ``JSON`` value wrapped as psycopg's ``Json`` with the
  dialect's serializer, a ``UTCDateTime`` checked and put in UTC, an ``ARRAY`` made a list),
  looked up once; the constants the statement binds (states, flags, ``literal()`` values)
  are worked out once. The driver receives the same values it would from SQLAlchemy.
- **The results' conversions.** Each column goes through its type's result processor (a
  ``UTCDateTime`` comes back in ``datetime.UTC``, not the session's ``Etc/UTC`` zone),
  looked up once from the first result's column types; rows are plain tuples read by
  position (psycopg's ``tuple_row`` never builds ``description``). The cursor is kept with
  the pooled connection (``_cursor``), so psycopg's choice of dumpers is kept too.
- **The connection.** The statement runs in the caller's connection and transaction through
  ``Connection._cursor_execute``, SQLAlchemy's own path for the statements it sends to the
  driver itself (sequences, defaults): ``before_cursor_execute`` / ``after_cursor_execute``
  and ``handle_error`` fire (tests count and read the statements so), ``echo`` logs it, and a
  driver error comes out as SQLAlchemy's ``DBAPIError``, a disconnect invalidating the
  connection and the pool: what the callers' retry branches read
  (``DBAPIError.connection_invalidated``). It is a private method, but an old and stable one
  (the same since SQLAlchemy 1.x); ``tests/test_hotpath.py`` runs both statements through it.

psycopg prepares a query on the server after it has run it ``prepare_threshold`` times (5,
its default), under SQLAlchemy as here: the hot statements run prepared from their sixth
execution on; preparing the first five too is not worth a second path.

Only for statements whose text SQLAlchemy does not rewrite at execution (no expanding
``IN``, no ``literal_execute`` parameter) and a dialect with named parameters (psycopg's
``pyformat``); anything else is refused when compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Select
from sqlalchemy.engine import Dialect

_Processor = Callable[[Any], Any]


class DriverStatement:
    """One statement compiled for one dialect, with its conversions resolved."""

    __slots__ = ("_columns", "_constants", "_dialect", "_processors", "_results", "sql")

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        if dialect.paramstyle != "pyformat":
            raise ValueError(f"named parameters only, not {dialect.paramstyle}")
        compiled: Any = statement.compile(dialect=dialect)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("the statement's text would be rewritten at each execution")
        self.sql: str = compiled.string
        required = {name for bind, name in compiled.bind_names.items() if bind.required}
        processors: dict[str, _Processor] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        constants = {name: value for name, value in compiled.params.items() if name not in required}
        for name, value in constants.items():
            if name in processors:
                constants[name] = processors[name](value)
        self._constants: dict[str, Any] = constants
        #: The caller's parameters that need a conversion, and it.
        self._processors = tuple(
            (name, processors[name]) for name in sorted(required) if name in processors
        )
        self._columns = tuple(
            column.type.dialect_impl(dialect) for column in statement.selected_columns
        )
        #: By position, the result columns that need a conversion (once a result was seen).
        self._results: tuple[tuple[int, _Processor], ...] | None = None
        self._dialect = dialect

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters for the driver: the statement's constants and ``values``, each
        converted as SQLAlchemy converts it."""
        parameters = self._constants | dict(values)
        for name, processor in self._processors:
            parameters[name] = processor(parameters[name])
        return parameters

    def first(self, conn: Connection, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run the statement in ``conn`` (its transaction, if one is begun) and return its
        first row, its values converted as SQLAlchemy converts them; ``None`` if none."""
        # What ``Connection.execute`` does first: a connection with no transaction begun
        # begins one, so the caller's ``commit()`` commits it (``_cursor_execute`` alone
        # would leave a transaction SQLAlchemy does not know, rolled back when pooled).
        if conn._transaction is None:
            conn._autobegin()
        cursor = _cursor(conn)
        conn._cursor_execute(cursor, self.sql, self.parameters(values))
        row = cursor.fetchone()
        if row is None:
            return None
        results = self._results
        if results is None:
            results = self._results = self._result_processors(cursor)
        if not results:
            return tuple(row)
        converted = list(row)
        for position, processor in results:
            converted[position] = processor(converted[position])
        return tuple(converted)

    def _result_processors(self, cursor: Any) -> tuple[tuple[int, _Processor], ...]:
        """Looked up as SQLAlchemy looks them up: by the column's type and the type the
        driver names for it (read once here, from ``description``)."""
        description: Sequence[Sequence[Any]] = cursor.description
        if len(description) != len(self._columns):
            raise ValueError(
                f"{len(description)} columns came back, the statement selects {len(self._columns)}"
            )
        found = []
        pairs = zip(self._columns, description, strict=True)
        for position, (column_type, described) in enumerate(pairs):
            processor = column_type.result_processor(self._dialect, described[1])
            if processor is not None:
                found.append((position, processor))
        return tuple(found)


#: Key in a pooled connection's ``info``: the cursor the hot statements run on.
_CURSOR = "billing_driversql_cursor"


def _cursor(conn: Connection) -> Any:
    """The cursor kept with ``conn``'s DBAPI connection, made if it has none (or its own is
    closed: SQLAlchemy closes the cursor of a statement that failed).

    Kept, not made per statement: psycopg's cursor keeps the dumpers it chose per Python
    type (a list's element type, ``Json``), which a new cursor chooses again: about 20 µs
    for the arrays and JSON of one statement. The pool's ``info`` is the DBAPI connection's
    and is emptied when it is replaced (an invalidated connection reconnects); the cursor
    is checked to be this connection's all the same. A pooled connection serves one thread
    at a time, so does its cursor.
    """
    pooled = conn.connection
    driver = pooled.driver_connection
    cursor = pooled.info.get(_CURSOR)
    if cursor is None or cursor.closed or cursor.connection is not driver:
        cursor = pooled.info[_CURSOR] = pooled.cursor()
    return cursor


@functools.lru_cache(maxsize=64)
def compiled(
    dialect: Dialect, build: Callable[..., Select[Any]], *args: Hashable
) -> DriverStatement:
    """The statement ``build(*args)`` returns, compiled for ``dialect`` once.

    Bounded, not weak: a compiled statement's conversions hold its dialect, and an engine
    (its dialect) is made anew after ``dispose_all`` (after a fork, between test runs), so a
    cache keyed weakly on the dialect would keep every one; 64 is a few engines' worth."""
    return DriverStatement(build(*args), dialect)


__all__ = ["DriverStatement", "compiled"]
