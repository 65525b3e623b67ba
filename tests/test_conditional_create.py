"""Conditional create (If-None-Exist): idempotent, and race-free over real sockets."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests import builders
from tests.conftest import REASON, bearer
from tests.test_crud import create

CRITERION = f"identifier={builders.SUBJECT_SYSTEM}|S01-042"


async def test_conditional_create_returns_the_existing_match(client):
    first = await client.post(
        "/fhir/Patient", json=builders.patient("S01-042"), headers={"If-None-Exist": CRITERION}
    )
    assert first.status_code == 201
    second = await client.post(
        "/fhir/Patient", json=builders.patient("S01-042"), headers={"If-None-Exist": CRITERION}
    )
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["etag"] == 'W/"1"'


async def test_criterion_matching_two_resources_is_412(client):
    # A subject number is unique (test_subjects.py); a hospital record number may be shared.
    await create(client, builders.with_mrn(builders.patient("S01-042"), "H-1"))
    await create(client, builders.with_mrn(builders.patient("S01-043"), "H-1"))
    response = await client.post(
        "/fhir/Patient",
        json=builders.patient("S01-044"),
        headers={"If-None-Exist": f"identifier={builders.MRN_SYSTEM}|H-1"},
    )
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_invalid_body_is_refused_even_when_a_match_exists(client):
    await client.post(
        "/fhir/Patient", json=builders.patient("S01-042"), headers={"If-None-Exist": CRITERION}
    )
    response = await client.post(
        "/fhir/Patient",
        json={**builders.patient("S01-042"), "gender": "bogus"},
        headers={"If-None-Exist": CRITERION},
    )
    assert response.status_code == 422


async def test_criteria_must_be_a_supported_search(client):
    # The grammar is the documented pattern (conditional.header_pattern): percent-encoding
    # and "+" are for the query form; ids and references as the search parser reads them.
    for header in (
        "",
        "nickname=x",
        "identifier",
        "identifier=a%20b",
        "identifier=a+b",
        "identifier=a,,b",
        "_id=a_b",
        "organization=Practitioner/S01",
        "identifier=x&",
    ):
        response = await client.post(
            "/fhir/Patient", json=builders.patient(), headers={"If-None-Exist": header}
        )
        assert response.status_code == 400, header


@pytest.mark.parametrize("form", ["header", "query"])
async def test_fifty_simultaneous_conditional_creates_leave_one(live_server, form):
    # The criteria in If-None-Exist, or in the query (POST /fhir/Patient?identifier=...).
    name, _, value = CRITERION.partition("=")
    header, params = ({"If-None-Exist": CRITERION}, {}) if form == "header" else ({}, {name: value})
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(
        base_url=live_server,
        limits=limits,
        timeout=60,
        headers={**bearer("admin"), "X-Provenance": REASON},
    ) as http:

        async def attempt() -> httpx.Response:
            return await http.post(
                "/fhir/Patient", params=params, json=builders.patient("S01-042"), headers=header
            )

        responses = await asyncio.gather(*(attempt() for _ in range(50)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 49 + [201], statuses
        assert len({r.json()["id"] for r in responses}) == 1
        found = (await http.get("/fhir/Patient", params={name: value})).json()
        assert len([e for e in found.get("entry", []) if e["search"]["mode"] == "match"]) == 1
