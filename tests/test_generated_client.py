"""The OpenAPI file is a product: a client generated from it (openapi-python-client, pinned)
drives one site's trial against a real uvicorn, as a frontend and a lab would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, urlsplit

import pytest

from tests import builders
from tests.conftest import PROJECT_ROOT, token


@pytest.fixture(scope="session")
def itp_client(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Generated in the test run from openapi/openapi.json, so it can never be stale."""
    out = tmp_path_factory.mktemp("generated")
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [
            str(bin_dir / "openapi-python-client"),
            "generate",
            "--meta",
            "none",
            "--path",
            str(PROJECT_ROOT / "openapi" / "openapi.json"),
            "--config",
            str(PROJECT_ROOT / "openapi" / "openapi-python-client.yaml"),
            "--output-path",
            str(out / "itp_client"),
        ],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A warning means an operation or a model was dropped or degraded: the contract failed.
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(out))
    import itp_client as package

    return package


def _cursor(bundle) -> str | None:
    for link in bundle.link:
        if link.relation == "next":
            return parse_qs(urlsplit(link.url).query)["_cursor"][0]
    return None


def test_one_sites_trial_through_the_generated_client(itp_client, live_server):
    from itp_client import AuthenticatedClient
    from itp_client.api.adverse_event import create_adverse_event
    from itp_client.api.hl7 import receive_lab_results
    from itp_client.api.medication_administration import create_medication_administration
    from itp_client.api.observation import (
        create_observation,
        delete_observation,
        read_observation,
        search_observation,
        search_observation_post,
        update_observation,
    )
    from itp_client.api.patient import create_patient, read_patient, search_patient
    from itp_client.api.response import get_response_status, get_response_summary
    from itp_client.models import (
        AdverseEvent,
        MedicationAdministration,
        Observation,
        OperationOutcome,
        Patient,
        ProvenanceHeader,
        ProvenanceHeaderReasonItem,
        ResponseAssessment,
        SearchObservationPostBody,
        SearchObservationPostBodyIncludeItem,
        SearchObservationPostBodyTotal,
    )
    from itp_client.types import File

    # The change reason, built with the model the file gives X-Provenance's contentSchema.
    reason = json.dumps(
        ProvenanceHeader(
            resource_type="Provenance",
            reason=[ProvenanceHeaderReasonItem(text="count mistyped")],
        ).to_dict()
    )
    frontend = AuthenticatedClient(
        base_url=live_server, token=token("investigator", ("S01",), sub="dr-a")
    )
    lab = AuthenticatedClient(base_url=live_server, token=token("lab", ("S01",), sub="lab-1"))

    # Enrol three patients, record baseline counts and the first doses.
    plans = {
        "S01-001": [40, 60, 75, 80],
        "S01-002": [110, 120, 130, 125],
        "S01-003": [12, 14, 11, 13],
    }
    patients = {}
    for subject in plans:
        created = create_patient.sync_detailed(
            client=frontend, body=Patient.from_dict(builders.patient(subject))
        )
        assert created.status_code == 201
        assert isinstance(created.parsed, Patient)
        patients[subject] = created.parsed.id
        baseline = builders.platelet_count(patients[subject], "2025-03-03T07:00:00Z", 12)
        assert (
            create_observation.sync_detailed(
                client=lab, body=Observation.from_dict(baseline)
            ).status_code
            == 201
        )
        dose = builders.administration(patients[subject], "2025-03-03T08:00:00Z")
        assert (
            create_medication_administration.sync_detailed(
                client=frontend, body=MedicationAdministration.from_dict(dose)
            ).status_code
            == 201
        )

    # The lab finds each patient by subject number and pushes weekly counts.
    found = search_patient.sync(client=lab, identifier=f"{builders.SUBJECT_SYSTEM}|S01-002")
    assert [entry.resource.id for entry in found.entry] == [patients["S01-002"]]
    counts = {}
    for subject, values in plans.items():
        for week, value in enumerate(values, start=1):
            body = builders.platelet_count(
                patients[subject], f"2025-03-{3 + 7 * week:02d}T09:00:00Z", value
            )
            response = create_observation.sync_detailed(
                client=lab, body=Observation.from_dict(body)
            )
            assert response.status_code == 201
            counts[(subject, week)] = response.parsed.id

    # The lab's interface engine sends one more count over HL7 v2 (ORU^R01, ER7).
    oru = (
        "MSH|^~\\&|LIS|CENTRAL LAB|ITP-TRIAL-API|TRIAL|20250407093000+0000||ORU^R01^ORU_R01|"
        "GEN-0001|P|2.5.1\r"
        "PID|1||S01-003^^^ITP-TRIAL^RI\r"
        "OBR|1||FIL-90001^CENTRAL LAB|777-3^Platelets^LN|||20250407090000\r"
        "OBX|1|NM|777-3^Platelets^LN||12|10*9/L^^UCUM|150-400|L|||F|||20250407090000\r"
    )
    sent = receive_lab_results.sync_detailed(
        client=lab, body=File(payload=BytesIO(oru.encode()), mime_type="x-application/hl7-v2+er7")
    )
    assert sent.status_code == 200 and isinstance(sent.parsed, File)
    assert "\rMSA|AA|GEN-0001" in sent.parsed.payload.read().decode()

    # A bleeding grade and an adverse event.
    grade = builders.bleeding_grade(patients["S01-003"], "2025-03-10T09:00:00Z", 2)
    assert (
        create_observation.sync_detailed(
            client=frontend, body=Observation.from_dict(grade)
        ).status_code
        == 201
    )
    event = builders.adverse_event(patients["S01-001"], "2025-03-05")
    assert (
        create_adverse_event.sync_detailed(
            client=frontend, body=AdverseEvent.from_dict(event)
        ).status_code
        == 201
    )

    # Correct a mistyped count (with a reason), then delete an entered-in-error one.
    mistyped = read_observation.sync(counts[("S01-001", 2)], client=lab)
    fixed = mistyped.to_dict()
    fixed["status"] = "corrected"
    fixed["valueQuantity"]["value"] = 65
    corrected = update_observation.sync_detailed(
        mistyped.id,
        client=lab,
        body=Observation.from_dict(fixed),
        if_match='W/"1"',
        x_provenance=reason,
    )
    assert corrected.status_code == 200
    assert corrected.parsed.value_quantity.value == 65
    removed = delete_observation.sync_detailed(
        counts[("S01-003", 4)], client=frontend, x_provenance=reason
    )
    assert removed.status_code == 204

    # Each patient's response, and the site's summary.
    statuses = {}
    for subject, patient_id in patients.items():
        assessment = get_response_status.sync(patient_id, client=frontend)
        assert isinstance(assessment, ResponseAssessment)
        statuses[subject] = assessment.status
    assert statuses == {"S01-001": "R", "S01-002": "CR", "S01-003": "NR"}
    summary = get_response_summary.sync(client=frontend)
    assert summary.patients == 3 and summary.by_status.cr == 1
    assert summary.overall_response_rate == pytest.approx(2 / 3, abs=1e-4)

    # Page through one patient's counts, two at a time.
    seen, cursor = [], None
    while True:
        page = search_observation.sync(
            client=frontend,
            patient=patients["S01-002"],
            code="777-3",
            field_count=2,
            **({"field_cursor": cursor} if cursor else {}),
        )
        seen += [entry.resource.id for entry in page.entry]
        cursor = _cursor(page)
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 5  # the baseline and four weekly counts

    # A form-encoded search: counts below 30 x 10^9/L of the patient with subject number
    # S01-003 (a chain, sent as an extra field), with the patient included.
    criteria = SearchObservationPostBody(
        value_quantity="lt30000|http://unitsofmeasure.org|/uL",
        field_total=SearchObservationPostBodyTotal.ACCURATE,
        field_include=[SearchObservationPostBodyIncludeItem.OBSERVATIONSUBJECT],
    )
    criteria["subject:Patient.identifier"] = f"{builders.SUBJECT_SYSTEM}|S01-003"
    low = search_observation_post.sync(client=frontend, body=criteria)
    # The baseline, weeks 1-3 (week 4 was deleted) and the count the lab sent over HL7 v2.
    assert low.total == 5
    modes = [entry.search.mode for entry in low.entry]
    assert modes.count("match") == 5 and modes.count("include") == 1

    # Typed errors.
    stale = update_observation.sync_detailed(
        mistyped.id,
        client=lab,
        body=Observation.from_dict(fixed),
        if_match='W/"1"',
        x_provenance=reason,
    )
    assert stale.status_code == 412 and isinstance(stale.parsed, OperationOutcome)
    invalid = builders.platelet_count(patients["S01-001"], "2025-04-01T09:00:00Z", 50, unit="mg/dL")
    refused = create_observation.sync_detailed(client=lab, body=Observation.from_dict(invalid))
    assert refused.status_code == 422 and isinstance(refused.parsed, OperationOutcome)
    assert "mg/dL" in refused.parsed.issue[0].diagnostics
    missing = read_patient.sync_detailed("no-such-patient", client=frontend)
    assert missing.status_code == 404 and isinstance(missing.parsed, OperationOutcome)
    # Typed on every operation, whatever its success looks like: a delete (204, no body)
    # with a stale If-Match, and $response-status (application/json) of a missing patient.
    stale_delete = delete_observation.sync_detailed(
        mistyped.id, client=frontend, if_match='W/"1"', x_provenance=reason
    )
    assert stale_delete.status_code == 412 and isinstance(stale_delete.parsed, OperationOutcome)
    no_status = get_response_status.sync_detailed("no-such-patient", client=frontend)
    assert no_status.status_code == 404 and isinstance(no_status.parsed, OperationOutcome)
