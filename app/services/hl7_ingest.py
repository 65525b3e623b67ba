"""Receive one HL7 v2 ORU^R01 of lab results: one transaction, one ACK.

Per message: read (python-hl7) -> check the header and structure (AR) -> in one write
transaction: find an earlier delivery of the same MSH-10 (its ACK is the answer) -> find
each PID's Patient -> turn each platelet OBX into an Observation (AE on anything wrong, with
every problem found) -> lock -> create, or update with a Provenance -> recompute each
patient once -> remember the message and its ACK -> audit. Any AE or AR rolls the whole
transaction back: a bad OBX 3 leaves nothing of OBX 1 and 2.

What a result does to the Observation that already has its identifiers (filler order
number and OBX set id), by OBX-11:

| stored \\ received | P                   | F                     | C                      |
|-------------------|---------------------|-----------------------|------------------------|
| nothing           | create, preliminary | create, final         | AE: nothing to correct |
| preliminary       | update if changed   | update, final         | update, corrected      |
| final, corrected  | ignored (late)      | none if same, else AE | update, corrected (*)  |

(*) none when it is already corrected and the same.

"Same" means the same count, unit and clinical time; a correction's reason is the NTE after
its OBX (else after its OBR, else "corrected result from lab").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.audit.trail import append as append_audit
from app.auth.permissions import Action
from app.auth.policy import access_policy
from app.auth.principal import Principal
from app.hl7 import hl7v2
from app.hl7 import observations as mapping
from app.hl7.hl7v2 import AckCode, Location, Problem, Rejected, Result
from app.kit import codes
from app.kit.dates import utc_now
from app.kit.errors import BadRequest, FhirError, Forbidden, NotFound
from app.services import resources, subjects
from app.services.context import ServiceContext, WriteTransaction
from app.services.resources import CreateCommand, UpdateCommand
from app.store import hl7_messages
from app.store import repository as repo
from app.store.criteria import SearchFilter, TokenMatch
from app.store.hl7_messages import MessageKey

DEFAULT_CORRECTION_REASON = "corrected result from lab"


@dataclass(frozen=True)
class Reply:
    ack: str
    code: AckCode
    replayed: bool = False  # the ACK of an earlier delivery of the same message


@dataclass(frozen=True)
class _Delivery:
    """One delivery of a message: as read (python-hl7), as parsed, and the key that names
    the message across deliveries."""

    message: Any
    oru: hl7v2.OruMessage
    key: MessageKey


@dataclass
class _Planned:
    result: Result
    patient_id: str
    document: dict[str, Any]
    key: tuple[str, str]  # the result identifier's (system, value)
    source: str  # the message, for the audit trail and a correction's Provenance

    @property
    def order(self) -> str:
        return f"order {self.result.order.filler_number!r} OBX-1 {self.result.set_id!r}"

    @property
    def description(self) -> str:
        return f"{self.source}, {self.order}"


@dataclass
class _Tally:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0  # OBX that are not platelet counts, or carry no result
    records: list[AuditRecord] = field(default_factory=list)
    changes: list[resources.Change] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.skipped} OBX not stored (not a platelet count, or no result)"
        )


async def receive(
    ctx: ServiceContext,
    body: bytes,
    principal: Principal,
    *,
    charset: str | None = None,
    local_codes: Mapping[str, str] | None = None,
) -> Reply:
    """The ACK of one message. A body that is not HL7 at all has no MSH to answer: 400; one
    that starts with MSH gets an ACK, an AR when even its MSH cannot be read."""
    try:
        message = hl7v2.read(body, charset)
    except hl7v2.Unreadable as exc:
        raise BadRequest(str(exc)) from None
    except hl7v2.Garbled as garbled:
        stand_in, garbled_reply = hl7v2.garbled_ack(garbled)
        problem = hl7v2.Problem("102", str(garbled))
        ctx.audit.add(_record(principal, stand_in, "AR", _refusal([problem])))
        return Reply(garbled_reply, "AR")
    try:
        oru = hl7v2.parse_oru(message)
        key = MessageKey(
            principal.sub,
            oru.header.sending_application,
            oru.header.sending_facility,
            oru.header.control_id,
        )
        try:
            reply = await _store(ctx, _Delivery(message, oru, key), principal, local_codes or {})
        except IntegrityError:
            # The unique key refused a second row for this message: a concurrent delivery
            # committed first. Its ACK is the answer; this transaction left nothing.
            earlier = await _earlier_reply(ctx, key, oru.content_hash)
            if earlier is None:
                raise
            reply = earlier
    except Rejected as rejected:
        refusal = _refusal(rejected.problems)
        ctx.audit.add(_record(principal, message, rejected.ack_code, refusal))
        return Reply(hl7v2.ack(message, rejected.ack_code, rejected.problems), rejected.ack_code)
    if reply.replayed:
        ctx.audit.add(_record(principal, message, reply.code, _REDELIVERY))
    return reply


async def serialise_deliveries(conn: AsyncConnection, key: MessageKey) -> None:
    """Deliveries of one message wait for each other (PostgreSQL; SQLite writers are serial).
    The table's unique key would catch a race anyway; this keeps it from costing a retry."""
    await repo.lock(conn, key.lock_key())


