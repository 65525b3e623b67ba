"""The subject-number migration (0009; both databases): numbers stored before the rule.
Patients that are one subject to a reader are listed and nothing is migrated; once the
trial's data manager has resolved them, every number is found in its normalised form and
can no longer be enrolled twice. It goes down and up again."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import httpx
import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from app.main import create_app
from app.settings import Settings
from app.store.db import async_url
from app.store.migrations import current_revision
from app.store.tables import resource_table, token_table
from tests import builders
from tests.conftest import KEY, PROJECT_ROOT, bearer
from tests.test_search_migration import _alembic, empty_database  # noqa: F401 (a fixture)

# The revision before the subject-number migration: what the rows below were written under.
BEFORE = "0008"
# (id, subject number as a client sent it before the rule, deleted)
STORED = [
    ("p-1", "S01-001", False),
    ("p-2", "S01-００１ ", False),  # full-width digits and a blank: S01-001 to a reader
    ("p-3", "S01\u200b-001", False),  # a zero-width space inside
    ("p-4", " S01-002", False),  # alone, only not normalised
    ("p-5", "S01-003", True),  # deleted: holds no number any more
    ("p-6", "S01-003", False),
]


async def _store_before_the_rule(url: str) -> None:
    now = datetime(2025, 3, 10, 12)
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            for patient_id, number, deleted in STORED:
                content = {**builders.patient(number), "id": patient_id}
                pk = (
                    await conn.execute(
                        insert(resource_table)
                        .values(
                            resource_type="Patient",
                            id=patient_id,
                            version_id=1,
                            last_updated=now,
                            deleted=deleted,
                            content=orjson.dumps(content).decode(),
                            patient_id=patient_id,
                            site="S01",
                        )
                        .returning(resource_table.c.pk)
                    )
                ).scalar_one()
                if not deleted:
                    await conn.execute(
                        insert(token_table).values(
                            resource_pk=pk,
                            resource_type="Patient",
                            param="identifier",
                            system=builders.SUBJECT_SYSTEM,
                            value=number,
                        )
                    )
    finally:
        await engine.dispose()


async def _retire(url: str, *patient_ids: str) -> None:
    """What a data manager does before migrating again: the duplicates are deleted."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(resource_table)
                .where(resource_table.c.id.in_(patient_ids))
                .values(deleted=True)
            )
    finally:
        await engine.dispose()


async def _subjects(url: str) -> dict[str, str | None]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(resource_table.c.id, resource_table.c.subject))
            return dict(rows.all())
    finally:
        await engine.dispose()


async def _revision(url: str) -> str | None:
    from app.store.db import Database

    db = Database.from_url(url)
    try:
        return await current_revision(db)
    finally:
        await db.dispose()


def _upgrade(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
    )


async def test_the_subject_migration_refuses_look_alikes_then_normalises(empty_database):  # noqa: F811
    url = empty_database
    _alembic(url, "upgrade", BEFORE)
    await _store_before_the_rule(url)

    refused = _upgrade(url)
    assert refused.returncode != 0
    message = refused.stderr.splitlines()[-1]
    assert "stopped, nothing was changed" in message
    assert "'S01-001' is held by Patient/p-1" in message
    assert "Patient/p-2" in message and "Patient/p-3" in message
    assert "p-4" not in message and "p-6" not in message
    assert "Traceback" in refused.stderr  # alembic's own report; the last line is ours
    assert await _revision(url) == BEFORE  # nothing of the migration stayed

    await _retire(url, "p-2", "p-3")
    migrated = _upgrade(url)
    assert migrated.returncode == 0, migrated.stderr
    assert "Patient/p-4 stores subject number ' S01-002'; found as 'S01-002'" in migrated.stdout
    assert await _subjects(url) == {
        "p-1": "S01-001",
        "p-2": None,
        "p-3": None,
        "p-4": "S01-002",
        "p-5": None,
        "p-6": "S01-003",
    }

    application = create_app(Settings(database_url=url, environment="test"), key_source=KEY)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=bearer("admin")
        ) as client:
            found = await client.get(
                "/fhir/Patient", params={"identifier": f"{builders.SUBJECT_SYSTEM}|S01-002"}
            )
            assert [e["resource"]["id"] for e in found.json()["entry"]] == ["p-4"]
            again = await client.post("/fhir/Patient", json=builders.patient("S01-００２"))
            assert again.status_code == 409 and "Patient/p-4" in again.text
            free = await client.post("/fhir/Patient", json=builders.patient("S01-004"))
            assert free.status_code == 201

    _alembic(url, "downgrade", BEFORE)
    _alembic(url, "upgrade", "head")
    assert (await _subjects(url))["p-4"] == "S01-002"
