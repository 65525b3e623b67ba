"""Conditional update and delete (`PUT`/`DELETE /fhir/Type?criteria`) and conditional create
with its criteria in the query (fhirpy's `create(**params)` and `get_or_create`): the same
answers as HAPI FHIR, race-free, audited, and never a mass write."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests import builders
from tests.conftest import REASON, bearer, without_reason
from tests.test_audit import _events
from tests.test_crud import create

SUBJECT = f"{builders.SUBJECT_SYSTEM}|S01-042"
JSON = {"Content-Type": "application/json"}  # what fhirpy sends


async def _matches(client, subject: str = SUBJECT) -> list[dict]:
    found = (await client.get("/fhir/Patient", params={"identifier": subject})).json()
    return [e["resource"] for e in found.get("entry", []) if e["search"]["mode"] == "match"]


async def test_no_match_creates_one_match_updates_it(app, client):
    body = builders.patient("S01-042")  # no id, as fhirpy sends it
    created = await client.put("/fhir/Patient", params={"identifier": SUBJECT}, json=body)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    assert created.headers["location"] == f"/fhir/Patient/{patient_id}/_history/1"
    updated = await client.put(
        "/fhir/Patient",
        params={"identifier": SUBJECT},
        json={**body, "gender": "male"},
        headers=JSON,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == patient_id
    assert updated.headers["etag"] == 'W/"2"'
    [stored] = await _matches(client)
    assert stored["gender"] == "male" and stored["meta"]["versionId"] == "2"
    events = await _events(client, app, entity=f"Patient/{patient_id}")
    # The writes (reads, and the searches that showed the Patient, are R and E).
    writes = [e["action"] for e in events if e["outcome"] == "0" and e["action"] in "CUD"]
    assert sorted(writes) == ["C", "U"]


async def test_the_body_id_must_be_the_matchs(client):
    body = builders.patient("S01-042")
    patient_id = (await create(client, body)).json()["id"]
    wrong = await client.put(
        "/fhir/Patient", params={"identifier": SUBJECT}, json={**body, "id": "someone-else"}
    )
    assert wrong.status_code == 400
    assert wrong.json()["issue"][0]["expression"] == ["Patient.id"]
    right = await client.put(
        "/fhir/Patient", params={"identifier": SUBJECT}, json={**body, "id": patient_id}
    )
    assert right.status_code == 200


async def test_no_match_with_a_body_id_creates_there_or_is_409_if_it_is_taken(client):
    body = {**builders.patient("S01-042"), "id": "chosen-1"}
    created = await client.put("/fhir/Patient", params={"identifier": SUBJECT}, json=body)
    assert created.status_code == 201
    assert created.json()["id"] == "chosen-1"
    other = (await create(client, builders.patient("S01-043"))).json()
    taken = await client.put(
        "/fhir/Patient",
        params={"identifier": f"{builders.SUBJECT_SYSTEM}|S01-044"},
        json={**builders.patient("S01-044"), "id": other["id"]},
    )
    assert taken.status_code == 409
    assert (await client.get(f"/fhir/Patient/{other['id']}")).json() == other


async def test_several_matches_are_412_and_nothing_changes(client):
    # A subject number is unique (test_subjects.py); a hospital record number may be shared.
    first = (await create(client, builders.with_mrn(builders.patient("S01-042"), "H-1"))).json()
    await create(client, builders.with_mrn(builders.patient("S01-043"), "H-1"))
    shared = {"identifier": f"{builders.MRN_SYSTEM}|H-1"}
    response = await client.put(
        "/fhir/Patient", params=shared, json={**builders.patient("S01-042"), "gender": "male"}
    )
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"
    deleted = await client.delete("/fhir/Patient", params=shared)
    assert deleted.status_code == 412
    assert (await client.get(f"/fhir/Patient/{first['id']}")).json() == first
    assert len(await _matches(client, shared["identifier"])) == 2


async def test_an_update_of_a_match_needs_a_reason_and_honours_if_match(client):
    body = builders.patient("S01-042")
    await create(client, body)
    changed = {**body, "gender": "male"}
    params = {"identifier": SUBJECT}
    no_reason = await without_reason(client, "PUT", "/fhir/Patient", params=params, json=changed)
    assert no_reason.status_code == 400
    assert no_reason.json()["issue"][0]["code"] == "required"
    stale = await client.put(
        "/fhir/Patient", params=params, json=changed, headers={"If-Match": 'W/"7"'}
    )
    assert stale.status_code == 412
    [stored] = await _matches(client)
    assert stored["meta"]["versionId"] == "1" and stored["gender"] == "female"


async def test_criteria_are_required_and_limited_to_tokens_and_the_patient(client):
    body = builders.patient("S01-042")
    for params in (
        {},
        {"name": "Doe"},
        {"birthdate": "1968"},
        {"_count": "1"},
        {"identifier": ""},
        {"_id": "not an id"},  # the schema's id grammar: refused, not "no match"
    ):
        response = await client.put("/fhir/Patient", params=params, json=body)
        assert response.status_code == 400, params
        assert response.json()["resourceType"] == "OperationOutcome"
        deleted = await client.delete("/fhir/Patient", params=params)
        assert deleted.status_code == 400, params
    assert await _matches(client) == []


async def test_delete_without_criteria_deletes_nothing(client):
    patient = (await create(client, builders.patient())).json()
    assert (await client.delete("/fhir/Patient")).status_code == 400
    assert (await client.delete("/fhir/Patient", params={"_format": "json"})).status_code == 400
    assert (await client.get(f"/fhir/Patient/{patient['id']}")).status_code == 200


async def test_conditional_delete_of_one_none_and_its_reason(app, client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    count = builders.platelet_count(
        patient_id,
        "2025-03-10",
        40,
        identifier=[{"system": "https://lab.example/results", "value": "R-1"}],
    )
    count_id = (await create(client, count)).json()["id"]
    params = {"identifier": "https://lab.example/results|R-1"}
    no_reason = await without_reason(client, "DELETE", "/fhir/Observation", params=params)
    assert no_reason.status_code == 400
    assert no_reason.json()["issue"][0]["code"] == "required"
    assert (await client.get(f"/fhir/Observation/{count_id}")).status_code == 200
    deleted = await client.delete("/fhir/Observation", params=params)
    assert deleted.status_code == 204
    assert deleted.headers["etag"] == 'W/"2"'
    assert (await client.get(f"/fhir/Observation/{count_id}")).status_code == 410
    again = await client.delete(
        "/fhir/Observation", params=params, headers={"Prefer": "return=OperationOutcome"}
    )
    assert again.status_code == 200
    assert "nothing was deleted" in again.json()["issue"][0]["diagnostics"]
    events = await _events(client, app, entity=f"Observation/{count_id}", action="D")
    assert [e["outcome"] for e in events] == ["0"]


async def test_a_lab_cannot_conditionally_delete(client):
    response = await client.delete(
        "/fhir/Observation",
        params={"identifier": "x|y"},
        headers=bearer("lab", ("S01",)),
    )
    assert response.status_code == 403


async def test_conditional_create_in_the_query_as_fhirpy_sends_it(client):
    body = builders.patient("S01-042")
    first = await client.post(
        "/fhir/Patient", params={"identifier": SUBJECT}, json=body, headers=JSON
    )
    assert first.status_code == 201
    second = await client.post("/fhir/Patient", params={"identifier": SUBJECT}, json=body)
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    header = await client.post(
        "/fhir/Patient", json=body, headers={"If-None-Exist": f"identifier={SUBJECT}"}
    )
    assert header.json()["id"] == first.json()["id"]
    both = await client.post(
        "/fhir/Patient",
        params={"identifier": SUBJECT},
        json=body,
        headers={"If-None-Exist": f"identifier={SUBJECT}"},
    )
    assert both.status_code == 400
    unknown = await client.post("/fhir/Patient", params={"name": "Doe"}, json=body)
    assert unknown.status_code == 400
    other = builders.patient("S01-043")
    plain = await client.post("/fhir/Patient", params={"_format": "json"}, json=other)
    assert plain.status_code == 201  # _format is no criterion
    assert len(await _matches(client)) == 1


async def test_a_lab_may_conditionally_update_its_result(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    lab = {**bearer("lab", ("S01",)), "X-Provenance": REASON}
    identifier = [{"system": "https://lab.example/results", "value": "R-9"}]
    params = {"identifier": "https://lab.example/results|R-9"}
    for value, status in ((40, 201), (45, 200)):
        body = builders.platelet_count(patient_id, "2025-03-10", value, identifier=identifier)
        response = await client.put("/fhir/Observation", params=params, json=body, headers=lab)
        assert response.status_code == status, response.text
    found = (await client.get("/fhir/Observation", params=params)).json()
    [entry] = found["entry"]
    assert entry["resource"]["valueQuantity"]["value"] == 45


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_twenty_simultaneous_conditional_updates_leave_one(live_server):
    async with httpx.AsyncClient(
        base_url=live_server,
        limits=httpx.Limits(max_connections=20),
        timeout=60,
        headers={**bearer("admin"), "X-Provenance": REASON},
    ) as http:

        async def attempt(number: int) -> httpx.Response:
            body = {**builders.patient("S01-042"), "gender": ("male", "female")[number % 2]}
            if number % 5 == 0:  # conditional creates of the same criteria join the race
                return await http.post("/fhir/Patient", params={"identifier": SUBJECT}, json=body)
            return await http.put("/fhir/Patient", params={"identifier": SUBJECT}, json=body)

        responses = await asyncio.gather(*(attempt(n) for n in range(20)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 19 + [201], statuses
        assert len({r.json()["id"] for r in responses}) == 1
        [stored] = await _matches(http)
        # One version for the create (by whichever request won), one per update.
        updates = sum(1 for n, r in enumerate(responses) if n % 5 and r.status_code == 200)
        assert int(stored["meta"]["versionId"]) == 1 + updates
