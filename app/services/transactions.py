"""Bundles at `POST /fhir`: a transaction (all or nothing, one database transaction) or a
batch (each entry on its own), with the write primitives of `app.services.resources`.

A transaction (FHIR http.html#trules):
1. lock the criteria of its conditional entries (sorted), then resolve them: which resource
   each conditional create, update and delete means, and what each conditional reference
   (`Patient?identifier=...`) points at (none: 400, several: 412);
2. give every created resource its id and rewrite each `fullUrl` (`urn:uuid:...`) wherever
   another entry references it to `Type/id`;
3. lock the ids it updates, patches or deletes, then every Patient involved, then the rows,
   in the lock order of a single write (`services.resources`, above `lock_id`), so a Bundle
   cannot deadlock with one;
4. process the entries DELETE, then POST, then PUT and PATCH, then GET (each group in the
   Bundle's order, but Patients written before the records that refer to them and deleted
   after them), recomputing each patient's response once, before the reads;
5. append every audit record at once, last.
Any entry failing fails the whole transaction: nothing of it is stored, and the answer is
that entry's OperationOutcome with its status.

A batch processes each entry as a transaction of one (the same steps, its own locks), and
answers every entry with its own status; one failing changes nothing of the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.audit.trail import append as append_audit
from app.auth.permissions import Action
from app.auth.policy import access_policy
from app.auth.principal import Principal
from app.kit.dates import utc_now
from app.kit.errors import (
    BadRequest,
    FhirError,
    Gone,
    PreconditionFailed,
    database_unavailable,
)
from app.kit.failures import is_transient
from app.services import resources, search, subjects
from app.services.context import LockedPatients, ServiceContext, WriteTransaction
from app.services.indexing import subject_patient_id
from app.services.patching import Patch
from app.services.provenance import require_reason
from app.services.resources import (
    Change,
    Condition,
    CreateCommand,
    Stored,
    UpdateCommand,
    WriteTarget,
)
from app.services.search import SearchRequest
from app.store import repository as repo
from app.store.criteria import SearchFilter

# FHIR processing order of a transaction's entries.
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3}
_INTERACTION = {"GET": "read", "POST": "create", "PUT": "update", "PATCH": "update"}


@dataclass
class EntryRequest:
    """One entry of a Bundle, as the wire layer parsed it."""

    index: int
    method: str  # GET, POST, PUT, PATCH or DELETE
    resource_type: str
    resource_id: str | None = None  # Type/id
    version_id: int | None = None  # Type/id/_history/version (GET)
    condition: Condition | None = None  # ifNoneExist, or Type?criteria
    full_url: str | None = None
    resource: dict[str, Any] | None = None  # POST, PUT
    patch: Patch | None = None  # PATCH
    if_match: int | None = None
    search: SearchRequest | None = None  # GET Type?...
    # Conditional references in `resource` (`Patient?identifier=...`) and their criteria.
    references: dict[str, SearchFilter] = field(default_factory=dict)


@dataclass(frozen=True)
class EntryResult:
    status: int
    stored: Stored | None = None  # the version written or read (a deletion: no content)
    search: search.SearchResult | None = None
    error: FhirError | None = None  # a batch entry that failed
    note: str | None = None  # what happened when nothing was written


async def transaction(
    ctx: ServiceContext,
    entries: Sequence[EntryRequest],
    principal: Principal,
    provenance: str | None,
) -> list[EntryResult]:
    for entry in entries:
        with _about(entry.index):
            _authorize(principal, entry)
    if any(entry.method in ("PUT", "PATCH", "DELETE") for entry in entries):
        # Before anything is looked up: whether the Bundle needs a reason depends on its
        # entries only, never on what they find.
        require_reason(provenance)
    async with ctx.db.write() as conn:
        tx = WriteTransaction(ctx, conn, principal, utc_now(), LockedPatients())
        return await _run(tx, entries, provenance)


async def batch(
    ctx: ServiceContext,
    entries: Sequence[EntryRequest | FhirError],
    principal: Principal,
    provenance: str | None,
) -> list[EntryResult]:
    results = []
    outage: FhirError | None = None
    for entry in entries:
        try:
            if isinstance(entry, FhirError):
                raise entry
            if outage is not None:  # not attempted: the database is away, each would wait
                raise outage
            _authorize(principal, entry)
            try:
                async with ctx.db.write() as conn:
                    tx = WriteTransaction(ctx, conn, principal, utc_now(), LockedPatients())
                    [result] = await _run(tx, [entry], provenance)
            except Exception as failure:
                if not is_transient(failure):
                    raise
                outage = database_unavailable(entry.method)
                raise outage from None
        except FhirError as error:
            ctx.audit.add(_failed_entry(principal, entry, error))
            result = EntryResult(error.status_code, error=error)
        results.append(result)
    return results


def _failed_entry(
    principal: Principal, entry: EntryRequest | FhirError, error: FhirError
) -> AuditRecord:
    method = entry.method if isinstance(entry, EntryRequest) else None
    return AuditRecord.of(
        principal,
        _INTERACTION.get(method or "", "delete" if method else "operation"),
        outcome="4",
        description=f"batch entry: {error.status_code}: {error.diagnostics}"[:1000],
        site=error.audit_site,
        entity_type=entry.resource_type if isinstance(entry, EntryRequest) else None,
    )


def _authorize(principal: Principal, entry: EntryRequest) -> None:
    resource_type = entry.resource_type
    if entry.method == "GET":
        action = Action.SEARCH if entry.search is not None else Action.READ
        access_policy(principal).require(resource_type, action)
        return
    action = {
        "POST": Action.CREATE,
        "PUT": Action.UPDATE,
        "PATCH": Action.UPDATE,
        "DELETE": Action.DELETE,
    }[entry.method]
    access_policy(principal).require(resource_type, action)
    if entry.condition is not None:
        if entry.method == "POST":
            access_policy(principal).require(resource_type, Action.CONDITIONAL_CREATE)
        access_policy(principal).require(resource_type, Action.SEARCH)
        search.authorize_criteria(principal, entry.condition.filter)
    for criteria in entry.references.values():
        access_policy(principal).require(criteria.resource_type, Action.SEARCH)
        search.authorize_criteria(principal, criteria)


@contextmanager
def _about(index: int) -> Iterator[None]:
    """An error raised inside names the entry it is about."""
    try:
        yield
    except FhirError as error:
        raise located(error, index) from None


def located(error: FhirError, index: int) -> FhirError:
    where = f"Bundle.entry[{index}]"
    if not error.diagnostics.startswith(where):
        error.diagnostics = f"{where}: {error.diagnostics}"
        for issue in error.issues:
            issue.diagnostics = f"{where}: {issue.diagnostics}"
    return error


@dataclass
class _Plan:
    """What steps 1 to 3 decided for each entry."""

    targets: dict[int, str | None] = field(default_factory=dict)  # entry -> id (None: none)
    creates: set[int] = field(default_factory=set)  # entries that create at their target
    references: dict[str, str] = field(default_factory=dict)  # fullUrl or Type?... -> Type/id
    # The rows written by PUT, PATCH and DELETE, locked (None: a new id).
    currents: dict[tuple[str, str], repo.Current | None] = field(default_factory=dict)


async def _run(
    tx: WriteTransaction, entries: Sequence[EntryRequest], provenance: str | None
) -> list[EntryResult]:
    for entry in entries:  # subject numbers as stored (services/subjects.py)
        if entry.condition is not None:
            criteria = subjects.normalise_criteria(entry.condition.filter, tx.ctx.codes)
            entry.condition = replace(entry.condition, filter=criteria)
        entry.references = {
            reference: subjects.normalise_criteria(criteria, tx.ctx.codes)
            for reference, criteria in entry.references.items()
        }
    plan = await _decide(tx, entries)
    await _lock_writes(tx, entries, plan)
    results, changes = await _process(tx, entries, plan, provenance)
    # The audit records, all at once (unchained: no lock; chained after the commit).
    await append_audit(tx.conn, [c.record for c in changes if c.record is not None])
    return [results[entry.index] for entry in entries]


async def _decide(tx: WriteTransaction, entries: Sequence[EntryRequest]) -> _Plan:
    """Steps 1 and 2: the criteria locks, what the conditional entries and references
    mean, then references to other entries and conditional references as Type/id."""
    plan = _Plan()
    keys = {e.condition.lock_key for e in entries if e.condition is not None and e.method != "GET"}
    for key in sorted(keys):
        await repo.lock(tx.conn, key)
    for entry in entries:
        with _about(entry.index):
            await _target(tx, entry, plan)
    _refuse_duplicates(entries, plan)
    for entry in entries:
        for reference, criteria in entry.references.items():
            if reference not in plan.references:
                with _about(entry.index):
                    plan.references[reference] = await _resolve(
                        tx.conn, reference, criteria, tx.principal
                    )
    for entry in entries:
        if entry.resource is not None and plan.references:
            entry.resource = _rewrite(entry.resource, plan.references)
    return plan


async def _lock_writes(tx: WriteTransaction, entries: Sequence[EntryRequest], plan: _Plan) -> None:
    """Step 3: the ids, the patients (into `tx.locked`), the rows (into `plan.currents`)."""
    assert tx.locked is not None
    written = sorted(
        {
            (e.resource_type, target)
            for e in entries
            if e.method in ("PUT", "PATCH", "DELETE")
            and (target := plan.targets.get(e.index)) is not None
        }
    )
    for resource_type, resource_id in written:
        plan.currents[(resource_type, resource_id)] = await resources.lock_id(
            tx.conn, resource_type, resource_id
        )
    for patient_id in sorted(_patients(entries, plan, tx.principal)):
        row = await repo.get_current(tx.conn, "Patient", patient_id, for_update=True)
        if row is not None:
            tx.locked.patients[patient_id] = row
    for resource_type, resource_id in written:
        plan.currents[(resource_type, resource_id)] = await repo.get_current(
            tx.conn, resource_type, resource_id, for_update=True
        )


async def _process(
    tx: WriteTransaction, entries: Sequence[EntryRequest], plan: _Plan, provenance: str | None
) -> tuple[dict[int, EntryResult], list[Change]]:
    """Step 4: the entries in FHIR's order; every patient recomputed once, before the reads."""
    results: dict[int, EntryResult] = {}
    changes: list[Change] = []
    reads = []
    # Plain creates of records go into the database together (one statement per table, not
    # four round trips each), inserted before any other entry is processed: nothing another
    # entry does can then see a state that one-at-a-time processing would not have shown.
    pending: list[repo.NewResource] = []
    for entry in sorted(entries, key=_processing_order):
        if entry.method == "GET":
            reads.append(entry)
            continue
        deferred = _deferrable(entry)
        if not deferred:
            await repo.insert_resources(tx.conn, pending, tx.now)
            pending.clear()
        with _about(entry.index):
            results[entry.index], change = await _write(
                tx, entry, plan, provenance, pending if deferred else None
            )
        if change is not None:
            changes.append(change)
    await repo.insert_resources(tx.conn, pending, tx.now)
    await resources.recompute_changes(tx, changes)
    for entry in reads:
        with _about(entry.index):
            results[entry.index] = await _read(tx, entry)
    return results, changes


