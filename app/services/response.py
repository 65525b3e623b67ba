"""Recompute a patient's ITP response inside the transaction that changed the patient's data.

The engine (`app.engine`) is pure; this module feeds it the patient's timeline from index
columns (one indexed query, never JSON parsing, never other patients) and stores what it
says twice: the assessment row `$response-status` serves, and the server-owned
response-status Observation, which gets a new version only when the result changes (not its
criteria nor its classifications), so its `_history` is the patient's response history.

The assessment row is rewritten whenever anything in it changes; its classifications are
rows of their own (a new count adds one, a full recompute writes runs of 256), and it keeps
the engine's fold state. A create
of a count dated after the patient's other records is appended to that state
(`_appended`), without reading the history; any other write recomputes it whole
(`_assessed`). Both store the same (tests/test_response_fold.py).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from app import metrics
from app.audit.trail import AuditRecord
from app.audit.trail import append as append_audit
from app.auth.permissions import hidden
from app.auth.policy import access_policy
from app.auth.principal import Principal, Role, parse_scopes
from app.engine import (
    EVIDENCE_RESOURCE_TYPES,
    RULES_VERSION,
    Administration,
    Assessment,
    BleedingAssessment,
    BleedingEvent,
    Classification,
    Criteria,
    PlateletCount,
    Timeline,
)
from app.engine.rules import assess_folded, extend
from app.engine.stored import dump_state, load_state
from app.kit import codes
from app.kit.codes import (
    KIND_BLEEDING_EVENT,
    KIND_BLEEDING_GRADE,
    KIND_PLATELET,
    KIND_RESPONSE_STATUS,
    RESERVED_ID_PREFIX,
)
from app.kit.dates import format_instant, utc_now
from app.kit.errors import Gone, NotFound
from app.services.context import ServiceContext, WriteTransaction
from app.services.indexing import search_values
from app.services.provenance import store_provenance
from app.store import repository as repo

ENGINE_KINDS = (KIND_PLATELET, KIND_BLEEDING_GRADE, KIND_BLEEDING_EVENT, *codes.MEDICATION_ROLES)
# Response-status Observation ids derive from the patient id: one per patient, found without
# a search, under the reserved prefix (kit.codes.RESERVED_ID_PREFIX).
_RESPONSE_NAMESPACE = uuid.UUID("2f1d7c4e-6a53-4d59-9a0e-5b0c1f7e3a11")


def response_observation_id(patient_id: str) -> str:
    return RESERVED_ID_PREFIX + uuid.uuid5(_RESPONSE_NAMESPACE, patient_id).hex


_WHOLE_DAY = timedelta(days=1) - timedelta(microseconds=1)


def timeline_from_rows(patient_id: str, rows: list[repo.FactRow], zone: ZoneInfo) -> Timeline:
    """The patient's Timeline from `repo.patient_fact_rows` (times aware UTC), built for the
    hot path (no intermediate objects, the engine's fast constructors). Stored times are
    UTC; a value that was a bare date (2025-03-10) means that calendar day where the trial
    is, so it starts at midnight in the trial's time zone, not UTC's."""
    counts, grades, events, administrations = [], [], [], []
    count, grade, event, administration = (
        PlateletCount.fast,
        BleedingAssessment.fast,
        BleedingEvent.fast,
        Administration.fast,
    )
    for kind, ident, status, start, value, end in rows:
        if start is None:
            continue  # a record without a clinical time cannot be placed on the timeline
        if end is not None and end - start == _WHOLE_DAY:
            # A bare date: that calendar day where the trial is.
            start = datetime.combine(start.date(), datetime.min.time(), tzinfo=zone)
        status = status or "unknown"
        if kind == KIND_PLATELET:
            if value is not None:
                counts.append(count(ident, start, value, status))
        elif kind == KIND_BLEEDING_GRADE:
            if value is not None:
                grades.append(grade(ident, start, int(value), status))
        elif kind == KIND_BLEEDING_EVENT:
            events.append(event(ident, start, status))
        else:
            administrations.append(administration(ident, start, kind, status))  # type: ignore[arg-type]
    return Timeline(patient_id, tuple(counts), tuple(grades), tuple(events), tuple(administrations))


def _fingerprint(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


# What the status Observation does not stand for: the criteria a result was made under and
# the classifications it rests on can change alone (a count that decides nothing, settings
# that give the same result), and so can the storage's own keys.
_NOT_THE_RESULT = frozenset({"criteria", "classifications", "computed_at", "observation"})


def _result_fingerprint(document: Mapping[str, Any]) -> str:
    """The result of an assessment document (new, or as stored by any rules version) hashed.

    Empty evidence lists are left out, so that a key added to the evidence later changes no
    result that has nothing under it.
    """
    result = {key: value for key, value in document.items() if key not in _NOT_THE_RESULT}
    result["evidence"] = {key: ids for key, ids in (document.get("evidence") or {}).items() if ids}
    return _fingerprint(result)


def _chained(digest: str, classifications: Iterable[Classification]) -> str:
    """The hash chain of the classifications, continued from `digest` ("" to start): each
    link hashes the one before and a classification's values, so that a count appended
    extends the digest of those stored without reading them."""
    for item in classifications:
        # orjson writes a tuple, not a NamedTuple: the fields as an array.
        digest = hashlib.sha256(digest.encode() + orjson.dumps(tuple(item))).hexdigest()
    return digest


def _fingerprints(result_document: dict[str, Any], classifications_digest: str) -> tuple[str, str]:
    """(whole, result) fingerprints of an assessment given as its JSON without the
    classifications (`_result_document`) and the digest of those (`_chained`)."""
    result = _result_fingerprint(result_document)
    criteria = orjson.dumps(result_document["criteria"], option=orjson.OPT_SORT_KEYS)
    whole = hashlib.sha256(result.encode() + criteria + classifications_digest.encode())
    return whole.hexdigest(), result


def _result_document(assessment: Assessment) -> dict[str, Any]:
    """`Assessment.as_dict` without the classifications: built once per recompute, for the
    fingerprints and then for the stored JSON."""
    document = replace(assessment, classifications=()).as_dict()
    del document["classifications"]
    return document


_CLASSIFICATION_FIELDS = Classification._fields


# Classifications per stored row when a full recompute writes them all: a handful of rows
# for a long history (each count's own row would make a full recompute, which any write
# but a later count makes, delete and insert as many rows as the patient has counts).
CLASSIFICATIONS_PER_ROW = 256


def _classification_rows(items: Sequence[Classification], first: int = 0) -> list[tuple[int, str]]:
    """The rows that store `items` from place `first` on: (the place of a row's first
    classification, a JSON array of `Classification.as_dict` objects), in runs of
    `CLASSIFICATIONS_PER_ROW`. The objects are `as_dict`'s bytes in half the time (the
    times and dates left to orjson)."""
    size = CLASSIFICATIONS_PER_ROW
    return [
        (first + start, _classification_array(items[start : start + size]))
        for start in range(0, len(items), size)
    ]


def _classification_array(items: Iterable[Classification]) -> str:
    fields = _CLASSIFICATION_FIELDS
    return orjson.dumps([dict(zip(fields, item, strict=True)) for item in items]).decode()


def _document(assessment: Assessment, result_document: dict[str, Any], now: datetime) -> str:
    """The stored JSON: `Assessment.as_dict` without the classifications (rows of their own,
    put back in their place by `as_served`), with when and for which Observation."""
    document = {
        **result_document,
        "computed_at": format_instant(now),
        "observation": f"Observation/{response_observation_id(assessment.patient)}",
    }
    return orjson.dumps(document).decode()


@dataclass(frozen=True)
class _Made:
    """A recompute's outcome before it is stored: the assessment, both fingerprints, the
    engine's state as stored JSON (None: none), and the classifications: their count and
    digest, and `new`, those to store from place `first` on (0: all of them, replacing
    whatever is stored)."""

    assessment: Assessment
    result_document: dict[str, Any]  # `_result_document`
    fingerprint: str
    result: str
    fold_state: str | None
    classification_count: int
    classification_digest: str
    first: int
    new: tuple[Classification, ...]


@dataclass(frozen=True)
class Recomputed:
    """What a recompute wrote. `before` is the status stored before it (None: the patient's
    first assessment). `versioned`: the result changed, and the status Observation got a new
    version; otherwise only the stored assessment was refreshed (criteria, classifications)."""

    before: str | None
    after: str
    versioned: bool


async def recompute(
    ctx: ServiceContext,
    conn: AsyncConnection,
    patient_id: str,
    now: datetime,
    appended: repo.FactRow | None = None,
) -> Recomputed | None:
    """Assess the patient and store the assessment if anything in it changed (None if not).

    Call it inside the write transaction that changed the patient's data, after locking the
    Patient row: the result commits with the data or not at all. `appended`: the write was
    the create of this one record and nothing else of the patient's; a platelet count later
    than every other record is then appended to the engine's stored state
    (`app.engine.rules.extend`) instead of re-assessing the whole history, and its
    classification added to those stored.
    """
    started = time.perf_counter()
    stored = await repo.stored_assessment(conn, patient_id)
    made = None
    if appended is not None and appended[0] == KIND_PLATELET and stored is not None:
        made = _appended(ctx, patient_id, stored, appended)
    if made is None:
        made = await _assessed(ctx, conn, patient_id)
    metrics.observe_recompute(time.perf_counter() - started)
    if stored is not None and (stored.fingerprint, stored.fold_state) == (
        made.fingerprint,
        made.fold_state,
    ):
        return None
    assessment = made.assessment
    versioned = stored is None or await _stored_result(conn, patient_id, stored) != made.result
    observation_id = response_observation_id(patient_id)
    if versioned:
        await _write_observation(ctx, conn, observation_id, assessment, now)
    await _save(conn, made, stored, now)
    return Recomputed(stored.status if stored else None, assessment.status, versioned)


async def _save(
    conn: AsyncConnection, made: _Made, stored: repo.StoredAssessment | None, now: datetime
) -> None:
    """Store the assessment, and the classifications that changed: the new ones after those
    stored, or all of them when any other changed."""
    assessment = made.assessment
    patient_id = assessment.patient
    row = repo.AssessmentRow(
        patient_id,
        assessment.status,
        assessment.best_response,
        made.fingerprint,
        now,
        response_observation_id(patient_id),
        _document(assessment, made.result_document, now),
        made.result,
        made.fold_state,
        made.classification_count,
        made.classification_digest,
    )
    await repo.save_assessment(conn, row, exists_=stored is not None)
    rows = _classification_rows(made.new, made.first)
    if made.first:
        await repo.insert_classifications(conn, patient_id, rows)
    elif stored is None or stored.classification_digest != made.classification_digest:
        await repo.save_classifications(conn, patient_id, rows)


async def _assessed(ctx: ServiceContext, conn: AsyncConnection, patient_id: str) -> _Made:
    """The assessment from the patient's whole timeline, and the state to keep."""
    rows = await repo.patient_fact_rows(conn, patient_id, ENGINE_KINDS)
    timeline = timeline_from_rows(patient_id, rows, ctx.criteria.zone)
    folded = assess_folded(timeline, ctx.criteria)
    assessment, state = folded.assessment, folded.state
    digest = _chained("", assessment.classifications)
    document = _result_document(assessment)
    fingerprint, result = _fingerprints(document, digest)
    fold_state = orjson.dumps(dump_state(state)).decode() if state is not None else None
    classifications = assessment.classifications
    return _Made(
        assessment,
        document,
        fingerprint,
        result,
        fold_state,
        len(classifications),
        digest,
        0,
        classifications,
    )


