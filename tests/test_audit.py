"""Reason for change, and the append-only, hash-chained audit trail (both databases)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import jsonschema
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import event, text

from app.audit import queries, trail
from app.audit.chain import (
    Broken,
    ChainSequencer,
    VerifyResult,
    chain_hash,
    parse_anchor,
    verify,
)
from app.audit.trail import AuditQueue, AuditRecord, read_spill, spill, to_fhir
from app.auth.principal import Principal, Role
from app.fhir import schemas
from app.kit.errors import BadRequest, ServiceUnavailable
from tests import builders
from tests.conftest import PROJECT_ROOT, bearer
from tests.test_audit_outage import Flaky, _until_written
from tests.test_crud import create


async def _events(client, app, **params: str) -> list[dict]:
    await app.state.services.audit.flush()  # reads are audited in batches
    bundle = (await client.get("/fhir/AuditEvent", params={"_count": "1000", **params})).json()
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


async def provenance_rows(app, *types: str) -> list[tuple[str, int, str]]:
    """(target id, target version, content) of each stored Provenance of these types."""
    async with app.state.services.db.read() as conn:
        result = await conn.execute(
            text("SELECT target_type, target_id, target_version, content FROM provenance")
        )
        return [(row[1], row[2], row[3]) for row in result.all() if row[0] in types]


def _details(event: dict) -> dict[str, str]:
    return {d["type"]: d["valueString"] for d in event["entity"][0].get("detail", [])}


async def test_update_and_delete_need_a_reason(client, anonymous):
    patient = (await create(client, builders.patient())).json()
    admin = bearer("admin")
    changed = {**patient, "gender": "male"}
    for headers in (
        {},
        {"X-Provenance": '{"resourceType":"Provenance"}'},
        {"X-Provenance": '{"resourceType":"Provenance","reason":[{}]}'},
    ):
        response = await anonymous.put(
            f"/fhir/Patient/{patient['id']}", json=changed, headers={**admin, **headers}
        )
        assert response.status_code == 400, headers
        assert response.json()["issue"][0]["code"] == "required"
        deleted = await anonymous.delete(
            f"/fhir/Patient/{patient['id']}", headers={**admin, **headers}
        )
        assert deleted.status_code == 400
    assert (await client.get(f"/fhir/Patient/{patient['id']}")).json() == patient
    assert (
        await anonymous.put(
            f"/fhir/Patient/{patient['id']}",
            json=changed,
            headers={**admin, "X-Provenance": "not json"},
        )
    ).status_code == 400


async def test_the_reason_is_needed_whatever_the_request_finds(app, client, anonymous):
    """A PUT that creates, a DELETE of what is deleted already and a conditional delete or
    update that matches nothing: each needs the reason (the OpenAPI file marks the header
    required), so a request's validity never depends on what is stored."""
    admin = bearer("admin")
    gone = (await create(client, builders.patient("S01-801"))).json()["id"]
    assert (await client.delete(f"/fhir/Patient/{gone}")).status_code in (200, 204)
    nothing = {"identifier": "https://itp-trial.example/fhir/sid/subject|none"}
    requests = [
        (
            "PUT",
            "/fhir/Patient/made-by-put",
            {**builders.patient("S01-802"), "id": "made-by-put"},
            {},
        ),
        ("PUT", "/fhir/Patient", builders.patient("S01-803"), nothing),
        ("DELETE", f"/fhir/Patient/{gone}", None, {}),
        ("DELETE", "/fhir/Patient", None, nothing),
    ]
    requests.append(("PATCH", "/fhir/Patient/no-such-patient", {"gender": "male"}, {}))
    for method, url, body, params in requests:
        answer = await anonymous.request(method, url, json=body, params=params, headers=admin)
        assert answer.status_code == 400, (method, url, answer.text)
        assert answer.json()["issue"][0]["code"] == "required"
        assert answer.json()["issue"][0]["expression"] == ["header.X-Provenance"]
        # A Provenance without a reason is no reason either, checked before anything else.
        reasonless = {**admin, "X-Provenance": '{"resourceType":"Provenance"}'}
        answer = await anonymous.request(method, url, json=body, params=params, headers=reasonless)
        assert answer.status_code == 400, (method, url, answer.text)
        assert answer.json()["issue"][0]["expression"] == ["Provenance.reason"]
    requests.pop()
    assert (await client.get("/fhir/Patient/made-by-put")).status_code == 404
    found = await client.get("/fhir/Patient", params={"identifier": "S01-803"})
    assert found.status_code == 200 and found.json().get("entry", []) == []
    # With the reason, the PUTs create, and each stores its Provenance with version 1.
    for method, url, body, params in requests:
        answer = await client.request(method, url, json=body, params=params)
        assert answer.status_code < 300, (method, url, answer.text)
    made = (await client.get("/fhir/Patient", params={"identifier": "S01-803"})).json()
    created = {"made-by-put", made["entry"][0]["resource"]["id"]}
    rows = [row for row in await provenance_rows(app, "Patient") if row[1] == 1]
    assert {row[0] for row in rows} == created
    [record] = [
        e
        for e in await _events(client, app, entity="Patient/made-by-put", action="U")
        if e["outcome"] == "0"
    ]
    assert _details(record)["reason"] == "test correction"


