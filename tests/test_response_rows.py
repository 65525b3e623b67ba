"""The recompute's read path (issue 8) gives the engine the patient's timeline on both
databases: the live rows, their instants, bare dates as that day in the trial's zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from app.services import response
from app.services.response import ENGINE_KINDS
from app.store import repository as repo
from tests import builders
from tests.conftest import REASON
from tests.test_crud import create


async def test_fact_rows_give_the_timeline(client, app) -> None:
    patient_id = (await create(client, builders.patient())).json()["id"]
    await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
    await create(client, builders.platelet_count(patient_id, "2025-03-03T07:00:00Z", 12))
    await create(client, builders.platelet_count(patient_id, "2025-03-10", 60))  # a bare date
    # Statuses other than each type's default, so both paths must carry them over.
    amended = builders.platelet_count(patient_id, "2025-03-12T08:00:00Z", 65)
    await create(client, {**amended, "status": "amended"})
    await create(client, builders.platelet_count(patient_id, "2025-03-17T09:00:00+05:30", 70))
    gone = (await create(client, builders.platelet_count(patient_id, "2025-03-18", 5))).json()
    await client.delete(f"/fhir/Observation/{gone['id']}", headers={"X-Provenance": REASON})
    grade = builders.bleeding_grade(patient_id, "2025-03-10T10:00:00Z", 2)
    await create(client, {**grade, "status": "corrected"})
    event = builders.adverse_event(patient_id, "2025-03-11", bleeding=True)
    await create(client, {**event, "actuality": "potential"})
    db = app.state.services.db
    for zone in (ZoneInfo("UTC"), ZoneInfo("America/New_York")):
        async with db.read() as conn:
            rows = await repo.patient_fact_rows(conn, patient_id, ENGINE_KINDS)
        timeline = response.timeline_from_rows(patient_id, rows, zone)
        assert timeline.patient == patient_id
        # Times with a time of day are those instants; a bare date is that calendar day
        # where the trial is, from midnight in its zone. The deleted count is not read, and
        # each record's own status comes along.
        assert sorted((c.time, c.value, c.status) for c in timeline.counts) == [
            (datetime(2025, 3, 3, 7, tzinfo=UTC), 12, "final"),
            (datetime(2025, 3, 10, tzinfo=zone), 60, "final"),
            (datetime(2025, 3, 12, 8, tzinfo=UTC), 65, "amended"),
            (datetime(2025, 3, 17, 3, 30, tzinfo=UTC), 70, "final"),
        ]
        assert [(b.time, b.grade, b.status) for b in timeline.bleeding_assessments] == [
            (datetime(2025, 3, 10, 10, tzinfo=UTC), 2, "corrected")
        ]
        assert [(e.time, e.status) for e in timeline.bleeding_events] == [
            (datetime(2025, 3, 11, tzinfo=zone), "potential")
        ]
        assert [(a.time, a.role) for a in timeline.administrations] == [
            (datetime(2025, 3, 3, 8, tzinfo=UTC), "study-drug")
        ]


async def _search_rows(db, pk: int) -> dict[str, list[tuple]]:
    from sqlalchemy import select

    from app.store.tables import quantity_table, string_table, token_table

    rows = {}
    async with db.read() as conn:
        for name, table in (
            ("token", token_table),
            ("string", string_table),
            ("quantity", quantity_table),
        ):
            columns = [c for c in table.c if c.name not in ("pk", "resource_pk")]
            query = select(*columns).where(table.c.resource_pk == pk)
            rows[name] = sorted(tuple(row) for row in (await conn.execute(query)).all())
    return rows


async def test_status_writes_skip_the_tables_it_has_no_values_in(client, app) -> None:
    """The status Observation has token search values only (repo.TOKEN_ONLY_KINDS): its
    updates and deletion issue no DELETE on the string and quantity tables, and its search
    values stay exactly those of its current version."""
    import orjson
    from sqlalchemy import event

    from app.kit.codes import KIND_RESPONSE_STATUS
    from app.services.indexing import search_values

    assert KIND_RESPONSE_STATUS in repo.TOKEN_ONLY_KINDS
    db = app.state.services.db
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(" ".join(statement.split()).lower())

    patient_id = (await create(client, builders.patient())).json()["id"]
    await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
    await create(client, builders.platelet_count(patient_id, "2025-03-03T07:00:00Z", 12))
    status_id = response.response_observation_id(patient_id)
    versions = []
    event.listen(db.writer.sync_engine, "before_cursor_execute", record)
    try:
        for day, value in ((10, 60), (17, 70), (24, 20), (31, 150)):
            await create(client, builders.platelet_count(patient_id, f"2025-03-{day}", value))
            versions.append((await client.get(f"/fhir/Observation/{status_id}")).json())
    finally:
        event.remove(db.writer.sync_engine, "before_cursor_execute", record)
    deletes = [s for s in statements if s.startswith("delete from search_")]
    assert len({v["meta"]["versionId"] for v in versions}) == len(versions)  # each changed it
    assert deletes and all(s.startswith("delete from search_token ") for s in deletes), deletes

    async with db.read() as conn:
        current = await repo.get_current(conn, "Observation", status_id)
    assert current is not None and current.kind == KIND_RESPONSE_STATUS
    stored = await _search_rows(db, current.pk)
    expected = search_values(
        "Observation", orjson.loads(current.content), app.state.services.codes, current.kind
    )
    assert stored["string"] == [] and stored["quantity"] == []
    assert stored["token"] == sorted(("Observation", p, s, v) for p, s, v in expected.tokens) != []

    # Its deletion (the Patient's) removes its token values too.
    listing = (await client.get(f"/fhir/Observation?patient={patient_id}&_count=100")).json()
    for entry in listing.get("entry", []):
        if entry["resource"]["id"] != status_id:
            await client.delete(
                f"/fhir/Observation/{entry['resource']['id']}", headers={"X-Provenance": REASON}
            )
    doses = (await client.get(f"/fhir/MedicationAdministration?patient={patient_id}")).json()
    for entry in doses.get("entry", []):
        await client.delete(
            f"/fhir/MedicationAdministration/{entry['resource']['id']}",
            headers={"X-Provenance": REASON},
        )
    deleted = await client.delete(f"/fhir/Patient/{patient_id}", headers={"X-Provenance": REASON})
    assert deleted.status_code in (200, 204), deleted.text
    async with db.read() as conn:
        gone = await repo.get_current(conn, "Observation", status_id)
    assert gone is not None and gone.deleted
    assert await _search_rows(db, gone.pk) == {"token": [], "string": [], "quantity": []}


async def test_a_token_only_kind_refuses_other_search_values(app) -> None:
    """Skipping the string and quantity DELETEs is safe only while those kinds never get
    such values: the repository refuses them rather than leave stale rows behind."""
    import pytest

    index = repo.IndexRow(
        patient_id=None,
        effective_start=None,
        effective_end=None,
        value_norm=None,
        kind="response-status",
        status="final",
        site=None,
        tokens=[("code", "s", "c")],
        quantities=[("value-quantity", 1.0, "", "", None)],
    )
    async with app.state.services.db.write() as conn:
        with pytest.raises(ValueError, match="token search values only"):
            await repo.insert_search_values(conn, 1, "Observation", index)
