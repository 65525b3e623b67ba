"""The FHIR interactions as use cases.

One write path. The primitives `create_in`, `update_in`, `patch_in` and `delete_in` make
every check of a write (validation, the caller's sites, the server-owned response-status
Observation, a lab's Observation kinds, the reason for change, `If-Match`) and store it, in
a transaction the caller owns and has locked; each returns a `Change`: what was stored, its
AuditRecord and the patients whose response must be recomputed. `finish` then recomputes
each patient once and appends every audit record at once. The public `create`, `update`,
`patch`, `delete` and the conditional forms are thin wrappers doing exactly that for one
request; a transaction Bundle (`app.services.transactions`) and an HL7 v2 message
(`app.services.hl7_ingest`) do it for many writes in one transaction.

Create and update: parse -> validate (R4B + the stricter FHIR checks) -> derive index values
(platelet normalisation, subject) -> lock -> store. Locks, PostgreSQL only (SQLite write
transactions are serial anyway), always taken in this order, each group sorted, so no two
writers can deadlock whatever they write:
1. advisory locks on criteria: conditional create, update and delete (`conditional:...`;
   50 identical conditional creates at once leave exactly one resource), HL7 message and
   result keys;
2. advisory locks on the ids updated, patched or deleted (`id:Type:id`): two
   update-as-creates of one new id cannot collide;
3. the Patient rows involved, `FOR UPDATE`: writes for one patient are serialised, writes for
   different patients never wait on each other, and a Patient cannot be deleted while a
   record for it is being written;
4. the resources' own rows, `FOR UPDATE`, on update and delete: `If-Match` checks and
   version numbers cannot race;
5. last, the audit chain (`finish`), held from the end of the write to its commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.audit.trail import append as append_audit
from app.auth.permissions import (
    Action,
    hidden,
)
from app.auth.policy import access_policy
from app.auth.principal import Principal
from app.kit.codes import KIND_RESPONSE_STATUS, RESERVED_ID_PREFIX
from app.kit.dates import format_instant, utc_now
from app.kit.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from app.services import response, subjects
from app.services.context import ServiceContext, WriteTransaction
from app.services.indexing import index_values, subject_patient_id
from app.services.patching import Patch, apply_patch
from app.services.provenance import require_reason, store_provenance
from app.services.validation import parse_json, validate
from app.store import repository as repo
from app.store.criteria import HistoryFilter, SearchFilter


@dataclass(frozen=True)
class Stored:
    """One version of a resource as served: `content` is the exact JSON text."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    content: str | None

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @classmethod
    def of_current(cls, current: repo.Current) -> Stored:
        """The current version, as the store's row holds it."""
        return cls(
            current.resource_type,
            current.id,
            current.version_id,
            current.last_updated,
            current.content,
        )

    @classmethod
    def of_version(cls, resource_type: str, resource_id: str, version: repo.Version) -> Stored:
        """A version from the history (`vread`)."""
        return cls(
            resource_type, resource_id, version.version_id, version.last_updated, version.content
        )


@dataclass(frozen=True)
class WriteResult:
    stored: Stored
    created: bool  # True: 201 Created; False: 200 (update, or conditional create matched)


@dataclass(frozen=True)
class Change:
    """One write done in the caller's transaction, not yet recomputed nor audited."""

    stored: Stored
    created: bool
    record: AuditRecord | None  # None: nothing was written (a conditional create matched)
    patients: frozenset[str] = frozenset()  # whose response the write may change
    forgotten: str | None = None  # a deleted Patient: its response status went with it
    # A create: the record as the response engine reads it, so that a count later than
    # everything else of its patient is appended, not the whole history re-assessed.
    appended: repo.FactRow | None = None


@dataclass(frozen=True)
class CreateCommand:
    """A create. The server assigns the id unless the caller assigned it in advance
    (`resource_id`: a Bundle's `urn:uuid` entries). With `if_none_exist`, whose criteria
    lock the caller holds, an existing match is returned instead and nothing is written."""

    resource_type: str
    body: dict[str, Any]
    resource_id: str | None = None
    if_none_exist: SearchFilter | None = None
    description: str | None = None  # the audit record's: what sent the write (HL7 v2)


@dataclass(frozen=True)
class UpdateCommand:
    """An update of `resource_type/resource_id` with `body` (a create when the id names
    nothing yet). `if_match`: the version If-Match expects; `provenance`: the X-Provenance
    header, the reason for the change."""

    resource_type: str
    resource_id: str
    body: dict[str, Any]
    if_match: int | None = None
    provenance: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class WriteTarget:
    """The existing resource a patch or a delete writes, the version If-Match expects, and
    the X-Provenance header (the reason for the change)."""

    resource_type: str
    resource_id: str
    if_match: int | None = None
    provenance: str | None = None


