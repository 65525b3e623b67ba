"""What the server refuses, and that a refused request writes nothing (both databases)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from app.kit import codes
from app.store.tables import resource_table
from tests import builders
from tests.conftest import without_reason
from tests.test_crud import create, new_patient


async def _count(client, kind: str) -> int:
    """Resources of `kind` stored by clients (the server's response status excluded)."""
    bundle = (await client.get(f"/fhir/{kind}?_count=1000")).json()
    return len(
        [
            e
            for e in bundle.get("entry", [])
            if e["search"]["mode"] == "match"
            and "itp-response-status" not in str(e["resource"].get("code"))
        ]
    )


def _expressions(response) -> list[str]:
    return [e for issue in response.json()["issue"] for e in issue.get("expression", [])]


async def test_malformed_json_is_400(client):
    for body in (b"{not json", b"", b"[1, 2]", b'"a string"'):
        response = await client.post(
            "/fhir/Patient", content=body, headers={"Content-Type": "application/fhir+json"}
        )
        assert response.status_code == 400, body
        assert response.json()["resourceType"] == "OperationOutcome"


async def test_resource_type_mismatch_or_missing_is_400(client):
    response = await client.post("/fhir/Observation", json=builders.patient())
    assert response.status_code == 400
    assert _expressions(response) == ["Observation.resourceType"]
    body = builders.patient()
    del body["resourceType"]
    response = await client.post("/fhir/Patient", json=body)
    assert response.status_code == 400
    assert _expressions(response) == ["Patient.resourceType"]


INVALID_PATIENTS = [
    ({"gender": "__not_in_enum__"}, "Patient.gender"),
    ({"birthDate": 0}, "Patient.birthDate"),
    ({"birthDate": "5000-11-31"}, "Patient.birthDate"),
    ({"birthDate": "1970-02-29"}, "Patient.birthDate"),
    ({"birthDate": None}, "Patient.birthDate"),
    ({"active": "true"}, "Patient.active"),
    ({"active": None}, "Patient.active"),
    ({"unknownElement": 1}, "Patient.unknownElement"),
    ({"identifier": [{"system": "has space", "value": "1"}]}, "Patient.identifier[0].system"),
    ({"identifier": [{"system": "", "value": "1"}]}, "Patient.identifier[0].system"),
    ({"identifier": []}, "Patient.identifier"),
    ({"identifier": [None]}, "Patient.identifier[0]"),
    ({"name": [{}]}, "Patient.name[0]"),
    ({"deceasedDateTime": "2025-03-10T09:00:00"}, "Patient.deceasedDateTime"),
    ({"managingOrganization": {"reference": 5}}, "Patient.managingOrganization.reference"),
    # Valid R4B, refused by the trial profile: no contained resources.
    (
        {"contained": [{"resourceType": "Practitioner", "id": "p1", "active": True}]},
        "Patient.contained",
    ),
    # A client's keys quoted in an expression are escaped like diagnostics: still FHIR strings.
    ({"\u001dm": 1}, "Patient.\\u001dm"),
]


@pytest.mark.parametrize(("change", "expression"), INVALID_PATIENTS)
async def test_invalid_patients_are_422_naming_the_element(client, change, expression):
    response = await client.post("/fhir/Patient", json={**builders.patient(), **change})
    assert response.status_code == 422, response.text
    assert expression in _expressions(response)
    assert await _count(client, "Patient") == 0


async def test_invalid_observation_fields(client):
    patient_id = await new_patient(client)
    good = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 40)
    cases = [
        ({"status": "done"}, "Observation.status"),
        ({"effectiveDateTime": 20250310}, "Observation.effectiveDateTime"),
        (
            {"valueQuantity": {**good["valueQuantity"], "value": "40"}},
            "Observation.valueQuantity.value",
        ),
        (
            {"valueQuantity": {**good["valueQuantity"], "comparator": "~"}},
            "Observation.valueQuantity.comparator",
        ),
    ]
    for change, expression in cases:
        response = await client.post("/fhir/Observation", json={**good, **change})
        assert response.status_code == 422, (change, response.text)
        assert expression in _expressions(response), (change, response.text)
    assert await _count(client, "Observation") == 0


