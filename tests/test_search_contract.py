"""The search contract: what the CapabilityStatement declares and what the OpenAPI file
documents is accepted, by GET and by POST (both databases)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli import OPENAPI_PATH
from app.services.search_params import SORT_KEYS
from tests import builders
from tests.conftest import bearer
from tests.test_crud import create

TYPES = ("Patient", "Observation", "MedicationAdministration", "AdverseEvent")
STRICT = {"Prefer": "handling=strict"}
# The cursor is opaque: only the values the server issued in next links are cursors, which
# no pattern can say. Every other documented parameter must accept every documented value.
OPAQUE = {"_cursor"}


async def test_every_declared_include_and_sort_key_is_accepted_strictly(client):
    patient = (await create(client, builders.patient())).json()["id"]
    await create(client, builders.platelet_count(patient, "2025-03-10T09:00:00Z", 20))
    statement = (await client.get("/fhir/metadata")).json()
    documentation = statement["rest"][0]["documentation"]
    for resource in statement["rest"][0]["resource"]:
        kind = resource["type"]
        if kind not in TYPES:
            continue
        for include in resource.get("searchInclude", []):
            response = await client.get(f"/fhir/{kind}?_include={include}", headers=STRICT)
            assert response.status_code == 200, (kind, include, response.text)
        for include in resource.get("searchRevInclude", []):
            response = await client.get(f"/fhir/{kind}?_revinclude={include}", headers=STRICT)
            assert response.status_code == 200, (kind, include, response.text)
        keys = SORT_KEYS[kind]
        assert f"{kind}: {', '.join(keys)}" in documentation
        for key in keys:
            for sort in (key, f"-{key}"):
                response = await client.get(f"/fhir/{kind}?_sort={sort}", headers=STRICT)
                assert response.status_code == 200, (kind, sort, response.text)
    observation = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Observation")
    assert observation["searchInclude"] == ["Observation:patient", "Observation:subject"]
    patient_resource = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    assert "Observation:subject" in patient_resource["searchRevInclude"]
    declared = {p["name"] for p in patient_resource["searchParam"]}
    assert declared == {
        "_id",
        "_lastUpdated",
        "identifier",
        "name",
        "family",
        "given",
        "birthdate",
        "gender",
        "organization",
    }


@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    """A synchronous client, so hypothesis can drive it example after example."""
    headers = {**bearer("admin"), **STRICT}
    with httpx.Client(base_url=live_server, headers=headers, timeout=30) as client:
        yield client


def _strategy(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema["type"] == "integer":
        return st.integers(min_value=schema.get("minimum", 0), max_value=10**12).map(str)
    if schema["type"] == "array":
        return st.lists(_strategy(schema["items"]), min_size=1, max_size=3)
    text = st.characters(codec="utf-8")
    return st.from_regex(schema["pattern"], fullmatch=True, alphabet=text)


OPENAPI = json.loads(OPENAPI_PATH.read_text())  # what clients and fuzzers read
DOCUMENTED = {
    resource_type: {
        p["name"]: _strategy(p["schema"])
        for p in OPENAPI["paths"][f"/fhir/{resource_type}"]["get"]["parameters"]
        if p["in"] == "query" and p["name"] not in OPAQUE
    }
    for resource_type in TYPES
}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_documented_value_is_accepted(http, data):
    resource_type = data.draw(st.sampled_from(TYPES), label="type")
    strategies = DOCUMENTED[resource_type]
    params = data.draw(st.fixed_dictionaries({}, optional=strategies), label="params")
    response = http.get(f"/fhir/{resource_type}", params=params)
    assert response.status_code == 200, (params, response.text)
    assert response.json()["type"] == "searchset"
    posted = http.post(f"/fhir/{resource_type}/_search", data=params)
    assert posted.status_code == 200, (params, posted.text)
