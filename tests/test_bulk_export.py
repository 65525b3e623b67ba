"""FHIR Bulk Data export (issue 17), driven by a client written from the Bulk Data Access IG
2.0's text: kick-off with `Prefer: respond-async` (202 + Content-Location), status polls
that honour `Retry-After` (202 + X-Progress while running, 200 + manifest when done), file
downloads with the same bearer token (`application/fhir+ndjson`, one resource per line),
and DELETE on the status URL. What it downloads is counted against the API's own searches.
Both databases; two server processes over one database for the any-worker promise.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from app.services import bulk_export
from app.settings import Settings
from tests import builders
from tests.conftest import REASON, bearer, client_for, running_app, uvicorn_server

TYPES = ("Patient", "Observation", "MedicationAdministration", "AdverseEvent")


# --- the client, from the IG ---------------------------------------------------------------


def _retry_after(value: str | None) -> float:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if value is None:
        return 1.0
    if value.strip().isdigit():
        return float(value)
    moment = parsedate_to_datetime(value)
    return max((moment - datetime.now(moment.tzinfo)).total_seconds(), 0.0)


async def kick_off(
    http: httpx.AsyncClient, path: str = "/fhir/$export", **params: str
) -> httpx.Response:
    return await http.get(
        path,
        params=params,
        headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
    )


async def poll(
    http: httpx.AsyncClient, status_url: str, timeout: float = 60.0
) -> tuple[dict[str, Any], httpx.Response, list[httpx.Response]]:
    """Poll until complete, waiting as long as each Retry-After says; every in-progress answer
    is kept so a test can check it."""
    waited, progress = 0.0, []
    while True:
        answer = await http.get(status_url, headers={"Accept": "application/json"})
        if answer.status_code != 202:
            break
        progress.append(answer)
        assert answer.headers.get("X-Progress") and len(answer.headers["X-Progress"]) < 100
        delay = _retry_after(answer.headers.get("Retry-After"))
        assert waited < timeout, "the export did not complete"
        await asyncio.sleep(delay)
        waited += delay
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json(), answer, progress


async def download(http: httpx.AsyncClient, manifest: dict[str, Any]) -> dict[str, list[dict]]:
    """Every output file, parsed: resources by type. Checks each file's type and count."""
    assert manifest["requiresAccessToken"] is True
    assert manifest["error"] == []
    found: dict[str, list[dict]] = {}
    for item in manifest["output"]:
        answer = await http.get(item["url"], headers={"Accept": "application/fhir+ndjson"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("application/fhir+ndjson")
        lines = answer.content.splitlines()
        assert len(lines) == item["count"]
        resources = [orjson.loads(line) for line in lines]
        assert {r["resourceType"] for r in resources} <= {item["type"]}
        found.setdefault(item["type"], []).extend(resources)
    return found


async def export(http: httpx.AsyncClient, path: str = "/fhir/$export", **params: str):
    started = await kick_off(http, path, **params)
    assert started.status_code == 202, started.text
    status_url = started.headers["Content-Location"]
    assert status_url.startswith("http")  # absolute (IG)
    manifest, answer, _ = await poll(http, status_url)
    return manifest, await download(http, manifest), status_url, answer


async def searched_ids(http: httpx.AsyncClient, resource_type: str) -> list[str]:
    """What the caller's own searches return, every page followed."""
    ids: list[str] = []
    url: str | None = f"/fhir/{resource_type}?_count=1000"
    while url:
        bundle = (await http.get(url)).json()
        ids += [entry["resource"]["id"] for entry in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return ids


# --- data ----------------------------------------------------------------------------------


async def _post(http: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    answer = await http.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert answer.status_code == 201, answer.text
    return answer.json()


async def trial(http: httpx.AsyncClient) -> dict[str, list[str]]:
    """Two S01 patients and one S02 patient with doses, counts, an AE; one count deleted."""
    made: dict[str, list[str]] = {}
    for subject, site in (("S01-001", "S01"), ("S01-002", "S01"), ("S02-001", "S02")):
        patient = await _post(http, builders.patient(subject, site))
        made.setdefault(site, []).append(patient["id"])
        pid = patient["id"]
        await _post(http, builders.administration(pid, "2025-03-03T08:00:00Z"))
        for day, value in ((1, 20), (8, 45), (15, 70), (22, 90)):
            await _post(http, builders.platelet_count(pid, f"2025-03-{day:02d}T09:00:00Z", value))
        await _post(http, builders.adverse_event(pid, "2025-03-05T10:00:00Z"))
    gone = await _post(http, builders.platelet_count(made["S01"][0], "2025-03-29T09:00:00Z", 99))
    assert (await http.delete(f"/fhir/Observation/{gone['id']}")).status_code == 204
    made["deleted"] = [gone["id"]]
    return made


@pytest.fixture
async def export_app(database_url: str):
    """The app with three resources per file, so that types are split into several files."""
    settings = Settings(database_url=database_url, environment="test", export_file_resources=3)
    async with running_app(settings) as application:
        yield application


@pytest.fixture
async def admin(export_app):
    async with client_for(export_app, role="admin") as http:
        yield http


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/fhir/$export", "/fhir/Patient/$export"])
async def test_an_export_holds_each_current_resource_once(admin, path) -> None:
    made = await trial(admin)
    manifest, found, _, answer = await export(admin, path)
    assert manifest["request"].endswith(path)
    assert parsedate_to_datetime(answer.headers["Expires"])
    for resource_type in TYPES:
        exported = [r["id"] for r in found.get(resource_type, [])]
        assert len(exported) == len(set(exported)), f"{resource_type} exported twice"
        assert sorted(exported) == sorted(await searched_ids(admin, resource_type))
    assert made["deleted"][0] not in {r["id"] for r in found["Observation"]}
    # At most 3 resources per file (APP_EXPORT_FILE_RESOURCES): larger types are split.
    observation_files = [o for o in manifest["output"] if o["type"] == "Observation"]
    assert len(observation_files) > 1
    assert all(o["count"] <= 3 for o in manifest["output"])
    # The server's response-status Observations are current resources: exported too.
    assert any(r["id"].startswith("rs-") for r in found["Observation"])


async def test_kick_off_refusals(admin, export_app) -> None:
    no_prefer = await admin.get("/fhir/$export")
    assert no_prefer.status_code == 400
    assert no_prefer.json()["resourceType"] == "OperationOutcome"
    for params in (
        {"_outputFormat": "text/csv"},
        {"_type": "Encounter"},
        {"_type": ""},
        {"_since": "yesterday"},
        {"_since": "2025-03-10"},  # a date, not an instant
        {"_typeFilter": "Observation?status=final"},
        {"_elements": "id"},
    ):
        answer = await kick_off(admin, **params)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.headers["content-type"].startswith("application/fhir+json")
    for params in ({"_outputFormat": "ndjson"}, {"_outputFormat": "application/ndjson"}):
        assert (await kick_off(admin, **params)).status_code == 202
    for role in ("investigator", "lab"):
        async with client_for(export_app, role=role) as other:
            refused = await kick_off(other)
            assert refused.status_code == 403, role
    # A monitor whose scopes cover Observation only exports Observations, and may not ask
    # for Patients.
    async with client_for(export_app, role="monitor", scope="user/Observation.rs") as narrow:
        assert (await kick_off(narrow, _type="Patient")).status_code == 403
        started = await kick_off(narrow)
        assert started.status_code == 202
        manifest, _, _ = await poll(narrow, started.headers["Content-Location"])
        assert {o["type"] for o in manifest["output"]} <= {"Observation"}


async def test_type_and_since_select_what_is_exported(admin) -> None:
    await trial(admin)
    manifest, found, _, _ = await export(admin, _type="Observation,AdverseEvent")
    assert set(found) == {"Observation", "AdverseEvent"}
    first = manifest["transactionTime"]
    # Written after the first export's transactionTime: only it comes with _since.
    patient = (await admin.get("/fhir/Patient?_count=1")).json()["entry"][0]["resource"]
    new = await _post(admin, builders.platelet_count(patient["id"], "2025-04-01T09:00:00Z", 120))
    _, later, _, _ = await export(admin, _type="Observation", _since=first)
    ids = {r["id"] for r in later["Observation"]}
    assert new["id"] in ids
    # The new count changed the patient's status: its Observation is newer too; nothing else.
    assert ids <= {new["id"], *(i for i in ids if i.startswith("rs-"))}


async def test_repeated_type_parameters_are_one_list(admin) -> None:
    await trial(admin)
    started = await admin.get(
        "/fhir/$export?_type=Patient&_type=AdverseEvent", headers={"Prefer": "respond-async"}
    )
    manifest, _, _ = await poll(admin, started.headers["Content-Location"])
    assert {o["type"] for o in manifest["output"]} == {"Patient", "AdverseEvent"}


async def test_the_export_is_the_trial_at_transaction_time(admin, export_app) -> None:
    """Writes after the kick-off, before the job reads, change nothing in it: an updated
    resource comes as it stood, a new one is left out, a deleted one is still there."""
    await export_app.state.exports.stop()  # the job runs when this test says
    await trial(admin)
    observations = await searched_ids(admin, "Observation")
    counts = [i for i in observations if not i.startswith("rs-")]
    started = await kick_off(admin, _type="Observation")
    status_url = started.headers["Content-Location"]
    changed = (await admin.get(f"/fhir/Observation/{counts[0]}")).json()
    changed["status"] = "amended"
    assert (await admin.put(f"/fhir/Observation/{counts[0]}", json=changed)).status_code == 200
    assert (await admin.delete(f"/fhir/Observation/{counts[1]}")).status_code == 204
    patient = (await admin.get("/fhir/Patient?_count=1")).json()["entry"][0]["resource"]
    new = await _post(admin, builders.platelet_count(patient["id"], "2025-05-01T09:00:00Z", 50))
    in_progress = await admin.get(status_url)
    assert in_progress.status_code == 202 and in_progress.headers["Retry-After"]
    assert await export_app.state.exports.run_pending() == 1
    manifest, _, _ = await poll(admin, status_url)
    found = {r["id"]: r for r in (await download(admin, manifest))["Observation"]}
    assert sorted(found) == sorted(observations)
    assert found[counts[0]]["status"] == "final" and found[counts[0]]["meta"]["versionId"] == "1"
    assert counts[1] in found and new["id"] not in found
    stamp = datetime.fromisoformat(manifest["transactionTime"])
    assert all(datetime.fromisoformat(r["meta"]["lastUpdated"]) <= stamp for r in found.values())


async def test_cancel_removes_the_job_and_its_files(admin, export_app) -> None:
    await trial(admin)
    manifest, _, status_url, _ = await export(admin)
    deleted = await admin.delete(status_url)
    assert deleted.status_code == 202
    assert (await admin.get(status_url)).status_code == 404
    assert (await admin.get(manifest["output"][0]["url"])).status_code == 404
    assert (await admin.delete(status_url)).status_code == 404
    async with export_app.state.services.db.read() as conn:
        for table in ("export_job", "export_file", "export_chunk"):
            assert (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one() == 0
    # Cancelled before it ran: the runner never writes it.
    await export_app.state.exports.stop()
    started = await kick_off(admin)
    assert (await admin.delete(started.headers["Content-Location"])).status_code == 202
    assert await export_app.state.exports.run_pending() == 0


async def test_a_job_belongs_to_whoever_started_it(admin, export_app) -> None:
    await trial(admin)
    manifest, _, status_url, _ = await export(admin)
    async with client_for(export_app, role="admin", sub="someone-else") as other:
        assert (await other.get(status_url)).status_code == 404
        assert (await other.get(manifest["output"][0]["url"])).status_code == 404
        assert (await other.delete(status_url)).status_code == 404
    assert (await admin.get(status_url)).status_code == 200


async def test_an_export_holds_the_callers_sites_only(admin, export_app) -> None:
    made = await trial(admin)
    async with client_for(export_app, role="monitor", sites=("S01",), sub="monitor-1") as monitor:
        _, found, _, _ = await export(monitor)
        for resource_type in TYPES:
            exported = sorted(r["id"] for r in found.get(resource_type, []))
            assert exported == sorted(await searched_ids(monitor, resource_type))
        patients = {r["id"] for r in found["Patient"]}
        assert patients == set(made["S01"])
        subjects = {
            r["subject"]["reference"].split("/")[1]
            for t in ("Observation", "MedicationAdministration", "AdverseEvent")
            for r in found[t]
        }
        assert subjects <= set(made["S01"])


async def test_expired_jobs_answer_404_and_are_deleted(admin, export_app) -> None:
    await trial(admin)
    manifest, _, status_url, answer = await export(admin)
    expires = parsedate_to_datetime(answer.headers["Expires"])
    hours = (expires - datetime.fromisoformat(manifest["transactionTime"])).total_seconds() / 3600
    assert 23.9 < hours < 24.1  # APP_EXPORT_RETENTION_HOURS, default 24
    db = export_app.state.services.db
    async with db.write() as conn:
        await conn.execute(text("UPDATE export_job SET expires = '2000-01-01 00:00:00'"))
    assert (await admin.get(status_url)).status_code == 404
    assert (await admin.get(manifest["output"][0]["url"])).status_code == 404
    await export_app.state.exports.run_pending()
    async with db.read() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM export_chunk"))).scalar_one() == 0
        assert (await conn.execute(text("SELECT count(*) FROM export_job"))).scalar_one() == 0


async def test_kick_off_status_and_downloads_are_audited(admin, export_app) -> None:
    await trial(admin)
    manifest, _, status_url, _ = await export(admin)
    job = status_url.rsplit("/", 1)[1]
    await export_app.state.services.audit.flush()
    async with export_app.state.services.db.read() as conn:
        rows = (
            (
                await conn.execute(
                    text("SELECT content FROM audit_event WHERE content LIKE :j"), {"j": f"%{job}%"}
                )
            )
            .scalars()
            .all()
        )
    descriptions = [orjson.loads(row)["outcomeDesc"] for row in rows]
    assert any(d.startswith("$export kick-off") for d in descriptions)
    assert any(d.startswith("$export status") for d in descriptions)
    downloads = [d for d in descriptions if d.startswith("$export file")]
    assert len(downloads) == len(manifest["output"])


class _Died(BaseException):
    """A worker process killed mid-job: nothing of its own clean-up runs."""


async def test_a_job_whose_worker_died_is_resumed_by_another(admin, export_app, monkeypatch):
    await export_app.state.exports.stop()
    await trial(admin)
    expected = await searched_ids(admin, "Observation")
    started = await kick_off(admin, _type="Observation")
    status_url = started.headers["Content-Location"]
    services = export_app.state.services
    settings = bulk_export.ExportSettings(
        retention=timedelta(hours=1), file_resources=3, lease=timedelta(seconds=30)
    )
    dying = bulk_export.ExportRunner(services, settings)
    closes = 0
    real_close = bulk_export.store.close_file

    async def close_then_die(conn, file_pk, last_pk, count):
        nonlocal closes
        closes += 1
        if closes == 2:  # the second file half written (its chunk is in), then the worker dies
            raise _Died
        await real_close(conn, file_pk, last_pk, count)

    monkeypatch.setattr(bulk_export.store, "close_file", close_then_die)
    with pytest.raises(_Died):
        await dying.run_pending()
    monkeypatch.setattr(bulk_export.store, "close_file", real_close)
    async with services.db.read() as conn:
        files = (
            await conn.execute(text("SELECT number, complete FROM export_file ORDER BY number"))
        ).all()
    assert [tuple(f) for f in files] == [(1, True), (2, False)]
    assert (await admin.get(status_url)).status_code == 202  # still running: its lease holds
    # Its lease runs out; another worker takes the job over.
    other = bulk_export.ExportRunner(services, settings)
    assert await other.run_pending() == 0  # not before the lease ran out
    async with services.db.write() as conn:
        await conn.execute(text("UPDATE export_job SET lease_expires = '2000-01-01 00:00:00'"))
    assert await other.run_pending() == 1
    manifest, _, _ = await poll(admin, status_url)
    found = [r["id"] for r in (await download(admin, manifest))["Observation"]]
    assert sorted(found) == sorted(expected)  # each once: the half file was redone
    async with services.db.read() as conn:
        attempts = (await conn.execute(text("SELECT attempts FROM export_job"))).scalar_one()
    assert attempts == 2


async def test_a_job_whose_workers_keep_dying_fails(admin, export_app) -> None:
    await export_app.state.exports.stop()
    started = await kick_off(admin)
    status_url = started.headers["Content-Location"]
    async with export_app.state.services.db.write() as conn:
        await conn.execute(
            text(
                "UPDATE export_job SET status = 'running', attempts = 3, lease_owner = 'dead', "
                "lease_expires = '2000-01-01 00:00:00'"
            )
        )
    await export_app.state.exports.run_pending()
    failed = await admin.get(status_url)
    assert failed.status_code == 500
    outcome = failed.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "attempted 3 times" in outcome["issue"][0]["diagnostics"]


async def test_a_failed_attempt_is_retried_then_the_job_fails(admin, export_app, monkeypatch):
    """An error while generating (a database outage, a bug) gives the job back; the next
    attempt may finish it; three failed attempts fail it."""
    await export_app.state.exports.stop()
    await trial(admin)
    runner = export_app.state.exports
    real_batch = bulk_export.store.resource_batch
    failures = 1

    async def flaky(*args, **kwargs):
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("the database went away")
        return await real_batch(*args, **kwargs)

    monkeypatch.setattr(bulk_export.store, "resource_batch", flaky)
    started = await kick_off(admin, _type="Patient")
    status_url = started.headers["Content-Location"]
    assert await runner.run_pending() == 2  # the failed attempt, then the one that finished
    manifest, _, _ = await poll(admin, status_url)
    assert [o["count"] for o in manifest["output"]] == [3]
    failures = 3
    started = await kick_off(admin, _type="Patient")
    for _ in range(3):
        await runner.run_pending()
    failed = await admin.get(started.headers["Content-Location"])
    assert failed.status_code == 500 and "attempted 3 times" in failed.text


async def test_two_server_processes_share_the_job(database_url, tmp_path) -> None:
    """Started through one server process, polled and downloaded through another (each with
    two workers), over one database: the job's state and files live in the database."""
    headers = {**bearer("admin"), "X-Provenance": REASON}
    with (
        uvicorn_server(database_url, tmp_path / "a.log") as first,
        uvicorn_server(database_url, tmp_path / "b.log") as second,
    ):
        async with (
            httpx.AsyncClient(base_url=first, headers=headers, timeout=30) as one,
            httpx.AsyncClient(base_url=second, headers=headers, timeout=30) as two,
        ):
            await trial(one)
            started = await kick_off(one)
            assert started.status_code == 202
            location = started.headers["Content-Location"]
            assert location.startswith(first)
            on_second = second + location.removeprefix(first)
            manifest, _, _ = await poll(two, on_second)
            manifest["output"] = [
                {**o, "url": second + o["url"].removeprefix(second)} for o in manifest["output"]
            ]
            found = await download(two, manifest)
            for resource_type in TYPES:
                assert sorted(r["id"] for r in found[resource_type]) == sorted(
                    await searched_ids(two, resource_type)
                )


async def test_an_outage_is_one_warning_in_the_runners_log_not_an_error(app, settings, caplog):
    """A pass that meets a database outage logs one WARNING line and is retried; any other
    failure is still an ERROR with its traceback (the outage test forbids ERROR lines)."""
    from app.fhir.export_routes import export_settings

    runner = bulk_export.ExportRunner(app.state.services, export_settings(settings))
    failures = [ConnectionRefusedError(111, "Connection refused"), RuntimeError("a bug")]

    async def failing_pass() -> int:
        if failures:
            raise failures.pop(0)
        return 0

    runner.run_pending = failing_pass  # type: ignore[method-assign]
    runner.poll_seconds = 0.01
    caplog.set_level("WARNING", logger="app.exports")
    runner.start()
    for _ in range(500):
        await asyncio.sleep(0.01)
        if not failures:
            break
    await asyncio.sleep(0.05)
    await runner.stop()
    records = [r for r in caplog.records if r.name == "app.exports"]
    assert [(r.levelname, r.exc_info is not None) for r in records] == [
        ("WARNING", False),
        ("ERROR", True),
    ]
    assert "database unavailable (ConnectionRefusedError" in records[0].getMessage()
