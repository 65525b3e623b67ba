"""CDISC SDTM datasets of the trial: DM, EX, CM, LB, AE and RS (SDTMIG 3.4 names, labels and
variable order), as SAS transport v5 (pyreadstat) and as CSV with the same columns.

The mapping follows the FHIR to CDISC Joint Mapping IG where it speaks (and the CDISC Lab
Semantics in FHIR IG for LB). Dates are ISO 8601 in the trial's time zone
(ITP_TRIAL_TIMEZONE) at the precision recorded; study days count from the first dose (the
engine's treatment start, RFSTDTC) with no day 0. The response comes from the engine's
stored output only: LBBLFL marks the count `$response-status` names as its baseline, RS has
one OVRLRESP row per change of the status Observation's value in its history and one
BESTRESP row per patient.

Rows are built subject by subject, in USUBJID order, from a batch of subjects' records at a
time: CSV is written as the rows come; an XPT file is written once the domain is complete,
since pyreadstat takes a whole data frame (held as compact Arrow columns by polars).
"""

from __future__ import annotations

import asyncio
import csv
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
import polars as pl
import pyreadstat
from sqlalchemy import not_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.auth.permissions import Action
from app.auth.policy import SiteAccess, access_policy
from app.auth.principal import Principal
from app.engine import EXPOSED_STATUSES
from app.kit import codes
from app.kit.codes import KIND_PLATELET
from app.kit.errors import NotFound
from app.services.context import ServiceContext
from app.services.response import response_observation_id
from app.store.criteria import site_condition
from app.store.tables import (
    assessment_table,
    resource_table,
    version_table,
)

Format = Literal["xpt", "csv"]
Value = str | float | None
Row = dict[str, Value]
XPT_MAX_CHARS = 200  # SAS transport v5 character values: longer ones are cut
PLANNED_ARM = ("NADNMN", "NAD+ IV and oral NMN")
RESPONSE_CATEGORY = "IWG ITP RESPONSE CRITERIA (RODEGHIERO 2009, PROVAN 2019)"
SUBJECTS_PER_READ = 20
_OUTCOMES = {
    "resolved": "RECOVERED/RESOLVED",
    "recovering": "RECOVERING/RESOLVING",
    "ongoing": "NOT RECOVERED/NOT RESOLVED",
    "resolvedWithSequelae": "RECOVERED/RESOLVED WITH SEQUELAE",
    "fatal": "FATAL",
    "unknown": "UNKNOWN",
}
_SEX = {"male": "M", "female": "F", "other": "U", "unknown": "U"}
RESOLVE_DATE_EXTENSION = (
    "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/resolve-date"
)


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    numeric: bool = False


@dataclass(frozen=True)
class Domain:
    code: str
    label: str
    variables: tuple[Variable, ...]
    sources: tuple[str, ...]  # resource types it reads: the caller must export each

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variables]


def _v(name: str, label: str, numeric: bool = False) -> Variable:
    return Variable(name, label, numeric)


_KEYS = (
    _v("STUDYID", "Study Identifier"),
    _v("DOMAIN", "Domain Abbreviation"),
    _v("USUBJID", "Unique Subject Identifier"),
)


def _record_keys(domain: str) -> tuple[Variable, ...]:
    """The keys of one of a subject's records: --SEQ numbers it within the subject, --SPID
    is the FHIR resource it came from."""
    return (
        *_KEYS,
        _v(f"{domain}SEQ", "Sequence Number", numeric=True),
        _v(f"{domain}SPID", "Sponsor-Defined Identifier"),
    )


def _timing(domain: str, of: str) -> tuple[Variable, ...]:
    """When something began and ended (--STDTC, --ENDTC), and on which study days."""
    return (
        _v(f"{domain}STDTC", f"Start Date/Time of {of}"),
        _v(f"{domain}ENDTC", f"End Date/Time of {of}"),
        _v(f"{domain}STDY", f"Study Day of Start of {of}", numeric=True),
        _v(f"{domain}ENDY", f"Study Day of End of {of}", numeric=True),
    )


