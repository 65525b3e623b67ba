"""Replicas act as one (issue 20, part 5): two API instances, separate processes on separate
ports (each started as in production, `python -m app serve`), over one PostgreSQL through
PgBouncer in transaction pooling mode (`DATABASE_URL=...?pgbouncer=true`), behave like one:

- conditional creates racing through both leave one patient;
- `If-Match` races through both have one winner, the others 412;
- many counts of one patient sent at once through both end in the status posting them one
  by one gives, and a full recompute afterwards (`python -m app recompute`) changes nothing;
- a Bulk export started on one is polled and downloaded through the other;
- the audit chain verifies (`python -m app audit verify`) after concurrent writes through
  both.

PgBouncer comes from the system's packages (`apt-get install -y pgbouncer`; scripts/test.sh
installs it); without it these tests are skipped locally and fail in CI. PgBouncer lends each
transaction one of `SERVER_CONNECTIONS` server connections while the two instances hold up
to 2 x `APP_DB_POOL_SIZE` client connections: transactions of both instances share server
connections, which is what breaks a driver that names its prepared statements.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from app.kit.errors import ConfigurationError
from app.store.db import async_url, driver_arguments
from bench.proxies import Missing, PgBouncer
from bench.workers import connections_to
from tests import builders
from tests.conftest import (
    IN_CI,
    POSTGRES_ADMIN_URL,
    PROJECT_ROOT,
    REASON,
    TEST_SECRET,
    _admin,
    _blocking,
    _migrate,
    _postgres_reachable,
    bearer,
    uvicorn_server,
)
from tests.test_bulk_export import TYPES, kick_off, poll, searched_ids, trial
from tests.test_response_api import BASELINE_TIME, START, at, status_of

pytestmark = pytest.mark.postgres

SERVER_CONNECTIONS = 4
CLIENT_POOL = 6  # per instance: 12 client connections over 4 server connections


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(message + " (CI=true: the replica tests must run)")
    pytest.skip(message)


class Replicas:
    def __init__(self, bouncer: PgBouncer, database: str, first: str, second: str) -> None:
        self.bouncer = bouncer
        self.database = database
        self.database_url = bouncer.url(database)
        self.urls = (first, second)

    def clients(self) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        headers = {**bearer("admin"), "X-Provenance": REASON}
        limits = httpx.Limits(max_connections=50)
        return (
            httpx.AsyncClient(base_url=self.urls[0], headers=headers, timeout=60, limits=limits),
            httpx.AsyncClient(base_url=self.urls[1], headers=headers, timeout=60, limits=limits),
        )

    def cli(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """`python -m app ...` with the instances' DATABASE_URL (through PgBouncer)."""
        return subprocess.run(
            [sys.executable, "-m", "app", *arguments],
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "DATABASE_URL": self.database_url,
                "APP_ENVIRONMENT": "test",
                "APP_AUTH_JWT_SECRET": TEST_SECRET,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    if not _postgres_reachable():
        _unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable")
    try:
        bouncer = PgBouncer(POSTGRES_ADMIN_URL, pool_size=SERVER_CONNECTIONS)
    except Missing as missing:
        _unavailable(str(missing))
    name = f"itp_replicas_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _blocking(_admin(f'CREATE DATABASE "{name}"'))
    logs = tmp_path_factory.mktemp("replicas")
    try:
        # Migrations straight to PostgreSQL, as a deployment runs them once before the
        # replicas start; everything after goes through the pooler.
        _migrate(make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False))
        with bouncer, ExitStack() as stack:
            url = bouncer.url(name)
            env = {
                "APP_DB_POOL_SIZE": str(CLIENT_POOL),
                "APP_DB_MAX_OVERFLOW": "0",
                # No per-worker queue in front of the writes: every racing request is in
                # the database at once, and only the database's locks can order them.
                "APP_MAX_CONCURRENT_WRITES": "0",
            }
            servers = [
                uvicorn_server(url, logs / f"{n}.log", 1, env, production_start=True)
                for n in ("a", "b")
            ]
            # Both start at once: each spends seconds importing the app.
            with ThreadPoolExecutor(2) as pool:
                first, second = pool.map(stack.enter_context, servers)
            yield Replicas(bouncer, name, first, second)
    finally:
        _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_the_pgbouncer_parameter_sets_the_driver_and_leaves_the_url():
    url = "postgresql://itp@pgbouncer:6432/itp?pgbouncer=true"
    assert driver_arguments(url) == {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    assert "pgbouncer" not in async_url(url).query
    assert driver_arguments("postgresql://itp@db:5432/itp") == {}
    assert driver_arguments("postgresql://itp@db:5432/itp?pgbouncer=false") == {}
    with pytest.raises(ConfigurationError, match="pgbouncer='yes' is not true or false"):
        driver_arguments("postgresql://itp@db:5432/itp?pgbouncer=yes")


async def test_conditional_creates_racing_through_both_leave_one_patient(replicas):
    """20 enrolments of one person at once (their hospital record number as the criteria),
    half through each instance: one Patient is created, the others find it. Each body has a
    subject number of its own, so the subject's unique index cannot stand in for the
    criteria's lock."""
    mrn = "MRN-501"
    criterion = f"identifier={builders.MRN_SYSTEM}|{mrn}"
    one, two = replicas.clients()
    async with one, two:
        answers = await asyncio.gather(
            *(
                http.post(
                    "/fhir/Patient",
                    json=builders.with_mrn(builders.patient(f"S01-{600 + n}"), mrn),
                    headers={"If-None-Exist": criterion},
                )
                for n, http in zip(range(20), itertools.cycle((one, two)), strict=False)
            )
        )
        assert sorted(a.status_code for a in answers) == [200] * 19 + [201], [
            a.text for a in answers if a.status_code not in (200, 201)
        ]
        assert len({a.json()["id"] for a in answers}) == 1
        for http in (one, two):
            found = await http.get("/fhir/Patient", params={"identifier": criterion[11:]})
            assert len(found.json().get("entry", [])) == 1


async def test_if_match_races_through_both_have_one_winner(replicas):
    one, two = replicas.clients()
    async with one, two:
        created = await one.post("/fhir/Patient", json=builders.patient("S01-502"))
        assert created.status_code == 201, created.text
        patient = created.json()
        contenders = []
        for n, http in enumerate(itertools.islice(itertools.cycle((one, two)), 10)):
            body = {**patient, "gender": "female" if n % 2 else "male", "birthDate": "1970-01-01"}
            body["birthDate"] = f"19{60 + n}-01-01"
            contenders.append(
                http.put(f"/fhir/Patient/{patient['id']}", json=body, headers={"If-Match": 'W/"1"'})
            )
        answers = await asyncio.gather(*contenders)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] + [412] * 9, [a.text for a in answers]
        [winner] = [a.json() for a in answers if a.status_code == 200]
        for http in (one, two):
            now = (await http.get(f"/fhir/Patient/{patient['id']}")).json()
            assert now["meta"]["versionId"] == "2"
            assert now["birthDate"] == winner["birthDate"]


