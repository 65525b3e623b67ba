"""The OpenAPI documentation models against FHIR R4B, as fhir.resources models it.

The models in app.fhir.schemas forbid unknown elements, so an R4B element they leave out
would be silently dropped by a generated client: the walk below compares them, element by
element and type by type, with the fhir.resources R4B models the server validates with.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import functools
import json
import typing
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI
from fhir.resources.R4B.adverseevent import AdverseEvent as R4BAdverseEvent
from fhir.resources.R4B.bundle import Bundle as R4BBundle
from fhir.resources.R4B.medicationadministration import (
    MedicationAdministration as R4BMedicationAdministration,
)
from fhir.resources.R4B.observation import Observation as R4BObservation
from fhir.resources.R4B.operationoutcome import OperationOutcome as R4BOperationOutcome
from fhir.resources.R4B.patient import Patient as R4BPatient
from pydantic import AnyUrl, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from app.fhir import schemas

R4B_COUNTERPARTS: dict[type[BaseModel], type[BaseModel]] = {
    schemas.Patient: R4BPatient,
    schemas.Observation: R4BObservation,
    schemas.MedicationAdministration: R4BMedicationAdministration,
    schemas.AdverseEvent: R4BAdverseEvent,
    schemas.OperationOutcome: R4BOperationOutcome,
    schemas.Bundle: R4BBundle,
}

# Where the trial profile (fhir-profile.md) narrows R4B on purpose: a record's subject is a
# Patient of this server (Patient/<id>), and every Patient names its site. The parity tests
# below expect exactly these differences and no other.
PROFILE_TYPES = [
    "AdverseEvent.subject: ['PatientReference'], R4B ['Reference']",
    "MedicationAdministration.subject: ['PatientReference'], R4B ['Reference']",
    "Observation.subject: ['PatientReference'], R4B ['Reference']",
    "Patient.managingOrganization.identifier.system: "
    "[\"'https://itp-trial.example/fhir/sid/site'\"], R4B ['string']",
    "Patient.managingOrganization.identifier: ['SiteIdentifier'], R4B ['Identifier']",
    "Patient.managingOrganization: ['SiteReference'], R4B ['Reference']",
]
PROFILE_REQUIRED = [
    "Observation.subject.reference: required=True",
    "Observation.subject: required=True",
    "Patient.managingOrganization.identifier.system: required=True",
    "Patient.managingOrganization.identifier.value: required=True",
    "Patient.managingOrganization.identifier: required=True",
    "Patient.managingOrganization: required=True",
]

# R4B elements typed SimpleQuantity (a Quantity without comparator, sqty-1), which
# fhir.resources models as Quantity.
SIMPLE_QUANTITY_ELEMENTS = {
    "Range.low",
    "Range.high",
    "RatioRange.lowNumerator",
    "RatioRange.highNumerator",
    "RatioRange.denominator",
    "SampledData.origin",
    "ObservationReferenceRange.low",
    "ObservationReferenceRange.high",
    "MedicationAdministrationDosage.dose",
    "MedicationAdministrationDosage.rateQuantity",
    "Dosage.maxDosePerAdministration",
    "Dosage.maxDosePerLifetime",
    "DosageDoseAndRate.doseQuantity",
    "DosageDoseAndRate.rateQuantity",
}
PROFILE_RESTRICTIONS = {
    ("SimpleQuantity", "comparator"),
    # No contained resources (README, "What is refused"); refused in test_validation.py.
    *(
        (resource, "contained")
        for resource in (
            "Patient",
            "Observation",
            "MedicationAdministration",
            "AdverseEvent",
            "OperationOutcome",
        )
    ),
}

# ---------------------------------------------------------------------------------------
# Walking the two model trees side by side
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementPair:
    path: str
    r4b_class: type[BaseModel]
    r4b_field: FieldInfo
    doc_class: type[BaseModel]
    doc_field: FieldInfo | None  # None: not documented


def _r4b_models(annotation: Any) -> list[type[BaseModel]]:
    """The R4B model classes a fhir.resources field annotation refers to."""
    if hasattr(annotation, "get_model_klass"):  # abc.QuantityType and friends
        return [annotation.get_model_klass()]
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    return [model for arg in typing.get_args(annotation) for model in _r4b_models(arg)]


def _leaf_types(annotation: Any) -> list[Any]:
    """Leaf types of an annotation, through Optional, list, unions and Annotated."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    args = typing.get_args(annotation)
    if args:
        return [leaf for arg in args for leaf in _leaf_types(arg)]
    return [annotation]


