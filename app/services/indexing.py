"""Index values derived from a resource on every write: what search and the response engine
query without parsing stored JSON.

`value_norm` is the platelet count in 10^9/L. The stored resource keeps what the lab sent;
an unknown unit is refused here (422 naming it) because a silent guess would corrupt the
patient's response.

Search values (tokens, strings, numbers and quantities) come from `search_values`, which
never refuses anything: it also rebuilds the index of resources stored before a parameter
existed (migration 0003).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.kit import codes
from app.kit.codes import (
    KIND_BLEEDING_EVENT,
    KIND_BLEEDING_GRADE,
    KIND_PLATELET,
    KIND_RESPONSE_STATUS,
)
from app.kit.dates import fhir_range
from app.kit.errors import Unprocessable
from app.kit.limits import (
    InputLimits,
    grade_problem,
    normalised_platelets,
    platelet_problem,
)

SUBJECT_ELEMENT = {
    "Observation": "subject",
    "MedicationAdministration": "subject",
    "AdverseEvent": "subject",
}
# The elements behind the `effective_start`/`effective_end` range, the first present wins.
EFFECTIVE_ELEMENTS = {
    "Patient": ("birthDate",),
    "Observation": ("effectiveDateTime", "effectiveInstant", "effectivePeriod"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod"),
    "AdverseEvent": ("date",),
}
# Token search parameters and the elements (CodeableConcept, Identifier or a Reference's
# identifier, or lists of them) behind them.
TOKEN_ELEMENTS: dict[str, dict[str, str]] = {
    "Patient": {"identifier": "identifier"},
    "Observation": {"identifier": "identifier", "code": "code", "category": "category"},
    "MedicationAdministration": {
        "identifier": "identifier",
        "code": "medicationCodeableConcept",
        "category": "category",
    },
    "AdverseEvent": {"identifier": "identifier", "seriousness": "seriousness", "event": "event"},
}
# Token search parameters on `code` elements: the system is the one of the element's
# required value set, as FHIR defines it for `system|code` searches.
CODE_ELEMENTS: dict[str, dict[str, tuple[str, str]]] = {
    "Patient": {"gender": ("gender", "http://hl7.org/fhir/administrative-gender")},
    "Observation": {"status": ("status", "http://hl7.org/fhir/observation-status")},
    "MedicationAdministration": {
        "status": ("status", "http://terminology.hl7.org/CodeSystem/medication-admin-status")
    },
}


@dataclass
class IndexValues:
    patient_id: str | None = None
    effective_start: datetime | None = None
    effective_end: datetime | None = None
    value_norm: float | None = None
    kind: str | None = None
    status: str | None = None
    site: str | None = None  # a Patient's own; other records inherit their subject's
    tokens: list[tuple[str, str, str]] = field(default_factory=list)  # (param, system, value)
    strings: list[tuple[str, str, str]] = field(default_factory=list)  # (param, value, normalised)
    quantities: list[Quantity] = field(default_factory=list)


# (param, value, system, code, value in 10^9/L or None): a `search_quantity` row.
Quantity = tuple[str, float, str, str, float | None]


@dataclass
class SearchValues:
    tokens: list[tuple[str, str, str]]
    strings: list[tuple[str, str, str]]
    quantities: list[Quantity]


_PATIENT_REFERENCE = re.compile(codes.PATIENT_REFERENCE_PATTERN)


def subject_patient_id(resource_type: str, raw: dict[str, Any]) -> str | None:
    """The Patient the resource belongs to; refuses a subject that is not a Patient."""
    element = SUBJECT_ELEMENT.get(resource_type)
    if element is None:
        return None
    expression = [f"{resource_type}.{element}"]
    subject = raw.get(element)
    if not isinstance(subject, dict):
        raise Unprocessable(
            f"{resource_type}.{element} is required: every trial record belongs to a Patient",
            expression=expression,
        )
    reference = subject.get("reference")
    match = _PATIENT_REFERENCE.fullmatch(reference) if isinstance(reference, str) else None
    if match is None:
        raise Unprocessable(
            f"{resource_type}.{element}.reference must reference a Patient (Patient/<id>)",
            expression=[f"{resource_type}.{element}.reference"],
        )
    return match.group(1)


def index_values(
    resource_type: str,
    resource_id: str,
    raw: dict[str, Any],
    code_systems: codes.CodeSystems,
    limits: InputLimits,
) -> IndexValues:
    values = IndexValues()
    values.kind = record_kind(resource_type, raw, code_systems)
    values.status = raw.get("actuality" if resource_type == "AdverseEvent" else "status")
    if resource_type == "Patient":
        values.patient_id = resource_id
        values.site = patient_site(raw, code_systems)
    else:
        values.patient_id = subject_patient_id(resource_type, raw)
    for element in EFFECTIVE_ELEMENTS.get(resource_type, ()):
        value = raw.get(element)
        if value is None:
            continue
        if isinstance(value, dict):  # a Period: from its start to its end (open ends unbounded)
            start = fhir_range(value["start"]) if "start" in value else None
            end = fhir_range(value["end"]) if "end" in value else None
            values.effective_start = (start or end or (None, None))[0]
            values.effective_end = (end or start or (None, None))[1]
        else:
            bounds = fhir_range(value)
            if bounds:
                values.effective_start, values.effective_end = bounds
        break
    if values.kind == KIND_PLATELET:
        values.value_norm = normalised_platelet_value(raw, limits)
    elif values.kind == KIND_BLEEDING_GRADE:
        values.value_norm = _bleeding_grade(raw)
    search = search_values(resource_type, raw, code_systems, values.kind)
    values.tokens, values.strings, values.quantities = (
        search.tokens,
        search.strings,
        search.quantities,
    )
    return values


def search_values(
    resource_type: str, raw: dict[str, Any], code_systems: codes.CodeSystems, kind: str | None
) -> SearchValues:
    """The token, string and quantity search values of a resource; `kind` as `record_kind`
    gave it. Never refuses: whatever is not there or not well-formed is not indexed."""
    tokens: list[tuple[str, str, str]] = []
    for param, element in TOKEN_ELEMENTS.get(resource_type, {}).items():
        tokens.extend(_tokens(param, raw.get(element)))
    for param, (element, system) in CODE_ELEMENTS.get(resource_type, {}).items():
        if isinstance(raw.get(element), str):
            tokens.append((param, system, raw[element]))
    strings: list[tuple[str, str, str]] = []
    quantities: list[Quantity] = []
    if resource_type == "Patient":
        organization = raw.get("managingOrganization")
        if isinstance(organization, dict):
            tokens.extend(_tokens("organization", organization.get("identifier")))
        strings = _name_strings(raw.get("name"))
    elif resource_type == "Observation":
        quantity = _quantity("value-quantity", raw.get("valueQuantity"))
        quantities = [quantity] if quantity else []
    elif resource_type == "MedicationAdministration" and kind is not None:
        # The role as the response engine reads it, the profile's default included (no role
        # coded: concomitant), under the deployment's system and the default one.
        default = codes.DEFAULT_CODE_SYSTEM_BASE + codes.MEDICATION_ROLE_PATH
        for system in dict.fromkeys((code_systems.medication_role, default)):
            tokens.append(("medication-role", system, kind))
    elif resource_type == "AdverseEvent":
        quantities = _grades(raw.get("extension"))
    return SearchValues(list(dict.fromkeys(tokens)), strings, quantities)


def normalise_text(text: str) -> str:
    """FHIR string search ignores case and accents: `Müller` is found by `muller`."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _name_strings(names: Any) -> list[tuple[str, str, str]]:
    """`family`, `given`, and `name` (every part: text, family, given, prefix, suffix)."""
    rows: list[tuple[str, str, str]] = []
    for name in names if isinstance(names, list) else ():
        if not isinstance(name, dict):
            continue
        parts: list[tuple[str, Any]] = [("family", name.get("family"))]
        parts += [("given", given) for given in name.get("given") or ()]
        parts.append(("name", name.get("text")))
        parts += [("name", part) for key in ("prefix", "suffix") for part in name.get(key) or ()]
        for param, part in parts:
            if not isinstance(part, str) or not part:
                continue
            if param != "name":
                rows.append((param, part, normalise_text(part)))
            rows.append(("name", part, normalise_text(part)))
    return list(dict.fromkeys(rows))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _quantity(param: str, quantity: Any) -> Quantity | None:
    if not isinstance(quantity, dict):
        return None
    value = _number(quantity.get("value"))
    if value is None:
        return None
    system, code, unit = quantity.get("system"), quantity.get("code"), quantity.get("unit")
    factor = codes.platelet_factor(system, code, unit)
    norm = round(value * factor, 6) if factor is not None else None
    return (param, value, system or "", code or unit or "", norm)