@dataclass(frozen=True)
class ChangeTerms:
    """What a client states beside the body of an update, patch or delete: `If-Match` as
    sent (the service parses it, after the body) and `X-Provenance`, the reason."""

    if_match: str | None = None
    provenance: str | None = None


@dataclass(frozen=True)
class ChangeRequest:
    """An update, patch or delete of `resource_type/resource_id` on the client's terms."""

    resource_type: str
    resource_id: str
    terms: ChangeTerms


@dataclass(frozen=True)
class Condition:
    """The criteria of a conditional interaction (a create's `If-None-Exist`, an update's or
    a delete's query, a Bundle entry's), and the advisory lock it is decided under
    (`conditional:Type:...`, `app.services.conditional`): equal criteria, one lock."""

    filter: SearchFilter
    lock_key: str


@dataclass(frozen=True)
class ConditionalChangeRequest:
    """A conditional update or delete: of the one resource `condition` matches."""

    resource_type: str
    condition: Condition
    terms: ChangeTerms


def new_id() -> str:
    return str(uuid.uuid4())


def _render(
    raw: dict[str, Any], resource_type: str, resource_id: str, version_id: int, now: datetime
) -> str:
    """The stored JSON: server-owned id and meta first, everything else as the client sent it."""
    meta = {
        k: v for k, v in (raw.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")
    }
    meta = {"versionId": str(version_id), "lastUpdated": format_instant(now), **meta}
    body = {k: v for k, v in raw.items() if k not in ("resourceType", "id", "meta")}
    document = {"resourceType": resource_type, "id": resource_id, "meta": meta, **body}
    return orjson.dumps(document).decode()


def parse_if_match(header: str | None) -> int | None:
    if header is None:
        return None
    value = header.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f'If-Match {header!r} is not a version ETag such as W/"3"')
    return int(value)


def _ids(*patient_ids: str | None) -> frozenset[str]:
    return frozenset(p for p in patient_ids if p is not None)


async def _patient_row(tx: WriteTransaction, patient_id: str) -> repo.Current | None:
    locked = tx.locked
    if locked is not None and patient_id in locked.patients:
        return locked.patients[patient_id]
    row = await repo.get_current(tx.conn, "Patient", patient_id, for_update=True)
    if locked is not None and row is not None:
        # Locked (or created) by this transaction: it stays as read until a write of this
        # Patient drops it (_wrote_patient). A Bundle's records of a Patient it creates
        # would otherwise each read it again.
        locked.patients[patient_id] = row
    return row


async def _accept(
    tx: WriteTransaction, resource_type: str, resource_id: str, raw: dict[str, Any]
) -> tuple[dict[str, Any], repo.IndexRow]:
    """Validate, derive index values, lock (and check) the subject Patient, and check that the
    caller may write this record at this site. Returns the resource as it is stored (a
    Patient's subject number normalised) and its index values."""
    validate(raw, resource_type)
    subject = None
    if resource_type == "Patient":
        raw, subject = subjects.normalise_patient(raw, tx.ctx.codes)
    values = index_values(resource_type, resource_id, raw, tx.ctx.codes, tx.ctx.limits)
    if resource_type == "Observation":
        access_policy(tx.principal).require_observation_write(values.kind)
    if resource_type == "Patient" and not access_policy(tx.principal).sees_site(values.site):
        raise Forbidden(f"Site {values.site} is not one of the caller's sites")
    if resource_type != "Patient" and values.patient_id is not None:
        patient = await _patient_row(tx, values.patient_id)
        # A patient at another site is answered exactly like a missing one: no existence leak.
        if (
            patient is None
            or patient.deleted
            or not access_policy(tx.principal).sees_site(patient.site)
        ):
            raise Unprocessable(
                f"{resource_type}.subject references Patient/{values.patient_id}, "
                "which does not exist",
                expression=[f"{resource_type}.subject"],
                audit_site=patient.site if patient is not None else None,
            )
        values.site = patient.site
    if values.kind == KIND_RESPONSE_STATUS:
        raise _server_owned()
    return raw, repo.IndexRow(
        values.patient_id,
        values.effective_start,
        values.effective_end,
        values.value_norm,
        values.kind,
        values.status,
        values.site,
        values.tokens,
        values.strings,
        values.quantities,
        subject,
    )


async def _check_subject(
    tx: WriteTransaction, raw: dict[str, Any], index: repo.IndexRow, resource_id: str
) -> None:
    """409 when another live Patient has the subject number this one is written with."""
    if index.subject is None:
        return
    holder = await repo.subject_holder(tx.conn, index.subject)
    if holder is not None and holder.id != resource_id:
        raise _subject_taken(raw, index.subject, holder, tx.principal)


