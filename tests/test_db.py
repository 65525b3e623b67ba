"""The database layer's read forms (app/store/db.py), on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.store.db import Database


async def _in_transaction(conn) -> bool:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if hasattr(driver, "is_in_transaction"):  # asyncpg
        return driver.is_in_transaction()
    return driver.in_transaction  # aiosqlite's sqlite3 connection


async def test_a_one_statement_read_skips_begin_and_commit(database_url: str) -> None:
    """read_statement saves BEGIN and COMMIT (issue 8 on PostgreSQL, issue 20 on SQLite);
    the connection goes back to the pool as it came: the next transactional read on it has
    its transaction."""
    # One connection, so the transactional read below gets the one read_statement used.
    db = Database.from_url(database_url, pool_size=1, max_overflow=0)
    try:
        async with db.read_statement() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            one_statement_in_transaction = await _in_transaction(conn)
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))
            assert await _in_transaction(conn)
    finally:
        await db.dispose()
    assert one_statement_in_transaction is False


async def _probe_count(conn) -> int:
    return (await conn.execute(text("SELECT count(*) FROM snapshot_probe"))).scalar_one()


async def test_a_read_sees_one_snapshot(database_url: str) -> None:
    """Every statement of a read sees the same data, though another transaction commits in
    between: a search's total, page and includes agree (on PostgreSQL, READ COMMITTED gave
    each statement its own snapshot)."""
    db = Database.from_url(database_url)
    try:
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE snapshot_probe (n integer)"))
            await conn.execute(text("INSERT INTO snapshot_probe VALUES (1)"))
        async with db.read() as conn:
            before = await _probe_count(conn)
            async with db.write() as other:
                await other.execute(text("INSERT INTO snapshot_probe VALUES (2)"))
            after = await _probe_count(conn)
        assert (before, after) == (1, 1)
        async with db.read() as conn:
            assert await _probe_count(conn) == 2
            # Read only: a write in a read is refused, not silently allowed.
            if db.dialect == "postgresql":
                with pytest.raises(Exception, match="read-only"):
                    await conn.execute(text("INSERT INTO snapshot_probe VALUES (3)"))
    finally:
        async with db.write() as conn:
            await conn.execute(text("DROP TABLE snapshot_probe"))
        await db.dispose()


def test_a_migrated_sqlite_database_is_in_wal_mode_before_the_server_opens_it(
    sqlite_template,
) -> None:
    """Migrations leave the file in WAL mode (bytes 18-19 of its header are 2: WAL), so a
    server's first connection never has to switch it, which needs the file to itself while
    the server's other connections open (a sporadic "database is locked" 503)."""
    header = sqlite_template.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\x00"
    assert (header[18], header[19]) == (2, 2)


def test_a_sqlite_connection_opened_while_another_one_checkpoints_waits(tmp_path) -> None:
    """The connect pragmas wait for a busy database instead of failing: another connection
    that writes and closes (a checkpoint that removes the WAL) makes a newcomer's journal-mode
    read busy for a moment. Before the busy timeout came first, about one connect in eight
    failed here with "database is locked" (a CLI command beside a running server)."""
    import sqlite3
    import threading

    from app.store.db import _sqlite_on_connect

    path = str(tmp_path / "busy.db")
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x)")
    setup.commit()
    setup.close()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            writer = sqlite3.connect(path, isolation_level=None, timeout=30)
            writer.execute("INSERT INTO t VALUES (1)")
            writer.close()

    thread = threading.Thread(target=churn)
    thread.start()
    on_connect, failures = _sqlite_on_connect(), []
    try:
        for _ in range(1500):
            connection = sqlite3.connect(path, timeout=0)  # the driver waits for nothing itself
            try:
                on_connect(connection, None)
                connection.execute("SELECT count(*) FROM t").fetchone()
            except sqlite3.OperationalError as error:
                failures.append(str(error))
            finally:
                connection.close()
    finally:
        stop.set()
        thread.join()
    assert failures == []