def _deferrable(entry: EntryRequest) -> bool:
    """A create whose processing reads nothing that earlier creates of its type write: not a
    Patient (records read their Patient's row), not conditional (its criteria search)."""
    return entry.method == "POST" and entry.condition is None and entry.resource_type != "Patient"


def _processing_order(entry: EntryRequest) -> tuple[int, int, int]:
    """FHIR's order of methods; within one, Patients are created and updated before the
    records that refer to them (wherever they are in the Bundle) and deleted after them."""
    patient_first = 0 if entry.resource_type == "Patient" else 1
    if entry.method == "DELETE":
        patient_first = 1 - patient_first
    return _ORDER[entry.method], patient_first, entry.index


async def _target(tx: WriteTransaction, entry: EntryRequest, plan: _Plan) -> None:
    """Which resource the entry writes, under its criteria lock."""
    conn, principal = tx.conn, tx.principal
    if entry.method == "POST":
        target = None
        if entry.condition is not None:
            criteria = entry.condition.filter
            match = await resources.single_match(conn, criteria, principal, "ifNoneExist")
            target = match.id if match is not None else None
        if target is None:
            target = resources.new_id()
            plan.creates.add(entry.index)
    elif entry.method == "GET":
        return
    elif entry.condition is None:
        target = entry.resource_id
    elif entry.method == "PUT":
        assert entry.resource is not None
        target, _ = await resources.conditional_target(
            conn, entry.resource_type, entry.condition.filter, entry.resource, principal
        )
        if target is None:
            target = resources.new_id()
            plan.creates.add(entry.index)
    else:  # DELETE
        criteria = entry.condition.filter
        match = await resources.single_match(conn, criteria, principal, "The criteria")
        target = match.id if match is not None else None
    plan.targets[entry.index] = target
    if entry.full_url and target is not None:
        plan.references[entry.full_url] = f"{entry.resource_type}/{target}"