async def _store(
    ctx: ServiceContext,
    delivery: _Delivery,
    principal: Principal,
    local_codes: Mapping[str, str],
) -> Reply:
    message, oru, key = delivery.message, delivery.oru, delivery.key
    async with ctx.db.write() as conn:
        await serialise_deliveries(conn, key)
        earlier = await hl7_messages.find(conn, key)
        if earlier is not None:
            return _replay(earlier, oru)
        patients = await _patients(ctx, conn, oru, principal)
        tally = _Tally()
        planned = _plan(ctx, oru, patients, local_codes, tally)
        stored = await _lock_results(conn, planned, patients, principal)
        tx = WriteTransaction(ctx, conn, principal, utc_now())
        for item in planned:
            await _apply(tx, item, stored[item.key], tally)
        await resources.recompute_changes(tx, tally.changes)
        reply = Reply(hl7v2.ack(message, "AA"), "AA")
        await hl7_messages.remember(conn, key, tx.now, oru.content_hash, reply.ack)
        summary = f", {tally.summary()}"
        tally.records.append(_record(principal, message, "AA", summary, now=tx.now))
        await append_audit(conn, tally.records)
    return reply


async def _lock_results(
    conn: AsyncConnection,
    planned: list[_Planned],
    patients: dict[int, str],
    principal: Principal,
) -> dict[tuple[str, str], repo.Current | None]:
    """The stored Observation of each result (None: none yet), locked in the lock order of
    a single write. Two messages about one result (a preliminary and its final, sent at
    once) are serialised on the result, so the second finds what the first stored."""
    for system, value in sorted({item.key for item in planned}):
        await repo.lock(conn, f"hl7-result:{system}|{value}")
    found = {item.key: await _stored_result(conn, item, principal) for item in planned}
    locked = await resources.lock_for_writes(
        conn,
        "Observation",
        [current.id for current in found.values() if current is not None],
        patients.values(),
    )
    return {
        key: locked.get(current.id) if current is not None else None
        for key, current in found.items()
    }


def _replay(earlier: hl7_messages.ReceivedMessage, oru: hl7v2.OruMessage) -> Reply:
    if earlier.content_hash != oru.content_hash:
        raise Rejected.one(
            "AR",
            "205",
            f"MSH-10 {oru.header.control_id!r} was already used on "
            f"{earlier.received:%Y-%m-%d %H:%M} UTC for a different message; "
            "a new message needs a new control id",
            Location("MSH", 1, 10),
        )
    return Reply(earlier.ack, "AA", replayed=True)


async def _earlier_reply(ctx: ServiceContext, key: MessageKey, content_hash: str) -> Reply | None:
    async with ctx.db.read() as conn:
        earlier = await hl7_messages.find(conn, key)
    if earlier is None or earlier.content_hash != content_hash:
        return None
    return Reply(earlier.ack, "AA", replayed=True)


def _subject_systems(code_systems: codes.CodeSystems) -> list[str]:
    # Clients that use the default base must keep working under an override (codes.py).
    return sorted(
        {
            code_systems.subject,
            codes.DEFAULT_CODE_SYSTEM_BASE + codes.SUBJECT_IDENTIFIER_SYSTEM_PATH,
        }
    )


