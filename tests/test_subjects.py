"""One subject, one patient (both databases): subject numbers are NFKC-normalised and
trimmed, must then have the documented form, and are unique in the trial. A plain create of
a number that is taken is a 409 naming the patient; a look-alike finds that patient in a
search, a conditional create, a Bundle's conditional reference and an HL7 PID-3."""

from __future__ import annotations

import asyncio
import string
import unicodedata

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.services import subjects
from tests import builders
from tests.conftest import REASON, bearer
from tests.hl7_support import read_ack, send, stored_state
from tests.test_bundles import bundle, count, post
from tests.test_bundles import send as send_bundle
from tests.test_crud import create
from tests.test_hl7_api import oru

SUBJECT = builders.SUBJECT_SYSTEM
# What an eye cannot tell from S01-001: blanks around it, full-width digits, or all of it
# full-width (NFKC folds these onto S01-001). A FHIR string holds no other white space than
# space, tab, CR and LF; a search value may (the no-break space below).
LOOK_ALIKES = ["S01-001 ", " S01-001", "\tS01-001 ", "S01-００１", "Ｓ０１－００１"]
# Invisible characters inside: no normalisation removes them, so they are refused.
INVISIBLE = ["S01\u200b-001", "\u202eS01-001", "S01-\ufeff001", "S01-00\u20601"]


def _expressions(response: httpx.Response) -> list[str]:
    return [e for issue in response.json()["issue"] for e in issue.get("expression", [])]


async def _patients(client: httpx.AsyncClient) -> list[dict]:
    found = (await client.get("/fhir/Patient", params={"_count": "100"})).json()
    return [e["resource"] for e in found.get("entry", []) if e["search"]["mode"] == "match"]


@pytest.mark.parametrize("number", LOOK_ALIKES)
async def test_a_look_alike_of_an_enrolled_number_is_409_naming_the_patient(app, client, number):
    enrolled = (await create(client, builders.patient("S01-001"))).json()
    before = await stored_state(app)
    response = await client.post("/fhir/Patient", json=builders.patient(number))
    assert response.status_code == 409, response.text
    issue = response.json()["issue"][0]
    assert issue["code"] == "conflict"
    assert f"Patient/{enrolled['id']}" in issue["diagnostics"]
    assert issue["expression"] == ["Patient.identifier[0].value"]
    assert await stored_state(app) == before


@pytest.mark.parametrize("number", INVISIBLE + ["S01 001", "-S01", "", "x" * 65, "S01/001"])
async def test_a_number_with_invisible_or_other_characters_is_422(app, client, number):
    before = await stored_state(app)
    response = await client.post("/fhir/Patient", json=builders.patient(number))
    assert response.status_code == 422, response.text
    assert set(_expressions(response)) == {"Patient.identifier[0].value"}
    assert await stored_state(app) == before


async def test_a_number_is_stored_and_found_in_its_normalised_form(client):
    created = (await create(client, builders.patient(" Ｓ０１－００２\t"))).json()
    assert created["identifier"][0]["value"] == "S01-002"
    for number in ("S01-002", "S01-００２", " S01-002", "S01\u200b-002", "\u3000S01-002"):
        found = await client.get("/fhir/Patient", params={"identifier": f"{SUBJECT}|{number}"})
        ids = [e["resource"]["id"] for e in found.json().get("entry", [])]
        assert ids == [created["id"]], number
    # Case is part of the number: s01-002 is another subject.
    other = await client.get("/fhir/Patient", params={"identifier": f"{SUBJECT}|s01-002"})
    assert "entry" not in other.json()


@pytest.mark.parametrize("number", LOOK_ALIKES)
async def test_a_conditional_create_on_a_look_alike_returns_the_patient(client, number):
    enrolled = (await create(client, builders.patient("S01-001"))).json()
    response = await client.post(
        "/fhir/Patient",
        params={"identifier": f"{SUBJECT}|{number}"},
        json=builders.patient(number),
    )
    assert response.status_code == 200, response.text
    assert response.json()["id"] == enrolled["id"]
    assert len(await _patients(client)) == 1