def _appended(
    ctx: ServiceContext, patient_id: str, stored: repo.StoredAssessment, fact: repo.FactRow
) -> _Made | None:
    """The stored assessment with one more count appended to the stored state; None when
    there is no state for these criteria or the count cannot simply be appended."""
    count, digest = stored.classification_count, stored.classification_digest
    if stored.fold_state is None or count is None or digest is None:
        return None
    try:
        data = orjson.loads(stored.fold_state)
    except orjson.JSONDecodeError:
        return None  # not a state at all: the whole history, which stores a good one
    state = load_state(data, ctx.criteria)
    counts = timeline_from_rows(patient_id, [fact], ctx.criteria.zone).counts
    if state is None or state.patient != patient_id or len(counts) != 1:
        return None
    if not extend(state, counts[0]):
        return None
    assessment = state.assessment()  # its classifications: the new count's, if any
    new = assessment.classifications
    digest = _chained(digest, new)
    document = _result_document(assessment)
    fingerprint, result = _fingerprints(document, digest)
    fold_state = orjson.dumps(dump_state(state)).decode()
    total = count + len(new)
    return _Made(assessment, document, fingerprint, result, fold_state, total, digest, count, new)


async def _stored_result(
    conn: AsyncConnection, patient_id: str, stored: repo.StoredAssessment
) -> str:
    if stored.decision_fingerprint is not None:
        return stored.decision_fingerprint
    # Stored before rules version 2 kept a result fingerprint: derived from its JSON, once.
    row = await repo.get_assessment(conn, patient_id)
    assert row is not None
    return _result_fingerprint(orjson.loads(row.content))