async def _patients(
    ctx: ServiceContext, conn: AsyncConnection, oru: hl7v2.OruMessage, principal: Principal
) -> dict[int, str]:
    """Each PID's Patient id (by the PID's position). PID-3 holds the trial subject number
    (`.../sid/subject`), or an identifier whose assigning authority is an ISO OID
    (`urn:oid:...`). Patients at sites the caller does not hold are unknown to it."""
    found: dict[int, str] = {}
    problems = []
    for group in oru.patients:
        where = group.location.at(3)
        if not group.identifiers:
            problems.append(Problem("101", f"{where} (patient identifier) is required", where))
            continue
        for identifier in group.identifiers:
            if identifier.authority_oid:
                systems, number = [f"urn:oid:{identifier.authority_oid}"], identifier.value
            else:  # stored normalised: a look-alike finds its patient (services/subjects.py)
                systems, number = (
                    _subject_systems(ctx.codes),
                    subjects.comparison_key(identifier.value),
                )
            criteria = SearchFilter(
                "Patient",
                tokens=[[TokenMatch("identifier", system, number) for system in systems]],
                access=access_policy(principal).sites,
            )
            matches = await repo.first_matches(conn, criteria, limit=2)
            if len(matches) > 1:
                problems.append(
                    Problem("205", f"{where} {identifier.value!r} names several patients", where)
                )
                break
            if matches:
                found[group.location.sequence] = matches[0].id
                break
        else:
            shown = ", ".join(repr(i.value) for i in group.identifiers)
            problems.append(
                Problem(
                    "204",
                    f"Unknown patient: no trial subject {shown} ({where}) at your sites; "
                    "nothing was stored",
                    where,
                )
            )
    if problems:
        raise Rejected("AE", problems)
    return found


def _plan(
    ctx: ServiceContext,
    oru: hl7v2.OruMessage,
    patients: dict[int, str],
    local_codes: Mapping[str, str],
    tally: _Tally,
) -> list[_Planned]:
    """The Observation each platelet OBX becomes; every problem of every OBX at once."""
    planned: list[_Planned] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, str], Result] = {}
    source = f"HL7 v2 ORU^R01 {oru.header.control_id} from {oru.header.sending_application}"
    context = mapping.MessageContext(oru.header, ctx.criteria.zone, ctx.codes, ctx.limits)
    for result in oru.results:
        loinc = mapping.platelet_loinc(result, local_codes)
        if loinc is None or result.status in mapping.NO_RESULT_STATUSES:
            tally.skipped += 1
            continue
        patient_id = patients[result.patient.location.sequence]
        try:
            document = _observation(context, result, patient_id, loinc)
        except Rejected as rejected:
            problems.extend(rejected.problems)
            continue
        key = mapping.result_key(result, ctx.codes)
        if key in seen:
            problems.append(_repeated(result, seen[key]))
            continue
        seen[key] = result
        planned.append(_Planned(result, patient_id, document, key, source))
    if problems:
        raise Rejected("AE", problems)
    return planned


def _observation(
    context: mapping.MessageContext, result: Result, patient_id: str, loinc: str
) -> dict[str, Any]:
    """The Observation of one platelet OBX; AE on a status the trial does not receive."""
    status = mapping.RESULT_STATUS.get(result.status)
    if not result.status:
        raise Rejected.one(
            "AE", "101", "OBX-11 (result status) is required", result.location.at(11)
        )
    if status is None:
        raise Rejected.one(
            "AE",
            "103",
            f"OBX-11 {result.status!r}: results are received as F (final), "
            "C (correction) or P (preliminary)",
            result.location.at(11),
        )
    mapping.check_keys(result)
    return mapping.observation(result, context, patient_id=patient_id, loinc=loinc, status=status)


def _repeated(result: Result, earlier: Result) -> Problem:
    return Problem(
        "205",
        f"{result.location} repeats order {result.order.filler_number!r} OBX-1 "
        f"{result.set_id!r} of {earlier.location}: one result, one OBX",
        result.location.at(1),
    )


async def _stored_result(
    conn: AsyncConnection, item: _Planned, principal: Principal
) -> repo.Current | None:
    system, value = item.key
    criteria = SearchFilter(
        "Observation",
        tokens=[[TokenMatch("identifier", system, value)]],
        access=access_policy(principal).sites,
    )
    matches = await repo.first_matches(conn, criteria, limit=2)
    if len(matches) > 1:
        raise Rejected.one(
            "AE",
            "205",
            f"{item.result.location}: several stored Observations carry identifier "
            f"{system}|{value}; ask the trial's data manager to resolve the duplicate",
            item.result.location,
        )
    return matches[0] if matches else None


# What makes two deliveries the same result: the count, its unit and its clinical time (a
# comment or a reference range that changed does not make a final result a new one).
_RESULT_ELEMENTS = ("subject", "code", "effectiveDateTime", "valueQuantity")