async def test_a_conditional_update_and_a_chained_search_on_a_look_alike(client):
    enrolled = (await create(client, builders.patient("S01-001"))).json()
    changed = {**builders.patient("S01-００１"), "gender": "male"}
    response = await client.put(
        "/fhir/Patient", params={"identifier": f"{SUBJECT}|S01-００１ "}, json=changed
    )
    assert response.status_code == 200, response.text
    assert response.json()["id"] == enrolled["id"]
    assert response.json()["identifier"][0]["value"] == "S01-001"
    observation = (
        await create(client, builders.platelet_count(enrolled["id"], "2025-03-10T09:00:00Z", 42))
    ).json()
    found = await client.get(
        "/fhir/Observation",
        params={"subject:Patient.identifier": f"{SUBJECT}| S01-００１", "code": "777-3"},
    )
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [observation["id"]]


async def test_an_update_cannot_take_another_patients_number(client):
    first = (await create(client, builders.patient("S01-001"))).json()
    second = (await create(client, builders.patient("S01-002"))).json()
    taken = {**second, "identifier": [{"system": SUBJECT, "value": "S01-００１"}]}
    response = await client.put(f"/fhir/Patient/{second['id']}", json=taken)
    assert response.status_code == 409, response.text
    assert f"Patient/{first['id']}" in response.json()["issue"][0]["diagnostics"]
    kept = {**first, "gender": "male"}
    assert (await client.put(f"/fhir/Patient/{first['id']}", json=kept)).status_code == 200
    # A deleted patient's number is free again.
    assert (await client.delete(f"/fhir/Patient/{first['id']}")).status_code == 204
    response = await client.put(f"/fhir/Patient/{second['id']}", json=taken)
    assert response.status_code == 200, response.text


async def test_a_number_enrolled_at_another_site_is_409_without_its_id(client, anonymous):
    enrolled = (await create(client, builders.patient("S01-001"))).json()
    s02 = {**bearer("investigator", ("S02",)), "X-Provenance": REASON}
    response = await anonymous.post(
        "/fhir/Patient", json=builders.patient("S01-001", site="S02"), headers=s02
    )
    assert response.status_code == 409, response.text
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert enrolled["id"] not in diagnostics and "a site you do not hold" in diagnostics


async def test_a_patient_has_one_subject_number(client):
    patient = builders.patient("S01-001")
    patient["identifier"].append({"system": SUBJECT, "value": "S01-002"})
    response = await client.post("/fhir/Patient", json=patient)
    assert response.status_code == 422
    assert _expressions(response) == ["Patient.identifier[1].value"]
    patient["identifier"][1]["value"] = "S01-００１"  # the same number twice is one number
    assert (await client.post("/fhir/Patient", json=patient)).status_code == 201


