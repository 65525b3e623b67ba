"""The trial's clinical records as a client writes them, one builder each: the demo trial
(`services/demo.py`) writes them, and the OpenAPI file shows them as examples
(`fhir/examples.py`), so an example is what the server really receives."""

from __future__ import annotations

from typing import Any

from app.kit import codes

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
AE_SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"


def platelet_count(subject: str, effective: str, value: float) -> dict[str, Any]:
    """A platelet count from the lab (LOINC 777-3), in 10^9/L; `subject` a reference."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}],
        "code": {
            "coding": [
                {
                    "system": codes.LOINC,
                    "code": "777-3",
                    "display": "Platelets [#/volume] in Blood by Automated count",
                }
            ]
        },
        "subject": {"reference": subject},
        "effectiveDateTime": effective,
        "valueQuantity": {
            "value": value,
            "unit": "10*9/L",
            "system": codes.UCUM,
            "code": "10*9/L",
        },
    }


def administration(
    subject: str, effective: str, role_system: str, role: str, drug: str
) -> dict[str, Any]:
    """A dose given: `role` (study-drug, rescue, ...) in the trial's medication-role codes."""
    return {
        "resourceType": "MedicationAdministration",
        "status": "completed",
        "category": {"coding": [{"system": role_system, "code": role}]},
        "medicationCodeableConcept": {"text": drug},
        "subject": {"reference": subject},
        "effectiveDateTime": effective,
    }


def adverse_event(subject: str, date: str, event: str, grade: int) -> dict[str, Any]:
    """A non-serious adverse event of `grade` (the AE research backport's grade extension)."""
    return {
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "event": {"text": event},
        "subject": {"reference": subject},
        "date": date,
        "seriousness": {"coding": [{"system": AE_SERIOUSNESS, "code": "non-serious"}]},
        "extension": [{"url": codes.AE_GRADE_EXTENSION, "valueInteger": grade}],
    }