def _grades(extensions: Any) -> list[Quantity]:
    grades: list[Quantity] = []
    for extension in extensions if isinstance(extensions, list) else ():
        if isinstance(extension, dict) and extension.get("url") == codes.AE_GRADE_EXTENSION:
            grade = _number(extension.get("valueInteger"))
            if grade is not None:
                grades.append(("grade", grade, "", "", None))
    return grades


def _codings(concept: Any) -> list[dict[str, Any]]:
    return list(concept.get("coding", ())) if isinstance(concept, dict) else []


def record_kind(
    resource_type: str, raw: dict[str, Any], code_systems: codes.CodeSystems
) -> str | None:
    """The record's role in the trial, as the response engine reads it (fhir-profile.md)."""
    kind_of = _KIND_OF.get(resource_type)
    return kind_of(raw, code_systems) if kind_of is not None else None


def _observation_kind(raw: dict[str, Any], code_systems: codes.CodeSystems) -> str | None:
    found = (_code_kind(coding, code_systems) for coding in _codings(raw.get("code")))
    kinds = {kind for kind in found if kind is not None}
    # Any response-status coding makes it server-owned, whatever else it carries: a
    # platelet coding beside it must not smuggle a forged status in.
    if KIND_RESPONSE_STATUS in kinds:
        return KIND_RESPONSE_STATUS
    if len(kinds) > 1:
        raise Unprocessable(
            "Observation.code mixes a platelet count and a bleeding grade; send each as "
            "its own Observation",
            expression=["Observation.code"],
        )
    return kinds.pop() if kinds else None