def _refuse_duplicates(entries: Iterable[EntryRequest], plan: _Plan) -> None:
    """FHIR: a resource appears once in a transaction's writes."""
    seen: dict[tuple[str, str], int] = {}
    for entry in entries:
        target = plan.targets.get(entry.index)
        if entry.method == "GET" or target is None:
            continue
        key = (entry.resource_type, target)
        if key in seen:
            raise located(
                BadRequest(
                    f"{key[0]}/{key[1]} is written by Bundle.entry[{seen[key]}] already; a "
                    "transaction writes each resource once"
                ),
                entry.index,
            )
        seen[key] = entry.index


async def _resolve(
    conn: AsyncConnection, reference: str, criteria: SearchFilter, principal: Principal
) -> str:
    visible = replace(criteria, access=access_policy(principal).sites)
    matches = await repo.first_matches(conn, visible, limit=2)
    if len(matches) > 1:
        raise PreconditionFailed(
            f"The conditional reference {reference!r} matches more than one "
            f"{criteria.resource_type}"
        )
    if not matches:
        raise BadRequest(
            f"The conditional reference {reference!r} matches no {criteria.resource_type}"
        )
    return f"{criteria.resource_type}/{matches[0].id}"


def _rewrite(value: Any, references: dict[str, str]) -> Any:
    """Every `reference` naming another entry's fullUrl, or a resolved conditional
    reference, as the Type/id it stands for."""
    if isinstance(value, dict):
        rewritten = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in references:
                rewritten[key] = references[item]
            else:
                rewritten[key] = _rewrite(item, references)
        return rewritten
    if isinstance(value, list):
        return [_rewrite(item, references) for item in value]
    return value


