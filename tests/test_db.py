"""The database layer's read forms (app/store/db.py), on both databases."""

from __future__ import annotations

from sqlalchemy import text

from app.store.db import Database


async def _in_transaction(conn) -> bool:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if hasattr(driver, "is_in_transaction"):  # asyncpg
        return driver.is_in_transaction()
    return driver.in_transaction  # aiosqlite's sqlite3 connection


async def test_a_one_statement_read_skips_begin_and_commit_on_postgresql(
    database_url: str,
) -> None:
    """read_statement saves BEGIN and COMMIT on PostgreSQL (issue 8); the connection goes
    back to the pool as it came: the next transactional read on it has its transaction."""
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
    assert one_statement_in_transaction is (db.dialect != "postgresql")