def _code_kind(coding: dict[str, Any], code_systems: codes.CodeSystems) -> str | None:
    """What one Observation.code coding makes the record, if anything."""
    system, code = coding.get("system"), coding.get("code")
    if system == codes.LOINC and code in codes.PLATELET_CODES:
        return KIND_PLATELET
    if code_systems.is_trial_codes(system) and code == codes.WHO_BLEEDING_GRADE:
        return KIND_BLEEDING_GRADE
    if code_systems.is_trial_codes(system) and code == codes.ITP_RESPONSE_STATUS:
        return KIND_RESPONSE_STATUS
    return None


def _medication_role(raw: dict[str, Any], code_systems: codes.CodeSystems) -> str:
    for coding in _codings(raw.get("category")):
        if code_systems.is_medication_role(coding.get("system")) and (
            coding.get("code") in codes.MEDICATION_ROLES
        ):
            return str(coding["code"])
    return "concomitant"  # the profile: an administration with no role is concomitant


def _adverse_event_kind(raw: dict[str, Any], code_systems: codes.CodeSystems) -> str | None:
    for coding in _codings(raw.get("event")):
        if (coding.get("system"), coding.get("code")) in code_systems.bleeding_event_codes:
            return KIND_BLEEDING_EVENT
    return None


_KIND_OF: dict[str, Callable[[dict[str, Any], codes.CodeSystems], str | None]] = {
    "Observation": _observation_kind,
    "MedicationAdministration": _medication_role,
    "AdverseEvent": _adverse_event_kind,
}


