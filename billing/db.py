"""Engines and sessions for PostgreSQL (psycopg 3) and the embedded SQLite default.

One engine per URL per process, pooled: a charge must not pay for a new connection.

SQLite works or refuses, never half-works. pysqlite opens no transaction for a SELECT and
ignores ``FOR UPDATE``, so a read followed by a write would not be atomic: another writer
could commit in between. Every transaction here therefore starts with ``BEGIN IMMEDIATE``
(SQLAlchemy's documented pysqlite recipe, with pysqlite's own BEGIN turned off), which takes
the database's write lock at once: a read-then-write is atomic, like ``SELECT ... FOR
UPDATE`` on PostgreSQL, and two writers wait for each other (``busy_timeout``) instead of
interleaving. Read-only work (listings, reports, the metrics scrape) uses
:func:`read_scope`, a deferred transaction that WAL lets run beside a writer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from billing.errors import NotFound


def normalize_url(url: str) -> str:
    """Point ``postgresql://`` URLs at psycopg 3, the driver we install."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


#: Execution option marking a read-only engine: its SQLite transactions take no write lock.
READ_ONLY = "billing_read_only"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun by ``_sqlite_begin`` below, never implicitly by pysqlite.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while a worker writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    """Take the write lock at the start of every write transaction (see the docstring)."""
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


#: Connections one process holds at most. A charge holds one only for its claim and its
#: record (milliseconds), never during the gateway call, so 32 serve the 32 calls a process
#: makes at once with room to spare; more threads wait their turn for a connection rather
#: than open more. ``billing worker`` with its defaults needs processes × 32 (+ beat and the
#: CLI) of PostgreSQL's ``max_connections`` (100 by default).
POOL_SIZE = 32
#: No connections beyond the pool: an overflow connection is closed when returned, so a
#: burst would open and close connections all day.
POOL_OVERFLOW = 0

#: Largest row ID (PostgreSQL ``integer``). A larger number cannot name a row.
MAX_ID = 2**31 - 1

#: The longest query (characters) and the most parameters psycopg keeps parsed. Its own
#: limits (4,096 and 50) leave out the hot path's approval (``billing.charging.hotpath``:
#: one statement of about 6,500 characters and 66 parameters), which psycopg would then
#: parse into PostgreSQL's ``$n`` form on every execution: about 1 ms of CPU per charge in
#: ``BENCH_PROFILE=1 make bench`` (``_query2pg_nocache``). Our statements are few and fixed,
#: so caching them all costs a few kilobytes.
PARSED_QUERY_LENGTH = 16_384
PARSED_QUERY_PARAMS = 128

_ENGINES: dict[str, Engine] = {}

#: Key in a pooled connection's ``info``: opened since its last checkout (nothing to ping).
_FRESH = "billing_fresh"
#: Set while :func:`connect_unpinged` checks a connection out in this thread.
_UNPINGED = threading.local()


def _mark_fresh(_dbapi_connection: Any, record: Any) -> None:
    record.info[_FRESH] = True


def _pinger(engine: Engine) -> Any:
    """SQLAlchemy's ``pool_pre_ping``, as a checkout listener that can be skipped.

    Like ``pool_pre_ping``: a connection is pinged when it is checked out again (not when
    it was just opened); one found disconnected makes the pool drop every connection as
    old as it and check out a new one (``InvalidatePoolError``, SQLAlchemy's documented
    checkout protocol). Unlike it, :func:`connect_unpinged` skips the ping: on the charge
    hot path it was a PostgreSQL transaction of its own, two per charge.
    """
    dialect = engine.dialect

    def ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.pop(_FRESH, False) or getattr(_UNPINGED, "active", False):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                raise exc.InvalidatePoolError(f"pre-ping failed: {error}") from error
            raise

    return ping


def _cache_long_queries() -> None:
    """Raise psycopg's parse-cache limits to ours (its documented behaviour is unchanged:
    the cache is an LRU of parsed queries; only which queries may enter it changes)."""
    from psycopg import _queries

    _queries.MAX_CACHED_STATEMENT_LENGTH = max(
        _queries.MAX_CACHED_STATEMENT_LENGTH, PARSED_QUERY_LENGTH
    )
    _queries.MAX_CACHED_STATEMENT_PARAMS = max(
        _queries.MAX_CACHED_STATEMENT_PARAMS, PARSED_QUERY_PARAMS
    )


_MAKERS: dict[tuple[str, bool], sessionmaker[Session]] = {}


def get_engine(url: str) -> Engine:
    """The pooled engine for ``url``, created once per process."""
    url = normalize_url(url)
    engine = _ENGINES.get(url)
    if engine is None:
        if is_sqlite(url):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
        else:
            _cache_long_queries()
            # Connections open lazily: the pool costs nothing until threads need it.
            engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
            event.listen(engine.pool, "connect", _mark_fresh)
            event.listen(engine.pool, "checkout", _pinger(engine))
        _ENGINES[url] = engine
    return engine


def connect_unpinged(url: str) -> Connection:
    """A pooled connection checked out without the ping every other checkout makes.

    Only for statements that are tried again when the connection turns out to be broken
    (``DBAPIError.connection_invalidated``), and only where a second try is provably safe
    (``billing.charging.calls``). A broken connection invalidates the pool as a failed
    ping does, so the second try gets a new connection.
    """
    engine = get_engine(url)
    _UNPINGED.active = True
    try:
        return engine.connect()
    finally:
        _UNPINGED.active = False


def get_sessionmaker(url: str, *, read_only: bool = False) -> sessionmaker[Session]:
    url = normalize_url(url)
    maker = _MAKERS.get((url, read_only))
    if maker is None:
        engine = get_engine(url)
        bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
        maker = _MAKERS[(url, read_only)] = sessionmaker(bind=bind, expire_on_commit=False)
    return maker


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back if it raises.

    On SQLite it holds the write lock from its first statement (``BEGIN IMMEDIATE``).
    """
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_scope(url: str) -> Iterator[Session]:
    """A transaction that only reads, rolled back at the end whatever it did.

    On SQLite it takes no write lock (a deferred ``BEGIN``; WAL lets it read beside a
    writer). Never decide a write from what it read: writes belong in :func:`session_scope`.
    """
    session = get_sessionmaker(url, read_only=True)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def dispose_all() -> None:
    """Drop every pooled connection (after a fork, or at the end of tests)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()
    _MAKERS.clear()


def checked_id(value: int, what: str) -> int:
    """``value`` if it can be a row ID; otherwise the record does not exist (``NotFound``)
    rather than a database error about the number's size."""
    if not 1 <= value <= MAX_ID:
        raise NotFound(f"{what} {value} does not exist")
    return value
