"""Plausible values only, and the same answer on both databases (README, "Input limits").

A platelet count is finite and, in 10^9/L, within 0 to ITP_PLATELET_MAX; a WHO bleeding grade
is an integer 0-4; every other value is a 422 with an `expression`, on every path (REST
create and update, Bundle entries, PATCH results, HL7 v2 OBX). A string the database indexes
is at most 255 characters; NUL is refused wherever it is sent. Nothing of a refused request
is stored (each test compares the stored rows before and after).
"""

from __future__ import annotations

import math

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import Criteria
from app.kit import codes
from app.kit.errors import Unprocessable
from app.kit.limits import (
    MAX_INDEXED_STRING,
    InputLimits,
    platelet_problem,
)
from app.main import create_app
from app.services.indexing import normalised_platelet_value
from app.settings import CriteriaSettings
from tests import builders
from tests.conftest import KEY, REASON, bearer
from tests.hl7_support import enrol, platelet_counts, read_ack, rows, send, stored_state
from tests.test_bundles import bundle, count, post, put
from tests.test_bundles import send as send_bundle
from tests.test_crud import create, new_patient
from tests.test_hl7_api import oru

WHEN = "2025-03-10T09:00:00Z"
VALUE = "Observation.valueQuantity.value"
FHIR = {"Content-Type": "application/fhir+json"}


def _expressions(response) -> list[str]:
    return [e for issue in response.json()["issue"] for e in issue.get("expression", [])]


def _count_body(patient_id: str, literal: str, unit: str = "10*9/L") -> bytes:
    """A platelet count whose value is the JSON number literal as written (1e-400 must reach
    the server as 1e-400, not as what Python makes of it)."""
    body = orjson.dumps(builders.platelet_count(patient_id, WHEN, 12345, unit=unit))
    return body.replace(b'"value":12345', b'"value":' + literal.encode())


# --- platelet counts over REST ----------------------------------------------------------


@pytest.mark.parametrize(
    "literal, unit",
    [
        ("-5", "10*9/L"),
        ("1e300", "10*9/L"),
        ("20000", "10*9/L"),
        ("5000.001", "10*9/L"),
        ("5000001", "/uL"),  # 5000.001 x10^9/L once converted
        ("1e-400", "10*9/L"),  # read as 0 by a double: refused, not stored as 0
        ("1e400", "10*9/L"),  # beyond a double
        ("1e-7", "/uL"),  # 1e-10 x10^9/L: stored to 6 decimals, it would be 0
        ("-0.0000001", "10*9/L"),
    ],
)
async def test_an_implausible_count_is_422_and_nothing_is_stored(app, client, literal, unit):
    patient_id = await new_patient(client)
    before = await stored_state(app)
    response = await client.post(
        "/fhir/Observation", content=_count_body(patient_id, literal, unit), headers=FHIR
    )
    assert response.status_code == 422, response.text
    assert _expressions(response) == [VALUE]
    assert await stored_state(app) == before


@pytest.mark.parametrize(
    "literal, unit, normalised",
    [
        ("0", "10*9/L", 0),
        ("5000", "10*9/L", 5000),
        ("5000000", "/uL", 5000),
        ("0.5", "/uL", 0.0005),
    ],
)
async def test_counts_at_the_limits_are_stored(app, client, literal, unit, normalised):
    patient_id = await new_patient(client)
    response = await client.post(
        "/fhir/Observation", content=_count_body(patient_id, literal, unit), headers=FHIR
    )
    assert response.status_code == 201, response.text
    found = await client.get(
        "/fhir/Observation", params={"value-quantity": f"{normalised}||10*9/L"}
    )
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [response.json()["id"]]


async def test_an_update_to_an_implausible_count_keeps_the_version(app, client):
    patient_id = await new_patient(client)
    stored = (await create(client, builders.platelet_count(patient_id, WHEN, 42))).json()
    before = await stored_state(app)
    changed = {**stored, "valueQuantity": {**stored["valueQuantity"], "value": 20000}}
    response = await client.put(f"/fhir/Observation/{stored['id']}", json=changed)
    assert response.status_code == 422, response.text
    assert _expressions(response) == [VALUE]
    assert await stored_state(app) == before
    assert (await client.get(f"/fhir/Observation/{stored['id']}")).json() == stored