async def test_the_reason_header_has_one_form(client, anonymous):
    """Printable ASCII with something visible (beyond ASCII: JSON \\u escapes), at most
    8,000 characters: what the OpenAPI file says, nothing else."""
    patient = (await create(client, builders.patient())).json()
    changed = {**patient, "gender": "male"}
    url = f"/fhir/Patient/{patient['id']}"
    escaped = '{"resourceType":"Provenance","reason":[{"text":"caf\\u00e9"}]}'
    raw = escaped.replace("\\u00e9", "\u00e9").encode("latin-1")
    long = '{"resourceType":"Provenance","reason":[{"text":"' + "x" * 8000 + '"}]}'
    for header in (raw, "   ", long):
        answer = await anonymous.put(
            url, json=changed, headers={**bearer("admin"), "X-Provenance": header}
        )
        assert answer.status_code == 400, header
        assert answer.json()["issue"][0]["expression"] == ["header.X-Provenance"]
    assert (await client.get(url)).json() == patient
    answer = await anonymous.put(
        url, json=changed, headers={**bearer("admin"), "X-Provenance": escaped}
    )
    assert answer.status_code == 200, answer.text


async def test_a_change_stores_its_provenance_and_audit_record(app, client, anonymous):
    patient = (await create(client, builders.patient())).json()
    reason = '{"resourceType":"Provenance","reason":[{"text":"birth date mistyped"}]}'
    response = await anonymous.put(
        f"/fhir/Patient/{patient['id']}",
        json={**patient, "birthDate": "1968-04-21"},
        headers={**bearer("investigator", ("S01",), sub="dr-who"), "X-Provenance": reason},
    )
    assert response.status_code == 200
    async with app.state.services.db.read() as conn:
        rows = (
            await conn.execute(
                text("SELECT target_version, content FROM provenance WHERE target_id = :id"),
                {"id": patient["id"]},
            )
        ).all()
    assert [row[0] for row in rows] == [2]
    assert f"Patient/{patient['id']}/_history/2" in rows[0][1]
    assert "dr-who" in rows[0][1] and "birth date mistyped" in rows[0][1]
    updates = await _events(client, app, entity=f"Patient/{patient['id']}", action="U")
    assert len(updates) == 1
    details = _details(updates[0])
    assert details["version-before"] == "1" and details["version-after"] == "2"
    assert details["reason"] == "birth date mistyped" and details["site"] == "S01"
    assert updates[0]["agent"][0]["who"]["identifier"]["value"] == "dr-who"
    assert updates[0]["agent"][0]["role"][0]["text"] == "investigator"
    assert updates[0]["outcome"] == "0"


async def test_every_write_read_search_and_refusal_is_audited(app, client, anonymous):
    patient_id = (await create(client, builders.patient())).json()["id"]
    count = (
        await create(client, builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 40))
    ).json()
    await client.get(f"/fhir/Observation/{count['id']}")
    await client.get("/fhir/Observation", params={"patient": patient_id})
    await client.delete(f"/fhir/Observation/{count['id']}")
    refused = await anonymous.post(
        "/fhir/Observation",
        headers=bearer("monitor", ("S01",)),
        json=builders.platelet_count(patient_id, "2025-03-11", 40),
    )
    assert refused.status_code == 403
    await anonymous.get("/fhir/Patient", headers={"Authorization": "Bearer forged"})
    events = await _events(client, app)
    summary = [
        (
            e["subtype"][0]["code"],
            e["outcome"],
            e.get("entity", [{}])[0].get("what", {}).get("reference", ""),
        )
        for e in events
    ]
    assert ("create", "0", f"Patient/{patient_id}/_history/1") in summary
    assert ("create", "0", f"Observation/{count['id']}/_history/1") in summary
    assert ("read", "0", f"Observation/{count['id']}/_history/1") in summary
    assert ("delete", "0", f"Observation/{count['id']}/_history/2") in summary
    assert any(code == "search-type" for code, _, _ in summary)
    assert any(code == "create" and outcome == "4" for code, outcome, _ in summary)
    assert any(code == "login" and outcome == "4" for code, outcome, _ in summary)
    request_ids = {_details(e).get("request-id") for e in events if e.get("entity")}
    assert None not in request_ids


def _shown(event: dict) -> set[str]:
    """The resource versions a search's AuditEvent says it returned."""
    return {
        entity["what"]["reference"]
        for entity in event.get("entity", [])
        if entity.get("role", {}).get("code") == "4"
    }


async def test_a_search_record_names_what_it_showed(app, client):
    """Who was shown a patient's counts: each search's record lists the versions it returned
    (matches and included resources), and `entity=` finds the searches that returned one."""
    patient = (await create(client, builders.patient())).json()["id"]
    other = (await create(client, builders.patient("S01-002"))).json()["id"]
    counts = [
        (await create(client, builders.platelet_count(patient, f"2025-03-1{d}", 30 + d))).json()
        for d in range(3)
    ]
    changed = {**counts[0], "valueQuantity": {**counts[0]["valueQuantity"], "value": 99}}
    updated = await client.put(
        f"/fhir/Observation/{counts[0]['id']}",
        json=changed,
        headers={"X-Provenance": '{"resourceType":"Provenance","reason":[{"text":"typo"}]}'},
    )
    assert updated.status_code == 200
    query = "code=http://loinc.org|777-3&_include=Observation:subject&_count=2&_sort=date"
    page = await client.get(f"/fhir/Observation?{query}")
    assert page.status_code == 200
    await client.get("/fhir/Observation?_summary=count")
    searches = [
        e
        for e in await _events(client, app, action="E")
        if e["subtype"][0]["code"] == "search-type"
    ]
    expected = {
        f"Observation/{counts[0]['id']}/_history/2",
        f"Observation/{counts[1]['id']}/_history/1",
        f"Patient/{patient}/_history/1",
    }
    assert sorted(_shown(e) != set() for e in searches) == [False, True]
    (shown,) = [_shown(e) for e in searches if _shown(e)]
    assert shown == expected
    # Each of them finds that search; what it did not return does not.
    for reference in expected:
        kind, ident = reference.split("/")[:2]
        found = await _events(client, app, entity=f"{kind}/{ident}", action="E")
        assert [_shown(e) for e in found] == [expected], reference
    assert await _events(client, app, entity=f"Observation/{counts[2]['id']}", action="E") == []
    assert await _events(client, app, entity=f"Patient/{other}", action="E") == []
    # The record as served is a valid R4B AuditEvent, and the chain still verifies.
    (record,) = [e for e in searches if _shown(e)]
    schema = schemas.AuditEvent.model_json_schema(by_alias=True)
    jsonschema.Draft202012Validator(schema).validate(record)
    assert (await verify(app.state.services.db)).problem is None