def _subject_taken(
    raw: dict[str, Any], subject: str, holder: repo.Current | None, principal: Principal
) -> Conflict:
    """409 naming the Patient that has the number (at a site the caller does not hold: only
    that it is taken, as uniqueness across the trial must say that much)."""
    identifiers = raw.get("identifier") or []
    index = next(
        (
            i
            for i, identifier in enumerate(identifiers)
            if isinstance(identifier, dict) and identifier.get("value") == subject
        ),
        0,
    )
    if holder is not None and access_policy(principal).sees_site(holder.site):
        who = f"Patient/{holder.id}"
        hint = "; update that Patient, or send a conditional create to get it"
    else:
        who, hint = "a Patient at a site you do not hold", ""
    return Conflict(
        f"Subject number {subject} is enrolled already, as {who}: one subject, one patient{hint}",
        expression=[f"Patient.identifier[{index}].value"],
    )


def _matched(tx: WriteTransaction, match: repo.Current) -> Change:
    """A conditional create that found its resource: nothing written, the match read."""
    tx.ctx.audit.add(
        audit_access(
            "read",
            tx.principal,
            match,
            description="If-None-Exist matched this resource; nothing was written",
        )
    )
    return Change(Stored.of_current(match), created=False, record=None)


def _wrote_patient(tx: WriteTransaction, resource_type: str, resource_id: str) -> None:
    if tx.locked is not None and resource_type == "Patient":
        tx.locked.patients.pop(resource_id, None)


# --- The primitives: one write each, in the caller's locked transaction ---------------------


async def create_in(
    tx: WriteTransaction, command: CreateCommand, pending: list[repo.NewResource] | None = None
) -> Change:
    """A create (`CreateCommand`). With `pending`, the new rows are appended to it instead of
    inserted: the caller inserts them (`repo.insert_resources`) before anything reads them."""
    resource_type = command.resource_type
    resource_id = command.resource_id or new_id()
    # Every check a create makes, also when a match will be returned: a client must not
    # learn that a body it may not write "worked".
    raw, index = await _accept(tx, resource_type, resource_id, command.body)
    if command.if_none_exist is not None:
        match = await single_match(tx.conn, command.if_none_exist, tx.principal, "If-None-Exist")
        if match is not None:
            return _matched(tx, match)
    await _check_subject(tx, raw, index, resource_id)
    content = _render(raw, resource_type, resource_id, 1, tx.now)
    new = repo.NewResource(resource_type, resource_id, content, index)
    if pending is not None:
        pending.append(new)
    elif (match := await _insert_created(tx, command, raw, new)) is not None:
        return _matched(tx, match)
    _wrote_patient(tx, resource_type, resource_id)
    stored = Stored(resource_type, resource_id, 1, tx.now, content)
    record = _record(tx, "create", index.site, stored, description=command.description)
    fact = repo.created_fact(resource_id, index)
    return Change(stored, True, record, _ids(index.patient_id), appended=fact)


def _record(
    tx: WriteTransaction, interaction: str, site: str | None, stored: Stored, **fields: Any
) -> AuditRecord:
    """The audit record of a version written."""
    return AuditRecord.of(
        tx.principal,
        interaction,
        site=site,
        entity_type=stored.resource_type,
        entity_id=stored.id,
        version_after=stored.version_id,
        recorded=tx.now,
        **fields,
    )


async def _insert_created(
    tx: WriteTransaction, command: CreateCommand, raw: dict[str, Any], new: repo.NewResource
) -> repo.Current | None:
    """Insert the created resource. A concurrent create that committed its subject number
    first (PostgreSQL) makes this a conflict, or, when its Patient meets the conditional
    create's criteria, the match returned instead (None: inserted)."""
    try:
        await repo.insert_resource(tx.conn, new, tx.now)
    except repo.SubjectTaken as taken:
        match = None
        if command.if_none_exist is not None:
            match = await single_match(
                tx.conn, command.if_none_exist, tx.principal, "If-None-Exist"
            )
        if match is not None:
            return match
        holder = await repo.subject_holder(tx.conn, taken.subject)
        raise _subject_taken(raw, taken.subject, holder, tx.principal) from None
    return None


async def update_in(
    tx: WriteTransaction, command: UpdateCommand, current: repo.Current | None
) -> Change:
    """An update of the row `current` that the caller locked (None: a new id, an update as
    create). Every update needs the reason in `provenance`, whether or not the resource
    exists: whether a PUT creates depends on state the client may not know, and a request's
    validity must not."""
    reason = require_reason(command.provenance)
    _check_update(tx, command, current)
    resource_type, resource_id = command.resource_type, command.resource_id
    raw, index = await _accept(tx, resource_type, resource_id, {**command.body, "id": resource_id})
    await _check_subject(tx, raw, index, resource_id)
    stored = await _store_version(tx, command, raw, index, current)
    if current is None:
        record = _record(tx, "update", index.site, stored, description=command.description)
        change = Change(stored, True, record, _ids(index.patient_id))
        await store_reason(tx, change, command.provenance)
        return change
    if resource_type == "Patient" and current.site != index.site:
        access_policy(tx.principal).require("Patient", Action.MOVE_SITE)
        await repo.move_records(tx.conn, resource_id, index.site)
    assert command.provenance is not None
    await store_provenance(tx, command.provenance, resource_type, resource_id, stored.version_id)
    record = _record(
        tx,
        "update",
        index.site,
        stored,
        description=command.description,
        version_before=current.version_id,
        reason=reason,
    )
    # A record moved to another patient changes both patients' responses.
    return Change(stored, current.deleted, record, _ids(index.patient_id, current.patient_id))


