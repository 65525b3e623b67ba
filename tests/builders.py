"""FHIR resources as the trial writes them, so a test reads as the clinical story it checks."""

from __future__ import annotations

from typing import Any

SITE_SYSTEM = "https://itp-trial.example/fhir/sid/site"
SUBJECT_SYSTEM = "https://itp-trial.example/fhir/sid/subject"
# A hospital's own record number: unlike a subject number, two Patients may share one.
MRN_SYSTEM = "https://hospital.example/fhir/sid/mrn"
ROLE_SYSTEM = "https://itp-trial.example/fhir/CodeSystem/medication-role"
TRIAL_CODES = "https://itp-trial.example/fhir/CodeSystem/trial-codes"
UCUM = "http://unitsofmeasure.org"


def patient(subject: str = "S01-001", site: str = "S01", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SUBJECT_SYSTEM, "value": subject}],
        "managingOrganization": {"identifier": {"system": SITE_SYSTEM, "value": site}},
        "gender": "female",
        "birthDate": "1968-04-12",
        **extra,
    }


def with_mrn(resource: dict[str, Any], mrn: str) -> dict[str, Any]:
    """The Patient with a hospital record number beside its subject number."""
    return {
        **resource,
        "identifier": [*resource["identifier"], {"system": MRN_SYSTEM, "value": mrn}],
    }


def platelet_count(
    patient_id: str,
    when: str,
    value: float,
    *,
    unit: str = "10*9/L",
    status: str = "final",
    code: str = "777-3",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
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
                    "code": code,
                    "display": "Platelets [#/volume] in Blood by Automated count",
                }
            ]
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        **extra,
    }


def bleeding_grade(patient_id: str, when: str, grade: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": TRIAL_CODES, "code": "who-bleeding-grade"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueInteger": grade,
    }


def administration(
    patient_id: str,
    when: str,
    role: str = "study-drug",
    drug: str = "NAD+ (Coenzyme I) IV",
    status: str = "completed",
) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "status": status,
        "category": {"coding": [{"system": ROLE_SYSTEM, "code": role}]},
        "medicationCodeableConcept": {"text": drug},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
    }


def adverse_event(
    patient_id: str, when: str, *, bleeding: bool = False, grade: int = 2
) -> dict[str, Any]:
    event = (
        {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "131148009", "display": "Bleeding"}
            ]
        }
        if bleeding
        else {"text": "Headache"}
    )
    return {
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "event": event,
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": when,
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
                "valueInteger": grade,
            }
        ],
    }