@pytest.mark.parametrize(
    "content_type, document",
    [
        (
            "application/json-patch+json",
            [{"op": "replace", "path": "/valueQuantity/value", "value": -5}],
        ),
        ("application/merge-patch+json", {"valueQuantity": {"value": 20000}}),
    ],
)
async def test_a_patch_whose_result_is_implausible_is_422(app, client, content_type, document):
    patient_id = await new_patient(client)
    stored = (await create(client, builders.platelet_count(patient_id, WHEN, 42))).json()
    before = await stored_state(app)
    response = await client.patch(
        f"/fhir/Observation/{stored['id']}",
        content=orjson.dumps(document),
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 422, response.text
    assert _expressions(response) == [VALUE]
    assert await stored_state(app) == before


async def test_a_patch_document_with_an_unrepresentable_number_is_422(app, client):
    patient_id = await new_patient(client)
    stored = (await create(client, builders.platelet_count(patient_id, WHEN, 42))).json()
    before = await stored_state(app)
    response = await client.patch(
        f"/fhir/Observation/{stored['id']}",
        content=b'[{"op": "replace", "path": "/valueQuantity/value", "value": 1e-400}]',
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert response.status_code == 422, response.text
    assert _expressions(response) == ["patch[0].value"]
    assert await stored_state(app) == before


async def test_a_transaction_with_an_implausible_count_stores_nothing(app, client):
    before = await stored_state(app)
    urn = "urn:uuid:0c4d8a0e-7f3b-4c55-9a43-1c2d3e4f5a6b"
    document = bundle(
        "transaction",
        post(builders.patient("S01-001"), urn),
        post(count(urn, WHEN, 42)),
        post(count(urn, "2025-03-17T09:00:00Z", 20000)),
    )
    answer = await send_bundle(client, document)
    assert answer.status_code == 422, answer.text
    assert answer.json()["issue"][0]["diagnostics"].startswith("Bundle.entry[2]")
    assert _expressions(answer) == [VALUE]
    assert await stored_state(app) == before


async def test_a_number_a_double_cannot_hold_in_a_bundle_is_located(app, client):
    before = await stored_state(app)
    document = orjson.dumps(bundle("transaction", post(count("p-1", WHEN, 12345))))
    answer = await client.post("/fhir", content=document.replace(b"12345", b"1e-400"), headers=FHIR)
    assert answer.status_code == 422, answer.text
    assert _expressions(answer) == ["Bundle.entry[0].resource.valueQuantity.value"]
    assert await stored_state(app) == before


async def test_a_batch_answers_the_implausible_entry_alone(client):
    patient_id = await new_patient(client)
    answer = await send_bundle(
        client,
        bundle("batch", post(count(patient_id, WHEN, 42)), post(count(patient_id, WHEN, -5))),
    )
    first, second = answer.json()["entry"]
    assert first["response"]["status"].startswith("201")
    assert second["response"]["status"].startswith("422")
    issue = second["response"]["outcome"]["issue"][0]
    assert issue["expression"] == [VALUE]


async def test_a_conditional_update_in_a_bundle_is_checked_too(app, client):
    patient_id = await new_patient(client)
    before = await stored_state(app)
    criteria = "Observation?identifier=https://lab.example/results|R-1"
    answer = await send_bundle(
        client,
        bundle("transaction", put(criteria, count(patient_id, WHEN, 1e300, "R-1"))),
        **{"X-Provenance": REASON},
    )
    assert answer.status_code == 422, answer.text
    assert await stored_state(app) == before


async def test_itp_platelet_max_sets_the_limit(settings, monkeypatch):
    monkeypatch.setenv("ITP_PLATELET_MAX", "1000")
    limits = CriteriaSettings().input_limits()
    assert limits == InputLimits(platelet_max=1000)
    assert "platelet_max" not in CriteriaSettings().to_criteria().__dict__
    monkeypatch.setenv("ITP_PLATELET_MAX", "0")
    with pytest.raises(ValueError, match="platelet_max"):
        CriteriaSettings()
    app = create_app(settings, key_source=KEY, limits=limits)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=bearer("admin")
        ) as client:
            patient_id = await new_patient(client)
            refused = await client.post(
                "/fhir/Observation", content=_count_body(patient_id, "1200"), headers=FHIR
            )
            assert refused.status_code == 422
            assert "1000 x10^9/L (ITP_PLATELET_MAX)" in refused.json()["issue"][0]["diagnostics"]
            accepted = await client.post(
                "/fhir/Observation", content=_count_body(patient_id, "999"), headers=FHIR
            )
            assert accepted.status_code == 201


# --- value[x] of the two kinds the engine reads -------------------------------------------


@pytest.mark.parametrize("grade", [5, -1, 100])
async def test_a_bleeding_grade_outside_0_to_4_is_422(app, client, grade):
    patient_id = await new_patient(client)
    before = await stored_state(app)
    response = await client.post(
        "/fhir/Observation", json=builders.bleeding_grade(patient_id, WHEN, grade)
    )
    assert response.status_code == 422, response.text
    assert _expressions(response) == ["Observation.valueInteger"]
    assert await stored_state(app) == before


async def test_a_whole_number_with_a_fraction_is_the_integer_it_is(app, client):
    """JSON Schema's `integer` (the OpenAPI file's) takes 2.0, and a client that writes
    numbers as doubles sends it: it is stored and answered as 2 (found by the fuzzer: the
    schema took it and the server answered 422). 2.5 is still no integer."""
    patient_id = await new_patient(client)
    grade = {**builders.bleeding_grade(patient_id, WHEN, 2), "valueInteger": 2.0}
    created = await client.post("/fhir/Observation", content=orjson.dumps(grade), headers=FHIR)
    assert created.status_code == 201, created.text
    assert b'"valueInteger":2,' in created.content or created.content.endswith(b'"valueInteger":2}')
    read = await client.get(f"/fhir/Observation/{created.json()['id']}")
    assert read.json()["valueInteger"] == 2 and isinstance(read.json()["valueInteger"], int)
    before = await stored_state(app)
    refused = await client.post(
        "/fhir/Observation",
        content=orjson.dumps({**grade, "valueInteger": 2.5}),
        headers=FHIR,
    )
    assert refused.status_code == 422
    assert _expressions(refused) == ["Observation.valueInteger"]
    assert await stored_state(app) == before


async def test_a_value_in_another_value_x_is_422(app, client):
    patient_id = await new_patient(client)
    before = await stored_state(app)
    grade = builders.bleeding_grade(patient_id, WHEN, 2)
    del grade["valueInteger"]
    grade["valueQuantity"] = {"value": 7}
    response = await client.post("/fhir/Observation", json=grade)
    assert response.status_code == 422
    assert _expressions(response) == ["Observation.valueQuantity"]
    platelets = builders.platelet_count(patient_id, WHEN, 42)
    del platelets["valueQuantity"]
    platelets["valueInteger"] = 20000
    response = await client.post("/fhir/Observation", json=platelets)
    assert response.status_code == 422
    assert _expressions(response) == ["Observation.valueInteger"]
    assert await stored_state(app) == before


# --- HL7 v2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["20000", "5000.5", "9" * 400, "0." + "0" * 400 + "1", "0.0000000001"],
)
async def test_an_implausible_hl7_count_is_an_ae_naming_the_obx(client, app, value):
    await enrol(client, "S01-001")
    before = await stored_state(app)
    body = oru(results=[("FIL-1", "42", "F", "20250310"), ("FIL-2", value, "F", "20250310")])
    ack = read_ack(await send(client, body))
    assert ack.code == "AE", ack.text
    assert [(code, where) for code, where, _ in ack.errors] == [("102", "OBX^2^5")]
    assert await platelet_counts(app) == {}
    assert await stored_state(app) == before


