"""`python -m app serve`, the production start (README "Production start"): every worker has a
listening socket of its own (SO_REUSEPORT), so connections spread over the workers; a worker
that cannot start stops the server with exit 3; one that dies is replaced; SIGTERM stops it
cleanly. Run as a real process on loopback, on both databases."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.workers import listening_sockets, requests_by_pid, shares, worker_pids
from tests.conftest import PROJECT_ROOT, TEST_SECRET, _free_port, bearer


def _environment(database_url: str, tmp_path: Path) -> dict[str, str]:
    metrics = tmp_path / "metrics"
    metrics.mkdir(exist_ok=True)
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "APP_ENVIRONMENT": "test",
        "APP_AUTH_JWT_SECRET": TEST_SECRET,
        "APP_AUDIT_SPILL_DIR": str(tmp_path / "audit-spill"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
    }


def _start(env: dict[str, str], port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port), "--workers", str(workers)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _until(condition, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        if process.poll() is not None:
            status = process.returncode
            pytest.fail(f"the server exited ({status}) before {what}: {log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in 30 s: {log.read_text()}")
        time.sleep(0.1)


@contextmanager
def serving(database_url: str, tmp_path: Path, workers: int = 2) -> Iterator[tuple]:
    env = _environment(database_url, tmp_path)
    port, log = _free_port(), tmp_path / "serve.log"
    process = _start(env, port, workers, log)
    try:
        # Ready when every worker listens: a worker listens once its app has started.
        _until(lambda: listening_sockets(port) == workers, "listening workers", process, log)
        yield process, port, Path(env["PROMETHEUS_MULTIPROC_DIR"]), log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def _one_request_per_connection(port: int, connections: int) -> None:
    """`connections` clients, each on a connection of its own, one request each at once."""

    async def one() -> int:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            return (await http.get("/fhir/metadata", headers=bearer())).status_code

    assert await asyncio.gather(*(one() for _ in range(connections))) == [200] * connections


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_connections_spread_a_dead_worker_is_replaced_sigterm_stops(database_url, tmp_path):
    """One server (PostgreSQL, as in production; starting one takes seconds):
    - 32 connections opened at once reach both workers, each with a fair share. The kernel
      hashes each connection to a socket: that all 32 land on one of two has odds of 2^-31.
      With `uvicorn --workers 2` and its one shared socket, one worker took them all in 9 of
      22 benchmark runs.
    - a worker killed is replaced, and the server serves on;
    - SIGTERM stops every worker, exit 0, nothing listens any more."""
    with serving(database_url, tmp_path) as (process, port, metrics, log):
        pids = worker_pids(process.pid)
        assert len(pids) == 2
        before = requests_by_pid([metrics])
        await _one_request_per_connection(port, 32)
        seen = shares(before, requests_by_pid([metrics]), pids)
        assert sum(seen["requests"].values()) == 32, seen
        assert seen["idle_workers"] == 0, seen

        first, second = pids
        os.kill(first, signal.SIGKILL)
        _until(
            lambda: (
                len(set(worker_pids(process.pid)) - {first, second}) == 1
                and listening_sockets(port) == 2
            ),
            "replacement worker",
            process,
            log,
        )
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        workers = worker_pids(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
        assert listening_sockets(port) == 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_that_cannot_start_stops_the_server_with_status_3(database_url, tmp_path):
    """A database that is not migrated: the worker's start fails, and the server exits 3 (a
    supervisor notices; `uvicorn --workers` exits 0) instead of starting it again."""
    missing = f"sqlite:///{tmp_path / 'not-migrated.db'}"
    env = _environment(missing, tmp_path)
    log = tmp_path / "serve.log"
    process = _start(env, _free_port(), 1, log)
    assert process.wait(60) == 3, log.read_text()
    assert "could not start" in log.read_text()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_port_taken_by_another_program_is_one_line_and_status_3(database_url, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "serve.log"
        process = _start(_environment(database_url, tmp_path), port, 2, log)
        assert process.wait(30) == 3
    assert f"cannot listen on 127.0.0.1:{port}" in log.read_text()
