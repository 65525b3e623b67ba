"""Basic search and keyset paging (both databases)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests import builders
from tests.test_crud import create, new_patient


def _ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _next(bundle: dict) -> str | None:
    for link in bundle["link"]:
        if link["relation"] == "next":
            parts = urlsplit(link["url"])
            return f"{parts.path}?{parts.query}"
    return None


async def _counts(client, patient_id: str, days: list[int]) -> dict[int, str]:
    ids = {}
    for day in days:
        body = builders.platelet_count(patient_id, f"2025-03-{day:02d}T09:00:00Z", 20 + day)
        ids[day] = (await create(client, body)).json()["id"]
    return ids


async def test_patient_by_identifier(client):
    wanted = (await create(client, builders.patient("S01-001"))).json()["id"]
    await create(client, builders.patient("S01-002"))
    system = builders.SUBJECT_SYSTEM
    for query in (f"{system}|S01-001", "S01-001"):
        bundle = (await client.get("/fhir/Patient", params={"identifier": query})).json()
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "searchset"
        assert _ids(bundle) == [wanted]
    other_system = (
        await client.get("/fhir/Patient", params={"identifier": "urn:other|S01-001"})
    ).json()
    assert _ids(other_system) == []
    both = (await client.get("/fhir/Patient", params={"identifier": "S01-001,S01-002"})).json()
    assert len(_ids(both)) == 2


async def test_observation_by_patient_code_and_date_prefixes(client):
    patient_id = await new_patient(client)
    other = await new_patient(client, "S01-002")
    ids = await _counts(client, patient_id, [3, 10, 17])
    await _counts(client, other, [10])
    await create(client, builders.bleeding_grade(patient_id, "2025-03-10T09:00:00Z", 1))

    async def search(**params: str) -> list[str]:
        bundle = (
            await client.get(
                "/fhir/Observation", params={"patient": patient_id, "code": "777-3", **params}
            )
        ).json()
        return sorted(_ids(bundle))

    assert await search() == sorted(ids.values())
    assert await search(date="2025-03-10") == [ids[10]]
    assert await search(date="eq2025-03-10") == [ids[10]]
    assert await search(date="ne2025-03-10") == sorted([ids[3], ids[17]])
    assert await search(date="lt2025-03-10") == [ids[3]]
    assert await search(date="le2025-03-10") == sorted([ids[3], ids[10]])
    assert await search(date="gt2025-03-10") == [ids[17]]
    assert await search(date="ge2025-03-10") == sorted([ids[10], ids[17]])
    assert await search(date="2025-03") == sorted(ids.values())
    assert await search(date="ge2025-03-10T09:00:00Z") == sorted([ids[10], ids[17]])
    subject = (
        await client.get("/fhir/Observation", params={"subject": f"Patient/{patient_id}"})
    ).json()
    # Three counts, the bleeding grade and the server's response-status Observation.
    assert len(_ids(subject)) == 5
    loinc = (
        await client.get(
            "/fhir/Observation", params={"patient": patient_id, "code": "http://loinc.org|777-3"}
        )
    ).json()
    assert len(_ids(loinc)) == 3


async def test_a_date_at_seconds_precision_covers_its_whole_second(client):
    """FHIR's implicit ranges (search.html#date): 2025-03-10T09:00:05Z is the second
    [09:00:05, 09:00:06), so it matches a count taken at 09:00:05.500."""
    patient_id = await new_patient(client)
    taken = builders.platelet_count(patient_id, "2025-03-10T09:00:05.500Z", 40)
    count_id = (await create(client, taken)).json()["id"]

    async def search(date: str) -> list[str]:
        params = {"patient": patient_id, "code": "777-3", "date": date}
        return _ids((await client.get("/fhir/Observation", params=params)).json())

    for date in (
        "2025-03-10T09:00:05Z",
        "eq2025-03-10T10:00:05+01:00",
        "2025-03-10T09:00Z",  # the minute
        "ge2025-03-10T09:00:05Z",
        "le2025-03-10T09:00:05Z",
        "gt2025-03-10T09:00:04Z",
        "lt2025-03-10T09:00:06Z",
    ):
        assert await search(date) == [count_id], date
    for date in ("2025-03-10T09:00:04Z", "2025-03-10T09:00:06Z", "ne2025-03-10T09:00:05Z"):
        assert await search(date) == [], date


async def test_repeated_date_parameters_are_and_ed(client):
    patient_id = await new_patient(client)
    ids = await _counts(client, patient_id, [3, 10, 17])
    response = await client.get(
        f"/fhir/Observation?patient={patient_id}&code=777-3&date=gt2025-03-04&date=lt2025-03-16"
    )
    assert _ids(response.json()) == [ids[10]]


async def test_sort_by_date_both_ways(client):
    patient_id = await new_patient(client)
    ids = await _counts(client, patient_id, [17, 3, 10])
    counts = {"patient": patient_id, "code": "777-3"}
    ascending = (await client.get("/fhir/Observation", params={**counts, "_sort": "date"})).json()
    assert _ids(ascending) == [ids[3], ids[10], ids[17]]
    descending = (await client.get("/fhir/Observation", params={**counts, "_sort": "-date"})).json()
    assert _ids(descending) == [ids[17], ids[10], ids[3]]


@pytest.mark.parametrize("sort", [None, "date", "-date"])
async def test_paging_neither_skips_nor_repeats_while_data_arrives(client, sort):
    patient_id = await new_patient(client)
    before = await _counts(client, patient_id, list(range(1, 11)))
    params = {
        "patient": patient_id,
        "code": "777-3",
        "_count": "3",
        **({"_sort": sort} if sort else {}),
    }
    page = (await client.get("/fhir/Observation", params=params)).json()
    seen = _ids(page)
    added = []
    day = 11
    while (url := _next(page)) is not None:
        # New counts arrive between pages, dated both before and after what was seen.
        for when in (f"2025-02-{day:02d}T09:00:00Z", f"2025-04-{day:02d}T09:00:00Z"):
            body = builders.platelet_count(patient_id, when, 50)
            added.append((await create(client, body)).json()["id"])
        day += 1
        page = (await client.get(url)).json()
        seen += _ids(page)
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert set(before.values()) <= set(seen), "a row that existed before paging was skipped"
    assert set(seen) <= set(before.values()) | set(added)


async def test_self_and_next_links_and_count(client):
    patient_id = await new_patient(client)
    await _counts(client, patient_id, [1, 2, 3])
    query = f"patient={patient_id}&code=777-3&_count=2"
    bundle = (await client.get(f"/fhir/Observation?{query}")).json()
    relations = {link["relation"]: link["url"] for link in bundle["link"]}
    assert relations["self"].endswith(f"/fhir/Observation?{query}")
    assert "_cursor=" in relations["next"]
    assert len(_ids(bundle)) == 2
    last = (await client.get(_next(bundle))).json()
    assert len(_ids(last)) == 1
    assert _next(last) is None


async def test_administrations_and_adverse_events_by_patient(client):
    patient_id = await new_patient(client)
    other = await new_patient(client, "S01-002")
    dose = await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
    await create(client, builders.administration(other, "2025-03-03T08:00:00Z"))
    event = await create(client, builders.adverse_event(patient_id, "2025-03-05"))
    await create(client, builders.adverse_event(other, "2025-03-05"))
    doses = (
        await client.get("/fhir/MedicationAdministration", params={"patient": patient_id})
    ).json()
    assert _ids(doses) == [dose.json()["id"]]
    events = (
        await client.get("/fhir/AdverseEvent", params={"subject": f"Patient/{patient_id}"})
    ).json()
    assert _ids(events) == [event.json()["id"]]


async def test_deleted_resources_are_not_found_by_search(client):
    patient_id = await new_patient(client)
    ids = await _counts(client, patient_id, [1, 2])
    await client.delete(f"/fhir/Observation/{ids[1]}")
    bundle = (
        await client.get("/fhir/Observation", params={"patient": patient_id, "code": "777-3"})
    ).json()
    assert _ids(bundle) == [ids[2]]


async def test_unknown_parameters_warn_or_fail_in_strict_mode(client):
    lenient = await client.get("/fhir/Patient", params={"nickname": "x"})
    assert lenient.status_code == 200
    outcomes = [e for e in lenient.json().get("entry", []) if e["search"]["mode"] == "outcome"]
    assert outcomes[0]["resource"]["issue"][0]["severity"] == "warning"
    strict = await client.get(
        "/fhir/Patient", params={"nickname": "x"}, headers={"Prefer": "handling=strict"}
    )
    assert strict.status_code == 400


@pytest.mark.parametrize(
    "query",
    [
        "date=2025-13-01",
        "date=xx2025",
        "_count=many",
        "_sort=value",
        "patient=Group/1",
    ],
)
async def test_bad_search_values_are_400(client, query):
    response = await client.get(f"/fhir/Observation?{query}")
    assert response.status_code == 400, query
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_an_unusable_cursor_is_ignored_with_a_warning_unless_strict(client):
    for number in range(3):
        await new_patient(client, f"S01-{number:03d}")
    first = (await client.get("/fhir/Patient?_count=2")).json()
    lenient = await client.get("/fhir/Patient?_count=2&_cursor=garbage")
    assert lenient.status_code == 200
    bundle = lenient.json()
    matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert [e["resource"]["id"] for e in matches] == [
        e["resource"]["id"] for e in first["entry"] if e["search"]["mode"] == "match"
    ]
    outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert "_cursor" in outcomes[0]["issue"][0]["diagnostics"]
    strict = await client.get(
        "/fhir/Patient?_count=2&_cursor=garbage", headers={"Prefer": "handling=strict"}
    )
    assert strict.status_code == 400


async def test_history_pages_by_position_and_any_wellformed_position_is_a_page(client):
    patient_id = await new_patient(client)
    for number in range(3):
        resource = {**builders.patient("S01-001"), "id": patient_id, "active": number % 2 == 0}
        updated = await client.put(f"/fhir/Patient/{patient_id}", json=resource)
        assert updated.status_code == 200, updated.text
    seen, url = [], f"/fhir/Patient/{patient_id}/_history?_count=1"
    while url:
        bundle = (await client.get(url)).json()
        seen += [e["resource"]["meta"]["versionId"] for e in bundle["entry"]]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    assert seen == ["4", "3", "2", "1"]
    # A position before every version: nothing is older, so the page is empty.
    before = await client.get(f"/fhir/Patient/{patient_id}/_history?_cursor=0~a~1")
    assert before.status_code == 200
    assert "entry" not in before.json()