DOMAINS: dict[str, Domain] = {
    "dm": Domain(
        "DM",
        "Demographics",
        (
            *_KEYS,
            _v("SUBJID", "Subject Identifier for the Study"),
            _v("RFSTDTC", "Subject Reference Start Date/Time"),
            _v("RFENDTC", "Subject Reference End Date/Time"),
            _v("RFXSTDTC", "Date/Time of First Study Treatment"),
            _v("RFXENDTC", "Date/Time of Last Study Treatment"),
            _v("SITEID", "Study Site Identifier"),
            _v("BRTHDTC", "Date/Time of Birth"),
            _v("AGE", "Age", numeric=True),
            _v("AGEU", "Age Units"),
            _v("SEX", "Sex"),
            _v("ARMCD", "Planned Arm Code"),
            _v("ARM", "Description of Planned Arm"),
            _v("ACTARMCD", "Actual Arm Code"),
            _v("ACTARM", "Description of Actual Arm"),
            _v("ARMNRS", "Reason Arm and/or Actual Arm is Null"),
        ),
        ("Patient", "MedicationAdministration"),
    ),
    "ex": Domain(
        "EX",
        "Exposure",
        (
            *_record_keys("EX"),
            _v("EXTRT", "Name of Treatment"),
            _v("EXDOSE", "Dose", numeric=True),
            _v("EXDOSU", "Dose Units"),
            _v("EXROUTE", "Route of Administration"),
            *_timing("EX", "Treatment"),
        ),
        ("Patient", "MedicationAdministration"),
    ),
    "cm": Domain(
        "CM",
        "Concomitant/Concurrent Medications",
        (
            *_record_keys("CM"),
            _v("CMTRT", "Reported Name of Drug, Med, or Therapy"),
            _v("CMDECOD", "Standardized Medication Name"),
            _v("CMCAT", "Category for Medication"),
            _v("CMDOSE", "Dose per Administration", numeric=True),
            _v("CMDOSU", "Dose Units"),
            _v("CMROUTE", "Route of Administration"),
            *_timing("CM", "Medication"),
        ),
        ("Patient", "MedicationAdministration"),
    ),
    "lb": Domain(
        "LB",
        "Laboratory Test Results",
        (
            *_record_keys("LB"),
            _v("LBTESTCD", "Lab Test or Examination Short Name"),
            _v("LBTEST", "Lab Test or Examination Name"),
            _v("LBCAT", "Category for Lab Test"),
            _v("LBORRES", "Result or Finding in Original Units"),
            _v("LBORRESU", "Original Units"),
            _v("LBSTRESC", "Character Result/Finding in Std Format"),
            _v("LBSTRESN", "Numeric Result/Finding in Standard Units", numeric=True),
            _v("LBSTRESU", "Standard Units"),
            _v("LBBLFL", "Baseline Flag"),
            _v("LBDTC", "Date/Time of Specimen Collection"),
            _v("LBDY", "Study Day of Specimen Collection", numeric=True),
        ),
        ("Patient", "Observation", "MedicationAdministration"),
    ),
    "ae": Domain(
        "AE",
        "Adverse Events",
        (
            *_record_keys("AE"),
            _v("AETERM", "Reported Term for the Adverse Event"),
            _v("AEDECOD", "Dictionary-Derived Term"),
            _v("AESER", "Serious Event"),
            _v("AEREL", "Causality"),
            _v("AEOUT", "Outcome of Adverse Event"),
            _v("AETOXGR", "Standard Toxicity Grade"),
            *_timing("AE", "Adverse Event"),
        ),
        ("Patient", "AdverseEvent", "MedicationAdministration"),
    ),
    "rs": Domain(
        "RS",
        "Disease Response and Clin Classification",
        (
            *_record_keys("RS"),
            _v("RSTESTCD", "Assessment Short Name"),
            _v("RSTEST", "Assessment Name"),
            _v("RSCAT", "Category for Assessment"),
            _v("RSORRES", "Result or Finding in Original Units"),
            _v("RSSTRESC", "Character Result/Finding in Std Format"),
            _v("RSEVAL", "Evaluator"),
            _v("RSDTC", "Date/Time of Assessment"),
            _v("RSDY", "Study Day of Assessment", numeric=True),
        ),
        ("Patient", "Observation", "MedicationAdministration"),
    ),
}


def check_domain(domain: Domain) -> None:
    """What SAS transport v5 allows, checked before a file is opened (a name pyreadstat
    refuses leaves a broken file behind): names of 1-8 letters and digits, labels of 40
    characters at most."""
    problems = [
        f"{v.name}: name longer than 8 or not A-Z0-9"
        for v in domain.variables
        if not (
            1 <= len(v.name) <= 8 and v.name.isascii() and v.name.isalnum() and v.name.isupper()
        )
    ]
    problems += [f"{v.name}: label longer than 40" for v in domain.variables if len(v.label) > 40]
    if len(domain.label) > 40 or len(domain.code) > 8:
        problems.append(f"{domain.code}: dataset name or label too long")
    if problems:
        raise ValueError(f"SDTM {domain.code} cannot be written as XPT v5: {'; '.join(problems)}")


