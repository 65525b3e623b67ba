"""Integrity edges: reserved ids, forged statuses, concurrent writes to one id or across two
patients, calendar days in a non-UTC trial, and errors that must stay OperationOutcomes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.engine import Criteria
from app.main import create_app
from app.services.response import response_observation_id
from tests import builders
from tests.conftest import KEY, REASON, bearer
from tests.test_crud import create
from tests.test_response_api import enrol_and_treat, post_count, status_of


async def test_reserved_response_ids_cannot_be_taken_by_a_client(client):
    future_id = response_observation_id("S02-FUTURE")
    body = {**builders.platelet_count("x", "2025-03-10", 40), "id": future_id}
    patient_id = (await create(client, builders.patient())).json()["id"]
    body["subject"] = {"reference": f"Patient/{patient_id}"}
    response = await client.put(f"/fhir/Observation/{future_id}", json=body)
    assert response.status_code == 403
    assert (await client.get(f"/fhir/Observation/{future_id}")).status_code == 404


async def test_a_status_coding_beside_a_platelet_coding_is_still_server_owned(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    forged = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 150)
    forged["code"]["coding"].append(
        {
            "system": "https://itp-trial.example/fhir/CodeSystem/trial-codes",
            "code": "itp-response-status",
        }
    )
    response = await client.post("/fhir/Observation", json=forged, headers=bearer("lab", ("S01",)))
    assert response.status_code == 403


async def test_concurrent_update_as_create_of_one_new_id(live_server):
    headers = {**bearer(), "X-Provenance": REASON}
    async with httpx.AsyncClient(base_url=live_server, headers=headers, timeout=60) as http:
        body = {**builders.patient(), "id": "new-subject-1"}
        responses = await asyncio.gather(
            *(http.put("/fhir/Patient/new-subject-1", json=body) for _ in range(8))
        )
        assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
        history = (await http.get("/fhir/Patient/new-subject-1/_history")).json()
        assert len(history.get("entry", [])) == 8


async def test_records_swapped_between_two_patients_at_once_never_deadlock(live_server):
    headers = {**bearer(), "X-Provenance": REASON}
    async with httpx.AsyncClient(base_url=live_server, headers=headers, timeout=60) as http:
        a = (await http.post("/fhir/Patient", json=builders.patient("S01-A"))).json()["id"]
        b = (await http.post("/fhir/Patient", json=builders.patient("S01-B"))).json()["id"]
        on_a = (
            await http.post(
                "/fhir/Observation", json=builders.platelet_count(a, "2025-03-10T09:00:00Z", 40)
            )
        ).json()
        on_b = (
            await http.post(
                "/fhir/Observation", json=builders.platelet_count(b, "2025-03-10T09:00:00Z", 50)
            )
        ).json()

        async def move(record: dict, to: str) -> int:
            body = {**record, "subject": {"reference": f"Patient/{to}"}}
            response = await http.put(f"/fhir/Observation/{record['id']}", json=body)
            return response.status_code

        for _ in range(5):
            statuses = await asyncio.gather(
                move(on_a, b), move(on_b, a), move(on_a, a), move(on_b, b)
            )
            assert set(statuses) == {200}, statuses


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_bare_dates_are_calendar_days_of_the_trial_time_zone(settings):
    app = create_app(settings, criteria=Criteria(trial_timezone="America/New_York"), key_source=KEY)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", headers=bearer()) as client,
    ):
        patient_id = await enrol_and_treat(client, (10, "10*9/L"))
        # Worked example 8, with the bleeding grade dated by day only.
        await create(client, builders.bleeding_grade(patient_id, "2025-03-10", 2))
        for day, value in (("03-10", 60), ("03-17", 65), ("03-24", 70)):
            await post_count(client, patient_id, day, value)
        assessment = await status_of(client, patient_id)
        assert assessment["response_date"] == "2025-03-17"
        assert assessment["time_to_response_days"] == 14


async def test_dates_beyond_the_calendar_are_400_not_500(client):
    response = await client.get("/fhir/Observation", params={"date": "0001-01-01T00:30:00+01:00"})
    assert response.status_code == 400


async def test_even_a_500_carries_the_security_headers_and_request_id(client, monkeypatch):
    from app.services import resources

    async def explode(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(resources, "read", explode)
    response = await client.get("/fhir/Patient/abc")
    assert response.status_code == 500
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]


async def test_attempts_to_change_the_audit_trail_are_audited(app, client):
    await client.delete("/fhir/AuditEvent/some-id")
    await app.state.services.audit.flush()
    bundle = (await client.get("/fhir/AuditEvent", params={"action": "D"})).json()
    refused = [e["resource"] for e in bundle.get("entry", []) if e["resource"]["outcome"] == "4"]
    assert refused and "405" in refused[0]["outcomeDesc"]