async def test_bundles_enrol_a_number_once(app, client):
    enrolled = (await create(client, builders.patient("S01-001"))).json()
    before = await stored_state(app)
    answer = await send_bundle(client, bundle("transaction", post(builders.patient("S01-001 "))))
    assert answer.status_code == 409, answer.text
    assert answer.json()["issue"][0]["diagnostics"].startswith("Bundle.entry[0]")
    twice = bundle(
        "transaction", post(builders.patient("S01-002")), post(builders.patient("S01-００２"))
    )
    assert (await send_bundle(client, twice)).status_code == 409
    assert await stored_state(app) == before
    # A look-alike conditional create and a conditional reference find the patient.
    urn = "urn:uuid:6f1c1a52-2b6e-4d0c-8f3e-0a9b8c7d6e5f"
    answer = await send_bundle(
        client,
        bundle(
            "transaction",
            post(
                builders.patient("S01-００１"), urn, url=f"Patient?identifier={SUBJECT}|S01-００１"
            ),
            post(count(urn, "2025-03-10T09:00:00Z", 42)),
            post(count(f"Patient?identifier={SUBJECT}|S01-001\u00a0", "2025-03-11", 43)),
        ),
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert entries[0]["response"]["status"] == "200 OK"
    subjects_of = {e["resource"]["subject"]["reference"] for e in entries[1:]}
    assert subjects_of == {f"Patient/{enrolled['id']}"}


async def test_an_hl7_message_finds_the_patient_by_a_look_alike(client, app):
    await create(client, builders.patient("S01-001"))
    ack = read_ack(await send(client, oru(subject="S01-００１")))
    assert ack.code == "AA", ack.text


async def test_concurrent_enrolments_of_one_number_leave_one_patient(live_server):
    """Two worker processes, one number written many ways at once: one 201, every other
    plain create a 409 and every conditional one the same patient (never a 500, never two
    patients). On PostgreSQL the losers meet the unique index; the answer comes from the
    patient that won."""
    numbers = LOOK_ALIKES + ["S01-001"] * 3
    async with httpx.AsyncClient(
        base_url=live_server,
        limits=httpx.Limits(max_connections=40),
        timeout=60,
        headers={**bearer("admin"), "X-Provenance": REASON},
    ) as http:

        async def plain(number: str) -> httpx.Response:
            return await http.post("/fhir/Patient", json=builders.patient(number))

        async def conditional(number: str) -> httpx.Response:
            return await http.post(
                "/fhir/Patient",
                params={"identifier": f"{SUBJECT}|{number}"},
                json=builders.patient(number),
            )

        responses = await asyncio.gather(
            *(plain(n) for n in numbers), *(conditional(n) for n in numbers * 2)
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) == 1, statuses
        assert set(statuses[: len(numbers)]) <= {201, 409}, statuses
        assert set(statuses[len(numbers) :]) <= {200, 201}, statuses
        winners = {r.json()["id"] for r in responses if r.status_code in (200, 201)}
        assert len(winners) == 1
        found = (
            await http.get("/fhir/Patient", params={"identifier": f"{SUBJECT}|S01-001"})
        ).json()
        assert [e["resource"]["id"] for e in found["entry"]] == list(winners)


# --- the rule, for every input -----------------------------------------------------------

_ALLOWED = string.ascii_letters + string.digits + "-_."
valid_numbers = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(_ALLOWED, max_size=63),
)
blanks = st.text(" \t\n\r\u00a0\u2003\u3000", max_size=3)


def _full_width(text: str) -> str:
    """The full-width form of the printable ASCII characters (U+FF01-FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@settings(max_examples=300, deadline=None)
@given(number=valid_numbers, before=blanks, after=blanks, wide=st.booleans())
def test_a_look_alike_normalises_to_the_number(number, before, after, wide):
    decorated = before + (_full_width(number) if wide else number) + after
    assert subjects.normalise(decorated) == number
    assert subjects.comparison_key(decorated) == number
    assert subjects.is_valid(subjects.normalise(decorated))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_normalisation_is_stable_and_valid_numbers_are_ascii(text):
    number = subjects.normalise(text)
    assert subjects.normalise(number) == number
    assert subjects.comparison_key(subjects.comparison_key(text)) == subjects.comparison_key(text)
    if subjects.is_valid(number):
        assert set(number) <= set(_ALLOWED) and 1 <= len(number) <= 64
        # A lookup compares what is stored: for a valid number both are the same.
        assert subjects.comparison_key(text) == number


@settings(max_examples=300, deadline=None)
@given(
    number=valid_numbers,
    position=st.integers(min_value=0, max_value=64),
    invisible=st.sampled_from(
        [c for c in map(chr, range(0x2000, 0x2070)) if unicodedata.category(c) == "Cf"]
        + ["\ufeff", "\u00ad", "\u0000", "\u0007"]
    ),
)
def test_an_invisible_character_makes_a_number_invalid_but_finds_it(number, position, invisible):
    """Stored: refused (the pattern has no room for it). Looked up: the number it hides."""
    at = min(position, len(number))
    hidden = number[:at] + invisible + number[at:]
    assert not subjects.is_valid(subjects.normalise(hidden))
    assert subjects.comparison_key(hidden) == number
