"""Test fixtures: every API test runs on SQLite and on PostgreSQL.

Both databases are built by `alembic upgrade head` (never create_all), once per session:
SQLite as a template file copied for each test, PostgreSQL as one database whose tables
are truncated before each test. Where PostgreSQL cannot be reached, its tests are skipped
locally and fail in CI (CI=true): an unreachable production database is never a silent skip.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.auth.tokens import SecretKeySource, TokenGrant, issue_token
from app.main import create_app
from app.services.response import response_observation_id
from app.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
# Every update, patch and delete needs a reason; the default client gives this one.
REASON = '{"resourceType":"Provenance","reason":[{"text":"test correction"}]}'
TEST_SECRET = "test-only-shared-secret-for-hs256-" + "k" * 16
KEY = SecretKeySource(TEST_SECRET, issuer="itp-trial-api", audience="itp-trial-api")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the summary, Python's final garbage collection walked the session's heap
    (gigabytes: every test builds an app) for minutes before the process exited (seen with
    py-spy: gc_collect_main at shutdown). Frozen objects are left out of that collection; the
    process is exiting, so nothing is lost."""
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (scripts/mutation.sh), property tests run last: a mutant's run stops at
    its first failing test, and a hypothesis test takes seconds where an example takes
    milliseconds. The order is stable otherwise; outside mutmut nothing moves."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        items.sort(
            key=lambda item: getattr(getattr(item, "obj", None), "is_hypothesis_test", False)
        )


def token(
    role: str = "admin",
    sites: tuple[str, ...] = ("S01",),
    sub: str = "tester",
    scope: str | None = None,
) -> str:
    return issue_token(KEY, TokenGrant(sub, role, list(sites), scope), minutes=60)


def bearer(role: str = "admin", sites: tuple[str, ...] = ("S01",), **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sites, **kwargs)}"}


def _migrate(database_url: str) -> None:
    # A subprocess keeps alembic's event loop and logging away from the test process.
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # scripts/mutation.sh migrates one template for its whole run: each mutant is its own
    # pytest session, and migrating per session cost more than most mutants' tests.
    migrated = os.environ.get("ITP_TEST_SQLITE_TEMPLATE")
    if migrated:
        return Path(migrated)
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    _migrate(f"sqlite:///{path}")
    return path


def _postgres_reachable() -> bool:
    url = make_url(POSTGRES_ADMIN_URL)
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=3):
            return True
    except OSError:
        return False


def _blocking(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run admin SQL from sync fixtures, in a thread so no event loop is disturbed."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if not _postgres_reachable():
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable"
        if IN_CI:
            pytest.fail(message + " (CI=true: the PostgreSQL half of the suite must run)")
        pytest.skip(message)
    name = f"itp_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_url(POSTGRES_ADMIN_URL)
    _blocking(_admin(f'CREATE DATABASE "{name}"'))
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        _migrate(url)
        yield url
    finally:
        _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(statement: str) -> None:
    url = make_url(POSTGRES_ADMIN_URL)
    conn = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _truncate(url: str) -> None:
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version'"
        )
        names = ", ".join(f'"{row["tablename"]}"' for row in tables)
        # Test isolation only: the owner lifts the append-only triggers for this statement.
        append_only = ("audit_event", "audit_disclosure")
        async with conn.transaction():
            for table in append_only:
                await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
            for table in append_only:
                await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind, private to the test."""
    if request.param == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        path = tmp_path / "itp.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_url")
    _blocking(_truncate(url))
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # Spilled audit records stay with the test (the default is the checkout's data/).
    return Settings(
        database_url=database_url, environment="test", audit_spill_dir=tmp_path / "audit-spill"
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[object]:
    application = create_app(settings, key_source=KEY)
    async with application.router.lifespan_context(application):
        yield application
        # After every API test, on both databases: no write without its audit record.
        await assert_every_write_is_audited(application)


@asynccontextmanager
async def running_app(settings: Settings, **options: Any) -> AsyncIterator[Any]:
    """An app with settings of a test's own (`options` go to create_app), started, and
    checked like the `app` fixture's when the test ends."""
    application = create_app(settings, key_source=KEY, **options)
    async with application.router.lifespan_context(application):
        yield application
        await assert_every_write_is_audited(application)


def client_for(application: Any, **token: Any) -> httpx.AsyncClient:
    """An ASGI client of `application` with a token made of `token` (see `bearer`)."""
    transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://testserver",
        headers={**bearer(**token), "X-Provenance": REASON},
    )


@pytest.fixture
async def client(app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://testserver",
        headers={**bearer("admin"), "X-Provenance": REASON},
    ) as http:
        yield http


async def without_reason(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """The request as `client` sends it (its token), minus its default X-Provenance."""
    request = client.build_request(method, url, **kwargs)
    del request.headers["X-Provenance"]
    return await client.send(request)


@pytest.fixture
async def anonymous(app: object) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sends no token."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def uvicorn_server(
    database_url: str,
    log_path: Path,
    workers: int = 2,
    env: dict[str, str] | None = None,
    production_start: bool = False,
) -> Iterator[str]:
    """A real uvicorn process (`workers` worker processes) on loopback; yields its base URL.
    `production_start`: started by `python -m app serve` (a socket per worker) instead of
    `uvicorn --workers`."""
    port = _free_port()
    server = ["app", "serve"] if production_start else ["uvicorn", "app.main:app"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *server,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--log-level",
                "warning",
            ],
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "DATABASE_URL": database_url,
                "APP_ENVIRONMENT": "test",
                "APP_AUTH_JWT_SECRET": TEST_SECRET,
                "APP_AUDIT_SPILL_DIR": str(log_path.parent / "audit-spill"),
                **(env or {}),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited: {log_path.read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not become ready: {log_path.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def live_server(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real uvicorn process on loopback, for what must cross a real socket. Two worker
    processes, as in production: races must hold across processes."""
    with uvicorn_server(database_url, tmp_path / "uvicorn.log") as base:
        yield base


async def assert_every_write_is_audited(application: Any) -> None:
    """Each version a client wrote has its AuditEvent (the server's own response-status
    versions ride on the audited write that caused them)."""
    services = application.state.services
    await services.audit.flush()
    async with services.db.read() as conn:
        patients = (
            (await conn.execute(text("SELECT id FROM resource WHERE resource_type = 'Patient'")))
            .scalars()
            .all()
        )
        server_owned = {response_observation_id(p) for p in patients}
        versions = {
            f"{kind}/{ident}/_history/{version}"
            for kind, ident, version in (
                await conn.execute(
                    text("SELECT resource_type, id, version_id FROM resource_version")
                )
            ).all()
            if ident not in server_owned
        }
        audited = set()
        for (content,) in (
            await conn.execute(
                text(
                    "SELECT content FROM audit_event WHERE action IN ('C', 'U', 'D') "
                    "AND outcome = '0'"
                )
            )
        ).all():
            event = orjson.loads(content)
            audited.add(event["entity"][0]["what"]["reference"])
    missing = versions - audited
    assert not missing, f"writes without an AuditEvent: {sorted(missing)[:5]}"