async def test_an_hl7_count_at_the_limit_is_stored(client, app):
    await enrol(client, "S01-001")
    ack = read_ack(await send(client, oru(results=[("FIL-1", "5000", "F", "20250310")])))
    assert ack.code == "AA", ack.text
    assert (await platelet_counts(app))["FIL-1-1"]["normalised"] == 5000


# --- the rule itself, for every value -----------------------------------------------------

_FACTORS = sorted(set(codes.UCUM_PLATELET_FACTORS.items()))


@settings(max_examples=400, deadline=None)
@given(
    value=st.floats(allow_nan=True, allow_infinity=True),
    unit=st.sampled_from(_FACTORS),
    maximum=st.floats(min_value=1, max_value=1e6),
)
def test_a_count_is_stored_only_within_the_limits(value, unit, maximum):
    """Whatever the number and unit: either the stored value is in [0, max] and reads back
    as the count sent (to 6 decimals), or the count is refused at its value."""
    code, factor = unit
    limits = InputLimits(platelet_max=maximum)
    raw = {"valueQuantity": {"value": value, "system": codes.UCUM, "code": code}}
    try:
        stored = normalised_platelet_value(raw, limits)
    except Unprocessable as refused:
        assert refused.issues[0].expression == [VALUE]
        assert platelet_problem(value, factor, code, limits) is not None
        return
    assert stored is not None and math.isfinite(stored)
    assert 0 <= stored <= maximum
    assert stored == round(value * factor, 6)
    assert (stored == 0) == (value == 0)