for _domain in DOMAINS.values():
    check_domain(_domain)


# --- reading ------------------------------------------------------------------------------


@dataclass
class Record:
    resource_type: str
    id: str
    kind: str | None
    status: str | None
    value_norm: float | None
    resource: dict[str, Any]


@dataclass
class Subject:
    """One patient with what the domains read of them."""

    patient_id: str
    subject: str
    site: str | None
    patient: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    assessment: dict[str, Any] | None = None
    # The status Observation's versions, oldest first: (version, content).
    statuses: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def subject_number(patient: dict[str, Any], code_systems: codes.CodeSystems) -> str | None:
    subject_system = (
        code_systems.base + "/sid/subject",
        codes.DEFAULT_CODE_SYSTEM_BASE + "/sid/subject",
    )
    for identifier in patient.get("identifier") or ():
        if identifier.get("system") in subject_system and identifier.get("value"):
            return str(identifier["value"])
    return None


async def _patients(
    conn: AsyncConnection, access: SiteAccess, code_systems: codes.CodeSystems
) -> list[tuple[str, str, str | None, str]]:
    """(subject number, patient id, site, content) of every live patient `access` sees, in
    subject-number order. Held for the run: a few hundred bytes per patient, never records."""
    query = select(resource_table.c.id, resource_table.c.site, resource_table.c.content).where(
        resource_table.c.resource_type == "Patient", not_(resource_table.c.deleted)
    )
    query = query.where(*site_condition(resource_table.c.site, access))
    patients = []
    for patient_id, site, content in await conn.execute(query):
        number = subject_number(orjson.loads(content), code_systems) or patient_id
        patients.append((number, patient_id, site, content))
    patients.sort()
    return patients


async def subjects(
    ctx: ServiceContext,
    access: SiteAccess,
    record_types: Sequence[str],
    statuses: bool = False,
) -> AsyncIterator[Subject]:
    """Every live patient `access` sees, in USUBJID order, with their live records of
    `record_types`, their assessment, and (`statuses`) their status Observation's history.
    Records are read for SUBJECTS_PER_READ patients at a time."""
    async with ctx.db.read() as conn:
        patients = await _patients(conn, access, ctx.codes)
    for start in range(0, len(patients), SUBJECTS_PER_READ):
        batch = patients[start : start + SUBJECTS_PER_READ]
        ids = [patient_id for _, patient_id, _, _ in batch]
        found = {
            patient_id: Subject(patient_id, number, site, orjson.loads(content))
            for number, patient_id, site, content in batch
        }
        async with ctx.db.read() as conn:
            if record_types:
                await _read_records(conn, found, record_types)
            assessments = await conn.execute(
                select(assessment_table.c.patient_id, assessment_table.c.content).where(
                    assessment_table.c.patient_id.in_(ids)
                )
            )
            for patient_id, content in assessments:
                found[patient_id].assessment = orjson.loads(content)
            if statuses:
                await _read_statuses(conn, found)
        for patient_id in ids:
            yield found[patient_id]


async def _read_records(
    conn: AsyncConnection, found: dict[str, Subject], record_types: Sequence[str]
) -> None:
    """The subjects' live records of `record_types`."""
    rows = await conn.execute(
        select(
            resource_table.c.patient_id,
            resource_table.c.resource_type,
            resource_table.c.id,
            resource_table.c.kind,
            resource_table.c.status,
            resource_table.c.value_norm,
            resource_table.c.content,
        ).where(
            resource_table.c.patient_id.in_(list(found)),
            resource_table.c.resource_type.in_(record_types),
            not_(resource_table.c.deleted),
        )
    )
    for patient_id, resource_type, ident, kind, status, value, content in rows:
        found[patient_id].records.append(
            Record(resource_type, ident, kind, status, value, orjson.loads(content))
        )


