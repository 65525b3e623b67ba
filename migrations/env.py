"""Alembic environment: the app's own engine mapping, run on the async drivers."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from alembic.util import CommandError
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import app.store.tables  # noqa: F401 - registers the tables on SQLModel.metadata
from app.kit.failures import explain
from app.settings import get_settings
from app.store.db import async_url, driver_arguments

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def _database_url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def _configure(connection: Connection | None = None, **kwargs: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=True,  # SQLite can only ALTER by copying tables
        **kwargs,
    )


def run_offline() -> None:
    _configure(
        url=async_url(_database_url()).render_as_string(hide_password=False), literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    url = async_url(_database_url())
    if url.get_backend_name() == "sqlite" and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args=driver_arguments(_database_url()))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
            if url.get_backend_name() == "sqlite":
                # WAL is a property of the file: set here, once, while nothing else has it
                # open. Left to the server, each new database was switched by its first
                # connection, which needs the file to itself, while its other connections
                # (writer, readers, audit queue) opened too: now and then a first request
                # got "database is locked" (503).
                await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    except Exception as error:
        # An unreachable, missing or refusing database: alembic prints this one line
        # ("FAILED: ...", exit 1) instead of a traceback.
        line = explain(error, make_url(_database_url()).render_as_string(hide_password=True))
        if line is None:
            raise
        raise CommandError(line) from None
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