async def test_subject_must_be_an_existing_patient(client):
    missing = builders.platelet_count("does-not-exist", "2025-03-10", 40)
    response = await client.post("/fhir/Observation", json=missing)
    assert response.status_code == 422
    assert _expressions(response) == ["Observation.subject"]
    no_subject = builders.platelet_count("x", "2025-03-10", 40)
    del no_subject["subject"]
    assert (await client.post("/fhir/Observation", json=no_subject)).status_code == 422
    group = {**missing, "subject": {"reference": "Group/1"}}
    response = await client.post("/fhir/Observation", json=group)
    assert response.status_code == 422
    assert await _count(client, "Observation") == 0


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (15000, "/uL", 15.0),
        (95000, "/mm3", 95.0),
        (102, "10*3/uL", 102.0),
        (110, "10*9/L", 110.0),
        (250000, "10*6/L", 250.0),
    ],
)
async def test_platelet_units_are_normalised_beside_what_was_sent(
    app, client, value, unit, expected
):
    patient_id = await new_patient(client)
    created = (
        await create(
            client, builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", value, unit=unit)
        )
    ).json()
    # What the lab sent is kept as sent.
    assert created["valueQuantity"]["value"] == value
    assert created["valueQuantity"]["code"] == unit
    # The normalised value sits beside it, in the index column search and the engine read.
    async with app.state.services.db.read() as conn:
        stored = (
            await conn.execute(
                select(resource_table.c.value_norm).where(resource_table.c.id == created["id"])
            )
        ).scalar_one()
    assert stored == pytest.approx(expected)


async def test_lab_unit_strings_without_ucum_code_are_mapped(client):
    patient_id = await new_patient(client)
    body = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42)
    body["valueQuantity"] = {"value": 42, "unit": "K/uL"}
    assert (await client.post("/fhir/Observation", json=body)).status_code == 201


async def test_unknown_platelet_unit_is_422_naming_it(client):
    patient_id = await new_patient(client)
    body = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42, unit="mg/dL")
    response = await client.post("/fhir/Observation", json=body)
    assert response.status_code == 422
    assert "mg/dL" in response.json()["issue"][0]["diagnostics"]
    assert _expressions(response) == ["Observation.valueQuantity.code"]
    assert await _count(client, "Observation") == 0


async def test_refused_update_leaves_the_resource_as_it_was(client):
    patient_id = await new_patient(client)
    created = (await create(client, builders.platelet_count(patient_id, "2025-03-10", 40))).json()
    bad = {**created, "valueQuantity": {**created["valueQuantity"], "code": "furlongs"}}
    response = await client.put(f"/fhir/Observation/{created['id']}", json=bad)
    assert response.status_code == 422
    current = await client.get(f"/fhir/Observation/{created['id']}")
    assert current.json() == created
    history = (await client.get(f"/fhir/Observation/{created['id']}/_history")).json()
    assert len(history.get("entry", [])) == 1


async def test_unsupported_formats(client):
    xml = await client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 406
    assert xml.json()["resourceType"] == "OperationOutcome"
    assert (await client.get("/fhir/metadata?_format=xml")).status_code == 406
    assert (await client.get("/fhir/metadata?_format=json")).status_code == 200
    wrong_type = await client.post(
        "/fhir/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}
    )
    assert wrong_type.status_code == 415