async def _read_statuses(conn: AsyncConnection, found: dict[str, Subject]) -> None:
    """Every version of the subjects' status Observations, oldest first."""
    owners = {response_observation_id(p): p for p in found}
    versions = await conn.execute(
        select(version_table.c.id, version_table.c.version_id, version_table.c.content)
        .where(
            version_table.c.resource_type == "Observation",
            version_table.c.id.in_(list(owners)),
        )
        .order_by(version_table.c.id, version_table.c.version_id)
    )
    for ident, version, content in versions:
        if content is not None:
            found[owners[ident]].statuses.append((version, orjson.loads(content)))


# --- values -------------------------------------------------------------------------------


def dtc(value: str | None, zone: ZoneInfo) -> tuple[str | None, date | None]:
    """A FHIR date/dateTime as SDTM --DTC text in the trial's time zone, at the precision it
    was recorded (a date stays a date, a time keeps its seconds or not), and its calendar
    date there when it has a whole one (for study days)."""
    if not value:
        return None, None
    if "T" not in value:
        return value, date.fromisoformat(value) if len(value) == 10 else None
    moment = datetime.fromisoformat(value)
    try:
        local = moment.astimezone(zone)
    except OverflowError:  # the calendar's first or last hours, outside it in the trial's zone
        local = moment
    with_seconds = len(value.split("T", 1)[1]) > 5 and value.split("T", 1)[1][5] == ":"
    return local.strftime("%Y-%m-%dT%H:%M:%S" if with_seconds else "%Y-%m-%dT%H:%M"), local.date()


def study_day(day: date | None, reference: date | None) -> float | None:
    """SDTM study day: the reference date is day 1, the day before it day -1 (no day 0)."""
    if day is None or reference is None:
        return None
    delta = (day - reference).days
    return float(delta + 1 if delta >= 0 else delta)


def _concept_text(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or ():
        if coding.get("display") or coding.get("code"):
            return str(coding.get("display") or coding["code"])
    return None


def _coded(concept: Any) -> str | None:
    """The display (else the code) of the concept's first coding: a dictionary term."""
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or ():
        if coding.get("display") or coding.get("code"):
            return str(coding.get("display") or coding["code"])
    return None


def _number_text(value: float) -> str:
    return f"{value:.10g}"


def _period(resource: dict[str, Any]) -> tuple[str | None, str | None]:
    if resource.get("effectiveDateTime"):
        return resource["effectiveDateTime"], resource["effectiveDateTime"]
    period = resource.get("effectivePeriod") or {}
    return period.get("start"), period.get("end")


@dataclass(frozen=True)
class Study:
    study_id: str
    zone: ZoneInfo

    def usubjid(self, subject: Subject) -> str:
        return f"{self.study_id}-{subject.subject}"


def _reference_date(subject: Subject, study: Study) -> tuple[str | None, date | None]:
    start = (subject.assessment or {}).get("treatment_start")
    return dtc(start, study.zone)


def _administrations(subject: Subject, kinds: Iterable[str]) -> list[Record]:
    wanted = set(kinds)
    return sorted(
        (
            r
            for r in subject.records
            if r.resource_type == "MedicationAdministration"
            and r.kind in wanted
            and r.status in EXPOSED_STATUSES
        ),
        key=lambda r: (_period(r.resource)[0] or "", r.id),
    )


def _keys(study: Study, domain: str, subject: Subject) -> Row:
    return {"STUDYID": study.study_id, "DOMAIN": domain, "USUBJID": study.usubjid(subject)}


def dm_rows(subject: Subject, study: Study) -> list[Row]:
    rfstdtc, rfstdate = _reference_date(subject, study)
    doses = _administrations(subject, ("study-drug",))
    first = dtc(_period(doses[0].resource)[0], study.zone)[0] if doses else None
    last = None
    if doses:
        start, end = _period(doses[-1].resource)
        last = dtc(end or start, study.zone)[0]
    birth = subject.patient.get("birthDate")
    age = None
    if birth and len(birth) == 10 and rfstdate is not None:
        born = date.fromisoformat(birth)
        age = float(
            rfstdate.year - born.year - ((rfstdate.month, rfstdate.day) < (born.month, born.day))
        )
    treated = bool(doses)
    return [
        {
            **_keys(study, "DM", subject),
            "SUBJID": subject.subject,
            "RFSTDTC": rfstdtc,
            "RFENDTC": last if rfstdtc else None,
            "RFXSTDTC": first,
            "RFXENDTC": last,
            "SITEID": subject.site,
            "BRTHDTC": birth,
            "AGE": age,
            "AGEU": "YEARS" if age is not None else None,
            "SEX": _SEX.get(subject.patient.get("gender") or ""),
            "ARMCD": PLANNED_ARM[0],
            "ARM": PLANNED_ARM[1],
            "ACTARMCD": PLANNED_ARM[0] if treated else None,
            "ACTARM": PLANNED_ARM[1] if treated else None,
            "ARMNRS": None if treated else "ASSIGNED, NOT TREATED",
        }
    ]


def _dose(resource: dict[str, Any]) -> tuple[float | None, str | None, str | None]:
    dosage = resource.get("dosage") or {}
    dose = dosage.get("dose") or {}
    value = dose.get("value")
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None,
        dose.get("unit") or dose.get("code"),
        _concept_text(dosage.get("route")),
    )


