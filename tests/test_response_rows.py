"""The recompute's fast read path (issue 8) gives the engine exactly the timeline the plain
one does, on both databases: same rows, same times (bare dates in the trial's zone)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from app.services import response
from app.services.response import ENGINE_KINDS
from app.store import repository as repo
from tests import builders
from tests.conftest import REASON
from tests.test_crud import create


async def test_fact_rows_give_the_same_timeline(client, app) -> None:
    patient_id = (await create(client, builders.patient())).json()["id"]
    await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
    await create(client, builders.platelet_count(patient_id, "2025-03-03T07:00:00Z", 12))
    await create(client, builders.platelet_count(patient_id, "2025-03-10", 60))  # a bare date
    await create(client, builders.platelet_count(patient_id, "2025-03-17T09:00:00+05:30", 70))
    gone = (await create(client, builders.platelet_count(patient_id, "2025-03-18", 5))).json()
    await client.delete(f"/fhir/Observation/{gone['id']}", headers={"X-Provenance": REASON})
    await create(client, builders.bleeding_grade(patient_id, "2025-03-10T10:00:00Z", 2))
    await create(client, builders.adverse_event(patient_id, "2025-03-11", bleeding=True))
    db = app.state.services.db
    for zone in (ZoneInfo("UTC"), ZoneInfo("America/New_York")):
        async with db.read() as conn:
            facts = await repo.patient_facts(conn, patient_id, ENGINE_KINDS)
            rows = await repo.patient_fact_rows(conn, patient_id, ENGINE_KINDS)
        plain = response.timeline(patient_id, facts, zone)
        fast = response.timeline_from_rows(patient_id, rows, zone)
        key = lambda item: item.id  # noqa: E731 - the database returns rows in any order
        for field in ("counts", "bleeding_assessments", "bleeding_events", "administrations"):
            assert sorted(getattr(fast, field), key=key) == sorted(getattr(plain, field), key=key)
        assert len(fast.counts) == 3 and len(fast.bleeding_events) == 1