async def forget(conn: AsyncConnection, patient_id: str, now: datetime) -> None:
    """A deleted Patient takes its response status with it (the history stays readable)."""
    current = await repo.get_current(conn, "Observation", response_observation_id(patient_id))
    if current is not None and not current.deleted:
        await repo.delete_resource(conn, current, now)
    await repo.delete_assessment(conn, patient_id)


async def _write_observation(
    ctx: ServiceContext,
    conn: AsyncConnection,
    observation_id: str,
    assessment: Assessment,
    now: datetime,
) -> None:
    current = await repo.get_current(conn, "Observation", observation_id)
    if current is not None and current.kind != KIND_RESPONSE_STATUS:
        # Unreachable while clients cannot write `rs-` ids; never overwrite clinical data.
        raise RuntimeError(f"Observation/{observation_id} is not a response status")
    if current is not None and not current.deleted:
        # A live status is at its patient's site: a move takes the patient's records along
        # (`repo.move_records`), this one included. One query fewer on every change.
        site = current.site
    else:
        patient = await repo.get_current(conn, "Patient", assessment.patient)
        site = patient.site if patient is not None else None
    version = 1 if current is None else current.version_id + 1
    document = _observation(ctx, observation_id, version, assessment, now)
    content = orjson.dumps(document).decode()
    search = search_values("Observation", document, ctx.codes, KIND_RESPONSE_STATUS)
    index = repo.IndexRow(
        patient_id=assessment.patient,
        effective_start=now,
        effective_end=now,
        value_norm=None,
        kind=KIND_RESPONSE_STATUS,
        status="final" if version == 1 else "amended",
        site=site,
        tokens=search.tokens,
        strings=search.strings,
        quantities=search.quantities,
    )
    if current is None:
        new = repo.NewResource("Observation", observation_id, content, index)
        await repo.insert_resource(conn, new, now)
    else:
        await repo.update_resource(conn, current, content, index, now)


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _components(code_systems: codes.CodeSystems, assessment: Assessment) -> list[dict[str, Any]]:
    """The baseline, the time to response and the best response, those the patient has."""
    trial, response = code_systems.trial_codes, code_systems.itp_response
    components: list[dict[str, Any]] = []
    if assessment.baseline is not None:
        components.append(
            {
                "code": _concept(trial, codes.BASELINE_COMPONENT, "Baseline platelet count"),
                "valueQuantity": {
                    "value": assessment.baseline.value,
                    "unit": "10*9/L",
                    "system": codes.UCUM,
                    "code": "10*9/L",
                },
            }
        )
    if assessment.time_to_response_days is not None:
        components.append(
            {
                "code": _concept(trial, codes.TIME_TO_RESPONSE_COMPONENT, "Time to response"),
                "valueQuantity": {
                    "value": assessment.time_to_response_days,
                    "unit": "d",
                    "system": codes.UCUM,
                    "code": "d",
                },
            }
        )
    if assessment.best_response is not None:
        components.append(
            {
                "code": _concept(trial, codes.BEST_RESPONSE_COMPONENT, "Best response"),
                "valueCodeableConcept": _concept(
                    response,
                    assessment.best_response,
                    codes.RESPONSE_DISPLAY[assessment.best_response],
                ),
            }
        )
    return components


