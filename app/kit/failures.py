"""What a database error means, decided in one place for SQLAlchemy, asyncpg and aiosqlite.

Two questions are asked of an error:

- `is_transient`: will the same request probably work once the database is back? A database
  that is down, starting up, shutting down, out of connections (pool timeout, PostgreSQL's
  `too_many_connections`), a connection that died mid-statement or during COMMIT, a
  serialization failure or deadlock, SQLite's busy lock. The API answers these 503
  `transient` with `Retry-After`, and the audit queue keeps its records and retries them.
- `explain`: what an operator must do when a command or the server cannot start: one line
  naming the cause and the fix (database unreachable, missing, not migrated).

How the errors arrive (measured with the pinned libraries): a refused TCP connect is a raw
`OSError` (`ConnectionRefusedError`), not wrapped by SQLAlchemy; "the database system is
starting up" (SQLSTATE 57P03), a backend terminated by a shutdown or a crash (08003, the
connection marked invalidated) and a missing database (3D000) are SQLAlchemy `DBAPIError`s
whose `orig` carries the SQLSTATE; a pool that has no connection to give within its timeout
raises `sqlalchemy.exc.TimeoutError`; SQLite's errors carry `sqlite_errorcode`.
"""

from __future__ import annotations

import sqlite3

import asyncpg  # type: ignore[import-untyped]  # no stubs; only its exception classes are used
from sqlalchemy import exc as sa

# SQLSTATE classes and codes worth a retry: connection exceptions (08), insufficient
# resources (53: too many connections, out of memory or disk), operator intervention (57:
# shutdown, crash, starting up, statement cancelled), serialization failure and deadlock.
_TRANSIENT_CLASSES = ("08", "53", "57")
_TRANSIENT_CODES = frozenset({"40001", "40P01"})
_SQLITE_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
MISSING_DATABASE = "3D000"


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of `error`: asyncpg's own exception, SQLAlchemy's adapter
    error (`orig`) or what either was raised from."""
    orig = getattr(error, "orig", None)
    for candidate in (error, orig, error.__cause__, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def is_transient(error: BaseException) -> bool:
    if isinstance(error, sa.TimeoutError):  # the pool had no connection within its timeout
        return True
    if isinstance(error, sa.DBAPIError):
        if error.connection_invalidated:  # the connection died under the statement
            return True
        return _transient_driver_error(error.orig)
    return _transient_driver_error(error)


def _transient_driver_error(error: BaseException | None) -> bool:
    if error is None:
        return False
    code = sqlstate(error)
    if code is not None:
        return code in _TRANSIENT_CODES or code.startswith(_TRANSIENT_CLASSES)
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) in _SQLITE_BUSY
    # Refused or reset connections, timeouts of a connect or a read; asyncpg's own
    # "connection is closed" when it did not go through SQLAlchemy.
    return isinstance(
        error,
        OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError,
    )


def explain(error: BaseException, where: str) -> str | None:
    """One line for an operator: what is wrong with the database at `where` (the URL
    without its password) and how to fix it; None when `error` is no database problem."""
    code = sqlstate(error)
    if code == MISSING_DATABASE:
        return (
            f"the database at {where} does not exist: create it (e.g. `createdb`), then "
            "run `alembic upgrade head`"
        )
    if code is not None and code.startswith("28"):
        return (
            f"the database at {where} refused the login ({_first_line(error)}): fix the user "
            "or password in DATABASE_URL"
        )
    if is_transient(error):
        return (
            f"the database at {where} is unreachable ({_first_line(error)}): start it or fix "
            "DATABASE_URL"
        )
    return None


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error)
    # SQLAlchemy appends the statement and a link on later lines, asyncpg its detail.
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
