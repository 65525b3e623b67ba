"""A database that cannot serve, an unexpected error, a client that goes away (both
databases, in process): what the client is answered, what the log and the metrics say, and
that the exception never escapes the app (uvicorn would close the connection)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from sqlalchemy import text

from app.main import create_app
from app.settings import Settings
from tests import builders
from tests.conftest import KEY, REASON, assert_every_write_is_audited, bearer
from tests.test_crud import create

SUBJECT_SYSTEM = "https://itp-trial.example/fhir/sid/subject"


@pytest.fixture
async def small_pool_app(settings: Settings) -> AsyncIterator[object]:
    """The app with one pooled connection per engine and a short wait for it."""
    tight = settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 0.2}
    )
    application = create_app(tight, key_source=KEY)
    async with application.router.lifespan_context(application):
        yield application
        await assert_every_write_is_audited(application)


def strict_client(application: object) -> httpx.AsyncClient:
    """A client whose transport re-raises whatever escapes the app, as uvicorn would see it
    (and then close the connection)."""
    transport = httpx.ASGITransport(app=application)  # type: ignore[arg-type]
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://testserver",
        headers={**bearer("admin", ("S01",)), "X-Provenance": REASON},
    )


@contextlib.asynccontextmanager
async def pool_exhausted(application) -> AsyncIterator[None]:
    """Every pooled connection of the app's engines is taken (and held) by someone else."""
    db = application.state.services.db
    async with contextlib.AsyncExitStack() as stack:
        for engine in {id(db.writer): db.writer, id(db.reader): db.reader}.values():
            await stack.enter_async_context(engine.connect())
        yield


