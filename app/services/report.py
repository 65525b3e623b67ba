"""The trial report as use cases: the caller's sites, one snapshot of their patients'
records, the engine's assessment of each, then statistics and pictures off the event loop,
and the audit record of what was shown.

Each patient is assessed afresh from the records of the same snapshot, under the server's
criteria (the report's `criteria`): what `$response-status` stores, since it is computed
the same way after every write (unless the criteria were changed without
`python -m app recompute`), and always consistent with the counts the pictures draw.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.auth.policy import SiteAccess, access_policy
from app.auth.principal import Principal
from app.engine import ACTUAL_EVENT, assess
from app.kit import codes
from app.kit.codes import KIND_BLEEDING_EVENT
from app.kit.dates import format_instant, utc_now
from app.report import plots, summary
from app.report.model import AdverseEventFacts, PatientData
from app.services.context import ServiceContext
from app.services.response import (
    ENGINE_KINDS,
    patient_operation,
    timeline_from_rows,
    visible_patient,
)
from app.store import repository as repo

_T = TypeVar("_T")
SERIOUS = "serious"
# WHO-UMC causality categories that count an adverse event as related to the study drug.
RELATED = frozenset({"Certain", "Probably-Likely", "Possible"})
CAUSALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess"
SERIOUSNESS_SYSTEM = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"


@dataclass(frozen=True)
class Trial:
    """The patients a request covers, and the sites it reports on."""

    sites: tuple[str, ...]
    patients: list[PatientData]


async def _off_loop(function: Callable[..., _T], *args: Any) -> _T:
    """CPU work (the engine over every patient, scipy, matplotlib) in a worker thread, so
    the event loop keeps serving other requests meanwhile."""
    return await asyncio.to_thread(function, *args)


async def trial_report(
    ctx: ServiceContext, principal: Principal, sites: frozenset[str], query: str | None
) -> dict[str, Any]:
    trial = await _trial(ctx, principal, sites)
    ctx.audit.add(_record(principal, "$trial-report", query, trial.patients))
    return await _off_loop(
        summary.trial_report, trial.patients, trial.sites, ctx.criteria, format_instant(utc_now())
    )


async def response_listing(
    ctx: ServiceContext, principal: Principal, sites: frozenset[str], query: str | None
) -> dict[str, Any]:
    trial = await _trial(ctx, principal, sites)
    ctx.audit.add(_record(principal, "$response-listing", query, trial.patients))
    return {
        "generated_at": format_instant(utc_now()),
        "sites": list(trial.sites),
        "rows": [summary.listing_row(patient) for patient in trial.patients],
    }


def listing_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The listing as CSV (RFC 4180): a header of the JSON keys, empty cells for nulls."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=summary.LISTING_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


async def swimmer_plot(
    ctx: ServiceContext, principal: Principal, sites: frozenset[str], query: str | None
) -> bytes:
    trial = await _trial(ctx, principal, sites)
    treated = [p for p in trial.patients if p.treated]
    ctx.audit.add(_record(principal, "$swimmer-plot", query, treated))
    return await _off_loop(plots.swimmer_plot, treated, ctx.criteria)


async def platelet_chart(ctx: ServiceContext, principal: Principal, patient_id: str) -> bytes:
    async with ctx.db.read() as conn:
        current = await visible_patient(conn, principal, patient_id)
        # The patient is visible (checked above), and its records are where it is.
        records = await _read(conn, access_policy(principal).sites, patient_id)
    (patient,) = await _patients(ctx, records)
    operation = patient_operation(
        principal, current, "$platelet-chart", version_after=current.version_id
    )
    ctx.audit.add(operation)
    return await _off_loop(plots.platelet_chart, patient, ctx.criteria)


def _record(
    principal: Principal, operation: str, query: str | None, shown: Sequence[PatientData]
) -> AuditRecord:
    """A report spans sites, like a search: no site, and every Patient it showed."""
    return AuditRecord.of(
        principal,
        "operation",
        description=operation,
        query=query,
        disclosed=tuple(("Patient", p.id, p.version) for p in shown),
    )


async def _trial(ctx: ServiceContext, principal: Principal, requested: frozenset[str]) -> Trial:
    access = access_policy(principal).narrowed(requested)
    async with ctx.db.read() as conn:
        records = await _read(conn, access, None)
    patients = await _patients(ctx, records)
    listed = access.sites
    if listed is None:
        listed = frozenset(p.site for p in patients if p.site is not None)
    return Trial(tuple(sorted(listed)), patients)


@dataclass(frozen=True)
class _Records:
    """What one snapshot holds of the patients in scope (three queries, however many)."""

    patients: list[tuple[str, int, str | None, str | None]]
    facts: dict[str, list[repo.FactRow]]
    adverse_events: list[tuple[str, str, str | None, datetime | None, str]]


async def _read(conn: AsyncConnection, access: SiteAccess, patient_id: str | None) -> _Records:
    return _Records(
        await repo.live_patients(conn, access, patient_id),
        await repo.fact_rows_by_patient(conn, ENGINE_KINDS, access, patient_id),
        await repo.adverse_event_rows(conn, access, patient_id),
    )


async def _patients(ctx: ServiceContext, records: _Records) -> list[PatientData]:
    return await _off_loop(_assemble, ctx, records)


def _assemble(ctx: ServiceContext, records: _Records) -> list[PatientData]:
    """Each patient's timeline, assessment and adverse events (CPU only: in a thread)."""
    events: dict[str, list[AdverseEventFacts]] = {}
    for owner, ident, kind, time, content in records.adverse_events:
        event = _adverse_event(ident, kind, time, orjson.loads(content))
        if event is not None:
            events.setdefault(owner, []).append(event)
    zone = ctx.criteria.zone
    patients = []
    for ident, version, site, document in records.patients:
        timeline = timeline_from_rows(ident, records.facts.get(ident, []), zone)
        patients.append(
            PatientData(
                id=ident,
                version=version,
                subject=_subject(ctx, orjson.loads(document) if document else {}),
                site=site,
                timeline=timeline,
                assessment=assess(timeline, ctx.criteria),
                adverse_events=tuple(sorted(events.get(ident, []), key=lambda e: e.id)),
            )
        )
    return patients


