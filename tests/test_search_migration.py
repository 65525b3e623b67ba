"""Migration 0003: resources stored before it are found by the parameters it adds, on both
databases, and it goes down and up again."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app.main import create_app
from app.settings import Settings
from app.store.db import async_url
from app.store.tables import resource_table, token_table
from tests import builders
from tests.conftest import (
    IN_CI,
    KEY,
    POSTGRES_ADMIN_URL,
    PROJECT_ROOT,
    _admin,
    _blocking,
    _postgres_reachable,
    bearer,
)


def _alembic(url: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
        capture_output=True,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of its own: this test migrates it from revision 0002."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    if not _postgres_reachable():
        if IN_CI:
            pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable (CI=true)")
        pytest.skip(f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable")
    name = f"itp_migration_{uuid.uuid4().hex[:8]}"
    _blocking(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)
    finally:
        _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _store_as_revision_0002_did(url: str) -> dict[str, str]:
    """Rows as the code of revision 0002 wrote them: index columns and the tokens it knew
    (identifier, code), nothing else."""
    patient = builders.patient(
        "S01-001", name=[{"family": "Müller", "given": ["Anna"]}], birthDate="1968-04-12"
    )
    patient_id = "p-1"
    count = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 25000, unit="/uL")
    event = builders.adverse_event(patient_id, "2025-03-05", grade=3)
    dose = builders.administration(patient_id, "2025-03-03T08:00:00Z", role="rescue")
    now = datetime(2025, 3, 10, 12)
    rows = [
        ("Patient", patient_id, patient, {"patient_id": patient_id, "site": "S01"}),
        ("Observation", "o-1", count, {"kind": "platelet-count", "value_norm": 25.0}),
        ("AdverseEvent", "ae-1", event, {}),
        ("MedicationAdministration", "ma-1", dose, {"kind": "rescue"}),
    ]
    tokens = {
        "Patient": [("identifier", builders.SUBJECT_SYSTEM, "S01-001")],
        "Observation": [("code", "http://loinc.org", "777-3")],
    }
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            for resource_type, resource_id, body, columns in rows:
                content = {**body, "id": resource_id, "meta": {"versionId": "1"}}
                pk = (
                    await conn.execute(
                        insert(resource_table)
                        .values(
                            resource_type=resource_type,
                            id=resource_id,
                            version_id=1,
                            last_updated=now,
                            deleted=False,
                            content=orjson.dumps(content).decode(),
                            **{"patient_id": patient_id, "site": "S01", **columns},
                        )
                        .returning(resource_table.c.pk)
                    )
                ).scalar_one()
                for param, system, value in tokens.get(resource_type, ()):
                    await conn.execute(
                        insert(token_table).values(
                            resource_pk=pk,
                            resource_type=resource_type,
                            param=param,
                            system=system,
                            value=value,
                        )
                    )
    finally:
        await engine.dispose()
    return {"patient": patient_id, "count": "o-1", "event": "ae-1", "dose": "ma-1"}


async def _found(url: str, queries: list[str]) -> list[list[str]]:
    application = create_app(Settings(database_url=url, environment="test"), key_source=KEY)
    results = []
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=bearer("admin")
        ) as client:
            for query in queries:
                response = await client.get(f"/fhir/{query}")
                assert response.status_code == 200, (query, response.text)
                entries = response.json().get("entry", [])
                results.append([e["resource"]["id"] for e in entries])
    return results


async def test_resources_stored_before_0003_are_found_by_the_new_parameters(empty_database):
    url = empty_database
    _alembic(url, "upgrade", "0002")
    ids = await _store_as_revision_0002_did(url)
    _alembic(url, "upgrade", "head")
    queries = [
        "Patient?name=muller",
        "Patient?given=ann&family:exact=Müller",
        "Patient?birthdate=1968-04",
        "Patient?gender=female",
        "Patient?identifier=S01-001",  # a token that existed: backfilled once, not twice
        "Observation?value-quantity=lt30|http://unitsofmeasure.org|10*9/L",
        "Observation?category=laboratory&status=final",
        "AdverseEvent?grade=ge3",
        "AdverseEvent?seriousness=non-serious",
        "MedicationAdministration?medication-role=rescue&status=completed",
    ]
    expected = [[ids["patient"]]] * 5 + [[ids["count"]]] * 2 + [[ids["event"]]] * 2
    expected.append([ids["dose"]])
    assert await _found(url, queries) == expected

    _alembic(url, "downgrade", "0002")
    _alembic(url, "upgrade", "head")
    assert await _found(url, queries) == expected
