"""PATCH: JSON Patch (RFC 6902) and JSON Merge Patch (RFC 7386), each an update in every
respect: validated, versioned, with its reason, If-Match and audit record (both databases)."""

from __future__ import annotations

import orjson

from app.services.response import response_observation_id
from tests import builders
from tests.conftest import bearer, without_reason
from tests.test_audit import _details, _events
from tests.test_crud import create

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


async def _patch(client, path: str, document, content_type: str = JSON_PATCH, **headers: str):
    return await client.patch(
        path, content=orjson.dumps(document), headers={"Content-Type": content_type, **headers}
    )


async def test_json_patch_changes_the_resource_as_an_audited_update(app, client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    response = await _patch(
        client,
        path,
        [
            {"op": "test", "path": "/gender", "value": "female"},
            {"op": "replace", "path": "/gender", "value": "male"},
            {"op": "add", "path": "/name", "value": [{"family": "Doe"}]},
        ],
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'
    body = response.json()
    assert body["gender"] == "male" and body["name"] == [{"family": "Doe"}]
    assert body["meta"]["versionId"] == "2"
    assert (await client.get(path)).json() == body
    assert (await client.get(f"{path}/_history/1")).json()["gender"] == "female"
    updates = await _events(client, app, entity=f"Patient/{patient['id']}", action="U")
    assert len(updates) == 1
    details = _details(updates[0])
    assert details["version-before"] == "1" and details["version-after"] == "2"
    assert details["reason"] == "test correction"
    assert "patch" in updates[0]["outcomeDesc"]


async def test_merge_patch_sets_and_removes_elements(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    response = await _patch(client, path, {"birthDate": None, "gender": "other"}, MERGE_PATCH)
    assert response.status_code == 200, response.text
    stored = (await client.get(path)).json()
    assert "birthDate" not in stored and stored["gender"] == "other"
    assert stored["identifier"] == patient["identifier"]


async def test_a_json_object_as_fhir_json_is_a_merge_patch_as_fhirpy_sends_it(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    for content_type, gender in (("application/fhir+json", "male"), ("application/json", "other")):
        document = {"resourceType": "Patient", "gender": gender}
        response = await _patch(client, path, document, content_type)
        assert response.status_code == 200, response.text
        assert (await client.get(path)).json()["gender"] == gender
    assert (await client.get(path)).json()["meta"]["versionId"] == "3"


async def test_a_patch_needs_a_reason(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    document = [{"op": "replace", "path": "/gender", "value": "male"}]
    response = await without_reason(
        client,
        "PATCH",
        path,
        content=orjson.dumps(document),
        headers={"Content-Type": JSON_PATCH},
    )
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "required"
    assert (await client.get(path)).json() == patient


async def test_if_match_is_honoured(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    document = [{"op": "replace", "path": "/gender", "value": "male"}]
    assert (await _patch(client, path, document, **{"If-Match": 'W/"1"'})).status_code == 200
    stale = await _patch(client, path, document, **{"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(path)).json()["meta"]["versionId"] == "2"


async def test_a_failed_test_or_a_missing_path_is_422_and_changes_nothing(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    for document in (
        [
            {"op": "test", "path": "/gender", "value": "male"},
            {"op": "replace", "path": "/gender", "value": "other"},
        ],
        [{"op": "remove", "path": "/deceasedBoolean"}],
    ):
        response = await _patch(client, path, document)
        assert response.status_code == 422, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(path)).json() == patient


async def test_the_result_is_validated_like_an_update(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    response = await _patch(client, path, [{"op": "replace", "path": "/gender", "value": "x"}])
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["Patient.gender"]
    for document in (
        [{"op": "replace", "path": "/id", "value": "other-id"}],
        [{"op": "remove", "path": "/id"}],
        [{"op": "replace", "path": "/resourceType", "value": "Observation"}],
    ):
        assert (await _patch(client, path, document)).status_code == 422, document
    merged = await _patch(client, path, {"id": "other-id"}, MERGE_PATCH)
    assert merged.status_code == 422
    assert (await client.get(path)).json() == patient


async def test_malformed_patches_are_400_and_other_media_types_415(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    for document in (
        [],
        [{"op": "bogus", "path": "/gender"}],
        [{"op": "replace", "path": "gender", "value": "male"}],
        [{"op": "add", "path": "/gender"}],
        [{"op": "move", "path": "/gender"}],
        {"gender": "male"},  # an object is not a JSON Patch
    ):
        assert (await _patch(client, path, document)).status_code == 400, document
    assert (await _patch(client, path, [1, 2], MERGE_PATCH)).status_code == 400
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "operation"}]}
    assert (await _patch(client, path, parameters, "application/fhir+json")).status_code == 400
    response = await client.patch(
        path, content=b"gender=male", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert (await client.get(path)).json() == patient


async def test_missing_deleted_and_server_owned_resources(client):
    document = [{"op": "replace", "path": "/status", "value": "amended"}]
    assert (await _patch(client, "/fhir/Observation/nothing-here", document)).status_code == 404
    patient_id = (await create(client, builders.patient())).json()["id"]
    count = (await create(client, builders.platelet_count(patient_id, "2025-03-10", 40))).json()
    await client.delete(f"/fhir/Observation/{count['id']}")
    assert (await _patch(client, f"/fhir/Observation/{count['id']}", document)).status_code == 410
    status_id = response_observation_id(patient_id)
    assert (await _patch(client, f"/fhir/Observation/{status_id}", document)).status_code == 403


async def test_a_patched_count_is_reassessed_and_a_lab_keeps_to_counts(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    count = (
        await create(client, builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 40))
    ).json()
    path = f"/fhir/Observation/{count['id']}"
    document = [{"op": "replace", "path": "/valueQuantity/value", "value": 20000}]
    document.append({"op": "replace", "path": "/valueQuantity/unit", "value": "/uL"})
    document.append({"op": "replace", "path": "/valueQuantity/code", "value": "/uL"})
    lab = {**bearer("lab", ("S01",)), "X-Provenance": client.headers["X-Provenance"]}
    response = await _patch(client, path, document, **lab)
    assert response.status_code == 200, response.text
    found = await client.get(
        "/fhir/Observation", params={"value-quantity": f"eq20|{builders.UCUM}|10*9/L"}
    )
    assert [e["resource"]["id"] for e in found.json().get("entry", [])] == [count["id"]]
    into_grade = [
        {
            "op": "replace",
            "path": "/code",
            "value": {"coding": [{"system": builders.TRIAL_CODES, "code": "who-bleeding-grade"}]},
        },
        {"op": "remove", "path": "/valueQuantity"},
        {"op": "add", "path": "/valueInteger", "value": 1},
    ]
    assert (await _patch(client, path, into_grade, **lab)).status_code == 403
    assert (await client.get(path)).json()["meta"]["versionId"] == "2"