def _doc_models(annotation: Any) -> list[type[BaseModel]]:
    return [t for t in _leaf_types(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        return _is_list(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (list, typing.List):  # noqa: UP006 - fhir.resources
        return True
    return any(_is_list(arg) for arg in typing.get_args(annotation))


def _json_kinds(annotation: Any) -> set[str]:
    """JSON types of a primitive element: string, number, integer or boolean."""
    kinds = set()
    for leaf in _leaf_types(annotation):
        if leaf is type(None) or (isinstance(leaf, type) and issubclass(leaf, BaseModel)):
            continue
        if leaf is bool:
            kinds.add("boolean")
        elif leaf is int:
            kinds.add("integer")
        elif leaf in (float, decimal.Decimal):
            kinds.add("number")
        elif leaf in (
            str,
            bytes,
            datetime.date,
            datetime.datetime,
            datetime.time,
            uuid.UUID,
            AnyUrl,
        ) or (isinstance(leaf, type) and issubclass(leaf, str)):
            kinds.add("string")
        else:
            kinds.add(repr(leaf))
    return kinds


def _doc_enum(annotation: Any) -> type[Enum] | None:
    enums = [t for t in _leaf_types(annotation) if isinstance(t, type) and issubclass(t, Enum)]
    return enums[0] if enums else None


def _walk(
    r4b_class: type[BaseModel],
    doc_class: type[BaseModel],
    path: str,
    pairs: list[ElementPair],
    visited: set[tuple[type, type]],
) -> None:
    if (r4b_class, doc_class) in visited:
        return
    visited.add((r4b_class, doc_class))
    doc_fields = {field.alias: field for field in doc_class.model_fields.values()}
    for name, r4b_field in r4b_class.model_fields.items():
        alias = r4b_field.alias or name
        if alias.startswith("_") or name in ("fhir_comments", "resource_type"):
            continue  # primitive extensions (_birthDate) and fhir.resources internals
        if (doc_class.__name__, alias) in PROFILE_RESTRICTIONS:
            continue
        doc_field = doc_fields.get(alias)
        pairs.append(ElementPair(f"{path}.{alias}", r4b_class, r4b_field, doc_class, doc_field))
        if doc_field is None:
            continue
        doc_models = _doc_models(doc_field.annotation)
        for r4b_model in _r4b_models(r4b_field.annotation):
            # Resource-typed elements (contained, entry.resource, response.outcome) are
            # documented as their own union or object: nothing to walk into.
            if r4b_model.__name__ != "Resource" and len(doc_models) == 1:
                _walk(r4b_model, doc_models[0], f"{path}.{alias}", pairs, visited)


@functools.cache
def _element_pairs() -> tuple[list[ElementPair], set[tuple[type, type]]]:
    pairs: list[ElementPair] = []
    visited: set[tuple[type, type]] = set()
    for doc_class, r4b_class in R4B_COUNTERPARTS.items():
        _walk(r4b_class, doc_class, doc_class.__name__, pairs, visited)
    return pairs, visited


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(sorted(set(problems)))


def test_every_r4b_element_is_documented() -> None:
    pairs, _ = _element_pairs()
    missing = [pair.path for pair in pairs if pair.doc_field is None]
    assert not missing, _report(missing)


def test_no_documented_element_is_unknown_to_r4b() -> None:
    _, visited = _element_pairs()
    unknown = []
    for r4b_class, doc_class in visited:
        r4b_aliases = {field.alias or name for name, field in r4b_class.model_fields.items()}
        for field in doc_class.model_fields.values():
            if field.alias not in r4b_aliases | {"resourceType"}:
                unknown.append(f"{doc_class.__name__}.{field.alias}")
    assert not unknown, _report(unknown)


def test_nested_types_match_r4b() -> None:
    problems = []
    for pair in _element_pairs()[0]:
        r4b_models = _r4b_models(pair.r4b_field.annotation)
        if pair.doc_field is None or "Resource" in [m.__name__ for m in r4b_models]:
            continue
        documented = [m.__name__ for m in _doc_models(pair.doc_field.annotation)]
        expected = [m.__name__ for m in r4b_models]
        if f"{pair.r4b_class.__name__}.{pair.r4b_field.alias}" in SIMPLE_QUANTITY_ELEMENTS:
            expected = ["SimpleQuantity"]
        if documented != expected:
            problems.append(f"{pair.path}: {documented}, R4B {expected}")
        if not r4b_models:
            r4b_kinds = _json_kinds(pair.r4b_field.annotation)
            doc_kinds = _json_kinds(pair.doc_field.annotation)
            if r4b_kinds != doc_kinds:
                problems.append(f"{pair.path}: {sorted(doc_kinds)}, R4B {sorted(r4b_kinds)}")
    assert sorted(problems) == sorted(PROFILE_TYPES), _report(problems)


def test_cardinality_matches_r4b() -> None:
    problems = []
    for pair in _element_pairs()[0]:
        if pair.doc_field is None:
            continue
        extra = pair.r4b_field.json_schema_extra or {}
        assert isinstance(extra, dict)
        if _is_list(pair.r4b_field.annotation) != _is_list(pair.doc_field.annotation):
            problems.append(f"{pair.path}: repeating in one model only")
        choice = extra.get("one_of_many")
        if choice:
            documented = pair.doc_class.choice_elements.get(choice)
            if documented is None:
                problems.append(f"{pair.path}: {choice}[x] not declared a choice")
            elif documented != bool(extra.get("one_of_many_required")):
                problems.append(f"{pair.path}: {choice}[x] required={documented}")
            continue
        r4b_required = pair.r4b_field.is_required() or bool(extra.get("element_required"))
        if r4b_required != pair.doc_field.is_required():
            problems.append(f"{pair.path}: required={pair.doc_field.is_required()}")
    assert sorted(problems) == sorted(PROFILE_REQUIRED), _report(problems)


def test_code_sets_match_r4b() -> None:
    problems = []
    for pair in _element_pairs()[0]:
        if pair.doc_field is None:
            continue
        extra = pair.r4b_field.json_schema_extra or {}
        assert isinstance(extra, dict)
        r4b_codes = [code for code in extra.get("enum_values", []) if code not in ("+", "etc.")]
        if not r4b_codes:
            continue
        enum = _doc_enum(pair.doc_field.annotation)
        if enum is None:
            if "etc." not in extra["enum_values"]:  # an extensible binding stays a code
                problems.append(f"{pair.path}: not an enum, R4B {r4b_codes}")
            continue
        documented = {member.value for member in enum}
        truncated = "+" in extra["enum_values"]  # fhir.resources lists the first codes only
        if (not set(r4b_codes) <= documented) or (not truncated and documented != set(r4b_codes)):
            problems.append(f"{pair.path}: {sorted(documented)}, R4B {r4b_codes}")
    assert not problems, _report(problems)


# Required code sets fhir.resources does not list in full, as the R4B spec gives them
# (hl7.org/fhir/R4B/valueset-<name>.html).
R4B_CODE_SETS: dict[type[Enum], str] = {
    schemas.ObservationStatus: "registered preliminary final amended corrected cancelled "
    "entered-in-error unknown",
    schemas.QuantityComparator: "< <= >= >",
    schemas.EventTiming: "MORN MORN.early MORN.late NOON AFT AFT.early AFT.late EVE EVE.early "
    "EVE.late NIGHT PHS HS WAKE C CM CD CV AC ACM ACD ACV PC PCM PCD PCV",
    schemas.IssueType: "invalid structure required value invariant security login unknown "
    "expired forbidden suppressed processing not-supported duplicate multiple-matches "
    "not-found deleted "
    "too-long code-invalid extension too-costly business-rule conflict transient "
    "lock-error no-store exception timeout incomplete throttled informational",
}


@pytest.mark.parametrize("enum", R4B_CODE_SETS, ids=lambda enum: enum.__name__)
def test_code_sets_fhir_resources_abbreviates_match_r4b(enum: type[Enum]) -> None:
    assert [member.value for member in enum] == R4B_CODE_SETS[enum].split()


def test_every_resource_model_is_walked() -> None:
    # Guards the walk itself: a resolution bug that stops at the root would pass the rest.
    _, visited = _element_pairs()
    walked = {doc_class.__name__ for _, doc_class in visited}
    assert {
        "Extension",
        "Quantity",
        "SimpleQuantity",
        "Timing",
        "Dosage",
        "TriggerDefinition",
        "ObservationComponent",
        "AdverseEventSuspectEntityCausality",
        "BundleEntryResponse",
        "Signature",
    } <= walked


# ---------------------------------------------------------------------------------------
# Round trip of realistic trial resources
# ---------------------------------------------------------------------------------------

UCUM = "http://unitsofmeasure.org"
SUBJECT = {"reference": "Patient/p1"}

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "3", "lastUpdated": "2025-01-15T09:30:00.123+01:00"},
    "identifier": [
        {
            "use": "official",
            "system": "https://itp-trial.example/fhir/sid/subject",
            "value": "S01-001",
        }
    ],
    "active": True,
    "gender": "female",
    "birthDate": "1968-04-12",
    "managingOrganization": {
        "identifier": {"system": "https://itp-trial.example/fhir/sid/site", "value": "S01"}
    },
}

PLATELET_COUNT = {
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
    "subject": SUBJECT,
    "effectiveDateTime": "2025-01-14T08:05:00+01:00",
    "issued": "2025-01-14T10:00:00Z",
    "valueQuantity": {"value": 23.5, "unit": "10*9/L", "system": UCUM, "code": "10*9/L"},
    "referenceRange": [
        {
            "low": {"value": 150, "unit": "10*9/L", "system": UCUM, "code": "10*9/L"},
            "high": {"value": 400, "unit": "10*9/L", "system": UCUM, "code": "10*9/L"},
        }
    ],
}

BLEEDING_GRADE = {
    "resourceType": "Observation",
    "status": "final",
    "code": {
        "coding": [
            {
                "system": "https://itp-trial.example/fhir/CodeSystem/trial-codes",
                "code": "who-bleeding-grade",
            }
        ]
    },
    "subject": SUBJECT,
    "effectiveDateTime": "2025-01-14",
    "valueInteger": 2,
    "note": [{"authorString": "Dr. Hansen", "text": "Petechiae on both legs"}],
}

RESPONSE_STATUS = {
    "resourceType": "Observation",
    "status": "amended",
    "code": {
        "coding": [
            {
                "system": "https://itp-trial.example/fhir/CodeSystem/trial-codes",
                "code": "itp-response-status",
            }
        ]
    },
    "subject": SUBJECT,
    "effectivePeriod": {"start": "2024-11-02", "end": "2025-01-14"},
    "valueCodeableConcept": {
        "coding": [
            {"system": "https://itp-trial.example/fhir/CodeSystem/itp-response", "code": "R"}
        ]
    },
    "derivedFrom": [{"reference": "Observation/o1"}, {"reference": "Observation/o7"}],
    "component": [
        {
            "code": {"text": "time to response"},
            "valueQuantity": {"value": 21, "unit": "d", "system": UCUM, "code": "d"},
        }
    ],
}

STUDY_DRUG = {
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
    "subject": SUBJECT,
    "effectiveDateTime": "2025-01-14T09:00:00+01:00",
    "performer": [{"actor": {"display": "Study nurse S01"}}],
    "dosage": {
        "route": {
            "coding": [
                {
                    "system": "http://snomed.info/sct",
                    "code": "47625008",
                    "display": "Intravenous route",
                }
            ]
        },
        "dose": {"value": 500, "unit": "mg", "system": UCUM, "code": "mg"},
        "rateQuantity": {"value": 2, "unit": "mg/min", "system": UCUM, "code": "mg/min"},
    },
}

ADVERSE_EVENT = {
    "resourceType": "AdverseEvent",
    "extension": [
        {
            "url": "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/ae-grade",
            "valueInteger": 3,
        }
    ],
    "identifier": {"system": "https://itp-trial.example/fhir/sid/ae", "value": "S01-001-AE2"},
    "actuality": "actual",
    "event": {
        "coding": [{"system": "http://snomed.info/sct", "code": "131148009", "display": "Bleeding"}]
    },
    "subject": SUBJECT,
    "date": "2025-01-10",
    "seriousness": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                "code": "serious",
            }
        ]
    },
    "outcome": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/adverse-event-outcome",
                "code": "recovering",
            }
        ]
    },
    "suspectEntity": [
        {
            "instance": {"reference": "MedicationAdministration/ma1"},
            "causality": [
                {
                    "assessment": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess",
                                "code": "possible",
                            }
                        ]
                    },
                    "productRelatedness": "possibly related",
                }
            ],
        }
    ],
}

OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invalid",
            "diagnostics": "Unknown unit 'K/mm2'",
            "expression": ["Observation.valueQuantity.unit"],
        }
    ],
}

SEARCHSET = {
    "resourceType": "Bundle",
    "type": "searchset",
    "timestamp": "2025-01-15T09:30:00Z",
    "total": 2,
    "link": [
        {"relation": "self", "url": "https://api.example/fhir/Observation?subject=p1"},
        {"relation": "next", "url": "https://api.example/fhir/Observation?_cursor=a1"},
    ],
    "entry": [
        {
            "fullUrl": "https://api.example/fhir/Observation/o1",
            "resource": PLATELET_COUNT,
            "search": {"mode": "match"},
        },
        {
            "fullUrl": "https://api.example/fhir/Patient/p1",
            "resource": PATIENT,
            "search": {"mode": "include"},
        },
        {"resource": OUTCOME, "search": {"mode": "outcome"}},
    ],
}

TRANSACTION_RESPONSE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {
            "response": {
                "status": "201 Created",
                "location": "Observation/o9/_history/1",
                "etag": 'W/"1"',
                "lastModified": "2025-01-15T09:30:00Z",
                "outcome": OUTCOME,
            }
        }
    ],
}

EXAMPLES = {
    "patient": PATIENT,
    "platelet-count": PLATELET_COUNT,
    "bleeding-grade": BLEEDING_GRADE,
    "response-status": RESPONSE_STATUS,
    "study-drug": STUDY_DRUG,
    "adverse-event": ADVERSE_EVENT,
    "operation-outcome": OUTCOME,
    "searchset": SEARCHSET,
    "transaction-response": TRANSACTION_RESPONSE,
}