def _timing_values(
    domain: str, period: tuple[str | None, str | None], study: Study, reference: date | None
) -> Row:
    """The values of `_timing`'s variables for a FHIR (start, end)."""
    (start, start_day), (end, end_day) = (dtc(value, study.zone) for value in period)
    return {
        f"{domain}STDTC": start,
        f"{domain}ENDTC": end,
        f"{domain}STDY": study_day(start_day, reference),
        f"{domain}ENDY": study_day(end_day, reference),
    }


def _dated(domain: str, value: str | None, study: Study, reference: date | None) -> Row:
    """--DTC and --DY: when, as SDTM text, and on which study day."""
    when, day = dtc(value, study.zone)
    return {f"{domain}DTC": when, f"{domain}DY": study_day(day, reference)}


def _numbered(prefix: str, rows: list[Row]) -> list[Row]:
    for number, row in enumerate(rows, start=1):
        row[f"{prefix}SEQ"] = float(number)
    return rows


def _medication_rows(
    subject: Subject, study: Study, domain: str, kinds: tuple[str, ...]
) -> list[Row]:
    _, reference = _reference_date(subject, study)
    rows = []
    for record in _administrations(subject, kinds):
        start, end = _period(record.resource)
        dose, unit, route = _dose(record.resource)
        medication = record.resource.get("medicationCodeableConcept")
        row: Row = {
            **_keys(study, domain, subject),
            f"{domain}SPID": record.id,
            f"{domain}TRT": _concept_text(medication),
            f"{domain}DOSE": dose,
            f"{domain}DOSU": unit,
            f"{domain}ROUTE": route,
            **_timing_values(domain, (start, end), study, reference),
        }
        if domain == "CM":
            row["CMDECOD"] = _coded(medication)
            row["CMCAT"] = "RESCUE" if record.kind == "rescue" else "CONCOMITANT"
        rows.append(row)
    return _numbered(domain, rows)


def ex_rows(subject: Subject, study: Study) -> list[Row]:
    return _medication_rows(subject, study, "EX", ("study-drug",))


def cm_rows(subject: Subject, study: Study) -> list[Row]:
    return _medication_rows(subject, study, "CM", ("rescue", "concomitant"))


def lb_rows(subject: Subject, study: Study) -> list[Row]:
    """Every platelet count but entered-in-error ones (deleted ones are not read at all)."""
    _, reference = _reference_date(subject, study)
    baseline = ((subject.assessment or {}).get("baseline") or {}).get("observation")
    counts = [
        r
        for r in subject.records
        if r.resource_type == "Observation"
        and r.kind == KIND_PLATELET
        and r.status != "entered-in-error"
    ]
    counts.sort(key=lambda r: (_period(r.resource)[0] or "", r.id))
    rows = []
    for record in counts:
        quantity = record.resource.get("valueQuantity") or {}
        value = quantity.get("value")
        reported = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            reported = quantity.get("comparator", "") + _number_text(float(value))
        norm = record.value_norm
        rows.append(
            {
                **_keys(study, "LB", subject),
                "LBSPID": record.id,
                "LBTESTCD": "PLAT",
                "LBTEST": "Platelets",
                "LBCAT": "HEMATOLOGY",
                "LBORRES": reported,
                "LBORRESU": quantity.get("unit") or quantity.get("code"),
                "LBSTRESC": _number_text(norm) if norm is not None else None,
                "LBSTRESN": norm,
                "LBSTRESU": "10^9/L" if norm is not None else None,
                "LBBLFL": "Y" if record.id == baseline else None,
                **_dated("LB", _period(record.resource)[0], study, reference),
            }
        )
    return _numbered("LB", rows)