def _comparable(document: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(orjson.dumps(document))
    return {key: loaded.get(key) for key in _RESULT_ELEMENTS}


async def _apply(
    tx: WriteTransaction, item: _Planned, current: repo.Current | None, tally: _Tally
) -> None:
    """Create, update or leave the result's Observation (the table in the module doc)."""
    if current is None:
        if item.document["status"] == "corrected":
            raise Rejected.one(
                "AE",
                "204",
                f"A correction of {item.order}, which was never received: send the original "
                "result first (OBX-11 F), or this one as F",
                item.result.location.at(11),
            )
        await _write(tx, item, None, tally, None)
        return
    reason = _update_reason(item, _stored_document(item, current))
    if reason is None:
        tally.unchanged += 1
        return
    await _write(tx, item, current, tally, reason)


def _stored_document(item: _Planned, current: repo.Current) -> dict[str, Any]:
    """The Observation stored for the result, when this message may change it."""
    if current.patient_id != item.patient_id:
        raise Rejected.one(
            "AE",
            "205",
            f"The result of {item.order} is stored for another patient; "
            "a result cannot move between patients over HL7",
            item.result.location,
        )
    if current.deleted or current.content is None:
        raise Rejected.one(
            "AE",
            "205",
            f"The result of {item.order} was deleted at the trial site while this message "
            "was being stored; ask the site before sending it again",
            item.result.location,
        )
    stored: dict[str, Any] = orjson.loads(current.content)
    return stored


def _update_reason(item: _Planned, stored: dict[str, Any]) -> str | None:
    """Why the received result changes the stored one; None when it does not."""
    result, received = item.result, item.document["status"]
    same = _comparable(stored) == _comparable(item.document)
    status = stored.get("status")
    if received == "preliminary":
        changed = status == "preliminary" and not same
        return "updated preliminary result from lab" if changed else None
    if received == "final":
        if status == "preliminary":
            return "final result from lab replaces the preliminary one"
        if not same:
            raise Rejected.one(
                "AE",
                "205",
                f"The result of {item.order} is already final with another count, unit or "
                "time; a change to a final result is sent as a correction (OBX-11 C) with an "
                "NTE saying why",
                result.location.at(11),
            )
        return None
    if same and status == "corrected":
        return None
    return "; ".join(result.notes or result.order.notes) or DEFAULT_CORRECTION_REASON


async def _write(
    tx: WriteTransaction,
    item: _Planned,
    current: repo.Current | None,
    tally: _Tally,
    reason: str | None,
) -> None:
    try:
        if current is None:
            create = CreateCommand("Observation", item.document, description=item.description)
            change = await resources.create_in(tx, create)
            tally.created += 1
        else:
            # A correction is an update: the token must allow updates, not only HL7 ingestion.
            access_policy(tx.principal).require("Observation", Action.UPDATE)
            provenance = {
                "resourceType": "Provenance",
                "reason": [{"text": reason}],
                "entity": [{"role": "source", "what": {"display": item.description}}],
            }
            update = UpdateCommand(
                "Observation",
                current.id,
                {**item.document, "id": current.id},
                provenance=orjson.dumps(provenance).decode(),
                description=item.description,
            )
            change = await resources.update_in(tx, update, current)
            tally.updated += 1
    except FhirError as exc:
        code = "207" if isinstance(exc, Forbidden | NotFound) else "102"
        raise Rejected.one(
            "AE", code, f"{item.result.location}: {exc.diagnostics}", item.result.location
        ) from None
    assert change.record is not None
    tally.records.append(change.record)
    tally.changes.append(change)


_REDELIVERY = ", a redelivery: the first ACK was returned and nothing stored"


def _refusal(problems: list[Problem]) -> str:
    """What an AE or AR found, for the message's audit record."""
    return ": " + "; ".join(problem.text for problem in problems) if problems else ""


def _record(
    principal: Principal,
    message: Any,
    code: AckCode,
    detail: str,
    *,
    now: datetime | None = None,
) -> AuditRecord:
    """The audit record of the message itself (each write has its own as well): the
    message, its ACK code, and `detail`, what came of it (the tally, a redelivery, the
    problems)."""
    msh = message[0]
    control_id = hl7v2.field_text(msh, 10)
    sender = hl7v2.field_text(msh, 3)
    text = f"HL7 v2 {hl7v2.field_text(msh, 9)} {control_id!r} from {sender!r}: {code}{detail}"
    extra = {"recorded": now} if now is not None else {}
    return AuditRecord.of(
        principal,
        "operation",
        outcome="0" if code == "AA" else "4",
        description=text[:1000],
        **extra,
    )