ALL_DOC_MODELS: dict[str, type[BaseModel]] = {
    **schemas.RESOURCE_MODELS,
    "OperationOutcome": schemas.OperationOutcome,
    "Bundle": schemas.Bundle,
    "CapabilityStatement": schemas.CapabilityStatement,
}
R4B_MODELS = {doc.__name__: r4b for doc, r4b in R4B_COUNTERPARTS.items()}


@pytest.mark.parametrize("example", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_example_round_trips(example: dict[str, Any]) -> None:
    resource_type = example["resourceType"]
    R4B_MODELS[resource_type].model_validate(example)  # the example is valid R4B
    documented = ALL_DOC_MODELS[resource_type].model_validate(example)
    assert documented.model_dump(by_alias=True, exclude_none=True, mode="json") == example


@pytest.mark.parametrize("example", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_example_is_valid_against_the_json_schema(example: dict[str, Any]) -> None:
    _validator(ALL_DOC_MODELS[example["resourceType"]]).validate(example)


def test_bundle_entries_are_typed_by_resource_type() -> None:
    bundle = schemas.Bundle.model_validate(SEARCHSET)
    assert bundle.entry is not None
    kinds = [type(entry.resource) for entry in bundle.entry]
    assert kinds == [schemas.Observation, schemas.Patient, schemas.OperationOutcome]


def test_models_are_built_from_snake_case_names_too() -> None:
    quantity = schemas.Quantity(value=12, unit="10*9/L", system=UCUM, code="10*9/L")
    observation = schemas.Observation(
        resource_type="Observation",
        status=schemas.ObservationStatus.final,
        code=schemas.CodeableConcept(text="platelets"),
        subject=schemas.PatientReference(reference="Patient/p1"),
        value_quantity=quantity,
    )
    assert observation.model_dump(exclude_none=True, mode="json") == {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "platelets"},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": 12.0, "unit": "10*9/L", "system": UCUM, "code": "10*9/L"},
    }


def test_partial_dates_and_leap_days_are_accepted() -> None:
    for birth_date in ("1968", "1968-04", "2024-02-29"):
        schemas.Patient.model_validate({**PATIENT, "birthDate": birth_date})
    schemas.Observation.model_validate(
        {**PLATELET_COUNT, "effectiveDateTime": "2016-12-31T23:59:60Z"}  # a leap second
    )


# ---------------------------------------------------------------------------------------
# The JSON schema a client generator and schemathesis read
# ---------------------------------------------------------------------------------------


@functools.cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True)