def _observation(
    ctx: ServiceContext, observation_id: str, version: int, assessment: Assessment, now: datetime
) -> dict[str, Any]:
    trial, response = ctx.codes.trial_codes, ctx.codes.itp_response
    components = _components(ctx.codes, assessment)
    evidence = sorted(
        {
            f"{EVIDENCE_RESOURCE_TYPES[key]}/{i}"
            for key, ids in assessment.evidence.items()
            for i in ids
        }
    )
    document: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "meta": {"versionId": str(version), "lastUpdated": format_instant(now)},
        "status": "final" if version == 1 else "amended",
        "code": _concept(trial, codes.ITP_RESPONSE_STATUS, "ITP treatment response status"),
        "subject": {"reference": f"Patient/{assessment.patient}"},
        "effectiveDateTime": format_instant(now),
        "issued": format_instant(now),
        "valueCodeableConcept": _concept(
            response, assessment.status, codes.RESPONSE_DISPLAY[assessment.status]
        ),
    }
    if assessment.status_reason:
        document["note"] = [{"text": assessment.status_reason}]
    if evidence:
        document["derivedFrom"] = [{"reference": reference} for reference in evidence]
    if components:
        document["component"] = components
    return document


async def visible_patient(
    conn: AsyncConnection, principal: Principal, patient_id: str
) -> repo.Current:
    """The Patient an operation on one patient is about: 404 when it is missing or at
    another site (indistinguishable), 410 when it was deleted."""
    patient = await repo.get_current(conn, "Patient", patient_id)
    if patient is None or not access_policy(principal).sees_site(patient.site):
        raise hidden("Patient", patient_id, patient.site if patient else None)
    if patient.deleted:
        raise Gone(f"Patient/{patient_id} was deleted")
    return patient