def _check_body_id(command: UpdateCommand) -> None:
    body_id = command.body.get("id")
    if body_id is not None and body_id != command.resource_id:
        raise BadRequest(
            f"The body's id {body_id!r} does not match the URL's {command.resource_id!r}",
            expression=[f"{command.resource_type}.id"],
        )
    if command.resource_id.startswith(RESERVED_ID_PREFIX):
        raise _server_owned()


def _check_update(
    tx: WriteTransaction, command: UpdateCommand, current: repo.Current | None
) -> None:
    """What an update checks before it reads the body: the ids, the caller's sites,
    `If-Match`, and who may write the stored record."""
    _check_body_id(command)
    if current is not None:
        _check_visible(tx, command.resource_type, command.resource_id, current)
    if command.if_match is not None and (current is None or current.version_id != command.if_match):
        raise _stale(command.if_match, current)
    if current is not None and current.kind == KIND_RESPONSE_STATUS:
        raise _server_owned()
    if current is not None and command.resource_type == "Observation":
        access_policy(tx.principal).require_observation_write(current.kind)


def _check_visible(
    tx: WriteTransaction, resource_type: str, resource_id: str, current: repo.Current | None
) -> repo.Current:
    """The locked row, or 404 when it is missing or at another site (indistinguishable)."""
    if current is None or not access_policy(tx.principal).sees_site(current.site):
        raise hidden(resource_type, resource_id, current.site if current else None)
    return current


async def _store_version(
    tx: WriteTransaction,
    command: UpdateCommand,
    raw: dict[str, Any],
    index: repo.IndexRow,
    current: repo.Current | None,
) -> Stored:
    """Version 1 of a new id, or the next version of `current`; a subject number that a
    concurrent transaction took first is a 409."""
    resource_type, resource_id = command.resource_type, command.resource_id
    version = 1 if current is None else current.version_id + 1
    content = _render(raw, resource_type, resource_id, version, tx.now)
    if current is None:
        new = repo.NewResource(resource_type, resource_id, content, index)
        write = repo.insert_resource(tx.conn, new, tx.now)
    else:
        write = repo.update_resource(tx.conn, current, content, index, tx.now)
    try:
        await write
    except repo.SubjectTaken as taken:
        holder = await repo.subject_holder(tx.conn, taken.subject)
        raise _subject_taken(raw, taken.subject, holder, tx.principal) from None
    _wrote_patient(tx, resource_type, resource_id)
    return Stored(resource_type, resource_id, version, tx.now, content)


async def store_reason(tx: WriteTransaction, change: Change, provenance: str | None) -> None:
    """The reason of a PUT that created its resource: stored with version 1, as an update's
    is with the version it writes."""
    stored, reason = change.stored, require_reason(provenance)
    if provenance is None or change.record is None:  # a conditional create that matched
        raise ValueError(f"{stored.resource_type}/{stored.id}: no version was written")
    change.record.reason = reason
    await store_provenance(tx, provenance, stored.resource_type, stored.id, stored.version_id)


def patched(
    resource_type: str, resource_id: str, current: repo.Current | None, patch: Patch
) -> dict[str, Any]:
    """The resource `patch` makes of the current version (404 and 410 as a read)."""
    if current is None:
        raise NotFound(f"{resource_type}/{resource_id} does not exist")
    if current.deleted or current.content is None:
        raise Gone(f"{resource_type}/{resource_id} was deleted; there is nothing to patch")
    return apply_patch(patch, orjson.loads(current.content), resource_type, resource_id)


def _check_current(
    tx: WriteTransaction,
    resource_type: str,
    resource_id: str,
    current: repo.Current | None,
    if_match: int | None,
) -> repo.Current:
    """The locked row of a patch or delete: 404 as a read, 412 when `If-Match` is stale."""
    current = _check_visible(tx, resource_type, resource_id, current)
    if if_match is not None and current.version_id != if_match:
        raise _stale(if_match, current)
    return current