def _patients(entries: Iterable[EntryRequest], plan: _Plan, principal: Principal) -> set[str]:
    """Every Patient the writes touch: subjects before and after, Patients written."""
    patients: set[str] = set()
    for entry in entries:
        if entry.method == "GET":
            continue
        resource_type, target = entry.resource_type, plan.targets.get(entry.index)
        current = plan.currents.get((resource_type, target)) if target is not None else None
        if resource_type == "Patient":
            if target is not None and entry.method != "POST":
                patients.add(target)
            continue
        if current is not None and current.patient_id is not None:
            patients.add(current.patient_id)
        subject = _subject_after(entry, target, current, principal)
        if subject is not None:
            patients.add(subject)
    return patients


def _subject_after(
    entry: EntryRequest, target: str | None, current: repo.Current | None, principal: Principal
) -> str | None:
    """The Patient the entry's record refers to once written; None when it refers to none,
    or when the entry will be refused anyway (then with its entry, when it is processed)."""
    body = entry.resource
    if entry.patch is not None and current is not None and target is not None:
        if not access_policy(principal).sees_site(current.site):
            return None
        try:
            body = resources.patched(entry.resource_type, target, current, entry.patch)
        except FhirError:
            return None
    if body is None:
        return None
    try:
        return subject_patient_id(entry.resource_type, body)
    except FhirError:
        return None


