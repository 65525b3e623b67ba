"""fhirclient (SMART on FHIR's Python client, R4 models) against a real uvicorn on both
databases: the acceptance test of what it can do, unadapted.

fhirclient's resources have create, read, update, delete and search with paging, and a
transaction Bundle is created at the server's base. It has no method for PATCH, conditional
create or conditional update: a fhirclient user sends those through the client's own
requests session (`server.session`), which carries the same authentication, so that is what
this test does too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhirclient import client as smart_client
from fhirclient.models.bundle import Bundle
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException, FHIRServer
from requests import HTTPError

from tests import builders
from tests.clients.test_fhirpy import transaction
from tests.conftest import REASON, token

SUBJECT = builders.SUBJECT_SYSTEM
FHIR_JSON = "application/fhir+json"


def _server(base: str) -> FHIRServer:
    settings = {"app_id": "itp-acceptance", "api_base": f"{base}/fhir"}
    server = smart_client.FHIRClient(settings=settings).server
    server.session.headers.update(
        {
            "Authorization": f"Bearer {token('investigator', ('S01',), sub='fhirclient')}",
            "X-Provenance": REASON,
        }
    )
    return server


def _send(server: FHIRServer, method: str, path: str, body: Any, content_type: str) -> Any:
    response = server.session.request(
        method,
        f"{server.base_uri}{path}",
        data=json.dumps(body),
        headers={"Content-Type": content_type, "Accept": FHIR_JSON},
    )
    return response


def test_a_trial_through_fhirclient(live_server: str) -> None:  # noqa: PLR0915
    server = _server(live_server)

    # Create and read.
    created = Patient(builders.patient("S01-201")).create(server)
    patient_id = created["id"]
    patient = Patient.read(patient_id, server)
    assert patient.identifier[0].value == "S01-201" and patient.meta.versionId == "1"

    # Update through the model.
    patient.gender = "male"
    updated = patient.update(server)
    assert updated["meta"]["versionId"] == "2"
    assert Patient.read(patient_id, server).gender == "male"

    # PATCH, both ways FHIR servers accept it.
    json_patch = [{"op": "replace", "path": "/birthDate", "value": "1971-01-02"}]
    response = _send(
        server, "PATCH", f"Patient/{patient_id}", json_patch, "application/json-patch+json"
    )
    assert response.status_code == 200, response.text
    merge = {"gender": "female"}
    response = _send(
        server, "PATCH", f"Patient/{patient_id}", merge, "application/merge-patch+json"
    )
    assert response.status_code == 200, response.text
    patient = Patient.read(patient_id, server)
    assert (patient.gender, patient.birthDate.isostring, patient.meta.versionId) == (
        "female",
        "1971-01-02",
        "4",
    )

    # Conditional create (If-None-Exist) and conditional update (PUT Type?criteria).
    criteria = f"identifier={SUBJECT}|S01-201"
    again = server.session.post(
        f"{server.base_uri}Patient",
        data=json.dumps(builders.patient("S01-201")),
        headers={"Content-Type": FHIR_JSON, "If-None-Exist": criteria},
    )
    assert again.status_code == 200 and again.json()["id"] == patient_id
    response = _send(
        server, "PUT", f"Patient?{criteria}", builders.patient("S01-201", gender="male"), FHIR_JSON
    )
    assert response.status_code == 200 and response.json()["id"] == patient_id
    assert Patient.read(patient_id, server).meta.versionId == "5"

    # A transaction Bundle, created at the server's base.
    bundle = Bundle(transaction("S01-201", "S01-202", 8))
    answer = bundle.create(server)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["201"] * 18

    # Search, following every next link: the 8 counts the transaction gave S01-201.
    search = Observation.where(
        {"patient": patient_id, "code": "777-3", "_count": "3", "_sort": "date"}
    )
    counts = list(search.perform_resources_iter(server))
    assert len(counts) == 8 and len({c.id for c in counts}) == 8
    values = [c.valueQuantity.value for c in counts]
    assert values == sorted(values)
    pages = list(search.perform_iter(server))
    assert len(pages) == 3

    # Delete one count: gone for reads, its history remains.
    doomed = counts[0]
    doomed.delete(server)
    with pytest.raises((FHIRNotFoundException, HTTPError)) as refused:
        Observation.read(doomed.id, server)
    assert refused.value.response.status_code == 410
    assert len(list(search.perform_resources_iter(server))) == 7