async def _enrol(http: httpx.AsyncClient, subject: str) -> str:
    made = await http.post("/fhir/Patient", json=builders.patient(subject))
    assert made.status_code == 201, made.text
    patient_id: str = made.json()["id"]
    for record in (
        builders.platelet_count(patient_id, BASELINE_TIME, 12),
        builders.administration(patient_id, START),
    ):
        assert (await http.post(f"/fhir/{record['resourceType']}", json=record)).status_code == 201
    return patient_id


async def test_counts_through_both_end_in_the_status_a_full_recompute_gives(replicas):
    values = [35, 48, 60, 110, 120, 125, 130, 20, 18, 90, 140, 150, 160, 40, 55, 170]
    counts = [(f"03-{10 + d:02d}", v) for d, v in enumerate(values)]
    one, two = replicas.clients()
    async with one, two:
        sequential = await _enrol(one, "S01-503")
        for day, value in counts:
            record = builders.platelet_count(sequential, at(day), value)
            assert (await one.post("/fhir/Observation", json=record)).status_code == 201
        concurrent = await _enrol(two, "S01-504")
        random.Random(20).shuffle(counts)
        answers = await asyncio.gather(
            *(
                http.post(
                    "/fhir/Observation", json=builders.platelet_count(concurrent, at(day), value)
                )
                for http, (day, value) in zip(itertools.cycle((one, two)), counts, strict=False)
            )
        )
        assert [a.status_code for a in answers] == [201] * len(counts)
        expected = await status_of(one, sequential)
        before = {http.base_url: await status_of(http, concurrent) for http in (one, two)}
        recomputed = replicas.cli("recompute", "--reason", "replica test")
        assert recomputed.returncode == 0, recomputed.stderr
        assert "; 0 changed" in recomputed.stdout, recomputed.stdout
        assert "0 kept their result" in recomputed.stdout, recomputed.stdout
        after = {http.base_url: await status_of(http, concurrent) for http in (one, two)}
    assert after == before  # nothing new: same version, same body, through either instance
    status = before[one.base_url]
    for key in ("status", "best_response", "response_date", "episodes", "pending_confirmation"):
        assert status[key] == expected[key], key