def assert_transient(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"].isdigit()
    assert answer.headers["content-type"].startswith("application/fhir+json")
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [issue["code"] for issue in outcome["issue"]] == ["transient"]
    assert "Traceback" not in answer.text and "SELECT" not in answer.text.upper()


async def test_out_of_connections_is_503_transient_on_reads_and_writes(small_pool_app):
    async with strict_client(small_pool_app) as client:
        patient_id = (await create(client, builders.patient())).json()["id"]
        async with pool_exhausted(small_pool_app):
            answers = [
                await client.get(f"/fhir/Patient/{patient_id}"),
                await client.get("/fhir/Patient", params={"identifier": "S01-001"}),
                await client.post(
                    "/fhir/Patient",
                    content=orjson.dumps(builders.patient("S01-002")),
                    headers={"Content-Type": "application/fhir+json"},
                ),
                await client.put(
                    f"/fhir/Patient/{patient_id}",
                    content=orjson.dumps({**builders.patient(), "id": patient_id}),
                    headers={"Content-Type": "application/fhir+json"},
                ),
                await client.get(f"/fhir/Patient/{patient_id}/$response-status"),
                await client.post("/fhir", json=_bundle("transaction")),
            ]
            batch = await client.post("/fhir", json=_bundle("batch"))
        for answer in answers:
            assert_transient(answer)
        # A batch answers for each entry: the first waited for a connection and was refused,
        # the second was not attempted (it would have waited as long).
        assert batch.status_code == 200, batch.text
        statuses = [entry["response"]["status"] for entry in batch.json()["entry"]]
        assert [status.split()[0] for status in statuses] == ["503", "503"]
        # A write's answer says it may have been applied, and how to retry without a double.
        write = answers[2].json()["issue"][0]["diagnostics"]
        assert "may or may not have been applied" in write and "If-None-Exist" in write
        # Back to normal once connections are free; nothing of the refused writes is stored.
        assert (await client.get(f"/fhir/Patient/{patient_id}")).status_code == 200
        found = (await client.get("/fhir/Patient", params={"identifier": "S01-002"})).json()
        assert found.get("entry", []) == []
        await small_pool_app.state.services.audit.flush()
        async with small_pool_app.state.services.db.read() as conn:
            refusals = (
                await conn.execute(
                    text("SELECT content FROM audit_event WHERE outcome = '8' ORDER BY seq")
                )
            ).scalars()
            descriptions = [orjson.loads(content)["outcomeDesc"] for content in refusals]
    assert len(descriptions) == len(answers)
    assert all(d.startswith("503: The database is unavailable") for d in descriptions)
    async with small_pool_app.state.services.db.read() as conn:
        entries = (
            await conn.execute(
                text("SELECT content FROM audit_event WHERE content LIKE '%batch entry: 503%'")
            )
        ).all()
    assert len(entries) == 2


def _bundle(kind: str) -> dict:
    entries = [
        {
            "resource": builders.patient(f"S01-01{number}"),
            "request": {"method": "POST", "url": "Patient"},
        }
        for number in range(2)
    ]
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


async def test_an_unexpected_error_is_500_and_does_not_escape_the_app(app, monkeypatch):
    from app.services import resources

    async def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(resources, "read", broken)
    async with strict_client(app) as client:
        answer = await client.get("/fhir/Patient/x", headers={"X-Request-Id": "req-500"})
        assert answer.status_code == 500
        assert answer.json()["issue"][0]["code"] == "exception"
        assert "a bug" not in answer.text
        # One of each: the answer went through the middleware like any other.
        assert answer.headers.get_list("x-request-id") == ["req-500"]
        assert len(answer.headers.get_list("x-content-type-options")) == 1
        assert answer.headers["x-correlation-id"] == "req-500"
        # The connection is still good for the next request.
        assert (await client.get("/fhir/metadata")).status_code == 200


async def test_a_write_whose_commit_answer_is_lost_is_503_and_a_conditional_retry_is_safe(app):
    """The connection dies during COMMIT: the write may be stored, the client cannot know.
    It is told so (503), and its retry with If-None-Exist on its own identifier finds the
    stored resource instead of making a second one."""
    import dataclasses

    from tests.test_audit_outage import Flaky

    services = app.state.services
    flaky = Flaky(services.db)
    app.state.services = dataclasses.replace(services, db=flaky)
    async with strict_client(app) as client:
        patient_id = (await create(client, builders.patient())).json()["id"]
        count = builders.platelet_count(
            patient_id,
            "2025-03-10T09:00:00Z",
            42,
            identifier=[{"system": "https://lab.example/fhir/sid/result", "value": "R-1"}],
        )
        criteria = {"If-None-Exist": "identifier=https://lab.example/fhir/sid/result|R-1"}
        flaky.lose_commit = True
        lost = await client.post("/fhir/Observation", json=count, headers=criteria)
        assert_transient(lost)
        assert "may or may not have been applied" in lost.json()["issue"][0]["diagnostics"]
        retried = await client.post("/fhir/Observation", json=count, headers=criteria)
        assert retried.status_code == 200, retried.text  # the match: it had been stored
        found = await client.get(
            "/fhir/Observation", params={"identifier": "https://lab.example/fhir/sid/result|R-1"}
        )
        assert len(found.json()["entry"]) == 1
    app.state.services = services


def _scope(method: str, path: str, body_length: int) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/fhir+json"),
            (b"content-length", str(body_length).encode()),
            *[(k.lower().encode(), v.encode()) for k, v in bearer("admin", ("S01",)).items()],
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


def _requests_counted(status: str) -> float:
    from prometheus_client import REGISTRY

    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "itp_http_requests":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["status"] == status:
                    total += sample.value
    return total


@pytest.mark.parametrize("sent", [0, 20], ids=["nothing", "half"])
async def test_a_client_that_leaves_before_its_body_is_a_499_at_info(app, caplog, sent):
    body = orjson.dumps(builders.patient("S01-499"))
    parts = [{"type": "http.request", "body": body[:sent], "more_body": True}] if sent else []
    parts.append({"type": "http.disconnect"})
    sent_messages: list[dict] = []

    async def receive() -> dict:
        return parts.pop(0) if len(parts) > 1 else parts[0]

    async def send(message: dict) -> None:
        sent_messages.append(message)

    errors_before, gone_before = _requests_counted("500"), _requests_counted("499")
    with caplog.at_level(logging.INFO):
        await app(_scope("POST", "/fhir/Patient", len(body)), receive, send)  # raises nothing
    assert _requests_counted("500") == errors_before
    assert _requests_counted("499") == gone_before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    [line] = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert line.levelno == logging.INFO and line.exc_info is None
    assert "499" in line.getMessage()
    assert sent_messages[0]["status"] == 499
    async with app.state.services.db.read() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM resource"))).scalar() == 0


async def test_a_client_that_leaves_after_its_body_gets_its_write_whole(app):
    """The write runs to its end (nothing cancels it when the client goes): the Patient,
    its response status and its audit record, all committed (the fixture checks the
    audit record of every version)."""
    body = orjson.dumps(builders.patient("S01-500"))
    parts = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(_message: dict) -> None:
        return None

    await app(_scope("POST", "/fhir/Patient", len(body)), receive, send)
    async with app.state.services.db.read() as conn:
        kinds = (
            await conn.execute(text("SELECT resource_type FROM resource ORDER BY resource_type"))
        ).scalars()
        assert list(kinds) == ["Observation", "Patient"]  # with its response status


async def test_a_vanished_client_on_a_real_server(live_server, tmp_path):
    """Over a real socket: a client that hangs up mid-body leaves nothing stored and no
    error in the log; one that hangs up right after sending its whole request gets its
    write whole (the Patient with its response status and audit record) or not at all."""
    import asyncio
    import socket
    from urllib.parse import urlsplit

    port = urlsplit(live_server).port
    headers = {**bearer("admin", ("S01",)), "Content-Type": "application/fhir+json"}

    def hang_up(subject: str, whole: bool) -> None:
        body = orjson.dumps(builders.patient(subject))
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + (body if whole else body[: len(body) // 2])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)

    await asyncio.to_thread(hang_up, "S01-HALF", False)
    await asyncio.to_thread(hang_up, "S01-WHOLE", True)
    async with httpx.AsyncClient(base_url=live_server, headers=bearer("admin")) as client:
        for _ in range(50):  # the whole one may still be on its way
            whole = await client.get("/fhir/Patient", params={"identifier": "S01-WHOLE"})
            if whole.json().get("entry"):
                break
            await asyncio.sleep(0.1)
        half = await client.get("/fhir/Patient", params={"identifier": "S01-HALF"})
        assert half.json().get("entry", []) == []
        [entry] = whole.json()["entry"]
        patient_id = entry["resource"]["id"]
        status = await client.get(f"/fhir/Patient/{patient_id}/$response-status")
        assert status.status_code == 200  # written in the same transaction
        events = await client.get("/fhir/AuditEvent", params={"entity": f"Patient/{patient_id}"})
        assert [e["resource"]["action"] for e in events.json()["entry"]].count("C") == 1
    log = (tmp_path / "uvicorn.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