async def test_content_negotiation_json_only_and_pretty(client):
    created = (await client.post("/fhir/Patient", json=builders.patient())).json()
    path = f"/fhir/Patient/{created['id']}"
    for accept in ("application/fhir+json", "application/json", "*/*", "application/*"):
        response = await client.get(path, headers={"Accept": accept})
        assert response.status_code == 200, accept
        assert response.headers["content-type"].startswith("application/fhir+json")
    # Weight 0 means "not acceptable" (RFC 9110 12.4.2), whatever the type.
    for accept in ("application/fhir+json;q=0.8, application/xml", "*/*;q=0.5"):
        response = await client.get(path, headers={"Accept": accept})
        assert response.status_code == 200, accept
    refusals = (
        "application/fhir+xml",
        "application/xml",
        "text/html",
        "application/fhir+json;q=0, application/xml",
        "application/json; q=0.0, */*;q=0",
    )
    for accept in refusals:
        refused = await client.get(path, headers={"Accept": accept})
        assert refused.status_code == 406, accept
        assert refused.json()["resourceType"] == "OperationOutcome"
    # _format overrides Accept, as FHIR says.
    assert (
        await client.get(f"{path}?_format=json", headers={"Accept": "text/html"})
    ).status_code == 200
    for fmt in ("xml", "application/fhir+xml", "ttl"):
        assert (await client.get(f"{path}?_format={fmt}")).status_code == 406, fmt
    # Bundles negotiate too.
    bundle = {"resourceType": "Bundle", "type": "batch"}
    assert (await client.post("/fhir?_format=xml", json=bundle)).status_code == 406
    # _pretty=true indents the same document; without it the answer is compact.
    compact = await client.get(path)
    pretty = await client.get(f"{path}?_pretty=true")
    assert pretty.status_code == 200
    assert "\n  " in pretty.text and "\n" not in compact.text
    assert pretty.json() == compact.json()
    searched = await client.get(f"/fhir/Patient?_id={created['id']}&_pretty=true")
    assert "\n  " in searched.text


async def test_unknown_routes_and_methods_are_outcomes(client):
    unknown = await client.get("/fhir/Encounter/1")
    assert unknown.status_code == 404
    assert unknown.json()["resourceType"] == "OperationOutcome"
    method = await client.patch("/fhir/metadata", json={})
    assert method.status_code == 405
    assert method.json()["resourceType"] == "OperationOutcome"
    # A resource path matches only a FHIR id: a 65-character one names no resource, and a
    # method the type's _history does not serve is refused there, not read as an id.
    bad_id = await client.get("/fhir/Patient/" + "x" * 65)
    assert bad_id.status_code == 404
    assert bad_id.json()["resourceType"] == "OperationOutcome"
    history = await client.put("/fhir/Patient/_history", json={})
    assert history.status_code == 405
    assert history.headers["allow"] == "GET"
    assert history.json()["resourceType"] == "OperationOutcome"


async def test_diagnostics_quoting_the_request_stay_valid_fhir_strings(app, client):
    """A 404 quotes the path; characters a FHIR string forbids (U+0085, vertical tab, no-break
    space) are escaped as \\uXXXX, in the OperationOutcome and in the AuditEvent it leaves,
    so both match their documented schema (issue.diagnostics and outcomeDesc are strings)."""
    string = re.compile(f"^{codes.STRING_PATTERN}$")
    response = await client.get("/fhir/AdverseEvent/%C2%85%0B%C2%A0x")
    assert response.status_code == 404
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert string.match(diagnostics), diagnostics
    assert "\\u0085\\u000b\\u00a0x" in diagnostics
    await app.state.services.audit.flush()
    bundle = await client.get("/fhir/AuditEvent", params={"_count": "1000"})
    descriptions = [e["resource"].get("outcomeDesc", "") for e in bundle.json()["entry"]]
    quoted = [d for d in descriptions if "AdverseEvent" in d]
    assert quoted and all(string.match(d) for d in quoted), descriptions


async def test_unexpected_error_is_500_outcome_without_traceback(client, monkeypatch, caplog):
    from app.services import resources

    async def explode(*_args, **_kwargs):
        raise RuntimeError("secret internals: password=hunter2")

    monkeypatch.setattr(resources, "read", explode)
    response = await client.get("/fhir/Patient/abc", headers={"X-Request-Id": "req-123"})
    assert response.status_code == 500
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "req-123" in body["issue"][0]["diagnostics"]
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert "hunter2" in caplog.text  # the cause is in the log, for the operator