def patient_operation(
    principal: Principal, patient: repo.Current, operation: str, **fields: Any
) -> AuditRecord:
    """The audit record of an operation on one patient (`visible_patient`)."""
    return AuditRecord.of(
        principal,
        "operation",
        site=patient.site,
        entity_type="Patient",
        entity_id=patient.id,
        description=operation,
        **fields,
    )


async def response_status(ctx: ServiceContext, patient_id: str, principal: Principal) -> str:
    """The stored assessment of a patient, as JSON text."""
    async with ctx.db.read() as conn:
        patient = await visible_patient(conn, principal, patient_id)
        row = await repo.get_assessment(conn, patient_id)
        rows = None
        if row is not None and row.classification_digest is not None:
            rows = await repo.classification_contents(conn, patient_id)
    ctx.audit.add(patient_operation(principal, patient, "$response-status"))
    if row is None:  # written with the Patient; only a database edited by hand lacks it
        raise NotFound(f"Patient/{patient_id} has no assessment; run `python -m app recompute`")
    return as_served(row.content, rows)


def as_served(content: str, classifications: Sequence[str] | None = None) -> str:
    """A stored assessment as `$response-status` serves it.

    `classifications`: its classification rows (each a JSON array, in order), put back in
    their place, before the criteria. None: a row stored before they were rows of their
    own, which holds them.
    One stored before rules version 2 (until `python -m app recompute` reassesses it) says
    so: its criteria lacked the version-2 settings, which are version 1's values
    (`Criteria.from_stored`, `rules_version` 1), and it classified nothing (`null`).
    """
    document = orjson.loads(content)
    if classifications is not None:
        # Each row a JSON array: their items, joined, are the classifications in order.
        items = ",".join(row[1:-1] for row in classifications if row != "[]")
        served: dict[str, Any] = {}
        for key, value in document.items():
            if key == "criteria":
                served["classifications"] = orjson.Fragment(f"[{items}]")
            served[key] = value
        return orjson.dumps(served).decode()
    stored_criteria = document.get("criteria") or {}
    if "rules_version" in stored_criteria:
        return content
    document["criteria"] = Criteria.from_stored(stored_criteria).as_dict()
    document.setdefault("classifications", None)
    return orjson.dumps(document).decode()


