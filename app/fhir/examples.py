"""Example request bodies for the OpenAPI file: one resource of each type as the trial
writes them. Client authors read them (Swagger UI's "Try it out" starts from them), the
fuzzer's examples phase sends them, and tests/test_crud.py stores each one, so an example
the server would refuse fails the suite."""

from __future__ import annotations

from typing import Any

from app.kit import codes
from app.services import resource_bodies

EXAMPLE_PATIENT_ID = "example-patient"
_SUBJECT = f"Patient/{EXAMPLE_PATIENT_ID}"
_BASE = codes.DEFAULT_CODE_SYSTEM_BASE

RESOURCE_EXAMPLES: dict[str, dict[str, Any]] = {
    "Patient": {
        "resourceType": "Patient",
        "identifier": [
            {"system": _BASE + codes.SUBJECT_IDENTIFIER_SYSTEM_PATH, "value": "S01-001"}
        ],
        "managingOrganization": {
            "identifier": {"system": _BASE + codes.SITE_IDENTIFIER_SYSTEM_PATH, "value": "S01"}
        },
        "gender": "female",
        "birthDate": "1968-04-12",
    },
    "Observation": resource_bodies.platelet_count(_SUBJECT, "2025-03-10T08:15:00+01:00", 42),
    "MedicationAdministration": resource_bodies.administration(
        _SUBJECT,
        "2025-03-03T09:00:00+01:00",
        _BASE + codes.MEDICATION_ROLE_PATH,
        "study-drug",
        "NAD+ (Coenzyme I) IV",
    ),
    "AdverseEvent": resource_bodies.adverse_event(_SUBJECT, "2025-03-05", "Headache", 2),
}