@functools.cache
def _validator(model: type[BaseModel]) -> jsonschema.Draft202012Validator:
    schema = _schema(model)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else node


CODED_ELEMENTS = {
    "Patient": ("gender", schemas.AdministrativeGender),
    "Observation": ("status", schemas.ObservationStatus),
    "MedicationAdministration": ("status", schemas.MedicationAdministrationStatus),
    "AdverseEvent": ("actuality", schemas.AdverseEventActuality),
}


@pytest.mark.parametrize("resource_type", schemas.RESOURCE_MODELS)
def test_resource_schema_has_resource_type_and_coded_status(resource_type: str) -> None:
    schema = _schema(schemas.RESOURCE_MODELS[resource_type])
    assert schema["properties"]["resourceType"]["const"] == resource_type
    assert "resourceType" in schema["required"]
    assert schema["additionalProperties"] is False
    element, enum = CODED_ELEMENTS[resource_type]
    coded = _resolve(schema, schema["properties"][element])
    assert coded["enum"] == [member.value for member in enum]
    assert coded["title"] == enum.__name__  # a generated client names its enum after it


def _nodes(node: Any) -> typing.Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


@pytest.mark.parametrize("model", ALL_DOC_MODELS.values(), ids=ALL_DOC_MODELS.keys())
def test_schema_never_allows_null(model: type[BaseModel]) -> None:
    nullable = [
        json.dumps(node)[:120]
        for node in _nodes(_schema(model))
        if {"type": "null"} in node.get("anyOf", []) + node.get("oneOf", [])
        or node.get("type") == "null"
        or (isinstance(node.get("type"), list) and "null" in node["type"])
        or node.get("nullable")
        or ("default" in node and node["default"] is None)
    ]
    assert not nullable, nullable