def _extension(resource: dict[str, Any], url: str) -> dict[str, Any] | None:
    return next((e for e in resource.get("extension") or () if e.get("url") == url), None)


def ae_rows(subject: Subject, study: Study) -> list[Row]:
    """Every actual adverse event (`actuality` potential ones are not events)."""
    _, reference = _reference_date(subject, study)
    events = [
        r
        for r in subject.records
        if r.resource_type == "AdverseEvent" and r.resource.get("actuality") == "actual"
    ]
    events.sort(key=lambda r: (r.resource.get("date") or "", r.id))
    rows = []
    for record in events:
        resource = record.resource
        resolved = _extension(resource, RESOLVE_DATE_EXTENSION) or {}
        period = resource.get("date"), resolved.get("valueDateTime") or resolved.get("valueDate")
        grade = (_extension(resource, codes.AE_GRADE_EXTENSION) or {}).get("valueInteger")
        seriousness = {c.get("code") for c in (resource.get("seriousness") or {}).get("coding", ())}
        causality = next(
            (
                _coded(c.get("assessment")) or _concept_text(c.get("assessment"))
                for entity in resource.get("suspectEntity") or ()
                for c in entity.get("causality") or ()
                if c.get("assessment")
            ),
            None,
        )
        outcome = next(
            (c.get("code") for c in (resource.get("outcome") or {}).get("coding", ())), None
        )
        rows.append(
            {
                **_keys(study, "AE", subject),
                "AESPID": record.id,
                "AETERM": _concept_text(resource.get("event")),
                "AEDECOD": _coded(resource.get("event")),
                "AESER": "Y"
                if "serious" in seriousness
                else "N"
                if "non-serious" in seriousness
                else None,
                "AEREL": causality.upper() if causality else None,
                "AEOUT": _OUTCOMES.get(outcome or ""),
                "AETOXGR": str(grade) if isinstance(grade, int) else None,
                **_timing_values("AE", period, study, reference),
            }
        )
    return _numbered("AE", rows)


def _status_code(observation: dict[str, Any]) -> str | None:
    for coding in (observation.get("valueCodeableConcept") or {}).get("coding", ()):
        if coding.get("code"):
            return str(coding["code"])
    return None


def rs_rows(subject: Subject, study: Study) -> list[Row]:
    """OVRLRESP: each change of the status Observation's value, from its history (a new
    version that kept the value, e.g. a new baseline, is no change); BESTRESP: the current
    assessment's best response (NE when there is none)."""
    _, reference = _reference_date(subject, study)
    keys = _keys(study, "RS", subject)
    rows: list[Row] = []
    previous = None
    for version, observation in subject.statuses:
        code = _status_code(observation)
        if code is None or code == previous:
            continue
        previous = code
        source = f"Observation/{observation.get('id')}/_history/{version}"
        when = _dated("RS", observation.get("effectiveDateTime"), study, reference)
        rows.append({**keys, **_rs(("OVRLRESP", "Overall Response"), code, source), **when})
    if subject.assessment is not None:
        best = subject.assessment.get("best_response") or "NE"
        status = subject.assessment.get("observation")
        when = _dated("RS", subject.assessment.get("computed_at"), study, reference)
        rows.append({**keys, **_rs(("BESTRESP", "Best Overall Response"), best, status), **when})
    return _numbered("RS", rows)


def _rs(test: tuple[str, str], result: str, source: str | None) -> Row:
    code, name = test
    return {
        "RSSPID": source,
        "RSTESTCD": code,
        "RSTEST": name,
        "RSCAT": RESPONSE_CATEGORY,
        "RSORRES": result,
        "RSSTRESC": result,
        "RSEVAL": "COMPUTED",
    }


_BUILDERS: dict[str, tuple[Callable[[Subject, Study], list[Row]], tuple[str, ...], bool]] = {
    # domain -> (rows of a subject, record types read, status history read)
    "dm": (dm_rows, ("MedicationAdministration",), False),
    "ex": (ex_rows, ("MedicationAdministration",), False),
    "cm": (cm_rows, ("MedicationAdministration",), False),
    "lb": (lb_rows, ("Observation",), False),
    "ae": (ae_rows, ("AdverseEvent",), False),
    "rs": (rs_rows, (), True),
}


def domain(code: str) -> Domain:
    found = DOMAINS.get(code)
    if found is None:
        raise NotFound(f"No SDTM domain {code!r}; there are {', '.join(DOMAINS)}")
    return found


