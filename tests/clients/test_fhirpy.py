"""fhirpy, as labs and analysts use it, against a real uvicorn on both databases.

These clients are the acceptance test: nothing here adapts fhirpy to the server. The only
configuration is what any FHIR server with this trial's rules needs: a bearer token, and an
`X-Provenance` reason header that the server requires on every change (a standard header,
which HAPI FHIR reads too).

The async and sync clients have the same methods, one returning coroutines: the story is
written once and `_done` awaits what needs awaiting, so both run every step.
"""

from __future__ import annotations

import inspect
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, OperationOutcome, ResourceNotFound

from tests import builders
from tests.conftest import REASON, token

SUBJECT = builders.SUBJECT_SYSTEM
LAB_ORDER = "https://lab.example/fhir/sid/filler-order"


async def _done(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _client(kind: str, base: str) -> AsyncFHIRClient | SyncFHIRClient:
    cls = AsyncFHIRClient if kind == "async" else SyncFHIRClient
    return cls(
        f"{base}/fhir",
        authorization=f"Bearer {token('investigator', ('S01',), sub='fhirpy-' + kind)}",
        extra_headers={"X-Provenance": REASON},
    )


def _entry(resource: dict[str, Any], reference: str) -> dict[str, Any]:
    resource["subject"] = {"reference": reference}
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def transaction(existing_subject: str, new_subject: str, weeks: int) -> dict[str, Any]:
    """A site's backlog as one transaction: a new patient referenced by its urn:uuid, with
    its first dose and weekly counts (20, 30, ... x 10^9/L from the baseline on, so it
    reaches CR), and the same counts for an existing patient, referenced by a conditional
    reference on its subject number."""
    new_patient = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": new_patient,
            "resource": builders.patient(new_subject),
            "request": {"method": "POST", "url": "Patient"},
        },
        _entry(builders.administration("placeholder", "2025-05-01T09:00:00Z"), new_patient),
    ]
    start = datetime(2025, 5, 1, 8)
    for week in range(weeks):
        when = (start + timedelta(days=7 * week)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for reference in (new_patient, f"Patient?identifier={SUBJECT}|{existing_subject}"):
            count = builders.platelet_count("placeholder", when, 20 + week * 10)
            entries.append(_entry(count, reference))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_trial_through_fhirpy(kind: str, live_server: str) -> None:  # noqa: PLR0915
    client = _client(kind, live_server)

    # Create, read back.
    patient = client.resource("Patient", **builders.patient("S01-101"))
    await _done(patient.save())
    assert patient.id and patient["meta"]["versionId"] == "1"
    read = await _done(client.reference("Patient", patient.id).to_resource())
    assert read["identifier"][0]["value"] == "S01-101"

    # get_or_create: the existing patient is found, a new subject number is created. fhirpy
    # sends the criteria as query parameters of the POST (conditional create, query form).
    criteria = client.resources("Patient").search(identifier=f"{SUBJECT}|S01-101")
    found, created = await _done(
        criteria.get_or_create(client.resource("Patient", **builders.patient("S01-101")))
    )
    assert (found.id, created) == (patient.id, False)
    other, created = await _done(
        client.resources("Patient")
        .search(identifier=f"{SUBJECT}|S01-102")
        .get_or_create(client.resource("Patient", **builders.patient("S01-102")))
    )
    assert created and other.id != patient.id

    # Conditional create through Resource.create(**search params), twice: one resource.
    count = client.resource(
        "Observation",
        **builders.platelet_count(
            patient.id,
            "2025-04-01T08:00:00Z",
            18,
            identifier=[{"system": LAB_ORDER, "value": f"ORD-{kind}-1"}],
        ),
    )
    await _done(count.create(identifier=f"{LAB_ORDER}|ORD-{kind}-1"))
    again = client.resource(
        "Observation",
        **builders.platelet_count(
            patient.id,
            "2025-04-01T08:00:00Z",
            18,
            identifier=[{"system": LAB_ORDER, "value": f"ORD-{kind}-1"}],
        ),
    )
    await _done(again.create(identifier=f"{LAB_ORDER}|ORD-{kind}-1"))
    assert again.id == count.id

    # Update, then patch (fhirpy sends the changed fields as a JSON object).
    patient["gender"] = "male"
    await _done(patient.save())
    assert patient["meta"]["versionId"] == "2"
    await _done(patient.patch(birthDate="1970-02-03"))
    assert patient["meta"]["versionId"] == "3" and patient["gender"] == "male"
    patched = await _done(client.patch("Patient", patient.id, gender="female"))
    assert patched["gender"] == "female" and patched["birthDate"] == "1970-02-03"
    assert patched["meta"]["versionId"] == "4"
    stored = await _done(client.get("Patient", patient.id))
    assert (stored["gender"], stored["birthDate"]) == ("female", "1970-02-03")

    # A patch that makes the count invalid is refused like an update would be.
    with pytest.raises(OperationOutcome):
        await _done(client.patch("Observation", count.id, status="not-a-status"))

    # Conditional update: none matches, so it creates; then one matches, so it updates.
    searching = client.resources("Patient").search(identifier=f"{SUBJECT}|S01-103")
    third, created = await _done(
        searching.update(client.resource("Patient", **builders.patient("S01-103")))
    )
    assert created
    changed = builders.patient("S01-103", birthDate="1955-06-07")
    third_again, created = await _done(searching.update(client.resource("Patient", **changed)))
    assert not created and third_again.id == third.id
    assert third_again["birthDate"] == "1955-06-07" and third_again["meta"]["versionId"] == "2"

    # Several match: a conditional update must not pick one. (Two patients share a hospital
    # record number; a subject number they could not share.)
    for subject in ("S01-104", "S01-106"):
        sharing = builders.with_mrn(builders.patient(subject), "H-104")
        await _done(client.resource("Patient", **sharing).save())
    with pytest.raises(MultipleResourcesFound):
        await _done(
            client.resources("Patient")
            .search(identifier=f"{builders.MRN_SYSTEM}|H-104")
            .update(client.resource("Patient", **builders.patient("S01-104")))
        )

    # A transaction: a new patient, its first dose, and 12 weeks of counts for it and for
    # S01-101 (fhirpy has no transaction method: it posts the Bundle to the base URL).
    response = await _done(client.execute("", data=transaction("S01-101", "S01-105", 12)))
    assert response["type"] == "transaction-response"
    statuses = [entry["response"]["status"] for entry in response["entry"]]
    assert len(statuses) == 26 and all(s.startswith("201") for s in statuses)
    new_id = response["entry"][0]["response"]["location"].split("/")[1]
    new_patient = await _done(
        client.resources("Patient").search(identifier=f"{SUBJECT}|S01-105").get()
    )
    assert new_patient.id == new_id

    # Search and page through every page: 12 counts from the transaction and the one
    # conditional create, 5 per page, newest first.
    pages = (
        client.resources("Observation")
        .search(patient=patient.id, code="777-3")
        .sort("-date")
        .limit(5)
    )
    counts = await _done(pages.fetch_all())
    assert len(counts) == 13 and len({c.id for c in counts}) == 13
    # count() asks _count=0 and reads Bundle.total, unmodified.
    assert await _done(pages.count()) == 13
    dates = [c["effectiveDateTime"] for c in counts]
    assert dates == sorted(dates, reverse=True)
    assert {c["subject"]["reference"] for c in counts} == {f"Patient/{patient.id}"}
    # By the new patient's reference: its 12 counts, and the response-status Observation the
    # server keeps for every treated patient.
    for_new = await _done(
        client.resources("Observation").search(subject=f"Patient/{new_id}").limit(5).fetch_all()
    )
    codes = sorted(c["code"]["coding"][0]["code"] for c in for_new)
    assert len(for_new) == 13 and codes.count("777-3") == 12

    # The response engine saw the whole transaction: baseline 20 before the first dose,
    # CR confirmed by the counts of weeks 8 and 9 (100 and 110).
    status = await _done(
        client.reference("Patient", new_id).execute("$response-status", method="get")
    )
    assert status["status"] == "CR" and status["baseline"]["value"] == 20

    # Delete: the count is gone for reads and searches.
    await _done(count.delete())
    with pytest.raises(ResourceNotFound):
        await _done(client.get("Observation", count.id))
    remaining = await _done(pages.fetch_all())
    assert count.id not in {c.id for c in remaining} and len(remaining) == 12
    assert await _done(pages.count()) == 12