async def patch_in(
    tx: WriteTransaction, command: WriteTarget, patch: Patch, current: repo.Current | None
) -> Change:
    """A patch is an update of the patched resource: the same checks, reason and audit."""
    require_reason(command.provenance)  # first, as for every update: whatever is stored
    resource_type, resource_id = command.resource_type, command.resource_id
    current = _check_current(tx, resource_type, resource_id, current, command.if_match)
    update = UpdateCommand(
        resource_type,
        resource_id,
        patched(resource_type, resource_id, current, patch),
        command.if_match,
        command.provenance,
        description=f"patch ({patch.media_type})",
    )
    return await update_in(tx, update, current)


async def delete_in(
    tx: WriteTransaction, command: WriteTarget, current: repo.Current | None
) -> Change | None:
    """A delete of the locked row `current`; None when it was deleted already. Every
    delete needs the reason in `provenance`, even one that finds nothing left to delete."""
    reason = require_reason(command.provenance)
    resource_type, resource_id = command.resource_type, command.resource_id
    current = _check_current(tx, resource_type, resource_id, current, command.if_match)
    if current.kind == KIND_RESPONSE_STATUS:
        raise _server_owned()
    if current.deleted:
        return None
    if resource_type == "Patient" and await repo.has_live_references(tx.conn, resource_id):
        raise Conflict(f"Patient/{resource_id} still has records; delete or move them first")
    version = current.version_id + 1
    await repo.delete_resource(tx.conn, current, tx.now)
    _wrote_patient(tx, resource_type, resource_id)
    patients, forgotten = _ids(current.patient_id), None
    if resource_type == "Patient":
        await response.forget(tx.conn, resource_id, tx.now)
        patients, forgotten = frozenset(), resource_id
    assert command.provenance is not None
    await store_provenance(tx, command.provenance, resource_type, resource_id, version)
    stored = Stored(resource_type, resource_id, version, tx.now, None)
    record = _record(
        tx, "delete", current.site, stored, version_before=current.version_id, reason=reason
    )
    return Change(stored, False, record, patients, forgotten)


async def recompute_changes(tx: WriteTransaction, changes: Iterable[Change]) -> None:
    """Recompute each patient the changes touched, once, in the write's own transaction:
    data and status commit together. The Patient rows are locked already (`_accept`,
    `lock_for_update`, or the caller's `LockedPatients`)."""
    changes = list(changes)
    forgotten = {c.forgotten for c in changes if c.forgotten is not None}
    patients = set().union(*(c.patients for c in changes)) - forgotten
    for patient_id in sorted(patients):
        touching = [c for c in changes if patient_id in c.patients]
        # One create and nothing else of the patient's: what it added can be appended.
        appended = touching[0].appended if len(touching) == 1 else None
        await response.recompute(tx.ctx, tx.conn, patient_id, tx.now, appended)


async def finish(tx: WriteTransaction, changes: Sequence[Change]) -> None:
    """Recompute, then append every audit record in one go (unchained: the chain is built
    after the commit, `app.audit.chain`)."""
    await recompute_changes(tx, changes)
    await append_audit(tx.conn, [c.record for c in changes if c.record is not None])


async def finish_one(tx: WriteTransaction, change: Change) -> Change:
    """`finish` for a request of one write; returns that write."""
    await finish(tx, [change])
    return change


async def single_match(
    conn: AsyncConnection, criteria: SearchFilter, principal: Principal, what: str
) -> repo.Current | None:
    """The one resource at the caller's sites matching conditional criteria, None when
    none does; 412 when several do (FHIR: the server cannot tell which one is meant)."""
    visible = replace(criteria, access=access_policy(principal).sites)
    matches = await repo.first_matches(conn, visible, limit=2)
    if len(matches) > 1:
        raise PreconditionFailed(
            f"{what} matches more than one {criteria.resource_type}; nothing was done"
        )
    return matches[0] if matches else None


# The lock order, the one every write takes its locks in (a single write, and a transaction
# Bundle for all its entries at once), so that no two writes can deadlock:
#   1. the criteria of conditional interactions (`Condition.lock_key`), sorted;
#   2. the ids updated, patched or deleted (`lock_id`), sorted;
#   3. every Patient involved, by id (`lock_for_update`);
#   4. the records' rows (`lock_for_update`).
# The audit records take no lock: they are appended unchained, and chained after the commit
# (`app.audit.chain`).
# SQLite needs none of them: its write transactions begin IMMEDIATE, one at a time.


async def lock_id(
    conn: AsyncConnection, resource_type: str, resource_id: str
) -> repo.Current | None:
    """Step 2 of the lock order (above): the id. Returns its current row, which cannot change while
    the lock is held (every write of it takes the lock), but is not row-locked yet."""
    await repo.lock(conn, f"id:{resource_type}:{resource_id}")
    return await repo.get_current(conn, resource_type, resource_id)


