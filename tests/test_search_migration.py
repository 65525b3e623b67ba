"""Migration 0003: resources stored before it are found by the parameters it adds, on both
databases, and it goes down and up again. Migration 0005: its index covers the recompute's
read and goes down and up again."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import insert, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app.main import create_app
from app.settings import Settings
from app.store.db import async_url
from app.store.repository import _FACT_ROWS_SQL
from app.store.tables import FACT_COLUMNS, resource_table, token_table
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


async def _facts_index(url: str) -> tuple[list[str], str] | None:
    """ix_resource_facts' key columns and (PostgreSQL) definition, None when it is absent."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes("resource"))
            found = [i for i in indexes if i["name"] == "ix_resource_facts"]
            if not found:
                return None
            definition = ""
            if conn.dialect.name == "postgresql":
                definition = (
                    await conn.execute(
                        text(
                            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_resource_facts'"
                        )
                    )
                ).scalar_one()
            return [str(c) for c in found[0]["column_names"]], definition
    finally:
        await engine.dispose()


async def test_0005_covers_the_recompute_read_and_goes_down_and_up(empty_database):
    url = empty_database
    _alembic(url, "upgrade", "head")
    # The columns the read names are exactly the index's: its key and its INCLUDE list.
    named = set(
        re.findall(r"[a-z_]+", _FACT_ROWS_SQL.split("FROM")[0] + _FACT_ROWS_SQL.split("WHERE")[1])
    )
    read = named & set(resource_table.c.keys())
    assert read == {"patient_id", "kind", *FACT_COLUMNS}, read
    index = await _facts_index(url)
    assert index is not None and index[0] == ["patient_id", "kind"]
    if url.startswith("postgresql"):
        assert index[1].endswith(f"INCLUDE ({', '.join(FACT_COLUMNS)})"), index[1]

    _alembic(url, "downgrade", "0004")
    assert await _facts_index(url) is None
    _alembic(url, "upgrade", "head")
    assert await _facts_index(url) == index