def _subject(ctx: ServiceContext, patient: dict[str, Any]) -> str | None:
    """The subject number: the identifier in the trial's subject system, else the first."""
    systems = {
        ctx.codes.base + "/sid/subject",
        codes.DEFAULT_CODE_SYSTEM_BASE + "/sid/subject",
    }
    identifiers = [i for i in patient.get("identifier", []) if isinstance(i.get("value"), str)]
    preferred = [i for i in identifiers if i.get("system") in systems]
    chosen = (preferred or identifiers or [{}])[0]
    value = chosen.get("value")
    return value if isinstance(value, str) else None


def _codes(concept: Any, system: str) -> set[str]:
    if not isinstance(concept, dict):
        return set()
    return {
        c["code"]
        for c in concept.get("coding", [])
        if isinstance(c, dict) and c.get("system") == system and isinstance(c.get("code"), str)
    }


def _adverse_event(
    ident: str, kind: str | None, time: datetime | None, resource: dict[str, Any]
) -> AdverseEventFacts | None:
    """What the safety table counts of an AdverseEvent; None for a potential one."""
    if resource.get("actuality") != ACTUAL_EVENT:
        return None
    grade = next(
        (
            extension.get("valueInteger")
            for extension in resource.get("extension", [])
            if extension.get("url") == codes.AE_GRADE_EXTENSION
        ),
        None,
    )
    causality = {
        code
        for suspect in resource.get("suspectEntity", [])
        for assessment in suspect.get("causality", [])
        for code in _codes(assessment.get("assessment"), CAUSALITY_SYSTEM)
    }
    return AdverseEventFacts(
        id=ident,
        time=time,
        grade=grade if isinstance(grade, int) else None,
        serious=SERIOUS in _codes(resource.get("seriousness"), SERIOUSNESS_SYSTEM),
        related=bool(causality & RELATED),
        bleeding=kind == KIND_BLEEDING_EVENT,
    )
