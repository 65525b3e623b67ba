"""What an operator sees when a command or the server cannot start: one line naming the
cause and the fix, a non-zero exit, no traceback unless asked for (`--debug`); a server
whose workers cannot start stops instead of restarting them for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import (
    POSTGRES_ADMIN_URL,
    PROJECT_ROOT,
    TEST_SECRET,
    _admin,
    _blocking,
    _free_port,
    _postgres_reachable,
)

# Only what the case sets: no setting of the machine running the tests leaks in.
_CLEAN = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(("APP_", "ITP_", "DATABASE_URL"))
}


def run_app(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env={**_CLEAN, "PYTHONPATH": str(PROJECT_ROOT), "APP_ENVIRONMENT": "test", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def migrated_sqlite(sqlite_template, tmp_path) -> str:
    import shutil

    path = tmp_path / "itp.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        (
            {"ITP_R_THRESHOLD": "abc"},
            ["ITP_R_THRESHOLD='abc'", "valid number"],
        ),
        ({"ITP_BASELINE_RULE": "median"}, ["ITP_BASELINE_RULE", "'last-before-start'"]),
        ({"ITP_TRIAL_TIMEZONE": "Mars/Base"}, ["ITP_TRIAL_TIMEZONE", "IANA"]),
        ({"APP_CORS_ORIGINS": "https://a.example"}, ["APP_CORS_ORIGINS", "a JSON list"]),
        ({"APP_DB_POOL_SIZE": "many"}, ["APP_DB_POOL_SIZE='many'", "valid integer"]),
        ({"DATABASE_URL": "mysql://db/itp"}, ["DATABASE_URL", "sqlite:///PATH"]),
    ],
)
def test_a_setting_that_does_not_parse_is_named_with_its_expected_form(
    tmp_path, migrated_sqlite, env, needles
):
    result = run_app("demo", cwd=tmp_path, **{"DATABASE_URL": migrated_sqlite, **env})
    assert_one_line(result, *needles)


def test_a_database_url_is_never_echoed_with_its_password(tmp_path):
    url = f"postgresql://itp:s3cret-pw@127.0.0.1:{_free_port()}/itp"
    result = run_app("recompute", cwd=tmp_path, DATABASE_URL=url)
    line = assert_one_line(result, "unreachable", "start it or fix DATABASE_URL")
    assert "s3cret-pw" not in result.stderr + result.stdout and "***" in line


def test_sqlite_missing_or_not_migrated(tmp_path):
    missing = run_app("audit", "verify", cwd=tmp_path, DATABASE_URL="sqlite:///none.db")
    assert_one_line(missing, "none.db does not exist", "alembic upgrade head")
    assert not (tmp_path / "none.db").exists()  # the check creates no empty database

    import sqlite3

    sqlite3.connect(tmp_path / "empty.db").close()
    empty = run_app("demo", cwd=tmp_path, DATABASE_URL="sqlite:///empty.db")
    assert_one_line(empty, "no migrations applied", "run `alembic upgrade head`")
    debug = run_app("demo", "--debug", cwd=tmp_path, DATABASE_URL="sqlite:///empty.db")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "StartupError: the database at sqlite:///empty.db has no migrations" in debug.stderr


@pytest.mark.postgres
def test_postgres_unreachable_missing_or_not_migrated(tmp_path):
    if not _postgres_reachable():
        pytest.skip("PostgreSQL unreachable")
    admin = make_url(POSTGRES_ADMIN_URL)
    down = admin.set(port=_free_port(), database="itp").render_as_string(hide_password=False)
    assert_one_line(run_app("demo", cwd=tmp_path, DATABASE_URL=down), "is unreachable", "start it")
    name = f"itp_empty_{uuid.uuid4().hex[:8]}"
    url = admin.set(database=name).render_as_string(hide_password=False)
    assert_one_line(
        run_app("recompute", cwd=tmp_path, DATABASE_URL=url), "does not exist", "createdb"
    )
    _blocking(_admin(f'CREATE DATABASE "{name}"'))
    try:
        assert_one_line(
            run_app("audit", "verify", cwd=tmp_path, DATABASE_URL=url),
            "no migrations applied",
            "alembic upgrade head",
        )
    finally:
        _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_check_says_ready_or_why_not(tmp_path, migrated_sqlite):
    ready = run_app("check", cwd=tmp_path, DATABASE_URL=migrated_sqlite)
    assert ready.returncode == 0 and "ready to serve" in ready.stdout, ready.stderr
    no_key = run_app(
        "check", cwd=tmp_path, DATABASE_URL=migrated_sqlite, APP_ENVIRONMENT="production"
    )
    assert_one_line(no_key, "no token key in production", "APP_AUTH_JWT_SECRET")


def _serve(tmp_path: Path, workers: int, **env: str) -> tuple[int, str]:
    log = tmp_path / f"uvicorn-{workers}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(_free_port()),
                "--workers", str(workers), "--log-config", str(PROJECT_ROOT / "app/logging.json"),
            ],
            cwd=tmp_path,
            env={**_CLEAN, "PYTHONPATH": str(PROJECT_ROOT), **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"the server kept running (restarting workers?): {log.read_text()}")
    return code, log.read_text()


def test_a_server_that_cannot_start_stops_with_one_line_per_worker(tmp_path, migrated_sqlite):
    """Production without a token key: each worker logs the cause once and exits with
    uvicorn's start-up failure status, and the supervisor stops instead of restarting it."""
    code, log = _serve(tmp_path, 2, DATABASE_URL=migrated_sqlite, APP_ENVIRONMENT="production")
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 2, log
    assert all("no token key in production" in line for line in lines)
    assert "Traceback" not in log
    assert "failed to start, stopping the parent process" in log
    assert code == 0  # uvicorn's supervisor itself exits 0: `python -m app check` is not

    code, log = _serve(
        tmp_path,
        1,
        DATABASE_URL=migrated_sqlite,
        APP_ENVIRONMENT="test",
        APP_AUTH_JWT_SECRET=TEST_SECRET,
        ITP_R_THRESHOLD="abc",
    )
    assert code == 3, log
    [line] = [line for line in log.splitlines() if "cannot start" in line]
    assert "ITP_R_THRESHOLD='abc' is not a valid setting" in line
    assert "Traceback" not in log