async def lock_for_update(
    conn: AsyncConnection,
    resource_type: str,
    resource_id: str,
    current: repo.Current | None,
    new_patient: str | None = None,
) -> repo.Current | None:
    """Steps 3 and 4 of the lock order (above), after `lock_id`: the patients involved
    sorted by id (so two writes moving records between the same patients cannot deadlock),
    then the record's row. Returns the locked current row, or None for a new id."""
    if resource_type != "Patient":
        # The record's patient cannot change meanwhile: changing it needs the id lock we hold.
        patients = {new_patient, current.patient_id if current else None}
        for patient_id in sorted(p for p in patients if p is not None):
            await repo.get_current(conn, "Patient", patient_id, for_update=True)
    return await repo.get_current(conn, resource_type, resource_id, for_update=True)


async def _lock_current(
    conn: AsyncConnection, resource_type: str, resource_id: str, new_patient: str | None = None
) -> repo.Current | None:
    current = await lock_id(conn, resource_type, resource_id)
    return await lock_for_update(conn, resource_type, resource_id, current, new_patient)


# --- One request, one transaction -------------------------------------------------------


async def create(
    ctx: ServiceContext,
    resource_type: str,
    body: bytes,
    principal: Principal,
    if_none_exist: Condition | None = None,
) -> WriteResult:
    """A create; with `if_none_exist`, a conditional one (its criteria's match, if any, is
    returned instead)."""
    raw = parse_json(body)
    criteria = None
    if if_none_exist is not None:
        criteria = subjects.normalise_criteria(if_none_exist.filter, ctx.codes)
    async with ctx.db.write() as conn:
        if if_none_exist is not None:
            await repo.lock(conn, if_none_exist.lock_key)
        tx = WriteTransaction(ctx, conn, principal, utc_now())
        command = CreateCommand(resource_type, raw, if_none_exist=criteria)
        change = await _create_finished(tx, command)
    return WriteResult(change.stored, change.created)


async def _create_finished(
    tx: WriteTransaction, command: CreateCommand, provenance: str | None = None
) -> Change:
    """Create, recompute and audit, the locks held. With `provenance`, a PUT that creates:
    its reason is stored with version 1."""
    change = await create_in(tx, command)
    if provenance is not None:
        await store_reason(tx, change, provenance)
    return await finish_one(tx, change)


async def update(
    ctx: ServiceContext, request: ChangeRequest, body: bytes, principal: Principal
) -> WriteResult:
    raw = parse_json(body)
    resource_type = request.resource_type
    if raw.get("id") is None:
        raise BadRequest(
            "An update must carry the resource id in the body", expression=[f"{resource_type}.id"]
        )
    terms = request.terms
    expected = parse_if_match(terms.if_match)
    command = UpdateCommand(resource_type, request.resource_id, raw, expected, terms.provenance)
    _check_body_id(command)
    new_patient = _new_patient(resource_type, raw)
    async with ctx.db.write() as conn:
        change = await _update_locked(ctx, conn, principal, command, new_patient)
    return WriteResult(change.stored, change.created)


def _new_patient(resource_type: str, raw: dict[str, Any]) -> str | None:
    """The Patient a record is written for, to lock; found (or refused) before any lookup."""
    return None if resource_type == "Patient" else subject_patient_id(resource_type, raw)


async def _update_locked(
    ctx: ServiceContext,
    conn: AsyncConnection,
    principal: Principal,
    command: UpdateCommand,
    new_patient: str | None,
) -> Change:
    """Lock (the lock order, from the id on), update, recompute and audit."""
    current = await _lock_current(conn, command.resource_type, command.resource_id, new_patient)
    tx = WriteTransaction(ctx, conn, principal, utc_now())
    return await finish_one(tx, await update_in(tx, command, current))


async def patch(
    ctx: ServiceContext, request: ChangeRequest, document: Patch, principal: Principal
) -> WriteResult:
    command = _write_target(request)
    resource_type, resource_id = request.resource_type, request.resource_id
    if resource_id.startswith(RESERVED_ID_PREFIX):
        raise _server_owned()
    async with ctx.db.write() as conn:
        current = await lock_id(conn, resource_type, resource_id)
        # The patched subject decides which patients to lock; the id lock keeps the current
        # version from changing between this look and the row lock.
        new_patient = None
        if current is not None and access_policy(principal).sees_site(current.site):
            raw = patched(resource_type, resource_id, current, document)
            if resource_type != "Patient":
                new_patient = subject_patient_id(resource_type, raw)
        current = await lock_for_update(conn, resource_type, resource_id, current, new_patient)
        tx = WriteTransaction(ctx, conn, principal, utc_now())
        change = await finish_one(tx, await patch_in(tx, command, document, current))
    return WriteResult(change.stored, change.created)


def _write_target(request: ChangeRequest) -> WriteTarget:
    terms = request.terms
    expected = parse_if_match(terms.if_match)
    return WriteTarget(request.resource_type, request.resource_id, expected, terms.provenance)