@settings(max_examples=200, deadline=None)
@given(mantissa=st.integers(min_value=1, max_value=999), exponent=st.integers(-450, 450))
def test_a_number_literal_is_read_as_written_or_refused(mantissa, exponent):
    """No literal is silently read as something else: a number the server keeps is the one
    sent, one a double cannot hold (overflow, or underflow to 0) is a 422 at its place."""
    from app.services.validation import load_json

    literal = f"{mantissa}e{exponent}"
    document = (
        b'{"resourceType": "Observation", "valueQuantity": {"value": ' + literal.encode() + b"}}"
    )
    try:
        value = load_json(document)["valueQuantity"]["value"]
    except Unprocessable as refused:
        assert refused.issues[0].expression == [VALUE]
        assert exponent > 300 or exponent < -300
        return
    assert value != 0 and math.isfinite(value)
    assert value == float(literal)


# --- strings the database indexes: one limit on both --------------------------------------

LONG = "x" * (MAX_INDEXED_STRING + 1)
EXACT = "x" * MAX_INDEXED_STRING


@pytest.mark.parametrize(
    "change, expression",
    [
        (
            {"identifier": [{"system": builders.MRN_SYSTEM, "value": LONG}]},
            "Patient.identifier[0].value",
        ),
        (
            {"identifier": [{"system": "https://x.example/" + LONG, "value": "1"}]},
            "Patient.identifier[0].system",
        ),
        ({"name": [{"family": LONG}]}, "Patient.name[0].family"),
        ({"name": [{"given": ["Ann", LONG]}]}, "Patient.name[0].given[1]"),
    ],
)
async def test_a_patient_string_over_the_limit_is_422(app, client, change, expression):
    before = await stored_state(app)
    response = await client.post("/fhir/Patient", json={**builders.patient(), **change})
    assert response.status_code == 422, response.text
    assert _expressions(response) == [expression]
    assert response.json()["issue"][0]["code"] == "too-long"
    assert await stored_state(app) == before


async def test_codes_and_units_over_the_limit_are_422(app, client):
    patient_id = await new_patient(client)
    before = await stored_state(app)
    observation = builders.platelet_count(patient_id, WHEN, 42)
    observation["code"]["coding"].append({"system": "http://x.example", "code": LONG})
    response = await client.post("/fhir/Observation", json=observation)
    assert response.status_code == 422, response.text
    assert _expressions(response) == ["Observation.code.coding[1].code"]
    other = builders.platelet_count(patient_id, WHEN, 42)
    other["code"] = {"coding": [{"system": "http://x.example", "code": "x"}]}
    other["valueQuantity"] = {"value": 1, "unit": LONG}
    response = await client.post("/fhir/Observation", json=other)
    assert response.status_code == 422, response.text
    assert _expressions(response) == ["Observation.valueQuantity.unit"]
    assert await stored_state(app) == before