_SITE_CODE = re.compile(codes.SITE_CODE_PATTERN)


def patient_site(raw: dict[str, Any], code_systems: codes.CodeSystems) -> str:
    """The trial site (fhir-profile.md): managingOrganization.identifier in the site system."""
    organization = raw.get("managingOrganization")
    identifier = organization.get("identifier") if isinstance(organization, dict) else None
    if (
        not isinstance(identifier, dict)
        or not code_systems.is_site(identifier.get("system"))
        or not isinstance(identifier.get("value"), str)
        or not _SITE_CODE.fullmatch(identifier["value"])
    ):
        raise Unprocessable(
            "Every trial Patient belongs to one site: Patient.managingOrganization.identifier "
            f"with system {code_systems.site} and the site code as value",
            expression=["Patient.managingOrganization.identifier"],
        )
    return str(identifier["value"])


def _only_value(raw: dict[str, Any], element: str, what: str) -> None:
    """A platelet count or a bleeding grade carries its value in `element` only: a value in
    another `value[x]` would be stored but never assessed."""
    for key in raw:
        if key.startswith("value") and key != element:
            raise Unprocessable(
                f"{what} carries its value in Observation.{element}, not Observation.{key}",
                expression=[f"Observation.{key}"],
            )


def _bleeding_grade(raw: dict[str, Any]) -> float | None:
    _only_value(raw, "valueInteger", "A WHO bleeding grade")
    grade = raw.get("valueInteger")
    if grade is None:
        return None
    problem = grade_problem(grade)
    if problem is not None:
        raise Unprocessable(problem, expression=["Observation.valueInteger"])
    return float(grade)


def normalised_platelet_value(raw: dict[str, Any], limits: InputLimits) -> float | None:
    """The count in 10^9/L; refuses an unknown unit and an implausible value (limits.py)."""
    _only_value(raw, "valueQuantity", "A platelet count")
    quantity = raw.get("valueQuantity")
    if quantity is None:
        return None  # no value (e.g. dataAbsentReason): nothing to normalise
    if "value" not in quantity:
        return None
    factor = codes.platelet_factor(
        quantity.get("system"), quantity.get("code"), quantity.get("unit")
    )
    if factor is None:
        shown = quantity.get("code") or quantity.get("unit") or "(none)"
        accepted = ", ".join(codes.UCUM_PLATELET_FACTORS)
        raise Unprocessable(
            f"Unknown platelet count unit {shown!r}; accepted UCUM codes: {accepted} "
            "(and the common lab spellings such as K/uL, x10^9/L)",
            expression=[
                "Observation.valueQuantity.code"
                if quantity.get("code")
                else "Observation.valueQuantity.unit"
            ],
        )
    value = float(quantity["value"])
    unit = quantity.get("code") or quantity.get("unit")
    problem = platelet_problem(value, factor, unit, limits)
    if problem is not None:
        raise Unprocessable(problem, expression=["Observation.valueQuantity.value"])
    return normalised_platelets(value, factor)


def _tokens(param: str, element: Any) -> list[tuple[str, str, str]]:
    tokens: list[tuple[str, str, str]] = []
    if element is None:
        return tokens
    items = element if isinstance(element, list) else [element]
    for item in items:
        if not isinstance(item, dict):
            continue
        if "coding" in item:  # CodeableConcept
            for coding in item["coding"]:
                if "code" in coding:
                    tokens.append((param, coding.get("system", ""), coding["code"]))
        elif "value" in item:  # Identifier
            tokens.append((param, item.get("system", ""), item["value"]))
    return tokens