async def _write(
    tx: WriteTransaction,
    entry: EntryRequest,
    plan: _Plan,
    provenance: str | None,
    pending: list[repo.NewResource] | None,
) -> tuple[EntryResult, Change | None]:
    if entry.method != "POST":
        # Every PUT, PATCH and DELETE entry needs the reason, whatever it finds (as over REST).
        require_reason(provenance)
    if entry.method == "DELETE":
        return await _delete(tx, entry, plan, provenance)
    resource_type, target = entry.resource_type, plan.targets.get(entry.index)
    assert target is not None
    if entry.method == "POST" or entry.index in plan.creates:
        change = await _create(tx, entry, plan, provenance, pending)
    elif entry.method == "PATCH":
        assert entry.patch is not None
        command = WriteTarget(resource_type, target, entry.if_match, provenance)
        current = plan.currents[(resource_type, target)]
        change = await resources.patch_in(tx, command, entry.patch, current)
    else:  # PUT
        assert entry.resource is not None
        update = UpdateCommand(resource_type, target, entry.resource, entry.if_match, provenance)
        change = await resources.update_in(tx, update, plan.currents[(resource_type, target)])
    return EntryResult(201 if change.created else 200, stored=change.stored), change


async def _delete(
    tx: WriteTransaction, entry: EntryRequest, plan: _Plan, provenance: str | None
) -> tuple[EntryResult, Change | None]:
    resource_type, target = entry.resource_type, plan.targets.get(entry.index)
    if target is None:
        note = f"No {resource_type} matched the criteria; nothing was deleted"
        return EntryResult(204, note=note), None
    command = WriteTarget(resource_type, target, entry.if_match, provenance)
    change = await resources.delete_in(tx, command, plan.currents[(resource_type, target)])
    if change is None:
        return EntryResult(204, note=f"{resource_type}/{target} was already deleted"), None
    return EntryResult(204, stored=change.stored), change


async def _create(
    tx: WriteTransaction,
    entry: EntryRequest,
    plan: _Plan,
    provenance: str | None,
    pending: list[repo.NewResource] | None,
) -> Change:
    """A POST, or a PUT whose target does not exist yet (an update as create)."""
    assert entry.resource is not None
    if entry.method == "PUT" and entry.if_match is not None:
        raise PreconditionFailed(
            f"If-Match expected version {entry.if_match}, but nothing matches the criteria"
        )
    command = CreateCommand(
        entry.resource_type,
        entry.resource,
        resource_id=plan.targets[entry.index] if entry.index in plan.creates else None,
        if_none_exist=(
            entry.condition.filter if entry.method == "POST" and entry.condition else None
        ),
    )
    change = await resources.create_in(tx, command, pending)
    if entry.method == "PUT":
        await resources.store_reason(tx, change, provenance)
    return change


async def _read(tx: WriteTransaction, entry: EntryRequest) -> EntryResult:
    if entry.search is not None:
        found = await search.search(tx.ctx, entry.search, tx.principal, conn=tx.conn)
        return EntryResult(200, search=found)
    assert entry.resource_id is not None
    resource_type, resource_id = entry.resource_type, entry.resource_id
    current = await resources.visible_current(tx.conn, resource_type, resource_id, tx.principal)
    if entry.version_id is not None:
        stored = await resources.read_version(
            tx.ctx, tx.conn, tx.principal, current, entry.version_id
        )
        return EntryResult(200, stored=stored)
    tx.ctx.audit.add(resources.audit_access("read", tx.principal, current))
    if current.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted (version {current.version_id})")
    return EntryResult(200, stored=Stored.of_current(current))
