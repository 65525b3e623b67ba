"""Paging under concurrent inserts, across a real socket and two server processes (both
databases): while another task keeps inserting, a client paging through a search sees every
resource that existed before it started exactly once, whatever the sort."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx

from tests import builders
from tests.conftest import REASON, bearer

PRE_EXISTING = 23
PAGE = 4


def _next(bundle: dict) -> str | None:
    for link in bundle["link"]:
        if link["relation"] == "next":
            parts = urlsplit(link["url"])
            return f"{parts.path}?{parts.query}"
    return None


async def _create(http: httpx.AsyncClient, body: dict) -> str:
    response = await http.post(f"/fhir/{body['resourceType']}", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


SORTS = (None, "date", "-date", "_lastUpdated", "-_lastUpdated", "-date,_id", "_id")


async def test_every_pre_existing_resource_is_seen_exactly_once(live_server):
    headers = {**bearer("admin"), "X-Provenance": REASON}
    async with httpx.AsyncClient(base_url=live_server, headers=headers, timeout=30) as http:
        for number, sort in enumerate(SORTS):
            await _page_while_inserting(http, f"S01-{number:03d}", sort)


async def _page_while_inserting(http: httpx.AsyncClient, subject: str, sort: str | None) -> None:
    patient = await _create(http, builders.patient(subject))
    before = set()
    for i in range(PRE_EXISTING):
        when = f"2025-03-{1 + i % 28:02d}T09:{i % 60:02d}:00Z"
        before.add(await _create(http, builders.platelet_count(patient, when, 20 + i)))

    inserted: list[str] = []
    paging_done = asyncio.Event()
    new_row = asyncio.Condition()

    async def insert_while_paging() -> None:
        # Dates before, among and after the pre-existing ones: new rows land everywhere in
        # every sort order, also on pages already read and pages still to come.
        i = 0
        while not paging_done.is_set():
            day = (7 * i) % 28 + 1
            month = ("02", "03", "04")[i % 3]
            body = builders.platelet_count(patient, f"2025-{month}-{day:02d}T08:30:00Z", 99)
            created = await _create(http, body)
            async with new_row:
                inserted.append(created)
                new_row.notify_all()
            i += 1

    async def page_through() -> list[str]:
        params = f"patient={patient}&code=777-3&_count={PAGE}"
        url: str | None = f"/fhir/Observation?{params}" + (f"&_sort={sort}" if sort else "")
        seen: list[str] = []
        try:
            while url is not None:
                response = await http.get(url)
                assert response.status_code == 200, response.text
                bundle = response.json()
                seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
                url = _next(bundle)
                # Never fetch the next page before at least one more row was inserted.
                async with new_row:
                    target = len(inserted) + 1
                    waiting = new_row.wait_for(lambda target=target: len(inserted) >= target)
                    await asyncio.wait_for(waiting, timeout=30)
        finally:
            paging_done.set()
        return seen

    inserter = asyncio.create_task(insert_while_paging())
    seen = await page_through()
    await inserter

    pages = -(-PRE_EXISTING // PAGE)
    assert len(inserted) >= pages, (sort, "rows must have arrived between the pages")
    assert len(seen) == len(set(seen)), (sort, "a resource was seen twice")
    missing = before - set(seen)
    assert not missing, (sort, f"{len(missing)} pre-existing resources were skipped")
    assert set(seen) <= before | set(inserted), sort
