"""Example request bodies for the OpenAPI file: one resource of each type as the trial
writes them. Client authors read them (Swagger UI's "Try it out" starts from them), the
fuzzer's examples phase sends them, and tests/test_crud.py stores each one, so an example
the server would refuse fails the suite."""

from __future__ import annotations

from typing import Any

EXAMPLE_PATIENT_ID = "example-patient"
_SUBJECT = {"reference": f"Patient/{EXAMPLE_PATIENT_ID}"}

RESOURCE_EXAMPLES: dict[str, dict[str, Any]] = {
    "Patient": {
        "resourceType": "Patient",
        "identifier": [
            {"system": "https://itp-trial.example/fhir/sid/subject", "value": "S01-001"}
        ],
        "managingOrganization": {
            "identifier": {"system": "https://itp-trial.example/fhir/sid/site", "value": "S01"}
        },
        "gender": "female",
        "birthDate": "1968-04-12",
    },
    "Observation": {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "777-3",
                    "display": "Platelets [#/volume] in Blood by Automated count",
                }
            ]
        },
        "subject": _SUBJECT,
        "effectiveDateTime": "2025-03-10T08:15:00+01:00",
        "valueQuantity": {
            "value": 42,
            "unit": "10*9/L",
            "system": "http://unitsofmeasure.org",
            "code": "10*9/L",
        },
    },
    "MedicationAdministration": {
        "resourceType": "MedicationAdministration",
        "status": "completed",
        "category": {
            "coding": [
                {
                    "system": "https://itp-trial.example/fhir/CodeSystem/medication-role",
                    "code": "study-drug",
                }
            ]
        },
        "medicationCodeableConcept": {"text": "NAD+ (Coenzyme I) IV"},
        "subject": _SUBJECT,
        "effectiveDateTime": "2025-03-03T09:00:00+01:00",
    },
    "AdverseEvent": {
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "event": {"text": "Headache"},
        "subject": _SUBJECT,
        "date": "2025-03-05",
        "seriousness": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                    "code": "non-serious",
                }
            ]
        },
        "extension": [
            {
                "url": "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/ae-grade",
                "valueInteger": 2,
            }
        ],
    },
}