async def test_audit_trail_is_for_monitors_and_admins_only_and_cannot_be_changed(
    app, client, anonymous
):
    (await create(client, builders.patient())).json()
    for role, status in (("monitor", 200), ("admin", 200), ("investigator", 403), ("lab", 403)):
        response = await anonymous.get("/fhir/AuditEvent", headers=bearer(role, ("S01",)))
        assert response.status_code == status, role
    event = (await _events(client, app))[0]
    for method in ("PUT", "DELETE", "PATCH"):
        response = await client.request(method, f"/fhir/AuditEvent/{event['id']}", json=event)
        assert response.status_code == 405, method
    assert (await client.post("/fhir/AuditEvent", json=event)).status_code == 405
    read = await client.get(f"/fhir/AuditEvent/{event['id']}")
    assert read.json() == event


@pytest.mark.parametrize("name", ["entity", "agent", "action", "date", "_id"])
async def test_a_nul_in_an_audit_search_is_refused_not_a_server_error(client, name):
    """Found by the fuzzer on PostgreSQL, whose text cannot hold NUL (it answered 500)."""
    response = await client.get("/fhir/AuditEvent", params={name: "Patient/a\x00b"})
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "NUL" in response.json()["issue"][0]["diagnostics"]


async def test_monitor_sees_only_its_sites_events(app, client, anonymous):
    await create(client, builders.patient("S01-1", site="S01"))
    await create(client, builders.patient("S02-1", site="S02"))
    await app.state.services.audit.flush()
    bundle = (
        await anonymous.get(
            "/fhir/AuditEvent", params={"action": "C"}, headers=bearer("monitor", ("S02",))
        )
    ).json()
    sites = {_details(e["resource"]).get("site") for e in bundle.get("entry", [])}
    assert sites == {"S02"}


def _verify(database_url: str, *anchors: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "audit", "verify", *(f"--anchor={a}" for a in anchors)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )


async def _chained(app) -> None:
    """Queued records written and every record chained, now rather than at the sequencer's
    next pass: a test that changes a chained record must find it chained."""
    await app.state.services.audit.flush()
    await ChainSequencer(app.state.services.db).chain_all()


