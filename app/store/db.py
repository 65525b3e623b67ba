"""Engines and transactions.

The app talks to the database through SQLAlchemy Core on async drivers it picks itself from
`DATABASE_URL`: `sqlite:///PATH` runs on aiosqlite, `postgresql://USER@HOST:PORT/DB` on asyncpg.
`?pgbouncer=true` on a PostgreSQL URL says it names PgBouncer in transaction pooling mode
(`driver_arguments`).

Transactions have one owner: `write()` / `read()` below, opened by the service layer once
per request. A write transaction on SQLite starts with `BEGIN IMMEDIATE`, which takes the
database's write lock up front: check-then-insert sequences (conditional create) cannot
interleave, and two writers never deadlock upgrading a shared lock. On PostgreSQL the
equivalent guarantees come from explicit locks (`store.repository.lock` and row locks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.kit.errors import ConfigurationError

SQLITE_BUSY_TIMEOUT_S = 30
# An execution option of ours: the SQLite `begin` listener sends no BEGIN (`read_statement`).
_SQLITE_AUTOCOMMIT = "itp_sqlite_autocommit"
PGBOUNCER_PARAMETER = "pgbouncer"


def _parse(database_url: str) -> URL:
    try:
        return make_url(database_url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the raw text
        raise ConfigurationError(f"DATABASE_URL is not a database URL: {exc}") from None


def async_url(database_url: str) -> URL:
    """Map the public `DATABASE_URL` forms onto the async drivers the app ships with."""
    url = _parse(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        # The app's own parameter, not the driver's (`driver_arguments` reads it).
        url = url.difference_update_query([PGBOUNCER_PARAMETER])
        return url.set(drivername="postgresql+asyncpg")
    raise ConfigurationError(
        f"DATABASE_URL scheme {url.drivername!r} is not supported: "
        "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )


def driver_arguments(database_url: str) -> dict[str, Any]:
    """`connect_args` for the engine of `database_url`: none, unless it ends in
    `?pgbouncer=true`. A transaction pooler hands each transaction whichever server
    connection is free, so a statement prepared by name in one transaction is missing from
    (or already taken on) the server the next one gets. With both caches off (asyncpg's own
    and SQLAlchemy's), asyncpg prepares every statement unnamed and parses it again with
    its execution, within one transaction or one implicit one: nothing named outlives a
    statement, so nothing can collide or pile up on PgBouncer's server connections."""
    value = _parse(database_url).query.get(PGBOUNCER_PARAMETER, "false")
    if value not in ("true", "false"):
        raise ConfigurationError(
            f"DATABASE_URL's {PGBOUNCER_PARAMETER}={value!r} is not true or false"
        )
    if value == "false":
        return {}
    return {"statement_cache_size": 0, "prepared_statement_cache_size": 0}


def _sqlite_on_connect() -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's `begin` event, not the driver, decide how a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The busy timeout first: setting the journal mode reads the database, and while
        # another process writes it that read is refused at once ("database is locked")
        # unless the connection already waits.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    return on_connect


@dataclass(frozen=True)
class PoolLimits:
    """An engine's connection pool: the connections it keeps, those it may open beyond them
    under load, and how many seconds a request waits for one."""

    size: int
    max_overflow: int
    timeout: float

    def arguments(self) -> dict[str, Any]:
        """As `create_async_engine` takes them."""
        return {
            "pool_size": self.size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.timeout,
        }


def _make_engine(
    url: URL, pool: PoolLimits, *, immediate: bool, connect_args: dict[str, Any]
) -> AsyncEngine:
    # An error's message never carries the statement's parameters (resource bodies, subject
    # numbers): error logs hold no clinical data.
    common: dict[str, Any] = {"hide_parameters": True}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            # A file has a queue pool like PostgreSQL's (an in-memory database has none).
            common |= pool.arguments()
        engine = create_async_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, pool_pre_ping=False, **common
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect())
        begin_sql = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        def begin(conn: Any) -> None:
            if not conn.get_execution_options().get(_SQLITE_AUTOCOMMIT):
                conn.exec_driver_sql(begin_sql)

        event.listen(engine.sync_engine, "begin", begin)
        return engine
    engine = create_async_engine(
        url,
        **pool.arguments(),
        # No ping: it cost three round trips (BEGIN, `;`, ROLLBACK) on every checkout.
        pool_pre_ping=False,
        connect_args=connect_args,
        **common,
    )
    event.listen(engine.sync_engine, "checkout", _replace_if_closed)
    return engine


def _replace_if_closed(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A pooled connection the server closed (a restart, `pg_terminate_backend`, an idle
    timeout) is replaced before anything is sent on it: asyncpg learns of the closed socket
    from the event loop, so the check costs no round trip. The pool then takes another
    connection or opens one. A connection that dies without the server closing it is
    found by the request's first statement, and that request is answered 503 (transient);
    the pool discards every connection opened before (SQLAlchemy's disconnect handling)."""
    if record.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


@dataclass
class Database:
    """The app's engines: on SQLite a writer and a reader, on PostgreSQL one for both."""

    writer: AsyncEngine
    reader: AsyncEngine

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @classmethod
    def from_url(
        cls,
        database_url: str,
        pool_size: int = 10,
        max_overflow: int = 10,
        pool_timeout: float = 30.0,
    ) -> Database:
        url = async_url(database_url)
        engine = partial(
            _make_engine,
            url,
            PoolLimits(pool_size, max_overflow, pool_timeout),
            connect_args=driver_arguments(database_url),
        )
        writer = engine(immediate=True)
        # SQLite: a second engine whose transactions begin deferred, for reads.
        reader = engine(immediate=False) if url.get_backend_name() == "sqlite" else writer
        return cls(writer=writer, reader=reader)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: committed when the block ends, rolled back on any error."""
        async with self.writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """One read-only transaction whose statements all see one snapshot: a search's total,
        page and included resources agree with each other. On PostgreSQL that takes
        REPEATABLE READ (under READ COMMITTED each statement has its own snapshot), READ
        ONLY; it can never fail to serialize. SQLite's WAL gives a read transaction one
        snapshot from its first read on."""
        if self.reader.dialect.name != "postgresql":
            async with self.reader.begin() as conn:
                yield conn
            return
        async with self.reader.connect() as conn:
            await conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            async with conn.begin():
                yield conn

    @asynccontextmanager
    async def read_statement(self) -> AsyncIterator[AsyncConnection]:
        """For a read that is one statement: on PostgreSQL without BEGIN and COMMIT (a
        statement runs in its own snapshot anyway), two round trips fewer. Not for several
        statements that must see one snapshot: use `read`. On SQLite likewise: its driver is
        in autocommit mode (`_sqlite_on_connect`), so without the BEGIN its engine's listener
        would send, the statement is a transaction of its own."""
        async with self.reader.connect() as conn:
            if self.reader.dialect.name == "postgresql":
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                await conn.execution_options(**{_SQLITE_AUTOCOMMIT: True})
            yield conn

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