async def test_strings_at_the_limit_are_stored_and_found(client):
    patient = {
        **builders.with_mrn(builders.patient(), EXACT),
        "name": [{"family": "é" * MAX_INDEXED_STRING}],
    }
    created = await create(client, patient)
    found = await client.get(
        "/fhir/Patient", params={"identifier": f"{builders.MRN_SYSTEM}|{EXACT}"}
    )
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [created.json()["id"]]
    # A longer value in a search is no error either: it matches nothing.
    longer = await client.get(
        "/fhir/Patient", params={"identifier": f"{builders.MRN_SYSTEM}|{LONG}"}
    )
    assert longer.status_code == 200 and "entry" not in longer.json()
    by_name = await client.get("/fhir/Patient", params={"family": "e" * 300})
    assert by_name.status_code == 200


# --- NUL: 400 wherever it is sent ---------------------------------------------------------


async def test_nul_in_a_body_is_400_and_named(app, client):
    before = await stored_state(app)
    body = orjson.dumps(builders.patient(name=[{"family": "Do\x00e"}]))
    response = await client.post("/fhir/Patient", content=body, headers=FHIR)
    assert response.status_code == 400, response.text
    assert _expressions(response) == ["Patient.name[0].family"]
    key = orjson.dumps({**builders.patient(), "x\x00": 1})
    assert (await client.post("/fhir/Patient", content=key, headers=FHIR)).status_code == 400
    raw_byte = orjson.dumps(builders.patient()).replace(b"S01-001", b"S01\x00001")
    assert (await client.post("/fhir/Patient", content=raw_byte, headers=FHIR)).status_code == 400
    assert await stored_state(app) == before


async def test_nul_in_a_bundle_a_patch_or_a_reason_is_400(app, client):
    patient = (await create(client, builders.patient())).json()
    before = await stored_state(app)
    entry = post(builders.patient("S01-002", name=[{"text": "\x00"}]))
    answer = await send_bundle(client, bundle("transaction", entry))
    assert answer.status_code == 400
    assert _expressions(answer) == ["Bundle.entry[0].resource.name[0].text"]
    path = f"/fhir/Patient/{patient['id']}"
    patch = await client.patch(
        path,
        content=orjson.dumps({"name": [{"family": "\x00"}]}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert patch.status_code == 400
    for operation in (
        {"op": "add", "path": "/name", "value": [{"family": "\x00"}]},
        {"op": "add", "path": "/name", "value": [{"fam\x00ily": "Doe"}]},
        {"op": "remove", "path": "/name/0/fam\x00ily"},
        {"op": "copy", "from": "/gen\x00der", "path": "/name/0/text"},
    ):
        json_patch = await client.patch(
            path,
            content=orjson.dumps([operation]),
            headers={"Content-Type": "application/json-patch+json"},
        )
        assert json_patch.status_code == 400, (operation, json_patch.text)
    reason = '{"resourceType":"Provenance","reason":[{"text":"typo\\u0000"}]}'
    update = await client.put(path, json=patient, headers={"X-Provenance": reason})
    assert update.status_code == 400
    assert _expressions(update) == ["Provenance.reason[0].text"]
    assert await stored_state(app) == before


async def test_nul_in_a_query_a_path_or_a_header_is_400(client):
    for request in (
        client.get("/fhir/Patient", params={"identifier": "a\x00b"}),
        client.get("/fhir/AuditEvent", params={"agent": "a\x00b"}),
        client.get("/fhir/Patient/_history", params={"_since": "\x00"}),
        client.get("/fhir/Patient/a%00b"),
        client.get("/fhir/Patient", headers={"X-Request-Id": "a\x00b"}),
    ):
        response = await request
        assert response.status_code == 400, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert "NUL" in response.json()["issue"][0]["diagnostics"]
        assert response.headers["x-content-type-options"] == "nosniff"


def _token(**claims: object) -> dict[str, str]:
    """A bearer token signed with the test key, with these claims over valid ones."""
    valid = {"sub": "tester", "role": "admin", "sites": ["S01"], "exp": 4102444800}
    issued = {"iss": "itp-trial-api", "aud": "itp-trial-api", **valid, **claims}
    return {"Authorization": f"Bearer {KEY.sign(issued)}"}


async def test_nul_in_a_token_claim_is_400(anonymous):
    for claims in ({"sub": "lab\x00"}, {"sites": ["S01\x00"]}, {"name": "x\x00"}):
        response = await anonymous.get("/fhir/Patient", headers=_token(**claims))
        assert response.status_code == 400, (claims, response.text)


async def test_a_token_subject_over_the_limit_is_401(anonymous):
    response = await anonymous.get("/fhir/Patient", headers=_token(sub="x" * 256))
    assert response.status_code == 401
    assert "255" in response.json()["issue"][0]["diagnostics"]
    fits = await anonymous.get("/fhir/Patient", headers=_token(sub="x" * 255))
    assert fits.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"MSH|^~\\&|LIS|LAB|||20250310||ORU^R01|M1|P|2.5.1\rPID|1||S01\x00001\r",
        b"MSH|^~\\&|LIS|LAB|||20250310||ORU^R01|M1|P|2.5.1\rPID|1||S01\\X00\\001\r",
        b"MSH|^~\\&|LIS|LAB|||20250310||ORU^R01|M\\X4100\\1|P|2.5.1\rPID|1||S01-001\r",
    ],
)
async def test_nul_in_an_hl7_message_is_400(app, client, body):
    before = await stored_state(app)
    response = await send(client, body)
    assert response.status_code == 400, response.text
    assert "NUL" in response.json()["issue"][0]["diagnostics"]
    assert await stored_state(app) == before


