"""A PostgreSQL crash under load, end to end: a real uvicorn (two workers) on a private
PostgreSQL cluster (tests/pg_cluster.py; the shared server is never touched), two sites
reading, searching, writing and probing each other's patients while the database is killed
(`pg_ctl stop -m immediate`) and started again; then the server is stopped while the
database is down again, and started once it is back.

What must hold: no 500 and no request left without an answer; 503 with Retry-After while
the database is away; the keep-alive connection survives a 503; every acknowledged write is
stored once (writes refused with 503 are retried with If-None-Exist); every request has its
audit record (request ids counted against the trail), those queued during the outage and
those spilled at shutdown included, a probe of the other site's patient at that site; and
`python -m app audit verify` passes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests import builders
from tests.conftest import PROJECT_ROOT, REASON, TEST_SECRET, _free_port, _migrate, bearer
from tests.pg_cluster import Cluster

pytestmark = pytest.mark.postgres
RESULT_SYSTEM = "https://lab.example/fhir/sid/result"


@pytest.fixture
def cluster():
    server = Cluster()
    try:
        server.start()
        yield server
    finally:
        server.remove()


WORKERS = 2
# What each worker logs once its lifespan has started (uvicorn, INFO, in app/logging.json).
_STARTED = '"message":"Application startup complete."'


class Server:
    """`uvicorn app.main:app --workers 2` with the production log configuration."""

    def __init__(self, database_url: str, spill_dir: Path, log_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "APP_ENVIRONMENT": "test",
            "APP_AUTH_JWT_SECRET": TEST_SECRET,
            "APP_AUDIT_SPILL_DIR": str(spill_dir),
        }
        # The log is appended to across restarts: this start's lines come after `offset`.
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", str(WORKERS),
                    "--log-config", "app/logging.json", "--no-access-log",
                ],
                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, log_path.read_text()
            try:
                ready = httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False
            # Both workers, not just the one that answered: under load the second one
            # started 11 s after the first, after the test had crashed PostgreSQL; it could
            # not start, and uvicorn stopped the whole server (a CI run).
            if ready and log_path.read_bytes()[offset:].decode().count(_STARTED) == WORKERS:
                return
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # graceful: the workers' lifespans end
        self.process.wait(timeout=30)


@dataclass
class Site:
    code: str
    patient: str = ""
    other_patient: str = ""
    sent: list[str] = field(default_factory=list)  # request ids
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    # Request ids of the reads of the other site's patient answered 404 (a 503 knows no site).
    probes: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # result ids whose write got a 503
    stored: set[str] = field(default_factory=set)  # result ids acknowledged (201/200)
    missing_retry_after: int = 0
    numbers: int = 0

    def next_id(self) -> str:
        self.numbers += 1
        return f"{self.code}-{self.numbers}"


async def _send(site: Site, client: httpx.AsyncClient, kind: str, method: str, url: str, **kw):
    request_id = site.next_id()
    headers = {**kw.pop("headers", {}), "X-Request-Id": request_id}
    answer = await client.request(method, url, headers=headers, **kw)
    site.sent.append(headers["X-Request-Id"])
    site.statuses[(kind, answer.status_code)] += 1
    if answer.status_code == 503 and not answer.headers.get("retry-after", "").isdigit():
        site.missing_retry_after += 1
    return headers["X-Request-Id"], answer


async def _write(site: Site, client: httpx.AsyncClient, result_id: str) -> None:
    """A lab result, created so that a retry cannot store it twice."""
    count = builders.platelet_count(
        site.patient,
        "2025-03-10T09:00:00Z",
        42,
        identifier=[{"system": RESULT_SYSTEM, "value": result_id}],
    )
    _, answer = await _send(
        site,
        client,
        "write",
        "POST",
        "/fhir/Observation",
        json=count,
        headers={"If-None-Exist": f"identifier={RESULT_SYSTEM}|{result_id}"},
    )
    if answer.status_code in (200, 201):
        site.stored.add(result_id)
        if result_id in site.pending:
            site.pending.remove(result_id)
    elif answer.status_code == 503 and result_id not in site.pending:
        site.pending.append(result_id)


async def _load(site: Site, client: httpx.AsyncClient, stop: asyncio.Event, lane: int) -> None:
    number = 0
    while not stop.is_set():
        number += 1
        for result_id in list(site.pending):  # retries of writes the outage refused
            await _write(site, client, result_id)
        await _send(site, client, "read", "GET", f"/fhir/Patient/{site.patient}")
        await _send(
            site, client, "search", "GET", "/fhir/Observation", params={"subject": site.patient}
        )
        await _write(site, client, f"{site.code}-{lane}-{number}")
        await _probe(site, client)
        await asyncio.sleep(0.01)


async def _probe(site: Site, client: httpx.AsyncClient) -> None:
    request_id, answer = await _send(
        site, client, "probe", "GET", f"/fhir/Patient/{site.other_patient}"
    )
    if answer.status_code == 404:
        site.probes.append(request_id)


def _keep_alive_pair(port: int, path: str, token: str) -> tuple[int, str | None, int]:
    """Two requests on one connection: the statuses, and the first one's Retry-After."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        connection.request("GET", path, headers=headers)
        first = connection.getresponse()
        first.read()
        sock = connection.sock
        connection.request("GET", path, headers=headers)  # on the same socket, or it fails
        second = connection.getresponse()
        second.read()
        assert connection.sock is sock
        return first.status, first.getheader("Retry-After"), second.status
    finally:
        connection.close()