async def test_audit_verify_detects_tampering(app, client, database_url):
    for number in range(3):
        await create(client, builders.patient(f"S01-00{number}"))
    await _chained(app)
    intact = _verify(database_url)
    assert intact.returncode == 0, intact.stderr
    assert "intact" in intact.stdout
    async with app.state.services.db.write() as conn:
        if conn.dialect.name == "postgresql":
            # An attacker with the table owner's rights: the trigger is no obstacle to them.
            await conn.execute(text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
        seq = (
            await conn.execute(text("SELECT seq FROM audit_event ORDER BY seq LIMIT 1 OFFSET 1"))
        ).scalar_one()
        await conn.execute(
            text(
                "UPDATE audit_event SET content = replace(content, "
                '\'"outcome":"0"\', \'"outcome":"4"\') WHERE seq = :s'
            ),
            {"s": seq},
        )
        if conn.dialect.name == "postgresql":  # the database is shared by later tests
            await conn.execute(text("ALTER TABLE audit_event ENABLE TRIGGER USER"))
    broken = _verify(database_url)
    assert broken.returncode == 1
    assert f"seq={seq}" in broken.stderr


async def _write_records(app, client) -> list[int]:
    """Four creates: four records in the chain, none referenced by a disclosure row."""
    for number in range(1, 5):
        await create(client, builders.patient(f"S01-00{number}"))
    await _chained(app)
    async with app.state.services.db.read() as conn:
        return list(
            (await conn.execute(text("SELECT seq FROM audit_event ORDER BY chain_seq"))).scalars()
        )


async def test_audit_verify_detects_a_record_removed_from_the_middle(app, client, database_url):
    """Every remaining record still matches its own hash: only the link from the next
    record's prev_hash to the record before it shows the gap."""
    seqs = await _write_records(app, client)
    assert _verify(database_url).returncode == 0
    middle, after = seqs[1], seqs[2]
    row = text("SELECT * FROM audit_event WHERE seq = :s")
    async with app.state.services.db.write() as conn:
        removed = dict((await conn.execute(row, {"s": middle})).mappings().one())
        await _as_owner(conn, "DELETE FROM audit_event WHERE seq = :s", {"s": middle})
    broken = _verify(database_url)
    assert broken.returncode == 1
    assert f"seq={after}" in broken.stderr and "removed or changed" in broken.stderr
    columns, values = ", ".join(removed), ", ".join(f":{name}" for name in removed)
    async with app.state.services.db.write() as conn:  # put it back for the teardown's check
        await conn.execute(text(f"INSERT INTO audit_event ({columns}) VALUES ({values})"), removed)
    assert _verify(database_url).returncode == 0


async def test_audit_verify_detects_records_swapped_in_the_middle(app, client, database_url):
    """Two records trading places keep their own hashes (each covers its own prev_hash,
    id and content): the chain's links are what breaks."""
    seqs = await _write_records(app, client)
    first, second = seqs[1], seqs[2]
    row = text("SELECT * FROM audit_event WHERE seq = :s")

    async def swap() -> None:
        async with app.state.services.db.write() as conn:
            a = dict((await conn.execute(row, {"s": first})).mappings().one())
            b = dict((await conn.execute(row, {"s": second})).mappings().one())
            # Their places in the table and in the chain stay; everything else trades.
            moved = [name for name in a if name not in ("seq", "chain_seq")]
            assignments = ", ".join(f"{name} = :{name}" for name in moved)
            statement = f"UPDATE audit_event SET {assignments} WHERE seq = :seq"
            # The id is unique: park one record's under another name while they trade.
            await _as_owner(
                conn, "UPDATE audit_event SET id = 'parked' WHERE seq = :s", {"s": first}
            )
            await _as_owner(conn, statement, {**a, "seq": second})
            await _as_owner(conn, statement, {**b, "seq": first})

    await swap()
    broken = _verify(database_url)
    assert broken.returncode == 1
    assert f"seq={first}" in broken.stderr and "prev_hash" in broken.stderr
    await swap()  # and back, for the teardown's check
    assert _verify(database_url).returncode == 0


def _head(verified: subprocess.CompletedProcess[str]) -> str:
    assert verified.returncode == 0, verified.stderr
    (line,) = [line for line in verified.stdout.splitlines() if line.startswith("head")]
    return line.rsplit(" ", 1)[1]


async def test_audit_verify_anchor_detects_a_cut_off_tail(app, client, database_url):
    """A chain whose newest records were removed is still a valid chain; a head printed by
    an earlier run and kept elsewhere shows the cut. (Write records cut off are also seen
    without one: their versions are left unaudited. Read records are not.)"""
    patient = (await create(client, builders.patient("S01-001"))).json()
    await client.get(f"/fhir/Patient/{patient['id']}")
    await _chained(app)
    anchor = _head(_verify(database_url))
    seq, digest = anchor.split(":")
    for _ in range(2):
        await client.get(f"/fhir/Patient/{patient['id']}")
    await _chained(app)
    later = _head(_verify(database_url, anchor))
    assert int(later.split(":")[0]) > int(seq)
    # A wrong hash for the anchored record: a replaced record (or a forged anchor).
    replaced = _verify(database_url, f"{seq}:{'f' * 64}")
    assert replaced.returncode == 1
    assert f"seq={seq}" in replaced.stderr and "anchored" in replaced.stderr
    assert _verify(database_url, "12x").returncode == 2
    tail = text("SELECT * FROM audit_event WHERE chain_seq >= :s ORDER BY chain_seq")
    async with app.state.services.db.write() as conn:
        removed = [dict(row) for row in (await conn.execute(tail, {"s": int(seq)})).mappings()]
        assert {row["action"] for row in removed} == {"R"}  # the anchored read and later ones
        await _as_owner(conn, "DELETE FROM audit_event WHERE chain_seq >= :s", {"s": int(seq)})
    # What is left is a valid chain: without an anchor the cut goes unseen...
    assert _verify(database_url).returncode == 0
    # ...with the anchor it does not.
    cut = _verify(database_url, anchor)
    assert cut.returncode == 1
    assert f"seq={seq} is not in the chain" in cut.stderr
    # Put the records back (every read keeps its AuditEvent).
    columns = ", ".join(removed[0])
    values = ", ".join(f":{name}" for name in removed[0])
    async with app.state.services.db.write() as conn:
        await conn.execute(text(f"INSERT INTO audit_event ({columns}) VALUES ({values})"), removed)
    assert _verify(database_url, anchor).returncode == 0


async def _as_owner(conn, statement: str, parameters: dict) -> None:
    """A statement run with the table owner's rights, to whom the PostgreSQL trigger that
    keeps the trail append-only is no obstacle (an attacker with those rights)."""
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        await conn.execute(text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
    await conn.execute(text(statement), parameters)
    if postgres:  # the database is shared by later tests
        await conn.execute(text("ALTER TABLE audit_event ENABLE TRIGGER USER"))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgres_trigger_refuses_update_and_delete(app, client):
    await create(client, builders.patient())
    await client.get("/fhir/Patient")  # a search that showed one: an audit_disclosure row
    await app.state.services.audit.flush()
    for statement in (
        "UPDATE audit_event SET outcome = '4'",
        "DELETE FROM audit_event",
        "TRUNCATE audit_event CASCADE",  # without CASCADE the foreign key refuses it first
        "UPDATE audit_disclosure SET version = 9",
        "DELETE FROM audit_disclosure",
        "TRUNCATE audit_disclosure",
    ):
        with pytest.raises(Exception, match="append-only"):
            async with app.state.services.db.write() as conn:
                await conn.execute(text(statement))
    async with app.state.services.db.read() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM audit_event"))).scalar() >= 1
        assert (await conn.execute(text("SELECT count(*) FROM audit_disclosure"))).scalar() == 1


async def test_hardening_body_limit_and_security_headers(app, client):
    too_big = b'{"resourceType":"Patient","text":"' + b"x" * 1_100_000 + b'"}'
    response = await client.post(
        "/fhir/Patient", content=too_big, headers={"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 413
    assert response.json()["issue"][0]["code"] == "too-costly"

    async def chunks():
        for _ in range(20):
            yield b"x" * 100_000

    chunked = await client.post(
        "/fhir/Patient", content=chunks(), headers={"Content-Type": "application/fhir+json"}
    )
    assert chunked.status_code == 413
    refusals = await _events(client, app, action="C")
    assert sum("413" in e.get("outcomeDesc", "") for e in refusals) == 2
    read = await client.get("/fhir/metadata")
    assert read.headers["x-content-type-options"] == "nosniff"
    assert read.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in read.headers["content-security-policy"]
    assert (
        "access-control-allow-origin"
        not in (
            await client.get("/fhir/metadata", headers={"Origin": "https://evil.example"})
        ).headers
    )


async def test_cors_only_for_configured_origins(database_url):
    import httpx

    from app.main import create_app
    from app.settings import Settings
    from tests.conftest import KEY

    app = create_app(
        Settings(
            database_url=database_url, environment="test", cors_origins=["https://frontend.example"]
        ),
        key_source=KEY,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        allowed = await http.options(
            "/fhir/Patient",
            headers={"Origin": "https://frontend.example", "Access-Control-Request-Method": "POST"},
        )
        assert allowed.headers["access-control-allow-origin"] == "https://frontend.example"
        other = await http.options(
            "/fhir/Patient",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


async def test_the_trail_as_a_bundle_matches_its_documented_schema(app, client):
    """A refusal's outcomeDesc quotes the request (a path with U+0085, a vertical tab): the
    AuditEvent entries of the searchset stay valid under the Bundle schema (ST108)."""
    assert (await client.get("/fhir/AdverseEvent/%C2%85%0Bx")).status_code == 404
    assert (await client.get("/fhir/Patient?_count=%0B")).status_code == 400
    await app.state.services.audit.flush()
    bundle = (await client.get("/fhir/AuditEvent", params={"_count": "1000"})).json()
    assert any("\\u0085" in e["resource"].get("outcomeDesc", "") for e in bundle["entry"])
    schema = schemas.Bundle.model_json_schema(by_alias=True)
    jsonschema.Draft202012Validator(schema).validate(bundle)


async def test_batches_append_in_chain_order_under_concurrency(app, client):
    """A batch is inserted by one statement executed once per row (one round trip on
    asyncpg) with its records built before the chain's lock: `seq` order is still the order
    the records were given, and concurrent batches and writes still make one valid chain."""
    db = app.state.services.db
    inserts: list[tuple[str, bool, int]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT_EVENT"):
            inserts.append((statement, executemany, len(parameters) if executemany else 1))

    queues = [AuditQueue(db) for _ in range(2)]
    for number, queue in enumerate(queues):
        for k in range(150):
            queue.add(
                AuditRecord("read", agent=f"q{number}", entity_type="Patient", entity_id=f"{k}")
            )
    event.listen(db.writer.sync_engine, "before_cursor_execute", record)
    try:
        await asyncio.gather(
            *(queue.flush() for queue in queues),
            create(client, builders.patient("S01-101")),
            create(client, builders.patient("S01-102")),
        )
    finally:
        event.remove(db.writer.sync_engine, "before_cursor_execute", record)
    batches = [(many, rows) for statement, many, rows in inserts if rows == 150]
    assert batches == [(True, 150), (True, 150)]
    assert all("), (" not in statement for statement, _, _ in inserts)  # one row per execution

    await ChainSequencer(db).chain_all()
    assert (await verify(db)).problem is None
    async with db.read() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT id, agent, entity_id, content, prev_hash, hash "
                    "FROM audit_event ORDER BY chain_seq"
                )
            )
        ).all()
    for number in range(2):
        mine = [int(row.entity_id) for row in rows if row.agent == f"q{number}"]
        assert mine == list(range(150))
    for before, after in zip(rows, rows[1:], strict=False):
        assert after.prev_hash == before.hash
        assert after.hash == chain_hash(before.hash, after.id, after.content)


def test_an_audit_record_as_a_fhir_audit_event_field_by_field():
    """The stored and served form of a record, every field: the event's type, subtype and
    observer, the agent's identity, role and network address, the entity's versioned
    reference, query and details, and the entities a search showed."""
    recorded = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
    record = AuditRecord(
        "search-type",
        outcome="4",
        description="refused",
        agent="dr-who",
        role="monitor",
        site="S01",
        entity_type="Observation",
        entity_id="obs-1",
        version_before=1,
        version_after=2,
        query="patient=p-1",
        reason="typo",
        recorded=recorded,
        request_id="req-1",
        client_address="10.0.0.1",
        disclosed=(("Patient", "p-1", 3),),
    )
    assert to_fhir(record, "audit-1") == {
        "resourceType": "AuditEvent",
        "id": "audit-1",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "search-type"}],
        "action": "E",
        "recorded": "2025-03-10T09:00:00.000000Z",
        "outcome": "4",
        "outcomeDesc": "refused",
        "agent": [
            {
                "requestor": True,
                "who": {"identifier": {"value": "dr-who"}},
                "role": [{"text": "monitor"}],
                "network": {"address": "10.0.0.1", "type": "2"},
            }
        ],
        "source": {"observer": {"display": "itp-trial-api"}},
        "entity": [
            {
                "what": {"reference": "Observation/obs-1/_history/2"},
                "query": "patient=p-1",
                "detail": [
                    {"type": "version-before", "valueString": "1"},
                    {"type": "version-after", "valueString": "2"},
                    {"type": "site", "valueString": "S01"},
                    {"type": "request-id", "valueString": "req-1"},
                    {"type": "reason", "valueString": "typo"},
                ],
            },
            {
                "what": {"reference": "Patient/p-1/_history/3"},
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "4",
                    "display": "Domain Resource",
                },
            },
        ],
    }


@pytest.mark.parametrize(
    ("interaction", "action"),
    [
        ("create", "C"),
        ("update", "U"),
        ("delete", "D"),
        ("read", "R"),
        ("vread", "R"),
        ("history-instance", "R"),
        ("history-type", "R"),
        ("search-type", "E"),
        ("operation", "E"),
        ("login", "E"),
        ("capabilities", "E"),  # any other interaction: execute
    ],
)
def test_each_interaction_has_its_audit_action(interaction, action):
    assert AuditRecord(interaction).action == action


def test_a_record_keeps_only_what_its_columns_can_hold():
    long = AuditRecord("read", agent="a" * 300, entity_type="Patient", entity_id="x" * 65)
    assert long.agent == "a" * 255
    assert (long.entity_type, long.entity_id) == ("Patient", None)
    fits = AuditRecord("read", agent="a" * 255, entity_type="P" * 40, entity_id="A-z.9" * 12)
    assert (fits.agent, fits.entity_type, fits.entity_id) == ("a" * 255, "P" * 40, "A-z.9" * 12)
    # No type that a column holds: neither is kept, not even an id that would fit.
    assert AuditRecord("read", entity_type="P" * 41, entity_id="p-1").entity_id is None
    assert AuditRecord("read", entity_type="Pat/ient", entity_id="p-1").entity_type is None
    assert AuditRecord("read", agent="").agent == ""


@pytest.mark.parametrize(
    ("text", "anchor"),
    [("12:abc", (12, "abc")), (" 7:" + "f" * 64 + "\n", (7, "f" * 64))],
)
def test_an_anchor_is_seq_and_hash(text, anchor):
    assert parse_anchor(text) == anchor


@pytest.mark.parametrize("text", ["12", "12:", ":abc", "x1:abc", "-1:abc", "\u0661:abc"])
def test_a_malformed_anchor_is_refused(text):
    with pytest.raises(ValueError, match=r"an anchor is SEQ:HASH as `audit verify` prints it"):
        parse_anchor(text)


def test_a_spill_file_gives_back_every_field_of_its_records(tmp_path):
    """A spill directory that does not exist yet, parents included, is made; each record
    comes back equal, in order, the resources a search showed included."""
    shown = AuditRecord(
        "search-type",
        agent="dr-who",
        site="S01",
        query="patient=p-1",
        recorded=datetime(2025, 3, 10, 9, 0, tzinfo=UTC),
        disclosed=(("Patient", "p-1", 3), ("Observation", "o-1", 1)),
    )
    records = [shown, AuditRecord("read", outcome="4", entity_type="Patient", entity_id="p-2")]
    path = spill(tmp_path / "not" / "yet", records)
    assert path.parent == tmp_path / "not" / "yet"
    assert read_spill(path) == records


async def test_an_audit_event_is_read_by_its_id_within_the_callers_sites(app, client, anonymous):
    await create(client, builders.patient("S01-1", site="S01"))
    await create(client, builders.patient("S02-1", site="S02"))
    events = await _events(client, app, action="C")
    s01, s02 = events[-2], events[-1]
    assert _details(s02)["site"] == "S02"
    for record in (s01, s02):  # not merely the first record of the trail
        assert (await client.get(f"/fhir/AuditEvent/{record['id']}")).json() == record
    monitor = bearer("monitor", ("S01",))
    assert (await anonymous.get(f"/fhir/AuditEvent/{s01['id']}", headers=monitor)).json() == s01
    for missing in (s02["id"], "no-such-event"):
        response = await anonymous.get(f"/fhir/AuditEvent/{missing}", headers=monitor)
        assert response.status_code == 404
        outcome = response.json()
        assert outcome["issue"][0]["diagnostics"] == f"AuditEvent/{missing} does not exist"


async def test_verify_walks_the_whole_chain_batch_by_batch(app, client):
    """In process (the `audit verify` tests run it in a subprocess): every record counted
    across batches, the head it reports, and each way it names the first broken record."""
    await _write_records(app, client)
    db = app.state.services.db
    async with db.read() as conn:
        rows = (
            await conn.execute(
                text("SELECT seq, chain_seq, id, content, hash FROM audit_event ORDER BY chain_seq")
            )
        ).all()
    assert len(rows) >= 4
    intact = VerifyResult(len(rows), head=(rows[-1].chain_seq, rows[-1].hash))
    for batch in (1, 3, 1000):
        assert await verify(db, batch=batch) == intact, batch
    anchors = {rows[1].chain_seq: rows[1].hash, rows[-1].chain_seq: rows[-1].hash}
    assert await verify(db, batch=2, anchors=anchors) == intact
    assert await verify(db, batch=2, anchors={rows[1].chain_seq: "f" * 64}) == VerifyResult(
        1, Broken("its hash is not the anchored one (replaced)", rows[1].seq, rows[1].id)
    )
    beyond = rows[-1].chain_seq + 5
    assert await verify(db, batch=2, anchors={beyond + 1: "a", beyond: "b"}) == VerifyResult(
        len(rows),
        Broken(
            f"the anchored record seq={beyond} is not in the chain, which ends at "
            f"seq={rows[-1].chain_seq} (records were cut off)"
        ),
    )
    changed = "UPDATE audit_event SET content = :content WHERE seq = :seq"
    async with db.write() as conn:
        await _as_owner(conn, changed, {"content": rows[2].content + " ", "seq": rows[2].seq})
    assert await verify(db, batch=2) == VerifyResult(
        2, Broken("its content does not match its hash (changed)", rows[2].seq, rows[2].id)
    )
    async with db.write() as conn:  # back as it was, for the teardown's check
        await _as_owner(conn, changed, {"content": rows[2].content, "seq": rows[2].seq})
    assert await verify(db) == intact


async def test_a_record_the_database_refuses_for_good_is_logged_and_the_rest_written(
    app, caplog, monkeypatch
):
    """A batch the database refuses for a lasting reason (not an outage) is written one
    record at a time: the refused one goes to the error log in full, the others to the
    trail, in order, and none stays queued."""
    db = app.state.services.db
    original = trail.append

    async def refusing(conn, records):
        if any(record.agent == "refused" for record in records):
            raise sa.IntegrityError("INSERT", None, Exception("a lasting refusal"))
        await original(conn, records)

    monkeypatch.setattr(trail, "append", refusing)
    queue = AuditQueue(db)
    refused = AuditRecord("read", agent="refused", entity_type="Patient", entity_id="x")
    for record in (
        AuditRecord("read", agent="one-by-one", entity_type="Patient", entity_id="1"),
        refused,
        AuditRecord("read", agent="one-by-one", entity_type="Patient", entity_id="2"),
    ):
        queue.add(record)
    await queue.flush()
    assert len(queue) == 0
    async with db.read() as conn:
        rows = await conn.execute(
            text("SELECT entity_id FROM audit_event WHERE agent = 'one-by-one' ORDER BY seq")
        )
        assert list(rows.scalars()) == ["1", "2"]
    (logged,) = [r for r in caplog.records if r.name == "app.audit" and r.levelno >= 40]
    assert logged.getMessage() == (
        "audit record refused by the database, logged instead: "
        + orjson.dumps(to_fhir(refused, refused.audit_id)).decode()
    )
    assert (await verify(db)).problem is None


async def test_the_flush_loop_reports_an_outage_once_and_its_end(app, caplog):
    db = app.state.services.db
    flaky = Flaky(db)
    queue = AuditQueue(flaky, interval_seconds=0.01)  # type: ignore[arg-type]
    queue.add(AuditRecord("read", agent="loop", entity_type="Patient", entity_id="1"))
    flaky.refuse = 3
    caplog.set_level(logging.WARNING, logger="app.audit")
    await _until_written(queue)
    messages = [r.getMessage() for r in caplog.records if r.name == "app.audit"]
    assert len(messages) == 2, messages
    assert messages[0].startswith(
        "audit trail unreachable (DBAPIError: (asyncpg.exceptions.CannotConnectNowError) "
        "the database system is starting up); 1 records kept in order, retried every 0.01s"
    ), messages[0]
    assert messages[1].startswith("audit trail reachable again; the records queued since ")
    assert messages[1].endswith(" are written")


async def test_each_audit_search_parameter_selects_what_it_names(app, client):
    db = app.state.services.db
    queue = AuditQueue(db)
    days = {  # naive UTC, as the columns store it
        "a": datetime(2020, 1, 1, 12, 0),
        "b": datetime(2020, 1, 2, 0, 0),  # the very start of the day searched
        "c": datetime(2020, 1, 3, 12, 0),
    }
    records = {
        name: AuditRecord(
            "read", agent="dated", entity_type="Patient", entity_id=f"p-{name}", recorded=when
        )
        for name, when in days.items()
    }
    for record in records.values():
        queue.add(record)
    await queue.flush()
    ids = {record.audit_id: name for name, record in records.items()}

    async def found(*params: tuple[str, str]) -> str:
        response = await client.get(
            "/fhir/AuditEvent", params=[*params, ("agent", "dated"), ("_count", "100")]
        )
        assert response.status_code == 200, response.text
        return "".join(ids[e["resource"]["id"]] for e in response.json().get("entry", []))

    assert await found() == "abc"
    # No value: that parameter is ignored, the ones after it still apply.
    assert await found(("action", ""), ("entity", "Patient/p-b")) == "b"
    assert await found(("_id", f"{records['a'].audit_id},{records['c'].audit_id}")) == "ac"
    assert await found(("entity", "Patient/p-b")) == "b"
    assert await found(("entity", "p-a,Patient/p-c")) == "ac"
    assert await found(("entity", "Observation/p-b")) == ""
    assert await found(("action", "C,R,U,D,E")) == "abc"
    assert await found(("action", "C")) == ""
    for value, expected in [
        ("2020-01-02", "b"),
        ("eq2020-01-02", "b"),
        ("lt2020-01-02", "a"),
        ("le2020-01-02", "ab"),
        ("gt2020-01-02", "c"),
        ("ge2020-01-02", "bc"),
        ("ge2020-01-01T12:00:00Z", "abc"),
    ]:
        assert await found(("date", value)) == expected, value
    for params, message in [
        ([("action", "X")], "action='X': one of C, R, U, D, E"),
        ([("date", "eq2020-13-45")], "date='eq2020-13-45' is not a FHIR date or dateTime"),
        (
            [("subject", "x")],
            "Unknown AuditEvent search parameter 'subject'; supported: "
            "_id, entity, agent, date, action",
        ),
    ]:
        response = await client.get("/fhir/AuditEvent", params=params)
        assert response.status_code == 400, params
        assert response.json()["issue"][0]["diagnostics"] == message


async def test_a_full_queue_refuses_a_read_and_sums_up_the_refusals_it_could_not_queue(app):
    queue = AuditQueue(app.state.services.db, max_records=1)
    queue.add(AuditRecord("read", agent="full"))
    with pytest.raises(ServiceUnavailable) as refused:
        queue.add(AuditRecord("read", agent="full"))
    assert str(refused.value.diagnostics) == (
        "The audit trail cannot keep up (its queue is full while the database is "
        "unavailable): the request was not served; retry later"
    )
    first, last = datetime(2025, 3, 10, 9, 0), datetime(2025, 3, 10, 9, 5)
    for when in (first, datetime(2025, 3, 10, 9, 1), last):
        queue.add(AuditRecord("read", outcome="4", agent="full", recorded=when))
    assert len(queue) == 1
    await queue.flush()
    async with app.state.services.db.read() as conn:
        rows = await conn.execute(text("SELECT content FROM audit_event ORDER BY seq"))
        summary = orjson.loads(list(rows.scalars())[-1])
    assert summary["outcome"] == "8"
    assert summary["outcomeDesc"] == (
        "503: 3 requests refused between 2025-03-10T09:00:00.000000Z and "
        "2025-03-10T09:05:00.000000Z while the audit queue was full; their own records "
        "could not be kept"
    )


async def test_audit_search_pages_follow_the_chain_without_gap_or_repeat(app, client):
    queue = AuditQueue(app.state.services.db)
    for number in range(5):
        queue.add(AuditRecord("read", agent="paged", entity_type="Patient", entity_id=f"{number}"))
    await queue.flush()
    seen: list[str] = []
    url: str | None = "/fhir/AuditEvent?agent=paged&_count=2"
    while url is not None:
        page = (await client.get(url)).json()
        assert page["resourceType"] == "Bundle", page
        seen += [e["resource"]["entity"][0]["what"]["reference"] for e in page.get("entry", [])]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == [f"Patient/{number}" for number in range(5)]


class _Hanging:
    """A database whose write transactions never begin: a connect that hangs."""

    def __init__(self, db) -> None:
        self.db = db

    @asynccontextmanager
    async def write(self):
        await asyncio.Event().wait()
        yield None

    def __getattr__(self, name: str):
        return getattr(self.db, name)


async def test_a_flush_that_hangs_at_shutdown_is_cut_short_and_spilled(app, tmp_path):
    queue = AuditQueue(_Hanging(app.state.services.db), spill_dir=tmp_path)  # type: ignore[arg-type]
    queue.add(AuditRecord("read", agent="hung", entity_type="Patient", entity_id="1"))
    await asyncio.wait_for(queue.stop(timeout_seconds=0.2), 30)
    assert len(queue) == 0
    [spilled] = tmp_path.glob("*.jsonl")
    assert [record.agent for record in read_spill(spilled)] == ["hung"]


async def test_an_audit_date_search_covers_its_days_last_microsecond(app, client):
    queue = AuditQueue(app.state.services.db)
    last = AuditRecord("read", agent="edge", recorded=datetime(2020, 1, 2, 23, 59, 59, 999999))
    after = AuditRecord("read", agent="edge", recorded=datetime(2020, 1, 3))
    for record in (last, after):
        queue.add(record)
    await queue.flush()
    names = {last.audit_id: "last", after.audit_id: "after"}
    for value, expected in [
        ("2020-01-02", ["last"]),
        ("le2020-01-02", ["last"]),
        ("gt2020-01-02", ["after"]),
    ]:
        params = {"agent": "edge", "date": value, "_format": "json", "_pretty": "true"}
        response = await client.get("/fhir/AuditEvent", params=params)
        assert response.status_code == 200, response.text
        found = [names[e["resource"]["id"]] for e in response.json().get("entry", [])]
        assert found == expected, value


async def test_an_audit_record_names_the_request_and_the_callers_address(app, client):
    """What the middleware learned of the request goes into each record made while serving
    it: its request id and the caller's network address."""
    patient_id = (await create(client, builders.patient("S01-42"))).json()["id"]
    await client.get(f"/fhir/Patient/{patient_id}", headers={"X-Request-ID": "probe-42"})
    [event] = [e for e in await _events(client, app) if _details(e).get("request-id") == "probe-42"]
    assert event["subtype"][0]["code"] == "read"
    assert event["agent"][0]["network"] == {"address": "127.0.0.1", "type": "2"}  # httpx's


def test_an_audit_event_about_nothing_has_no_entity():
    """A failed login is about no resource: no empty entity (FHIR allows no empty object),
    and a search that showed resources lists only those."""
    assert "entity" not in to_fhir(AuditRecord("login", outcome="4"), "audit-1")
    shown = to_fhir(AuditRecord("search-type", disclosed=(("Patient", "p-1", 2),)), "audit-2")
    assert [entity["what"] for entity in shown["entity"]] == [
        {"reference": "Patient/p-1/_history/2"}
    ]


async def test_an_audit_search_entry_has_the_full_url_of_its_event(app, client):
    await create(client, builders.patient("S01-43"))
    bundle = (await client.get("/fhir/AuditEvent", params={"action": "C"})).json()
    assert bundle["entry"]
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"http://testserver/fhir/AuditEvent/{entry['resource']['id']}"


async def test_audit_search_results_follow_the_trail_not_their_recorded_times(app, client):
    """A record can be recorded before one stored ahead of it (a request that took longer,
    a spilled record replayed): results come in the trail's order all the same."""
    queue = AuditQueue(app.state.services.db)
    late = AuditRecord("read", agent="order", entity_id="1", recorded=datetime(2020, 1, 2))
    early = AuditRecord("read", agent="order", entity_id="2", recorded=datetime(2020, 1, 1))
    for record in (late, early):
        queue.add(record)
    await queue.flush()
    for params in ({"agent": "order"}, {"_id": f"{early.audit_id},{late.audit_id}"}):
        bundle = (await client.get("/fhir/AuditEvent", params=params)).json()
        found = [entry["resource"]["id"] for entry in bundle["entry"]]
        assert found == [late.audit_id, early.audit_id], params


async def test_an_audit_event_read_by_id_is_the_hit_a_search_finds(app, client):
    await create(client, builders.patient("S01-44"))
    admin = Principal(sub="admin", role=Role.ADMIN, sites=frozenset(), scopes=frozenset())
    db = app.state.services.db
    hits = await queries.search(db, admin, [("action", "C")], after=None, limit=10)
    assert hits
    for hit in hits:
        assert await queries.read(db, admin, hit.id) == hit


@pytest.mark.parametrize(("name", "value"), [("agent\x00", "x"), ("agent", "a\x00b")])
async def test_the_audit_query_refuses_a_nul_whoever_calls_it(app, name, value):
    """The API refuses a NUL in any query string before it gets here (the middleware); the
    query refuses one itself too, since PostgreSQL text cannot hold it."""
    admin = Principal(sub="admin", role=Role.ADMIN, sites=frozenset(), scopes=frozenset())
    with pytest.raises(BadRequest) as refused:
        await queries.search(app.state.services.db, admin, [(name, value)], after=None, limit=1)
    assert refused.value.diagnostics == "Search parameters cannot contain NUL characters"
