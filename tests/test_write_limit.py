"""WriteLimitMiddleware: writes beyond the limit wait their turn; none is lost or refused,
and reads never wait behind writes."""

from __future__ import annotations

import asyncio

import httpx

from app.main import create_app
from app.middleware import WriteLimitMiddleware
from app.settings import Settings
from tests import builders
from tests.conftest import KEY, REASON, bearer


async def test_writes_queue_under_the_limit_and_all_succeed(database_url) -> None:
    application = create_app(
        Settings(database_url=database_url, environment="test", max_concurrent_writes=1),
        key_source=KEY,
    )
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        headers = {**bearer("admin"), "X-Provenance": REASON}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as client:
            patient = await client.post("/fhir/Patient", json=builders.patient())
            patient_id = patient.json()["id"]
            counts = [
                builders.platelet_count(patient_id, f"2025-03-{day:02d}T09:00:00Z", 20 + day)
                for day in range(1, 21)
            ]
            answers = await asyncio.gather(
                *(client.post("/fhir/Observation", json=count) for count in counts),
                client.get(f"/fhir/Patient/{patient_id}"),
            )
            assert [a.status_code for a in answers] == [201] * 20 + [200]
            search = await client.get("/fhir/Observation", params={"patient": patient_id})
            assert len([e for e in search.json()["entry"] if "value" in str(e)]) >= 20


async def test_searches_by_post_and_reads_are_not_limited() -> None:
    entered: list[str] = []
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        entered.append(f"{scope['method']} {scope['path']}")
        if scope["path"] == "/fhir/Patient":
            await release.wait()

    limited = WriteLimitMiddleware(app, limit=1)
    http = {"type": "http", "method": "POST", "path": "/fhir/Patient"}
    first = asyncio.create_task(limited(http, None, None))  # type: ignore[arg-type]
    second = asyncio.create_task(limited(http, None, None))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await limited({**http, "path": "/fhir/Patient/_search"}, None, None)  # type: ignore[arg-type]
    await limited({**http, "method": "GET", "path": "/fhir/Patient/x"}, None, None)  # type: ignore[arg-type]
    assert entered == ["POST /fhir/Patient", "POST /fhir/Patient/_search", "GET /fhir/Patient/x"]
    release.set()
    await asyncio.gather(first, second)
    assert entered[-1] == "POST /fhir/Patient"