def _pg(cluster: Cluster, action: str) -> None:
    if action == "crash":
        cluster.stop("immediate")
    else:
        cluster.start()


async def _audited_request_ids(database_url: str) -> dict[str, str | None]:
    """Request id -> the site of its record (the last one seen), for the whole trail."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT content FROM audit_event")
    finally:
        await conn.close()
    found: dict[str, str | None] = {}
    for row in rows:
        event = json.loads(row["content"])
        for entity in event.get("entity", []):
            details = {d["type"]: d["valueString"] for d in entity.get("detail", [])}
            if "request-id" in details:
                found[details["request-id"]] = details.get("site")
    return found


async def test_a_postgres_crash_under_load_loses_no_request_and_no_audit_record(cluster, tmp_path):
    admin = await asyncpg.connect(cluster.admin_url)
    await admin.execute("CREATE DATABASE itp")
    await admin.close()
    database_url = cluster.url("itp")
    await asyncio.to_thread(_migrate, database_url)
    spill_dir, log_path = tmp_path / "audit-spill", tmp_path / "uvicorn.log"
    server = await asyncio.to_thread(Server, database_url, spill_dir, log_path)
    sites = [Site("S01"), Site("S02")]
    try:
        async with httpx.AsyncClient(base_url=server.base, headers=bearer("admin")) as admin_http:
            for site in sites:
                created = await admin_http.post(
                    "/fhir/Patient", json=builders.patient(f"{site.code}-001", site=site.code)
                )
                site.patient = created.json()["id"]
        sites[0].other_patient, sites[1].other_patient = sites[1].patient, sites[0].patient

        clients = [
            httpx.AsyncClient(
                base_url=server.base,
                headers={**bearer("investigator", (site.code,)), "X-Provenance": REASON},
                timeout=30,
            )
            for site in sites
        ]
        stop = asyncio.Event()
        lanes = [
            asyncio.create_task(_load(site, client, stop, lane))
            for site, client in zip(sites, clients, strict=True)
            for lane in range(2)
        ]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(_pg, cluster, "crash")
        await asyncio.sleep(0.5)
        token = bearer("investigator", ("S01",))["Authorization"].split()[1]
        pair = await asyncio.to_thread(
            _keep_alive_pair, server.port, f"/fhir/Patient/{sites[0].patient}", token
        )
        async with httpx.AsyncClient(base_url=server.base) as probe:
            health = [(await probe.get(path)).status_code for path in ("/healthz", "/readyz")]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(_pg, cluster, "start")
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*lanes)
        for site, client in zip(sites, clients, strict=True):
            for _ in range(20):  # what is still refused is retried until it is stored
                if not site.pending:
                    break
                for result_id in list(site.pending):
                    await _write(site, client, result_id)
                await asyncio.sleep(0.2)

        # The keep-alive connection answered 503 with Retry-After, and then answered again.
        assert pair[0] == 503 and pair[1] is not None and pair[1].isdigit(), pair
        assert pair[2] in (200, 503), pair
        assert health == [200, 503]  # the process is up, not ready (a warning, no traceback)

        # Then the database goes away again and the server is stopped: its workers' queued
        # records go to the spill file, which the next start writes before serving.
        await asyncio.to_thread(_pg, cluster, "crash")
        for site, client in zip(sites, clients, strict=True):
            await _send(site, client, "read", "GET", f"/fhir/Patient/{site.patient}")
            await _probe(site, client)
            await client.aclose()
        await asyncio.to_thread(server.stop)
        spilled = list(spill_dir.glob("*.jsonl"))
        assert spilled, log_path.read_text()[-3000:]
        await asyncio.to_thread(_pg, cluster, "start")
        server = await asyncio.to_thread(Server, database_url, spill_dir, log_path)
        assert list(spill_dir.glob("*.jsonl")) == []  # replayed before the server was ready
    finally:
        await asyncio.to_thread(server.stop)

    statuses = sum((site.statuses for site in sites), Counter())
    assert not [key for key in statuses if key[1] >= 500 and key[1] != 503], statuses
    assert statuses[("read", 503)] and statuses[("write", 503)], statuses  # the outage was seen
    assert statuses[("read", 200)] and statuses[("write", 201)], statuses
    assert sum(site.missing_retry_after for site in sites) == 0

    # Every acknowledged write is stored, once; the ones refused were retried until stored.
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT content FROM resource WHERE resource_type = 'Observation' AND content IS "
            "NOT NULL"
        )
    finally:
        await conn.close()
    results = Counter(
        identifier["value"]
        for row in rows
        for identifier in json.loads(row["content"]).get("identifier", [])
        if identifier["system"] == RESULT_SYSTEM
    )
    for site in sites:
        assert not site.pending
        assert all(results[result_id] == 1 for result_id in site.stored), results
    assert sum(results.values()) == sum(len(site.stored) for site in sites)

    # Every request has its audit record; a probe is recorded at the probed patient's site.
    audited = await _audited_request_ids(database_url)
    for site, other in zip(sites, reversed(sites), strict=True):
        unaudited = [request_id for request_id in site.sent if request_id not in audited]
        assert not unaudited, (len(unaudited), len(site.sent), unaudited[:5])
        assert site.probes
        assert {audited[request_id] for request_id in site.probes} == {other.code}

    verify = subprocess.run(
        [sys.executable, "-m", "app", "audit", "verify"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = log_path.read_text()
    assert "Traceback" not in log and '"level":"ERROR"' not in log, log[-3000:]