def authorize_domain(principal: Principal, dataset: Domain) -> None:
    for resource_type in dataset.sources:
        access_policy(principal).require(resource_type, Action.EXPORT)


async def domain_rows(
    ctx: ServiceContext,
    code: str,
    access: SiteAccess,
    study_id: str,
    progress: Callable[[int], None] | None = None,
) -> AsyncIterator[list[Row]]:
    """The domain's rows, subject by subject in USUBJID order (--SEQ within each)."""
    build, record_types, statuses = _BUILDERS[code]
    study = Study(study_id, ctx.criteria.zone)
    async for subject in subjects(ctx, access, record_types, statuses):
        yield build(subject, study)
        if progress is not None:
            progress(1)


async def patient_count(ctx: ServiceContext, access: SiteAccess) -> int:
    async with ctx.db.read() as conn:
        return len(await _patients(conn, access, ctx.codes))


# --- writing ------------------------------------------------------------------------------


def _cell(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return _number_text(value)
    return value


def _text(value: Value) -> Value:
    return value[:XPT_MAX_CHARS] if isinstance(value, str) else value


class DatasetWriter:
    """Writes one domain to `path` (.xpt or .csv) through a temporary name in the same
    directory, renamed into place once complete: a reader never sees a half-written file."""

    def __init__(self, dataset: Domain, path: Path, fmt: Format) -> None:
        check_domain(dataset)
        self.dataset, self.path, self.fmt = dataset, path, fmt
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        self._temporary = Path(name)
        self._frames: list[pl.DataFrame] = []
        self.rows = 0
        self._csv = None
        if fmt == "csv":
            self._file = self._temporary.open("w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._file)
            self._csv.writerow(dataset.names)

    def add(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.rows += len(rows)
        names = self.dataset.names
        if self._csv is not None:
            self._csv.writerows([[_cell(row.get(n)) for n in names] for row in rows])
            return
        schema = {v.name: pl.Float64 if v.numeric else pl.String for v in self.dataset.variables}
        columns = {n: [_text(row.get(n)) for row in rows] for n in names}
        self._frames.append(pl.DataFrame(columns, schema=schema))

    def finish(self) -> Path:
        try:
            if self._csv is not None:
                self._file.close()
            else:
                schema = {
                    v.name: pl.Float64 if v.numeric else pl.String for v in self.dataset.variables
                }
                frame = (
                    pl.concat(self._frames, rechunk=False)
                    if self._frames
                    else pl.DataFrame(schema=schema)
                )
                self._frames = []
                pyreadstat.write_xport(
                    frame,
                    str(self._temporary),
                    file_label=self.dataset.label,
                    column_labels=[v.label for v in self.dataset.variables],
                    table_name=self.dataset.code,
                    file_format_version=5,
                )
            os.replace(self._temporary, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        if self._csv is not None and not self._file.closed:
            self._file.close()
        self._temporary.unlink(missing_ok=True)


@dataclass(frozen=True)
class DatasetFile:
    """A domain to write as a file: `<directory>/<code>.<fmt>`."""

    code: str
    fmt: Format
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.code}.{self.fmt}"


async def write_dataset(
    ctx: ServiceContext,
    file: DatasetFile,
    access: SiteAccess,
    study_id: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, int]:
    """Write the domain's file; returns its path and row count."""
    dataset = domain(file.code)
    writer = DatasetWriter(dataset, file.directory / file.name, file.fmt)
    try:
        async for batch in domain_rows(ctx, file.code, access, study_id, progress):
            writer.add(batch)
    except BaseException:
        writer.discard()
        raise
    # pyreadstat writes a whole XPT at once: off the event loop.
    return await asyncio.to_thread(writer.finish), writer.rows


async def dataset_file(
    ctx: ServiceContext, principal: Principal, file: DatasetFile, study_id: str
) -> tuple[Path, int]:
    """`GET /sdtm/{code}.{fmt}`: the domain at the caller's sites, written into the file's
    directory (the caller streams it, then removes it); audited like a read."""
    dataset = domain(file.code)
    authorize_domain(principal, dataset)
    path, count = await write_dataset(ctx, file, access_policy(principal).sites, study_id)
    ctx.audit.add(
        AuditRecord.of(
            principal,
            "operation",
            description=f"SDTM {file.name}: {count} rows",
        )
    )
    return path, count