async def test_an_export_started_on_one_is_polled_and_downloaded_on_the_other(replicas):
    one, two = replicas.clients()
    first, second = replicas.urls
    async with one, two:
        await trial(one)
        started = await kick_off(one)
        assert started.status_code == 202, started.text
        location = started.headers["Content-Location"]
        assert location.startswith(first)
        manifest, _, _ = await poll(two, second + location.removeprefix(first))
        found: dict[str, list[str]] = {}
        for item in manifest["output"]:
            # The manifest names the files on the instance that answered the poll.
            assert item["url"].startswith(second)
            answer = await two.get(item["url"], headers={"Accept": "application/fhir+ndjson"})
            assert answer.status_code == 200, answer.text
            lines = answer.content.splitlines()
            assert len(lines) == item["count"]
            found.setdefault(item["type"], []).extend(
                httpx.Response(200, content=line).json()["id"] for line in lines
            )
        for resource_type in TYPES:
            assert sorted(found[resource_type]) == sorted(await searched_ids(two, resource_type))


async def test_the_audit_chain_verifies_after_concurrent_writes_through_both(replicas):
    one, two = replicas.clients()
    async with one, two:
        patient = await _enrol(one, "S01-505")
        answers = await asyncio.gather(
            *(
                http.post(
                    "/fhir/Observation",
                    json=builders.platelet_count(patient, at(f"04-{1 + n:02d}"), 30 + 7 * n),
                )
                for n, http in zip(range(24), itertools.cycle((one, two)), strict=False)
            ),
            *(http.get(f"/fhir/Patient/{patient}") for http in (one, two) * 6),
        )
        assert all(a.status_code in (200, 201) for a in answers)
    conn = await asyncpg.connect(
        make_url(POSTGRES_ADMIN_URL).set(database=replicas.database).render_as_string(False)
    )
    try:
        # The records of the last requests are chained by the instances' sequencers a
        # moment after commit; wait for them, so that the chain below holds every one.
        deadline = asyncio.get_running_loop().time() + 20
        while await conn.fetchval("SELECT count(*) FROM audit_event WHERE chain_seq IS NULL"):
            assert asyncio.get_running_loop().time() < deadline, "the sequencers fell behind"
            await asyncio.sleep(0.1)
        verified = replicas.cli("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "hash chain verified" in verified.stdout
        # Every write of both instances is in the one chain.
        chained = await conn.fetchval("SELECT count(*) FROM audit_event")
        writes = await conn.fetchval("SELECT count(*) FROM resource_version")
        backends = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            replicas.database,
        )
    finally:
        await conn.close()
    assert f"intact: {chained} records" in verified.stdout
    assert chained >= writes
    # Transaction pooling, not a pass-through: the instances hold more connections to
    # PgBouncer than PostgreSQL has backends for this database.
    assert connections_to(replicas.bouncer.port) > SERVER_CONNECTIONS
    assert 1 <= backends <= SERVER_CONNECTIONS
