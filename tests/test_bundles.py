"""Transaction and batch Bundles at POST /fhir (both databases): all or nothing, FHIR's
processing order, urn:uuid and conditional references, one recompute per patient, audit."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter

import httpx
import orjson
import pytest
from sqlalchemy import event, text

from app.main import create_app
from app.services import response
from app.services.response import response_observation_id
from app.settings import Settings
from tests import builders
from tests.conftest import KEY, REASON, bearer
from tests.test_audit import _details, _events, provenance_rows
from tests.test_crud import create
from tests.test_response_api import BASELINE_TIME, EXAMPLES, START, at, status_of

FHIR = {"Content-Type": "application/fhir+json"}
PATIENT_URN = "urn:uuid:5b2a3c1e-0d4f-4a6b-9c8d-7e6f5a4b3c2d"
LAB_RESULTS = "https://lab.example/results"


def bundle(kind: str, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource: dict, full_url: str | None = None, **request: str) -> dict:
    entry = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def put(url: str, resource: dict, **request: str) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": url, **request}}


def delete(url: str) -> dict:
    return {"request": {"method": "DELETE", "url": url}}


def get(url: str) -> dict:
    return {"request": {"method": "GET", "url": url}}


def count(patient: str, when: str, value: float, result_id: str | None = None) -> dict:
    """A platelet count whose subject is `patient`: an id, a urn:uuid or Patient?criteria."""
    reference = patient if ":" in patient or "?" in patient else f"Patient/{patient}"
    extra = {"identifier": [{"system": LAB_RESULTS, "value": result_id}]} if result_id else {}
    resource = builders.platelet_count("x", when, value, **extra)
    resource["subject"] = {"reference": reference}
    return resource


async def send(client: httpx.AsyncClient, document: dict, **headers: str) -> httpx.Response:
    return await client.post("/fhir", content=orjson.dumps(document), headers={**FHIR, **headers})


async def _observations(client, **params: str) -> list[dict]:
    found = (await client.get("/fhir/Observation", params={"_count": "1000", **params})).json()
    return [e["resource"] for e in found.get("entry", []) if e["search"]["mode"] == "match"]


async def test_a_lab_sends_results_as_a_transaction(client):
    patient_id = (await create(client, builders.patient("S01-001"))).json()["id"]
    by_identifier = f"Patient?identifier={builders.SUBJECT_SYSTEM}|S01-001"
    lab = bearer("lab", ("S01",), sub="central-lab")
    answer = await send(
        client,
        bundle(
            "transaction",
            post(count(by_identifier, "2025-03-10T09:00:00Z", 42, "R-1")),
            post(count(by_identifier, "2025-03-17T09:00:00Z", 55, "R-2")),
        ),
        **lab,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "transaction-response"
    for entry in body["entry"]:
        assert entry["response"]["status"] == "201 Created"
        assert entry["response"]["etag"] == 'W/"1"'
        assert entry["response"]["lastModified"]
        resource = entry["resource"]
        assert entry["response"]["location"] == f"Observation/{resource['id']}/_history/1"
        assert resource["subject"] == {"reference": f"Patient/{patient_id}"}
    stored = await _observations(client, patient=patient_id, code="777-3")
    assert sorted(o["valueQuantity"]["value"] for o in stored) == [42, 55]


async def test_urn_uuid_references_become_the_ids_the_server_gives(client):
    answer = await send(
        client,
        bundle(
            "transaction",
            # The Observation comes first: the Patient it refers to is created before it.
            post(count(PATIENT_URN, "2025-03-10T09:00:00Z", 42)),
            post(builders.patient("S01-007"), PATIENT_URN),
            post(
                {
                    **builders.administration("x", "2025-03-03T08:00:00Z"),
                    "subject": {"reference": PATIENT_URN},
                }
            ),
        ),
    )
    assert answer.status_code == 200, answer.text
    observation, patient, dose = (e["resource"] for e in answer.json()["entry"])
    dose_subject = dose["subject"]["reference"]
    assert observation["subject"]["reference"] == dose_subject == f"Patient/{patient['id']}"
    read = (await client.get(f"/fhir/Observation/{observation['id']}")).json()
    assert read["subject"]["reference"] == f"Patient/{patient['id']}"
    status = await client.get(f"/fhir/Patient/{patient['id']}/$response-status")
    assert status.status_code == 200


async def test_conditional_create_in_a_transaction_reuses_the_patient(client):
    def story(value: float) -> dict:
        return bundle(
            "transaction",
            post(
                builders.patient("S01-009"),
                PATIENT_URN,
                ifNoneExist=f"identifier={builders.SUBJECT_SYSTEM}|S01-009",
            ),
            post(count(PATIENT_URN, "2025-03-10T09:00:00Z", value)),
        )

    first = (await send(client, story(40))).json()
    second = (await send(client, story(45))).json()
    assert [e["response"]["status"] for e in first["entry"]] == ["201 Created", "201 Created"]
    assert [e["response"]["status"] for e in second["entry"]] == ["200 OK", "201 Created"]
    patient_id = first["entry"][0]["resource"]["id"]
    assert second["entry"][0]["resource"]["id"] == patient_id
    assert second["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
    assert len(await _observations(client, patient=patient_id, code="777-3")) == 2


async def test_a_conditional_create_sees_the_plain_creates_before_it(client):
    """Plain creates of records are inserted together (issue 8), but before any other entry
    is processed: a conditional create later in the Bundle finds one, as it would if each
    had been inserted at once (FHIR processes a transaction's POSTs in order)."""
    patient_id = (await create(client, builders.patient())).json()["id"]
    criteria = f"identifier={LAB_RESULTS}|R-1"
    answer = await send(
        client,
        bundle(
            "transaction",
            post(count(patient_id, "2025-03-10T09:00:00Z", 40, "R-0")),
            post(count(patient_id, "2025-03-11T09:00:00Z", 41, "R-1")),
            post(count(patient_id, "2025-03-11T09:00:00Z", 41, "R-1"), ifNoneExist=criteria),
            post(count(patient_id, "2025-03-12T09:00:00Z", 42, "R-2")),
        ),
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "201 Created",
        "201 Created",
        "200 OK",
        "201 Created",
    ]
    assert entries[2]["resource"]["id"] == entries[1]["resource"]["id"]
    stored = await _observations(client, patient=patient_id, code="777-3")
    assert sorted(o["identifier"][0]["value"] for o in stored) == ["R-0", "R-1", "R-2"]


@pytest.mark.parametrize("number", sorted(EXAMPLES))
async def test_a_whole_worked_example_in_one_transaction(client, number):
    """The spec's worked examples sent as one Bundle (a new Patient and all its records):
    the records go in together (issue 8), and the patient's one recompute sees all of them,
    giving the status the same data gets when posted one request at a time."""
    baseline, counts, bleeding_days, expected = EXAMPLES[number]

    def of_patient(resource: dict) -> dict:
        return post({**resource, "subject": {"reference": PATIENT_URN}})

    records = [
        builders.platelet_count("x", BASELINE_TIME, baseline[0], unit=baseline[1]),
        builders.administration("x", START),
        *(builders.bleeding_grade("x", at(day), 2) for day in bleeding_days),
        *(
            builders.platelet_count("x", at(day), value, unit=unit[0] if unit else "10*9/L")
            for day, value, *unit in counts
        ),
    ]
    answer = await send(
        client,
        bundle(
            "transaction",
            post(builders.patient(f"S01-{number:03d}"), PATIENT_URN),
            *(of_patient(record) for record in records),
        ),
    )
    assert answer.status_code == 200, answer.text
    patient_id = answer.json()["entry"][0]["resource"]["id"]
    assessment = await status_of(client, patient_id)
    for key, value in expected.items():
        assert assessment[key] == value, (number, key, assessment)


async def test_one_failing_entry_leaves_nothing_and_answers_its_outcome(app, client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    bad = count(patient_id, "2025-03-12T09:00:00Z", 50)
    bad["valueQuantity"] = {"value": 50, "unit": "furlongs"}
    answer = await send(
        client,
        bundle(
            "transaction",
            post(count(patient_id, "2025-03-10T09:00:00Z", 42)),
            post(builders.patient("S01-002")),
            post(bad),
        ),
    )
    assert answer.status_code == 422
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"].startswith("Bundle.entry[2]")
    assert "furlongs" in outcome["issue"][0]["diagnostics"]
    assert await _observations(client, code="777-3") == []
    patients = (await client.get("/fhir/Patient")).json()
    assert len([e for e in patients["entry"] if e["search"]["mode"] == "match"]) == 1
    writes = [e for e in await _events(client, app) if e["outcome"] == "0" and e["action"] != "R"]
    assert [e["action"] for e in writes if e["action"] != "E"] == ["C"]  # the first Patient


async def test_deletes_then_creates_then_updates_then_reads(client):
    patient = (await create(client, builders.patient())).json()
    patient_id = patient["id"]
    old = (await create(client, count(patient_id, "2025-03-01", 30))).json()
    answer = await send(
        client,
        bundle(
            "transaction",
            get(f"Observation?patient={patient_id}&code=777-3"),
            put(f"Patient/{patient_id}", {**patient, "gender": "male"}),
            post(count(patient_id, "2025-03-10", 42)),
            get(f"Patient/{patient_id}"),
            delete(f"Observation/{old['id']}"),
        ),
    )
    assert answer.status_code == 200, answer.text
    search, updated, created, read, deleted = answer.json()["entry"]
    found = [e["resource"]["id"] for e in search["resource"]["entry"]]
    assert found == [created["resource"]["id"]]  # the read saw the create, not the deleted
    assert read["resource"]["gender"] == "male"  # and the update
    assert updated["response"]["status"] == "200 OK"
    assert deleted["response"] == {
        "status": "204 No Content",
        "etag": 'W/"2"',
        "lastModified": deleted["response"]["lastModified"],
    }
    assert (await client.get(f"/fhir/Observation/{old['id']}")).status_code == 410


async def test_each_patient_is_recomputed_once_per_transaction(client, monkeypatch):
    first = (await create(client, builders.patient("S01-001"))).json()["id"]
    second = (await create(client, builders.patient("S01-002"))).json()["id"]
    await create(client, builders.administration(first, "2025-03-03T08:00:00Z"))
    calls: Counter[str] = Counter()
    original = response.recompute

    async def counting(ctx, conn, patient_id, now, appended=None):
        calls[patient_id] += 1
        return await original(ctx, conn, patient_id, now, appended)

    status_path = f"/fhir/Observation/{response_observation_id(first)}"
    before = int((await client.get(status_path)).json()["meta"]["versionId"])
    monkeypatch.setattr(response, "recompute", counting)
    entries = [post(count(first, f"2025-03-{day:02d}T09:00:00Z", 40 + day)) for day in range(1, 8)]
    entries += [post(count(second, f"2025-03-{day:02d}T09:00:00Z", 20)) for day in range(1, 4)]
    answer = await send(client, bundle("transaction", *entries))
    assert answer.status_code == 200, answer.text
    assert calls == {first: 1, second: 1}
    after = int((await client.get(status_path)).json()["meta"]["versionId"])
    assert after == before + 1  # seven new counts, one new assessment


async def test_conditional_references_must_match_exactly_one(client):
    await create(client, builders.with_mrn(builders.patient("S01-001"), "H-1"))
    await create(client, builders.with_mrn(builders.patient("S01-002"), "H-1"))
    twice = f"Patient?identifier={builders.MRN_SYSTEM}|H-1"
    never = f"Patient?identifier={builders.SUBJECT_SYSTEM}|S01-999"
    for reference, status in ((twice, 412), (never, 400)):
        answer = await send(client, bundle("transaction", post(count(reference, "2025-03-10", 4))))
        assert answer.status_code == status, answer.text
        assert "Bundle.entry[0]" in answer.json()["issue"][0]["diagnostics"]
    unsupported = "Patient?name=Doe"
    answer = await send(client, bundle("transaction", post(count(unsupported, "2025-03-10", 4))))
    assert answer.status_code == 400
    assert await _observations(client, code="777-3") == []


async def test_conditional_update_and_delete_entries(app, client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    criteria = f"Observation?identifier={LAB_RESULTS}|R-7"
    answer = await send(
        client, bundle("transaction", put(criteria, count(patient_id, "2025-03-10", 40, "R-7")))
    )
    assert answer.json()["entry"][0]["response"]["status"] == "201 Created"
    observation_id = answer.json()["entry"][0]["resource"]["id"]
    answer = await send(
        client, bundle("transaction", put(criteria, count(patient_id, "2025-03-10", 44, "R-7")))
    )
    entry = answer.json()["entry"][0]
    assert entry["response"]["status"] == "200 OK"
    assert entry["response"]["etag"] == 'W/"2"'
    assert entry["resource"]["id"] == observation_id
    reason = '{"resourceType":"Provenance","reason":[{"text":"sample haemolysed"}]}'
    answer = await send(client, bundle("transaction", delete(criteria)), **{"X-Provenance": reason})
    assert answer.json()["entry"][0]["response"]["status"] == "204 No Content"
    assert (await client.get(f"/fhir/Observation/{observation_id}")).status_code == 410
    [deletion] = await _events(client, app, entity=f"Observation/{observation_id}", action="D")
    assert _details(deletion)["reason"] == "sample haemolysed"
    again = await send(client, bundle("transaction", delete(criteria)))
    assert again.json()["entry"][0]["response"]["status"] == "204 No Content"
    for url in ("Observation", "Patient"):
        refused = await send(client, bundle("transaction", delete(url)))
        assert refused.status_code == 400, url
    assert (await client.get(f"/fhir/Patient/{patient_id}")).status_code == 200


async def test_a_change_in_a_bundle_needs_the_reason_of_its_request(client, anonymous):
    patient = (await create(client, builders.patient())).json()
    changed = put(f"Patient/{patient['id']}", {**patient, "gender": "male"})
    # Whatever the entry finds: a PUT that creates, a DELETE of nothing need it too.
    created = put("Patient/new-by-put", {**builders.patient("S01-900"), "id": "new-by-put"})
    matches_nothing = delete("Patient?identifier=https://example.org/none|0")
    for entry in (changed, created, matches_nothing):
        for kind in ("transaction", "batch"):
            answer = await anonymous.post(
                "/fhir", content=orjson.dumps(bundle(kind, entry)), headers={**FHIR, **bearer()}
            )
            if kind == "transaction":
                assert answer.status_code == 400, answer.text
                outcome = answer.json()
            else:
                assert answer.status_code == 200, answer.text
                [result] = answer.json()["entry"]
                assert result["response"]["status"].startswith("400")
                outcome = result["response"]["outcome"]
            assert outcome["issue"][0]["code"] == "required", outcome
    # An empty header is no reason either (not of the header's form: invalid).
    answer = await send(client, bundle("transaction", changed), **{"X-Provenance": ""})
    assert answer.status_code == 400
    assert answer.json()["issue"][0]["expression"] == ["header.X-Provenance"]
    assert (await client.get(f"/fhir/Patient/{patient['id']}")).json() == patient
    assert (await client.get("/fhir/Patient/new-by-put")).status_code == 404
    # A Bundle of creates and reads needs no reason.
    answer = await anonymous.post(
        "/fhir",
        content=orjson.dumps(bundle("transaction", post(builders.patient("S01-901")))),
        headers={**FHIR, **bearer()},
    )
    assert answer.status_code == 200, answer.text


async def test_a_put_that_creates_in_a_bundle_stores_its_reason(app, client):
    """Both ways a PUT entry creates: at its id, and a conditional update that matches
    nothing (the transaction's planned creates)."""
    patient_id = (await create(client, builders.patient())).json()["id"]
    at_id = put("Patient/made-by-put", {**builders.patient("S01-902"), "id": "made-by-put"})
    by_criteria = put(
        f"Observation?identifier={LAB_RESULTS}|PUT-1",
        count(patient_id, "2025-03-10", 42, result_id="PUT-1"),
    )
    answer = await send(client, bundle("transaction", at_id, by_criteria))
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "201 Created"]
    created = {"made-by-put", entries[1]["response"]["location"].split("/")[1]}
    rows = await provenance_rows(app, "Patient", "Observation")
    assert {row[0] for row in rows} == created
    assert all(row[1] == 1 and "test correction" in row[2] for row in rows)


async def test_a_patch_entry_carries_its_document_in_a_binary(client):
    patient = (await create(client, builders.patient())).json()
    document = [{"op": "replace", "path": "/gender", "value": "other"}]
    binary = {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(orjson.dumps(document)).decode(),
    }
    entry = {
        "resource": binary,
        "request": {"method": "PATCH", "url": f"Patient/{patient['id']}", "ifMatch": 'W/"1"'},
    }
    answer = await send(client, bundle("transaction", entry))
    assert answer.status_code == 200, answer.text
    assert answer.json()["entry"][0]["resource"]["gender"] == "other"
    stale = await send(client, bundle("transaction", entry))
    assert stale.status_code == 412


async def test_a_batch_answers_each_entry_on_its_own(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    bad = count(patient_id, "2025-03-12", 50)
    bad["status"] = "bogus"
    answer = await send(
        client,
        bundle(
            "batch",
            post(count(patient_id, "2025-03-10", 42)),
            post(bad),
            get("Observation/does-not-exist"),
            {"request": {"method": "HEAD", "url": "Patient"}},
            post(count(patient_id, "2025-03-11", 43)),
        ),
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "404 Not Found"] + [
        "400 Bad Request",
        "201 Created",
    ]
    outcome = body["entry"][1]["response"]["outcome"]
    assert outcome["issue"][0]["expression"] == ["Observation.status"]
    assert len(await _observations(client, code="777-3")) == 2


async def test_what_is_not_a_transaction_or_batch_is_refused(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    observation = post(count(patient_id, "2025-03-10", 42))
    nested = {"resource": bundle("transaction"), "request": {"method": "POST", "url": "Bundle"}}
    duplicate = put(f"Patient/{patient_id}", builders.patient())
    for document in (
        bundle("collection", observation),
        bundle("searchset"),
        bundle("transaction", nested),
        bundle("transaction", {"resource": builders.patient()}),
        bundle("transaction", post(builders.patient(), url="Observation")),
        bundle("transaction", duplicate, delete(f"Patient/{patient_id}")),
        {"resourceType": "Patient"},
    ):
        answer = await send(client, document)
        assert answer.status_code == 400, document
        assert answer.json()["resourceType"] == "OperationOutcome"
    assert await _observations(client, code="777-3") == []


async def test_the_base_url_with_a_slash_takes_bundles_too(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    document = bundle("transaction", post(count(patient_id, "2025-03-10", 42)))
    answer = await client.post("/fhir/", content=orjson.dumps(document), headers=FHIR)
    assert answer.status_code == 200, answer.text
    assert answer.json()["type"] == "transaction-response"


async def test_prefer_minimal_answers_without_resources(client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    document = bundle("transaction", post(count(patient_id, "2025-03-10", 42)))
    answer = await send(client, document, Prefer="return=minimal")
    [entry] = answer.json()["entry"]
    assert "resource" not in entry and entry["response"]["status"] == "201 Created"


async def test_a_lab_may_not_create_patients_in_a_transaction(client):
    lab = bearer("lab", ("S01",))
    answer = await send(client, bundle("transaction", post(builders.patient())), **lab)
    assert answer.status_code == 403


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_more_entries_than_the_limit_are_413(database_url):
    settings = Settings(database_url=database_url, environment="test", max_bundle_entries=2)
    app = create_app(settings, key_source=KEY)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", headers=bearer()) as http,
    ):
        entries = [post(builders.patient(f"S01-00{n}")) for n in range(3)]
        answer = await send(http, bundle("transaction", *entries))
        assert answer.status_code == 413
        assert answer.json()["issue"][0]["code"] == "too-costly"


async def test_a_thousand_results_in_one_transaction(app, client):
    patient_id = (await create(client, builders.patient())).json()["id"]
    await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
    entries = []
    for number in range(1000):
        resource = count(patient_id, f"2025-03-{number % 28 + 1:02d}T09:00:00Z", 40, f"R-{number}")
        resource["note"] = [{"text": "Automated count; sample received in good condition. " * 8}]
        entries.append(post(resource, f"urn:uuid:00000000-0000-4000-8000-{number:012d}"))
    document = orjson.dumps(bundle("transaction", *entries))
    assert len(document) > 1_048_576  # more than the general body limit
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    engine = app.state.services.db.writer.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        answer = await client.post("/fhir", content=document, headers=FHIR)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert answer.status_code == 200, answer.text[:500]
    statuses = Counter(e["response"]["status"] for e in answer.json()["entry"])
    assert statuses == {"201 Created": 1000}
    assert len(await _observations(client, code="777-3")) == 1000
    # The creates go in together (issue 8): a few statements per table, not one per entry.
    inserts = Counter(
        table
        for statement in statements
        for table in ("resource", "resource_version", "search_token", "search_quantity")
        if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()} ")
    )
    assert set(inserts) == {"resource", "resource_version", "search_token", "search_quantity"}
    assert max(inserts.values()) <= 20, inserts
    # ...and each resource's search values are its own (each pk matched to its id).
    created = {e["resource"]["id"]: f"R-{n}" for n, e in enumerate(answer.json()["entry"])}
    async with app.state.services.db.read() as conn:
        identifiers = dict(
            (
                await conn.execute(
                    text(
                        "SELECT r.id, t.value FROM resource r JOIN search_token t "
                        "ON t.resource_pk = r.pk WHERE t.param = 'identifier' "
                        "AND r.resource_type = 'Observation' AND t.system = :system"
                    ),
                    {"system": LAB_RESULTS},
                )
            ).all()
        )
    assert identifiers == created
    async with app.state.services.db.read() as conn:
        audited = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM audit_event WHERE action = 'C' "
                    "AND entity_type = 'Observation'"
                )
            )
        ).scalar_one()
    assert audited == 1000


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_concurrent_transactions_neither_deadlock_nor_duplicate(live_server):
    """Transactions writing the same two patients' records in opposite orders, and the same
    conditional create of a new patient, at once over a real socket (two workers)."""
    headers = {**bearer(), "X-Provenance": REASON, **FHIR}
    async with httpx.AsyncClient(base_url=live_server, headers=headers, timeout=120) as http:
        a = (await http.post("/fhir/Patient", json=builders.patient("S01-A"))).json()["id"]
        b = (await http.post("/fhir/Patient", json=builders.patient("S01-B"))).json()["id"]
        on_a = (await http.post("/fhir/Observation", json=count(a, "2025-03-01", 30))).json()
        on_b = (await http.post("/fhir/Observation", json=count(b, "2025-03-01", 31))).json()

        def swap(first: dict, second: dict, to_first: str, to_second: str, n: int) -> dict:
            return bundle(
                "transaction",
                put(
                    f"Observation/{first['id']}",
                    {**first, "subject": {"reference": f"Patient/{to_first}"}},
                ),
                put(
                    f"Observation/{second['id']}",
                    {**second, "subject": {"reference": f"Patient/{to_second}"}},
                ),
                post(count(to_second, f"2025-03-{n + 2:02d}", 40 + n)),
                post(count(to_first, f"2025-03-{n + 2:02d}", 50 + n)),
                post(
                    builders.patient("S01-NEW"),
                    PATIENT_URN,
                    ifNoneExist=f"identifier={builders.SUBJECT_SYSTEM}|S01-NEW",
                ),
                post(count(PATIENT_URN, f"2025-03-{n + 2:02d}", 20 + n)),
            )

        documents = [
            swap(on_a, on_b, b, a, n) if n % 2 else swap(on_b, on_a, a, b, n) for n in range(10)
        ]
        answers = await asyncio.gather(
            *(http.post("/fhir", content=orjson.dumps(d)) for d in documents)
        )
        assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
        created = [r.json()["entry"][4]["response"]["status"] for r in answers]
        assert sorted(created) == ["200 OK"] * 9 + ["201 Created"]
        new = {r.json()["entry"][4]["resource"]["id"] for r in answers}
        assert len(new) == 1
        versions = [
            (await http.get(f"/fhir/Observation/{o['id']}")).json()["meta"]["versionId"]
            for o in (on_a, on_b)
        ]
        assert versions == ["11", "11"]
        [patient_id] = new
        found = await http.get("/fhir/Observation", params={"patient": patient_id, "code": "777-3"})
        assert len(found.json()["entry"]) == 10
