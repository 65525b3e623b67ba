"""Every code system and code the service reads or writes, in one place (fhir-profile.md)."""

from __future__ import annotations

from typing import Final

DEFAULT_CODE_SYSTEM_BASE: Final = "https://itp-trial.example/fhir"

# The resource types the trial stores; AuditEvents are the server's own record of access.
PATIENT: Final = "Patient"
OBSERVATION: Final = "Observation"
MEDICATION_ADMINISTRATION: Final = "MedicationAdministration"
ADVERSE_EVENT: Final = "AdverseEvent"
AUDIT_EVENT: Final = "AuditEvent"
CLINICAL_RESOURCE_TYPES: Final[tuple[str, ...]] = (
    PATIENT,
    OBSERVATION,
    MEDICATION_ADMINISTRATION,
    ADVERSE_EVENT,
)
RESOURCE_TYPES: Final[tuple[str, ...]] = (*CLINICAL_RESOURCE_TYPES, AUDIT_EVENT)
# The types the response engine reads facts from.
ENGINE_RESOURCE_TYPES: Final[tuple[str, ...]] = (
    OBSERVATION,
    MEDICATION_ADMINISTRATION,
    ADVERSE_EVENT,
)

# What a stored record is to the response engine (its `kind` column): the kinds of
# Observation and AdverseEvent it reads, and the status Observation it writes. A
# MedicationAdministration's kind is its role (MEDICATION_ROLES).
KIND_PLATELET: Final = "platelet-count"
KIND_BLEEDING_GRADE: Final = "bleeding-grade"
KIND_BLEEDING_EVENT: Final = "bleeding-event"
KIND_RESPONSE_STATUS: Final = "response-status"

LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
SNOMED: Final = "http://snomed.info/sct"

PLATELET_CODES: Final = frozenset({"777-3", "26515-7"})
# AdverseEvent.event codings that make an event a bleeding, as (system, code); a deployment
# may list more (APP_BLEEDING_EVENT_CODES).
DEFAULT_BLEEDING_EVENT_CODES: Final = frozenset({("http://snomed.info/sct", "131148009")})