async def test_405_names_every_method_the_path_allows(client):
    response = await client.request("OPTIONS", "/fhir/Patient/abc")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "PUT", "PATCH", "DELETE"}


async def test_an_empty_searchset_has_no_empty_entry_array(client):
    bundle = (await client.get("/fhir/Patient", params={"identifier": "nobody"})).json()
    assert bundle["type"] == "searchset"
    assert "entry" not in bundle


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/fhir/Patient?_count=%C2%B9", {}),
        ("GET", "/fhir/AuditEvent?_count=%C2%B9", {}),
        ("DELETE", "/fhir/Patient/x", {"If-Match": 'W/"\u00b9"'.encode()}),
    ],
)
async def test_unicode_digits_are_not_numbers(client, method, path, headers):
    """'¹'.isdigit() is True in Python, int('¹') fails: such input is a 400, not a 500."""
    response = await client.request(method, path, headers=headers)
    assert response.status_code in (400, 404), response.text


# --- messages a person can act on --------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "example"),
    [
        ("2025-03-10T09:00:00", "2025-03-10T09:00:00Z"),
        ("2025-03-10T09:00", "2025-03-10T09:00:00Z"),
        ("2025-03-10 09:00:00", "2025-03-10T09:00:00+01:00"),
        ("2025-03-10T09:00:00.250", "2025-03-10T09:00:00.250Z"),
    ],
)
async def test_a_time_without_a_zone_says_the_zone_is_missing(client, sent, example):
    patient_id = await new_patient(client)
    response = await client.post(
        "/fhir/Observation", json=builders.platelet_count(patient_id, sent, 40)
    )
    assert response.status_code == 422
    [issue] = response.json()["issue"]  # one message, not fhir.resources' echo beside it
    assert issue["expression"] == ["Observation.effectiveDateTime"]
    assert "no time zone" in issue["diagnostics"] and example in issue["diagnostics"]
    response = await client.post(
        "/fhir/Patient", json={**builders.patient(), "birthDate": "10.03.1968"}
    )
    assert "e.g. 2025-03-10" in response.json()["issue"][0]["diagnostics"]


EXAMPLE_REASON = '{"resourceType":"Provenance","reason":[{"text":"transcription error"}]}'


async def test_a_missing_or_malformed_reason_says_what_is_expected(client):
    patient = (await create(client, builders.patient())).json()
    path = f"/fhir/Patient/{patient['id']}"
    missing = await without_reason(client, "PUT", path, json=patient)
    assert missing.status_code == 400
    [issue] = missing.json()["issue"]
    assert issue["code"] == "required"  # a contract: FHIR's issue type for what is missing
    assert "X-Provenance header is missing" in issue["diagnostics"]
    assert EXAMPLE_REASON in issue["diagnostics"]
    for header, says in (
        ("not json", "is not JSON"),
        ('{"resourceType":"Patient"}', "does not hold a Provenance"),
        ('{"resourceType":"Provenance","reason":[]}', "has no reason"),
        ("x" * 8001, "longer than 8000 characters"),
        ("   ", "no visible character"),
    ):
        response = await client.put(path, json=patient, headers={"X-Provenance": header})
        assert response.status_code == 400, header
        diagnostics = response.json()["issue"][0]["diagnostics"]
        assert says in diagnostics and EXAMPLE_REASON in diagnostics, (header, diagnostics)
    # The same words when a Bundle lacks it.
    entry = {"resource": patient, "request": {"method": "PUT", "url": f"Patient/{patient['id']}"}}
    answer = await without_reason(
        client,
        "POST",
        "/fhir",
        json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
    )
    assert answer.status_code == 400
    assert EXAMPLE_REASON in answer.json()["issue"][0]["diagnostics"]
