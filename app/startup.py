"""What stops a command or the server before it starts, said in one line an operator can act
on: the cause and the fix. A setting that does not parse names its variable and the form it
expects; a database that cannot be used says whether it is unreachable, missing or not
migrated. Tracebacks are for `--debug` (`python -m app`) or `--log-level debug` (uvicorn).
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_origin

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from app.kit import failures
from app.kit.errors import ConfigurationError


class StartupError(Exception):
    """A reason not to start, already phrased as the one line to print."""


def _settings_classes() -> dict[str, type[BaseSettings]]:
    from app.auth.settings import AuthSettings
    from app.settings import CriteriaSettings, Settings

    return {cls.__name__: cls for cls in (Settings, CriteriaSettings, AuthSettings)}


def _variable(model: type[BaseSettings] | None, field: str) -> str:
    """The environment variable a settings field is read from."""
    if model is None:
        return field.upper()
    info = model.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, str):
        return alias
    choices = getattr(alias, "choices", None)
    if choices and isinstance(choices[0], str):
        return choices[0]
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def _hides_value(variable: str) -> bool:
    # A database URL may hold a password, a secret is a secret: never echoed.
    return any(word in variable for word in ("SECRET", "PASSWORD", "DATABASE_URL"))


def _invalid_setting(error: ValidationError) -> str:
    model = _settings_classes().get(error.title)
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        variable = _variable(model, field)
        message = str(item["msg"]).removeprefix("Value error, ")
        shown = variable if _hides_value(variable) else f"{variable}={item['input']!r}"
        lines.append(f"{shown} is not a valid setting: {message}")
    return "; ".join(lines)


_SETTINGS_FIELD = re.compile(r'error parsing value for field "(\w+)"')


def _unparsable_setting(error: SettingsError) -> str:
    """pydantic-settings reads list and dict settings as JSON and says only which field."""
    match = _SETTINGS_FIELD.search(str(error))
    if match is None:
        return str(error)
    field = match.group(1)
    for model in _settings_classes().values():
        info = model.model_fields.get(field)
        if info is not None:
            origin = get_origin(info.annotation)
            form = {list: 'a JSON list, e.g. ["a", "b"]', dict: 'a JSON object, e.g. {"a": "b"}'}
            expected = form.get(origin, "JSON") if origin else "JSON"
            return f"{_variable(model, field)} is not a valid setting: expected {expected}"
    return str(error)


def explain(error: BaseException, database_url: str | None = None) -> str | None:
    """The one line for `error`, or None when it is none of the known start-up problems."""
    if isinstance(error, StartupError | ConfigurationError):
        return str(error)
    if isinstance(error, ValidationError):
        return _invalid_setting(error)
    if isinstance(error, SettingsError):
        return _unparsable_setting(error)
    return failures.explain(error, _where(database_url)) if database_url else None


def _where(database_url: str) -> str:
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: async_url says so, with the fix
        return "DATABASE_URL"


async def check_database(database_url: str) -> str:
    """Raises `StartupError` unless the database answers and its schema is at the
    migrations' head; returns that revision."""
    from app.store.db import Database, async_url
    from app.store.migrations import head_revision

    where = _where(database_url)
    url = async_url(database_url)
    file = url.database if url.get_backend_name() == "sqlite" else None
    if file not in (None, "", ":memory:") and not Path(str(file)).exists():
        raise StartupError(
            f"the database file {file} does not exist: run `alembic upgrade head` to create "
            "it (or fix DATABASE_URL)"
        )
    db = Database.from_url(database_url, pool_size=1, max_overflow=0)
    try:
        async with db.read() as conn:
            migrated = await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))
            current: str | None = None
            if migrated:
                result = await conn.execute(text("SELECT version_num FROM alembic_version"))
                current = result.scalar()
    except Exception as error:
        line = failures.explain(error, where)
        if line is None:
            raise
        raise StartupError(line) from error
    finally:
        await db.dispose()
    head = head_revision()
    if current is None:
        raise StartupError(
            f"the database at {where} has no migrations applied: run `alembic upgrade head`"
        )
    if current != head:
        raise StartupError(
            f"the database at {where} is at migration {current}, this code needs {head}: "
            "run `alembic upgrade head`"
        )
    return current


def check_database_now(database_url: str) -> str:
    """`check_database` from synchronous code, even inside a running event loop (uvicorn
    builds the app inside its own)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, check_database(database_url)).result()