async def response_summary(
    ctx: ServiceContext, principal: Principal, requested: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Counts over the patients at the caller's sites only, narrowed to `requested` (as the
    trial report's `site=`: a site the caller does not hold is refused)."""
    access = access_policy(principal).narrowed(requested)
    ctx.audit.add(AuditRecord.of(principal, "operation", description="$response-summary"))
    async with ctx.db.read() as conn:
        rows = await repo.assessment_counts(conn, access)
    by_status = {code: 0 for code in ("CR", "R", "NR", "LOR", "NE")}
    by_best = {code: 0 for code in ("CR", "R", "NR", "NE")}
    for status, best, count in rows:
        by_status[status] += count
        if best is not None:
            by_best[best] += count
    patients = sum(by_status.values())
    evaluable = patients - by_status["NE"]
    responders = by_best["CR"] + by_best["R"]
    return {
        "patients": patients,
        "evaluable": evaluable,
        "by_status": by_status,
        "by_best_response": by_best,
        "responders": responders,
        "overall_response_rate": round(responders / evaluable, 4) if evaluable else None,
        "sites": sorted(access.sites) if access.sites is not None else None,
        "criteria": ctx.criteria.as_dict(),
    }


# Who changes a status on `python -m app recompute`: the server, at every site.
RECOMPUTE_AGENT = Principal(
    "system/recompute", Role.ADMIN, frozenset(), parse_scopes("system/*.cruds")
)
DEFAULT_RECOMPUTE_REASON = f"response rules version {RULES_VERSION}"


@dataclass
class RecomputeReport:
    """What `recompute_all` did: each new status version as (patient, status before, after),
    and the assessments only refreshed (same result; new criteria or classifications)."""

    patients: int = 0
    changed: list[tuple[str, str | None, str]] = field(default_factory=list)
    refreshed: int = 0


async def _recompute_one(
    ctx: ServiceContext, conn: AsyncConnection, patient_id: str, reason: str
) -> Recomputed | None:
    patient = await repo.get_current(conn, "Patient", patient_id, for_update=True)
    if patient is None or patient.deleted:
        return None
    tx = WriteTransaction(ctx, conn, RECOMPUTE_AGENT, utc_now())
    change = await recompute(ctx, conn, patient_id, tx.now)
    if change is None or not change.versioned:
        return change
    status = await repo.get_current(conn, "Observation", response_observation_id(patient_id))
    assert status is not None
    transition = f"{change.before or 'none'} -> {change.after}"
    # The server changed a record: a reason for change like any other (Provenance, target =
    # the new version, the one it revises named), and an audit record.
    provenance = _recompute_provenance(status, transition, reason)
    await store_provenance(tx, provenance, "Observation", status.id, status.version_id)
    await append_audit(conn, [_recompute_record(tx, patient.site, status, transition, reason)])
    return change


def _recompute_provenance(status: repo.Current, transition: str, reason: str) -> str:
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "reason": [{"text": reason}],
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "UPDATE",
                }
            ],
            "text": f"response status {transition}, python -m app recompute",
        },
    }
    if status.version_id > 1:
        previous = f"Observation/{status.id}/_history/{status.version_id - 1}"
        provenance["entity"] = [{"role": "revision", "what": {"reference": previous}}]
    return orjson.dumps(provenance).decode()


def _recompute_record(
    tx: WriteTransaction, site: str | None, status: repo.Current, transition: str, reason: str
) -> AuditRecord:
    criteria = ", ".join(f"{k}={v}" for k, v in tx.ctx.criteria.as_dict().items())
    return AuditRecord(
        "update",
        description=f"response status {transition} (python -m app recompute under "
        f"criteria {criteria})",
        agent=tx.principal.sub,
        role="system",
        site=site,
        entity_type="Observation",
        entity_id=status.id,
        version_before=status.version_id - 1 or None,
        version_after=status.version_id,
        recorded=tx.now,
        reason=reason,
    )


async def recompute_all(
    ctx: ServiceContext,
    progress: Callable[[int, int, int], None] | None = None,
    reason: str = DEFAULT_RECOMPUTE_REASON,
) -> RecomputeReport:
    """Re-evaluate every patient under the current criteria, one transaction each.

    A patient whose result changed gets a new status version with a Provenance giving
    `reason`; one whose result did not gets no new version (its stored assessment is
    refreshed when its criteria or classifications changed); unchanged ones write nothing."""
    async with ctx.db.read() as conn:
        patient_ids = await repo.all_patient_ids(conn)
    report = RecomputeReport(patients=len(patient_ids))
    for done, patient_id in enumerate(patient_ids, start=1):
        async with ctx.db.write() as conn:
            change = await _recompute_one(ctx, conn, patient_id, reason)
        if change is not None and change.versioned:
            report.changed.append((patient_id, change.before, change.after))
        elif change is not None:
            report.refreshed += 1
        if progress is not None:
            progress(done, len(patient_ids), len(report.changed))
    return report