async def delete(
    ctx: ServiceContext, request: ChangeRequest, principal: Principal
) -> Stored | None:
    """Delete; returns the deletion version, or None when it was already deleted."""
    command = _write_target(request)
    async with ctx.db.write() as conn:
        return await _delete_locked(ctx, conn, principal, command)


async def _delete_locked(
    ctx: ServiceContext, conn: AsyncConnection, principal: Principal, command: WriteTarget
) -> Stored | None:
    """Lock (the lock order, from the id on), delete, recompute and audit; None when it was
    deleted already."""
    current = await _lock_current(conn, command.resource_type, command.resource_id)
    tx = WriteTransaction(ctx, conn, principal, utc_now())
    change = await delete_in(tx, command, current)
    if change is None:
        return None
    return (await finish_one(tx, change)).stored


async def conditional_target(
    conn: AsyncConnection,
    resource_type: str,
    criteria: SearchFilter,
    raw: dict[str, Any],
    principal: Principal,
) -> tuple[str | None, repo.Current | None]:
    """Which resource a conditional update writes (FHIR http.html#cond-update), under the
    criteria lock: (id, its current row). One match: that one (a body id must be its id).
    None: the body's id if it names no resource yet (update as create), else (None, None),
    a create. Several: 412."""
    body_id = raw.get("id")
    match = await single_match(conn, criteria, principal, "The conditional update's criteria")
    if match is not None:
        if body_id is not None and body_id != match.id:
            raise BadRequest(
                f"The body's id {body_id!r} is not the id of the resource the criteria match "
                f"({resource_type}/{match.id})",
                expression=[f"{resource_type}.id"],
            )
        return match.id, match
    access_policy(principal).require(resource_type, Action.CREATE)
    if body_id is None:
        return None, None
    if not isinstance(body_id, str):
        raise BadRequest("The body's id must be a string", expression=[f"{resource_type}.id"])
    if await repo.get_current(conn, resource_type, body_id) is not None:
        raise Conflict(
            f"{resource_type}/{body_id} exists but does not match the criteria: "
            "a conditional update cannot take its id"
        )
    return body_id, None


async def conditional_update(
    ctx: ServiceContext, request: ConditionalChangeRequest, body: bytes, principal: Principal
) -> WriteResult:
    """`PUT /Type?criteria`: no match creates, one match is updated, several are 412.
    Race-free: identical conditional writes serialise on their criteria. The reason is
    required whichever happens, as for any update."""
    resource_type, provenance = request.resource_type, request.terms.provenance
    require_reason(provenance)
    raw = parse_json(body)
    expected = parse_if_match(request.terms.if_match)
    criteria = subjects.normalise_criteria(request.condition.filter, ctx.codes)
    new_patient = _new_patient(resource_type, raw)
    async with ctx.db.write() as conn:
        await repo.lock(conn, request.condition.lock_key)
        target_id, _ = await conditional_target(conn, resource_type, criteria, raw, principal)
        if target_id is not None:
            if target_id.startswith(RESERVED_ID_PREFIX):
                raise _server_owned()
            command = UpdateCommand(resource_type, target_id, raw, expected, provenance)
            change = await _update_locked(ctx, conn, principal, command, new_patient)
        else:
            if expected is not None:
                raise _stale(expected, None)
            tx = WriteTransaction(ctx, conn, principal, utc_now())
            change = await _create_finished(tx, CreateCommand(resource_type, raw), provenance)
    return WriteResult(change.stored, change.created)


async def conditional_delete(
    ctx: ServiceContext, request: ConditionalChangeRequest, principal: Principal
) -> Stored | None:
    """`DELETE /Type?criteria` (single): none matches, nothing to do (None); one is
    deleted; several are 412. The reason is required whichever happens, as for any delete."""
    resource_type, provenance = request.resource_type, request.terms.provenance
    require_reason(provenance)
    expected = parse_if_match(request.terms.if_match)
    criteria = subjects.normalise_criteria(request.condition.filter, ctx.codes)
    async with ctx.db.write() as conn:
        await repo.lock(conn, request.condition.lock_key)
        match = await single_match(conn, criteria, principal, "The conditional delete's criteria")
        if match is None:
            ctx.audit.add(
                AuditRecord.of(
                    principal,
                    "search-type",
                    entity_type=resource_type,
                    description="Conditional delete: no match, nothing was deleted",
                )
            )
            return None
        command = WriteTarget(resource_type, match.id, expected, provenance)
        return await _delete_locked(ctx, conn, principal, command)