def test_optional_elements_are_documented_as_their_type_alone() -> None:
    properties = _schema(schemas.Observation)["properties"]
    assert properties["valueQuantity"] == {"$ref": "#/$defs/Quantity"}
    assert properties["note"] == {
        "items": {"$ref": "#/$defs/Annotation"},
        "minItems": 1,
        "type": "array",
    }
    assert properties["valueInteger"] == {
        "type": "integer",
        "minimum": -2147483648,
        "maximum": 2147483647,
    }


def test_bundle_entry_resource_is_a_discriminated_union() -> None:
    schema = _schema(schemas.Bundle)
    resource = schema["$defs"]["BundleEntry"]["properties"]["resource"]
    assert resource["discriminator"]["propertyName"] == "resourceType"
    assert set(resource["discriminator"]["mapping"]) == {
        "Patient",
        "Observation",
        "MedicationAdministration",
        "AdverseEvent",
        "OperationOutcome",
        "AuditEvent",  # GET /fhir/AuditEvent answers a Bundle of them
    }
    assert len(resource["oneOf"]) == 6


def test_fastapi_publishes_the_models_under_their_own_names() -> None:
    # The routes point their request bodies at #/components/schemas/<resourceType>.
    app = FastAPI()

    @app.get("/Observation", response_model=schemas.Bundle)
    def search() -> None: ...

    @app.get("/Observation/{id}", response_model=schemas.Observation)
    def read() -> None: ...

    components = app.openapi()["components"]["schemas"]
    assert {"Bundle", "Observation", "Patient", "Extension", "ObservationStatus"} <= set(components)
    assert not [name for name in components if name.endswith(("-Input", "-Output"))]
    assert components["Observation"]["properties"]["resourceType"]["const"] == "Observation"


def test_required_choice_is_in_the_json_schema() -> None:
    validator = _validator(schemas.MedicationAdministration)
    validator.validate(STUDY_DRUG)
    without = {k: v for k, v in STUDY_DRUG.items() if k != "medicationCodeableConcept"}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(without)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**STUDY_DRUG, "medicationReference": {"display": "NMN"}})


# ---------------------------------------------------------------------------------------
# What the models refuse (the server refuses the same)
# ---------------------------------------------------------------------------------------

_DELETE = object()