async def test_a_refusal_about_an_overlong_path_is_audited_on_both_databases(app, client):
    """The refusal's record names no entity the columns cannot hold: PostgreSQL refused such
    a record (the type is 40 characters at most, an id 64), SQLite stored it."""
    for path in ("/fhir/Observation/" + "x" * 100, "/fhir/" + "X" * 60 + "/1"):
        assert (await client.get(path)).status_code == 404
    await app.state.services.audit.flush()
    refusals = await rows(app, "SELECT content FROM audit_event WHERE outcome = '4'")
    descriptions = [orjson.loads(content)["outcomeDesc"] for (content,) in refusals]
    assert len(descriptions) == 2 and all(d.startswith("404") for d in descriptions)


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Shanghai"])
async def test_dates_at_the_ends_of_the_calendar_are_stored_assessed_and_reported(settings, zone):
    """FHIR's years run 0001 to 9999. On PostgreSQL a value that starts at the first
    representable instant or ends at the last is stored as -infinity or infinity (asyncpg's
    form of datetime.min and max), which the recompute's read got back without a time zone:
    every write for that patient was a 500 (found by the fuzzer). In a trial zone west of
    UTC, 0001-01-01T00:00Z falls before the calendar (and 9999-12-31T23:00Z after it east
    of UTC): its local day is the calendar's first (last)."""
    app = create_app(settings, criteria=Criteria(trial_timezone=zone), key_source=KEY)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=bearer("admin")
        ) as client:
            for when in ("0001", "0001-01-01T00:00:00Z", "9999", "9999-12-31T23:00:00Z"):
                patient_id = await new_patient(client, f"S01-{when[:4]}-{len(when)}")
                await create(client, builders.administration(patient_id, when))
                count = await create(client, builders.platelet_count(patient_id, when, 40))
                status = await client.get(f"/fhir/Patient/{patient_id}/$response-status")
                assert status.status_code == 200, (when, status.text)
                found = await client.get(
                    "/fhir/Observation",
                    params={"patient": patient_id, "date": when[:4], "code": "777-3"},
                )
                assert found.status_code == 200, found.text
                entries = found.json()["entry"]
                assert [entry["resource"]["id"] for entry in entries] == [count.json()["id"]]
                assert entries[0]["resource"]["effectiveDateTime"] == when
            for report in ("/fhir/$trial-report", "/fhir/$response-listing", "/sdtm/lb.csv"):
                answer = await client.get(report)
                assert answer.status_code == 200, (report, answer.text)
