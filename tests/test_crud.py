"""The FHIR interactions on the four resources (both databases)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

import httpx
import orjson
import pytest

from app.cli import render_openapi
from app.fhir.examples import EXAMPLE_PATIENT_ID
from tests import builders

FHIR = "application/fhir+json"


async def create(client: httpx.AsyncClient, resource: dict, **headers: str) -> httpx.Response:
    response = await client.post(
        f"/fhir/{resource['resourceType']}",
        json=resource,
        headers={"Content-Type": FHIR, **headers},
    )
    assert response.status_code == 201, response.text
    return response


async def new_patient(client: httpx.AsyncClient, subject: str = "S01-001") -> str:
    return (await create(client, builders.patient(subject))).json()["id"]


async def test_create_answers_201_with_location_etag_and_last_modified(client):
    response = await create(client, builders.patient())
    body = response.json()
    assert response.headers["location"] == f"/fhir/Patient/{body['id']}/_history/1"
    assert response.headers["etag"] == 'W/"1"'
    assert parsedate_to_datetime(response.headers["last-modified"]) is not None
    assert response.headers["content-type"].startswith(FHIR)
    assert body["meta"]["versionId"] == "1"
    assert body["identifier"][0]["value"] == "S01-001"


async def test_create_ignores_a_client_supplied_id(client):
    response = await create(client, {**builders.patient(), "id": "chosen-by-client"})
    assert response.json()["id"] != "chosen-by-client"


@pytest.mark.parametrize("kind", ["Observation", "MedicationAdministration", "AdverseEvent"])
async def test_each_clinical_resource_round_trips(client, kind):
    patient_id = await new_patient(client)
    resource = {
        "Observation": builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42),
        "MedicationAdministration": builders.administration(patient_id, "2025-03-03T08:00:00Z"),
        "AdverseEvent": builders.adverse_event(patient_id, "2025-03-05"),
    }[kind]
    created = (await create(client, resource)).json()
    read = await client.get(f"/fhir/{kind}/{created['id']}")
    assert read.status_code == 200
    assert read.headers["etag"] == 'W/"1"'
    assert read.json() == created
    for key, value in resource.items():
        assert read.json()[key] == value


async def test_update_versions_and_vread_returns_each_version(client):
    created = (await create(client, builders.patient())).json()
    changed = {**created, "gender": "male"}
    response = await client.put(
        f"/fhir/Patient/{created['id']}", json=changed, headers={"If-Match": 'W/"1"'}
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'
    assert response.json()["meta"]["versionId"] == "2"
    first = await client.get(f"/fhir/Patient/{created['id']}/_history/1")
    second = await client.get(f"/fhir/Patient/{created['id']}/_history/2")
    assert first.json()["gender"] == "female"
    assert second.json()["gender"] == "male"
    assert second.headers["etag"] == 'W/"2"'


async def test_stale_if_match_gives_412_and_changes_nothing(client):
    created = (await create(client, builders.patient())).json()
    await client.put(f"/fhir/Patient/{created['id']}", json={**created, "gender": "male"})
    stale = await client.put(
        f"/fhir/Patient/{created['id']}",
        json={**created, "gender": "other"},
        headers={"If-Match": 'W/"1"'},
    )
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    current = await client.get(f"/fhir/Patient/{created['id']}")
    assert current.json()["gender"] == "male"
    stale_delete = await client.delete(
        f"/fhir/Patient/{created['id']}", headers={"If-Match": 'W/"1"'}
    )
    assert stale_delete.status_code == 412
    assert (await client.get(f"/fhir/Patient/{created['id']}")).status_code == 200


async def test_update_as_create_with_a_client_id(client):
    resource = {**builders.patient(), "id": "subject-7"}
    response = await client.put("/fhir/Patient/subject-7", json=resource)
    assert response.status_code == 201
    assert response.headers["location"] == "/fhir/Patient/subject-7/_history/1"
    assert (await client.get("/fhir/Patient/subject-7")).json()["id"] == "subject-7"


async def test_update_id_mismatch_and_missing_id_are_400(client):
    created = (await create(client, builders.patient())).json()
    mismatch = await client.put(f"/fhir/Patient/{created['id']}", json={**created, "id": "x"})
    assert mismatch.status_code == 400
    missing = await client.put(f"/fhir/Patient/{created['id']}", json=builders.patient())
    assert missing.status_code == 400
    assert mismatch.json()["issue"][0]["expression"] == ["Patient.id"]


async def test_delete_gives_410_and_keeps_history(client):
    patient_id = await new_patient(client)
    obs = (await create(client, builders.platelet_count(patient_id, "2025-03-10", 40))).json()
    deleted = await client.delete(f"/fhir/Observation/{obs['id']}")
    assert deleted.status_code == 204
    assert deleted.headers["etag"] == 'W/"2"'
    gone = await client.get(f"/fhir/Observation/{obs['id']}")
    assert gone.status_code == 410
    assert gone.json()["issue"][0]["code"] == "deleted"
    assert (await client.get(f"/fhir/Observation/{obs['id']}/_history/1")).json() == obs
    history = (await client.get(f"/fhir/Observation/{obs['id']}/_history")).json()
    assert history["type"] == "history"
    assert [e["request"]["method"] for e in history.get("entry", [])] == ["DELETE", "POST"]
    assert "resource" not in history.get("entry", [])[0]
    assert history.get("entry", [])[1]["resource"] == obs
    again = await client.delete(f"/fhir/Observation/{obs['id']}")
    assert again.status_code == 204
    assert "etag" not in again.headers


async def test_update_after_delete_restores_with_a_new_version(client):
    created = (await create(client, builders.patient())).json()
    await client.delete(f"/fhir/Patient/{created['id']}")
    restored = await client.put(f"/fhir/Patient/{created['id']}", json=created)
    assert restored.status_code == 201
    assert restored.headers["etag"] == 'W/"3"'


async def test_patient_with_records_cannot_be_deleted(client):
    patient_id = await new_patient(client)
    await create(client, builders.platelet_count(patient_id, "2025-03-10", 40))
    response = await client.delete(f"/fhir/Patient/{patient_id}")
    assert response.status_code == 409
    assert (await client.get(f"/fhir/Patient/{patient_id}")).status_code == 200


async def test_missing_resources_are_404_outcomes(client):
    for path in (
        "/fhir/Patient/nope",
        "/fhir/Patient/nope/_history/1",
        "/fhir/Patient/nope/_history",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["issue"][0]["code"] == "not-found"
    assert (await client.delete("/fhir/Patient/nope")).status_code == 404


async def test_type_history_pages_newest_first(client):
    ids = [await new_patient(client, f"S01-00{i}") for i in range(5)]
    seen = []
    url = "/fhir/Patient/_history?_count=2"
    while url:
        page = (await client.get(url)).json()
        seen += [entry["resource"]["id"] for entry in page.get("entry", [])]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == list(reversed(ids))


@pytest.mark.parametrize(
    ("prefer", "expect"),
    [
        ("return=minimal", None),
        ("return=representation", "Patient"),
        ("return=OperationOutcome", "OperationOutcome"),
    ],
)
async def test_prefer_return_is_honoured(client, prefer, expect):
    response = await client.post(
        "/fhir/Patient", json=builders.patient(), headers={"Prefer": prefer}
    )
    assert response.status_code == 201
    assert response.headers["etag"] == 'W/"1"'
    if expect is None:
        assert response.content == b""
    else:
        assert response.json()["resourceType"] == expect


async def test_metadata_lists_exactly_what_is_implemented(client):
    statement = (await client.get("/fhir/metadata")).json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.3.0"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {
        "Patient",
        "Observation",
        "MedicationAdministration",
        "AdverseEvent",
        "AuditEvent",
        "CodeSystem",
    }
    assert {op["name"] for op in statement["rest"][0]["operation"]} == {
        "export",
        "response-status",
        "response-summary",
    }
    # Bulk Data: system-level and Patient-level $export (tests/test_bulk_export.py).
    assert [op["name"] for op in resources["Patient"]["operation"]] == ["export"]
    assert statement["instantiates"] == [
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    ]
    audit = resources.pop("AuditEvent")
    resources.pop("CodeSystem")
    assert {i["code"] for i in audit["interaction"]} == {"read", "search-type"}
    for resource in resources.values():
        assert resource["updateCreate"] is True
        assert resource["conditionalCreate"] is True
        assert resource["conditionalUpdate"] is True
        assert resource["conditionalDelete"] == "single"
        assert "patch" in {i["code"] for i in resource["interaction"]}
    assert {i["code"] for i in statement["rest"][0]["interaction"]} == {"transaction", "batch"}
    assert statement["patchFormat"] == [
        "application/json-patch+json",
        "application/merge-patch+json",
    ]
    observation_params = {p["name"] for p in resources["Observation"]["searchParam"]}
    assert {"patient", "code", "date"} <= observation_params
    # Every declared search parameter is accepted in strict mode.
    for kind, resource in resources.items():
        for param in resource["searchParam"]:
            value = {
                "date": "ge2025-01-01",
                "reference": "x",
                "quantity": "lt30|http://unitsofmeasure.org|10*9/L",
                "number": "ge3",
            }.get(param["type"], "x")
            response = await client.get(
                f"/fhir/{kind}",
                params={param["name"]: value},
                headers={"Prefer": "handling=strict"},
            )
            assert response.status_code == 200, (kind, param["name"], response.text)


async def test_health_endpoints(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready"


async def test_the_projects_code_systems_are_served(client, anonymous):
    bundle = (await client.get("/fhir/CodeSystem")).json()
    ids = {e["resource"]["id"] for e in bundle["entry"]}
    assert ids == {"trial-codes", "medication-role", "itp-response"}
    response = (await client.get("/fhir/CodeSystem/itp-response")).json()
    assert response["url"] == "https://itp-trial.example/fhir/CodeSystem/itp-response"
    assert {c["code"] for c in response["concept"]} == {"CR", "R", "NR", "NE", "LOR"}
    by_url = (await client.get("/fhir/CodeSystem", params={"url": response["url"]})).json()
    assert [e["resource"]["id"] for e in by_url["entry"]] == ["itp-response"]
    assert (await client.get("/fhir/CodeSystem/nope")).status_code == 404
    assert (await anonymous.get("/fhir/CodeSystem")).status_code == 401


async def test_requests_take_no_thread_pool_hop(client, monkeypatch):
    """Every dependency is `async def`: FastAPI runs a sync one in its thread pool, two thread
    hops per request (bench/README.md). Not a timing: which dependencies FastAPI off-loads."""
    import fastapi.dependencies.utils

    offloaded: list[str] = []
    forward = fastapi.dependencies.utils.run_in_threadpool

    async def record(func, *args, **kwargs):
        offloaded.append(getattr(func, "__qualname__", repr(func)))
        return await forward(func, *args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", record)
    patient_id = await new_patient(client)
    for path in (
        "/fhir/metadata",
        f"/fhir/Patient/{patient_id}",
        f"/fhir/Patient?_id={patient_id}",
        f"/fhir/Patient/{patient_id}/_history",
        f"/fhir/Patient/{patient_id}/$response-status",
    ):
        assert (await client.get(path)).status_code < 500, path
    assert offloaded == []


async def test_the_documented_examples_are_stored(client):
    """Each request body example of the OpenAPI file (Swagger UI's "Try it out" starts from
    them; the fuzzer's examples phase sends them) is accepted as it is written."""
    spec = orjson.loads(render_openapi())
    examples = {
        path.rsplit("/", 1)[1]: next(iter(body["examples"].values()))["value"]
        for path, item in spec["paths"].items()
        if "post" in item
        for body in item["post"].get("requestBody", {}).get("content", {}).values()
        if "examples" in body
    }
    assert sorted(examples) == [
        "AdverseEvent",
        "MedicationAdministration",
        "Observation",
        "Patient",
    ]
    patient = {**examples.pop("Patient"), "id": EXAMPLE_PATIENT_ID}
    stored = await client.put(f"/fhir/Patient/{EXAMPLE_PATIENT_ID}", json=patient)
    assert stored.status_code == 201, stored.text
    for resource_type, example in examples.items():
        created = await create(client, example)
        assert created.status_code == 201, (resource_type, created.text)
        assert created.json()["subject"] == {"reference": f"Patient/{EXAMPLE_PATIENT_ID}"}