def _changed(example: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of example with the element at a dotted path (list indexes as numbers) set."""
    changed = copy.deepcopy(example)
    *parents, last = path.split(".")
    node: Any = changed
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return changed


REFUSED = {
    "status outside its code set": (PLATELET_COUNT, "status", "__not_in_enum__"),
    "gender outside its code set": (PATIENT, "gender", "F"),
    "comparator outside its code set": (PLATELET_COUNT, "valueQuantity.comparator", "~"),
    "issue code outside its code set": (OUTCOME, "issue.0.code", "bad-request"),
    "empty string": (STUDY_DRUG, "medicationCodeableConcept.text", ""),
    "empty uri": (PLATELET_COUNT, "valueQuantity.system", ""),
    "uri with whitespace": (PLATELET_COUNT, "valueQuantity.system", "http://unitsof measure.org"),
    "code with leading space": (PLATELET_COUNT, "valueQuantity.code", " 10*9/L"),
    "id with an underscore": (PATIENT, "id", "p_1"),
    "month 13": (PATIENT, "birthDate", "1968-13-12"),
    "two-digit year": (PATIENT, "birthDate", "68-04-12"),
    "30 February": (PATIENT, "birthDate", "1968-02-30"),
    "29 February of a common year": (PATIENT, "birthDate", "2023-02-29"),
    "31 April": (STUDY_DRUG, "effectiveDateTime", "2025-04-31T09:00:00Z"),
    "time without zone": (STUDY_DRUG, "effectiveDateTime", "2025-01-14T09:00:00"),
    "time with a space": (STUDY_DRUG, "effectiveDateTime", "2025-01-14 09:00:00Z"),
    "hour 24": (STUDY_DRUG, "effectiveDateTime", "2025-01-14T24:00:00Z"),
    "instant without time": (PLATELET_COUNT, "issued", "2025-01-14"),
    "integer for a date": (PATIENT, "birthDate", 0),
    "integer out of range": (BLEEDING_GRADE, "valueInteger", 2**31),
    "decimal for an integer": (BLEEDING_GRADE, "valueInteger", 2.5),
    "string for a decimal": (PLATELET_COUNT, "valueQuantity.value", "23.5"),
    "string for a boolean": (PATIENT, "active", "true"),
    "null element": (PLATELET_COUNT, "subject", None),
    "null in a nested element": (PLATELET_COUNT, "valueQuantity.unit", None),
    "empty array": (PATIENT, "identifier", []),
    "unknown element": (PLATELET_COUNT, "valueQuantityy", {"value": 1}),
    "missing resourceType": (PATIENT, "resourceType", _DELETE),
    "other resourceType": (PATIENT, "resourceType", "Practitioner"),
    "missing required element": (ADVERSE_EVENT, "actuality", _DELETE),
    "two value[x] types": (PLATELET_COUNT, "valueString", "23.5"),
    "missing required medication[x]": (STUDY_DRUG, "medicationCodeableConcept", _DELETE),
    "two medication[x] types": (STUDY_DRUG, "medicationReference", {"display": "NMN"}),
    "extension without url": (ADVERSE_EVENT, "extension.0.url", _DELETE),
    "entry of another resource type": (SEARCHSET, "entry.0.resource.resourceType", "Basic"),
}


@pytest.mark.parametrize(("example", "path", "value"), REFUSED.values(), ids=REFUSED.keys())
def test_invalid_json_is_refused(example: dict[str, Any], path: str, value: Any) -> None:
    model = ALL_DOC_MODELS[example["resourceType"]]
    model.model_validate(example)  # the unchanged example is accepted
    with pytest.raises(ValidationError):
        model.model_validate(_changed(example, path, value))


# What the JSON schema does not say, left to the models and the server: calendar validity,
# and "at most one type" of an optional choice (a schema for it would list every pair).
NOT_IN_JSON_SCHEMA = {
    "30 February",
    "29 February of a common year",
    "31 April",
    "two value[x] types",
}


@pytest.mark.parametrize(
    ("example", "path", "value"),
    [case for name, case in REFUSED.items() if name not in NOT_IN_JSON_SCHEMA],
    ids=[name for name in REFUSED if name not in NOT_IN_JSON_SCHEMA],
)
def test_invalid_json_is_refused_by_the_json_schema(
    example: dict[str, Any], path: str, value: Any
) -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validator(ALL_DOC_MODELS[example["resourceType"]]).validate(_changed(example, path, value))