def audit_access(
    interaction: str,
    principal: Principal,
    current: repo.Current,
    *,
    version: int | None = None,
    description: str | None = None,
) -> AuditRecord:
    """An audit record of an access to one existing resource."""
    return AuditRecord.of(
        principal,
        interaction,
        site=current.site,
        entity_type=current.resource_type,
        entity_id=current.id,
        version_after=version if version is not None else current.version_id,
        description=description,
    )


def _server_owned() -> Forbidden:
    return Forbidden(
        "The ITP response-status Observation is written by the server only; it is "
        "recomputed from the patient's data after every change"
    )


def _stale(expected: int, current: repo.Current | None) -> PreconditionFailed:
    actual = "none" if current is None else str(current.version_id)
    return PreconditionFailed(
        f"If-Match expected version {expected}, but the current version is {actual}"
    )


async def visible_current(
    conn: AsyncConnection, resource_type: str, resource_id: str, principal: Principal
) -> repo.Current:
    """The current row, or 404 when it is missing or at another site (indistinguishable)."""
    current = await repo.get_current(conn, resource_type, resource_id)
    if current is None or not access_policy(principal).sees_site(current.site):
        raise hidden(resource_type, resource_id, current.site if current else None)
    return current


async def read(
    ctx: ServiceContext, resource_type: str, resource_id: str, principal: Principal
) -> Stored:
    async with ctx.db.read_statement() as conn:
        current = await visible_current(conn, resource_type, resource_id, principal)
    ctx.audit.add(audit_access("read", principal, current))
    if current.deleted:
        raise Gone(
            f"{resource_type}/{resource_id} was deleted (version {current.version_id}); "
            "its history stays readable",
            headers={"ETag": f'W/"{current.version_id}"'},
        )
    return Stored.of_current(current)


async def vread(
    ctx: ServiceContext,
    resource_type: str,
    resource_id: str,
    version_id: int,
    principal: Principal,
) -> Stored:
    async with ctx.db.read() as conn:
        current = await visible_current(conn, resource_type, resource_id, principal)
        return await read_version(ctx, conn, principal, current, version_id)


async def read_version(
    ctx: ServiceContext,
    conn: AsyncConnection,
    principal: Principal,
    current: repo.Current,
    version_id: int,
) -> Stored:
    """A version of the visible resource `current` (`vread`, also in a Bundle)."""
    resource_type, resource_id = current.resource_type, current.id
    version = await repo.get_version(conn, resource_type, resource_id, version_id)
    ctx.audit.add(audit_access("vread", principal, current, version=version_id))
    if version is None:
        raise NotFound(f"{resource_type}/{resource_id}/_history/{version_id} does not exist")
    if version.content is None:
        raise Gone(f"{resource_type}/{resource_id}/_history/{version_id} is a deletion")
    return Stored.of_version(resource_type, resource_id, version)


@dataclass(frozen=True)
class HistoryRequest:
    """A page of history: of a type, or of one resource (`resource_id`); the versions written
    at or after `since`, after the (last_updated, id, version) cursor `after`, `limit` at
    most, newest first."""

    resource_type: str
    resource_id: str | None
    since: datetime | None
    after: tuple[datetime, str, int] | None
    limit: int


async def history(
    ctx: ServiceContext, request: HistoryRequest, principal: Principal
) -> list[repo.Version]:
    resource_type, resource_id = request.resource_type, request.resource_id
    async with ctx.db.read() as conn:
        if resource_id is not None:
            current = await visible_current(conn, resource_type, resource_id, principal)
            ctx.audit.add(audit_access("history-instance", principal, current))
        else:
            ctx.audit.add(
                AuditRecord.of(
                    principal,
                    "history-type",
                    entity_type=resource_type,
                )
            )
        versions = HistoryFilter(resource_type, resource_id, request.since)
        access = access_policy(principal).sites
        return await repo.history(conn, versions, access, after=request.after, limit=request.limit)


# --- Several writes in one transaction (an HL7 v2 message) --------------------------------
# The caller owns the transaction. It takes every lock with `lock_for_writes` before its
# first write, writes with the primitives above, and ends with `finish` (or
# `recompute_changes`, then its own rows, then the audit records).


async def lock_for_writes(
    conn: AsyncConnection, resource_type: str, ids: Iterable[str], patient_ids: Iterable[str]
) -> dict[str, repo.Current]:
    """Lock in the order `update` does (the ids, the patients, the rows; each sorted), so a
    writer of several records cannot deadlock with one of a single record. Returns the
    current rows of the ids that exist."""
    wanted = sorted(set(ids))
    for resource_id in wanted:
        await repo.lock(conn, f"id:{resource_type}:{resource_id}")
    for patient_id in sorted(set(patient_ids)):
        await repo.get_current(conn, "Patient", patient_id, for_update=True)
    rows = {}
    for resource_id in wanted:
        current = await repo.get_current(conn, resource_type, resource_id, for_update=True)
        if current is not None:
            rows[resource_id] = current
    return rows