SITE_IDENTIFIER_SYSTEM_PATH: Final = "/sid/site"
# The trial subject number: a Patient identifier in this system (services/subjects.py).
SUBJECT_IDENTIFIER_SYSTEM_PATH: Final = "/sid/subject"
# The grammars the service accepts, shared by its checks and its OpenAPI document.
SITE_CODE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
# White space as Python's str.isspace() knows it, spelled out so that the same pattern means
# the same in Python's re and in the ECMA regexes of JSON Schema (their \\s differ).
_OTHER_WHITE_SPACE: Final = (
    r"\u000b\f\u001c-\u001f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
# NUL: PostgreSQL stores no text holding it, so no string of this API holds one (the server
# refuses it, 400, before it reads further; the OpenAPI patterns say so too).
_NUL: Final = r"\u0000"
# The characters a FHIR string cannot hold (a regex character-class body, for Python's re).
FORBIDDEN_STRING_CHARACTERS: Final = _OTHER_WHITE_SPACE + _NUL
_WHITE_SPACE: Final = r"\t\n\r " + _OTHER_WHITE_SPACE
# FHIR's code: no leading, trailing or repeated white space, and single spaces only.
CODE_PATTERN: Final = rf"[^{_WHITE_SPACE}{_NUL}]+( [^{_WHITE_SPACE}{_NUL}]+)*"
# FHIR's string: [ \r\n\t\S]+, i.e. no white space but space, CR, LF and tab.
STRING_PATTERN: Final = rf"[^{FORBIDDEN_STRING_CHARACTERS}]+"
URI_PATTERN: Final = rf"[^{_WHITE_SPACE}{_NUL}]*"
# A literal reference to a Patient of this server, optionally to one of its versions.
PATIENT_REFERENCE_PATTERN: Final = r"^Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[0-9]{1,9})?$"
TRIAL_CODES_PATH: Final = "/CodeSystem/trial-codes"
MEDICATION_ROLE_PATH: Final = "/CodeSystem/medication-role"
ITP_RESPONSE_PATH: Final = "/CodeSystem/itp-response"

WHO_BLEEDING_GRADE: Final = "who-bleeding-grade"
ITP_RESPONSE_STATUS: Final = "itp-response-status"
MEDICATION_ROLES: Final = ("study-drug", "rescue", "concomitant")

AE_GRADE_EXTENSION: Final = (
    "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/ae-grade"
)

# Platelet count units and their factor to 10^9/L. UCUM codes first (valueQuantity.code
# with system UCUM), then the free-text `unit` strings labs send without a UCUM code.
# Only units listed here are accepted: a silent guess at a unit would corrupt a response.
UCUM_PLATELET_FACTORS: Final[dict[str, float]] = {
    "10*9/L": 1.0,
    "10*3/uL": 1.0,
    "10*3/mm3": 1.0,
    "/uL": 0.001,
    "/mm3": 0.001,
    "10*6/L": 0.001,
}
TEXT_PLATELET_FACTORS: Final[dict[str, float]] = {
    "10*9/l": 1.0,
    "10^9/l": 1.0,
    "x10^9/l": 1.0,
    "x 10^9/l": 1.0,
    "x10e9/l": 1.0,
    "10e9/l": 1.0,
    "k/ul": 1.0,
    "k/mm3": 1.0,
    "10*3/ul": 1.0,
    "10^3/ul": 1.0,
    "x10^3/ul": 1.0,
    "x10e3/ul": 1.0,
    "x 10^3/ul": 1.0,
    "thou/ul": 1.0,
    "10^3/mm3": 1.0,
    "/ul": 0.001,
    "/mm3": 0.001,
    "cells/ul": 0.001,
    "10*6/l": 0.001,
    "10^6/l": 0.001,
}


def platelet_factor(system: str | None, code: str | None, unit: str | None) -> float | None:
    """Factor that turns a platelet Quantity into 10^9/L, or None for an unknown unit.

    A UCUM `code` wins over the display `unit`; a code in another system is not trusted.
    """
    if code is not None and (system is None or system == UCUM):
        factor = UCUM_PLATELET_FACTORS.get(code)
        if factor is not None:
            return factor
        if system == UCUM:
            return None
    if unit is not None:
        return TEXT_PLATELET_FACTORS.get(unit.strip().lower())
    return None


class CodeSystems:
    """The project's code-system URLs under a (possibly overridden) base."""

    def __init__(
        self,
        base: str = DEFAULT_CODE_SYSTEM_BASE,
        bleeding_event_codes: frozenset[tuple[str, str]] = DEFAULT_BLEEDING_EVENT_CODES,
    ) -> None:
        self.bleeding_event_codes = bleeding_event_codes
        base = base.rstrip("/")
        self.base = base
        self.site = base + SITE_IDENTIFIER_SYSTEM_PATH
        self.subject = base + SUBJECT_IDENTIFIER_SYSTEM_PATH
        self.trial_codes = base + TRIAL_CODES_PATH
        self.medication_role = base + MEDICATION_ROLE_PATH
        self.itp_response = base + ITP_RESPONSE_PATH

    def is_trial_codes(self, system: str | None) -> bool:
        return self._names(system, TRIAL_CODES_PATH)

    def is_medication_role(self, system: str | None) -> bool:
        return self._names(system, MEDICATION_ROLE_PATH)

    def is_site(self, system: str | None) -> bool:
        return self._names(system, SITE_IDENTIFIER_SYSTEM_PATH)

    def is_subject(self, system: str | None) -> bool:
        return self._names(system, SUBJECT_IDENTIFIER_SYSTEM_PATH)

    def _names(self, system: str | None, path: str) -> bool:
        """Whether `system` is the code system at `path`, under this base or the default one:
        clients that use the default base must always work, even under an override."""
        return system in (self.base + path, DEFAULT_CODE_SYSTEM_BASE + path)


# Components of the server's response-status Observation (codes in trial-codes).
BASELINE_COMPONENT: Final = "baseline-platelet-count"
TIME_TO_RESPONSE_COMPONENT: Final = "time-to-response"
BEST_RESPONSE_COMPONENT: Final = "best-response"
RESPONSE_DISPLAY: Final[dict[str, str]] = {
    "CR": "Complete response",
    "R": "Response",
    "NR": "No response",
    "NE": "Not evaluable",
    "LOR": "Loss of response",
}

# Ids of the server's own records (the response-status Observations) start with it: clients
# cannot write an id that does, so no client record can ever sit where a patient's status
# will be written, and `audit verify` knows which versions no client wrote.
RESERVED_ID_PREFIX: Final = "rs-"
