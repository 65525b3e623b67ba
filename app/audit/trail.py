"""Append AuditEvents to the `audit_event` table.

Writes are audited inside the write's own transaction (no write without its record).
Reads, searches and refusals go through `AuditQueue`: batched off the request path and
flushed at least once a second and at shutdown, so reading stays fast.

A record is inserted unchained, with its digest; the hash chain is built after commit by
the sequencer and verified there (`app.audit.chain`), so no write waits for another's commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.chain import record_digest
from app.auth.principal import Principal
from app.kit.background import Periodic
from app.kit.dates import format_instant, utc_now
from app.kit.errors import ServiceUnavailable, fhir_string
from app.kit.failures import is_transient
from app.kit.request_context import current_request
from app.store.db import Database
from app.store.tables import audit_table as AE
from app.store.tables import disclosure_table

log = logging.getLogger("app.audit")

_ENTITY_TYPE = re.compile(r"[A-Za-z]{1,40}")
_ENTITY_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_INTERACTION_ACTION = {
    "create": "C",
    "update": "U",
    "delete": "D",
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "history-type": "R",
    "search-type": "E",
    "operation": "E",
    "login": "E",
}


@dataclass
class AuditRecord:
    interaction: str  # FHIR restful-interaction code, or "login" / "operation"
    outcome: str = "0"  # 0 success, 4 minor failure (refused), 8 serious failure
    description: str | None = None
    agent: str | None = None
    role: str | None = None
    site: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    version_before: int | None = None
    version_after: int | None = None
    query: str | None = None
    reason: str | None = None
    recorded: datetime = field(default_factory=utc_now)
    request_id: str | None = None
    client_address: str | None = None
    # What a search showed the caller: (type, id, version) of each match and included resource.
    disclosed: tuple[tuple[str, str, int], ...] = ()
    # Given at creation, so a retried append can tell whether an earlier attempt stored it.
    audit_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        # Columns are bounded; a token's `sub` of any length must not make a record unstorable.
        self.agent = self.agent[:255] if self.agent else self.agent
        # A refusal names what the request's path named, which may be no type or id at all
        # (`/fhir/Patient/<300 characters>`): kept only when the columns can hold it, or
        # PostgreSQL would refuse the record that SQLite stores.
        if self.entity_type is not None and not _ENTITY_TYPE.fullmatch(self.entity_type):
            self.entity_type = self.entity_id = None
        if self.entity_id is not None and not _ENTITY_ID.fullmatch(self.entity_id):
            self.entity_id = None
        # outcomeDesc is a FHIR string: a refusal that quotes the request stays one.
        if self.description is not None:
            self.description = fhir_string(self.description)
        context = current_request.get()
        if context is not None:
            self.request_id = self.request_id or context.request_id
            self.client_address = self.client_address or context.client_address

    @classmethod
    def of(cls, principal: Principal, interaction: str, **fields: Any) -> AuditRecord:
        """A record of what `principal` did: who and in which role, from the token."""
        return cls(interaction, agent=principal.sub, role=principal.role, **fields)

    @property
    def action(self) -> str:
        return _INTERACTION_ACTION.get(self.interaction, "E")


def _detail(kind: str, value: object) -> dict[str, Any]:
    return {"type": kind, "valueString": str(value)}


def _agent(record: AuditRecord) -> dict[str, Any]:
    """AuditEvent.agent: who acted, in which role, from where."""
    agent: dict[str, Any] = {"requestor": True}
    if record.agent:
        agent["who"] = {"identifier": {"value": record.agent}}
    if record.role:
        agent["role"] = [{"text": record.role}]
    if record.client_address:
        agent["network"] = {"address": record.client_address, "type": "2"}
    return agent


def _entity(record: AuditRecord) -> dict[str, Any]:
    """AuditEvent.entity of what the interaction was about (empty when nothing is said)."""
    entity: dict[str, Any] = {}
    if record.entity_type:
        reference = record.entity_type
        if record.entity_id:
            reference += f"/{record.entity_id}"
            if record.version_after is not None:
                reference += f"/_history/{record.version_after}"
        entity["what"] = {"reference": reference}
    details = [
        _detail(kind, value)
        for kind, value in (
            ("version-before", record.version_before),
            ("version-after", record.version_after),
            ("site", record.site),
            ("request-id", record.request_id),
            ("reason", record.reason),
        )
        if value is not None
    ]
    if record.query:
        entity["query"] = record.query
    if details:
        entity["detail"] = details
    return entity


def to_fhir(record: AuditRecord, audit_id: str) -> dict[str, Any]:
    """The record as a FHIR R4B AuditEvent."""
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": audit_id,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [
            {"system": "http://hl7.org/fhir/restful-interaction", "code": record.interaction}
        ],
        "action": record.action,
        "recorded": format_instant(record.recorded),
        "outcome": record.outcome,
        "agent": [_agent(record)],
        "source": {"observer": {"display": "itp-trial-api"}},
    }
    if record.description:
        event["outcomeDesc"] = record.description
    entity = _entity(record)
    entities = [entity] if entity else []
    entities.extend(
        {"what": {"reference": f"{kind}/{ident}/_history/{version}"}, "role": _RESULT_ROLE}
        for kind, ident, version in record.disclosed
    )
    if entities:
        event["entity"] = entities
    return event


# AuditEvent.entity.role of a resource a search returned: object-role 4, "Domain Resource".
_RESULT_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "4",
    "display": "Domain Resource",
}


async def append(conn: AsyncConnection, records: Sequence[AuditRecord]) -> None:
    """Append records in the caller's transaction (commits or rolls back with it).

    Unchained: no lock and no read of the chain's head, so concurrent writes do not wait for
    each other's commit here; the sequencer links them after it (`app.audit.chain`)."""
    if not records:
        return
    appended = utc_now()
    rows = []
    for record in records:
        content = orjson.dumps(to_fhir(record, record.audit_id)).decode()
        rows.append(
            {
                "id": record.audit_id,
                "recorded": record.recorded,
                "action": record.action,
                "outcome": record.outcome,
                "agent": record.agent,
                "site": record.site,
                "entity_type": record.entity_type,
                "entity_id": record.entity_id,
                "content": content,
                "digest": record_digest(record.audit_id, content),
                "appended": appended,
            }
        )
    # One INSERT executed once per row (an executemany: asyncpg pipelines the executions in
    # one round trip, sqlite3 runs them one after the other), so the records of one call take
    # consecutive `seq` values in their order, which is the order the sequencer chains them.
    await conn.execute(_INSERT_RECORD, rows)
    disclosures = [
        {"audit_id": record.audit_id, "entity_type": kind, "entity_id": ident, "version": version}
        for record in records
        for kind, ident, version in record.disclosed
    ]
    if disclosures:
        await conn.execute(_INSERT_DISCLOSURE, disclosures)


_INSERT_RECORD = insert(AE)
_INSERT_DISCLOSURE = insert(disclosure_table)


class AuditQueue:
    """Reads, searches and refusals, written in batches off the request path.

    No record is lost to a database outage: a batch the database could not take for a
    transient reason (`kit.failures`) stays at the head of the queue, in order, and is
    retried every `interval` until the database is back. At shutdown what is still queued
    is spilled to a file in `spill_dir`, which the next start replays before serving
    (`replay`). A record keeps its id from creation on, so a batch whose commit outcome was
    unknown is never stored twice: its retry skips the ids already in the trail.

    The queue holds at most `max_records`. When it is full a read is refused with 503
    rather than served unaudited (`add` raises); a refusal that cannot be queued then is
    counted, and one record saying how many were refused, and when, is queued as soon as
    there is room."""

    def __init__(
        self,
        db: Database,
        interval_seconds: float = 1.0,
        *,
        max_records: int = 100_000,
        spill_dir: Path | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.db = db
        self.interval = interval_seconds
        self.max_records = max_records
        self.spill_dir = spill_dir
        self.batch_size = batch_size
        self._pending: list[AuditRecord] = []
        self._loop = Periodic(
            "audit-flush", interval_seconds, self._flush_and_report, self._note_failure
        )
        self._flushing = asyncio.Lock()
        # Set after an attempt that failed: its batch may have been committed after all.
        self._uncertain = False
        self._failing_since: datetime | None = None
        # Refusals that found the queue full: how many, the first and the last time.
        self._refused_count = 0
        self._refused_span: tuple[datetime, datetime] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_records

    def add(self, record: AuditRecord) -> None:
        if self.full:
            if record.outcome == "0":
                raise ServiceUnavailable(
                    "The audit trail cannot keep up (its queue is full while the database is "
                    "unavailable): the request was not served; retry later"
                )
            self._refused_count += 1
            first = self._refused_span[0] if self._refused_span else record.recorded
            self._refused_span = (first, record.recorded)
            return
        self._pending.append(record)

    def _queue_refusal_summary(self, *, even_if_full: bool = False) -> None:
        if self._refused_span is None or (self.full and not even_if_full):
            return
        first, last = self._refused_span
        self._pending.append(
            AuditRecord(
                "operation",
                outcome="8",
                description=(
                    f"503: {self._refused_count} requests refused between "
                    f"{format_instant(first)} and {format_instant(last)} while the audit "
                    "queue was full; their own records could not be kept"
                ),
            )
        )
        self._refused_count, self._refused_span = 0, None

    async def flush(self) -> None:
        """Write everything queued, oldest first. On a transient database error it raises,
        and what was not written stays queued, in order."""
        async with self._flushing:
            self._queue_refusal_summary()
            while self._pending:
                batch = self._pending[: self.batch_size]
                try:
                    await self._append(batch)
                except BaseException as error:  # cancelled too: the batch stays queued
                    self._uncertain = True
                    if not isinstance(error, Exception) or is_transient(error):
                        raise
                    await self._append_one_by_one(batch)
                else:
                    del self._pending[: len(batch)]
                    self._uncertain = False
                self._queue_refusal_summary()

    async def _append(self, batch: list[AuditRecord]) -> None:
        async with self.db.write() as conn:
            if self._uncertain:  # a retry: what the failed attempt committed is skipped
                batch = await _not_yet_stored(conn, batch)
            await append(conn, batch)

    async def _append_one_by_one(self, batch: list[AuditRecord]) -> None:
        """After a batch the database refused for good: a record it refuses must not block
        the others for ever. It goes to the error log in full; a transient error leaves the
        rest queued. `batch` is the head of the queue; each record leaves it once handled."""
        for record in batch:
            try:
                await self._append([record])
            except Exception as error:
                if is_transient(error):
                    raise
                log.exception(
                    "audit record refused by the database, logged instead: %s",
                    orjson.dumps(to_fhir(record, record.audit_id)).decode(),
                )
            del self._pending[0]

    async def _flush_and_report(self) -> None:
        await self.flush()
        if self._failing_since is not None:
            log.warning(
                "audit trail reachable again; the records queued since %s are written",
                format_instant(self._failing_since),
            )
            self._failing_since = None

    def _note_failure(self, error: Exception) -> None:
        if not is_transient(error):
            log.exception("audit flush failed; retrying in %ss", self.interval)
        elif self._failing_since is None:  # once per outage, not once a second
            self._failing_since = utc_now()
            log.warning(
                "audit trail unreachable (%s: %s); %d records kept in order, retried every %ss",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                len(self._pending),
                self.interval,
            )

    def start(self) -> None:
        self._loop.start()

    async def stop(self, timeout_seconds: float = 10.0) -> None:
        """Write what is queued; what the database cannot take now goes to the spill file."""
        await self._loop.stop()
        try:
            await asyncio.wait_for(self.flush(), timeout_seconds)
        except Exception as error:  # a timeout counts as transient too
            if self.spill_dir is None or not is_transient(error):
                raise
            self._queue_refusal_summary(even_if_full=True)
            path = spill(self.spill_dir, self._pending)
            log.warning(
                "database unavailable at shutdown: %d audit records spilled to %s; the next "
                "start writes them before serving",
                len(self._pending),
                path,
            )
            self._pending = []

    async def replay(self) -> int:
        """Write the records earlier runs spilled, before anything new; returns how many.
        One process at a time replays (a lock file): workers starting together do not
        write a spill file twice. A file is removed once its records are in the trail."""
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return 0
        with _spill_lock(self.spill_dir):
            files = sorted(self.spill_dir.glob(f"*{SPILL_SUFFIX}"))
            records = [record for path in files for record in read_spill(path)]
            if not records:
                return 0
            self._pending[:0] = records
            self._uncertain = True  # a spilled batch may have been committed before the spill
            await self.flush()
            for path in files:
                path.unlink()
        log.warning("%d audit records spilled by an earlier run written to the trail", len(records))
        return len(records)


async def _not_yet_stored(conn: AsyncConnection, batch: list[AuditRecord]) -> list[AuditRecord]:
    ids = [record.audit_id for record in batch]
    stored = set((await conn.execute(select(AE.c.id).where(AE.c.id.in_(ids)))).scalars())
    return [record for record in batch if record.audit_id not in stored]


SPILL_SUFFIX = ".jsonl"


def spill(directory: Path, records: Sequence[AuditRecord]) -> Path:
    """Write `records` (in order) to a new file of `directory`, atomically, and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"audit-{time.time_ns():020d}-{os.getpid()}{SPILL_SUFFIX}"
    path = directory / name
    partial = directory / f".{name}.partial"
    with partial.open("wb") as file:
        for record in records:
            file.write(orjson.dumps(dataclasses.asdict(record)) + b"\n")
        file.flush()
        os.fsync(file.fileno())
    partial.rename(path)  # a crash mid-write leaves no half file to replay
    return path


def read_spill(path: Path) -> list[AuditRecord]:
    records = []
    for line in path.read_bytes().splitlines():
        fields = orjson.loads(line)
        fields["recorded"] = datetime.fromisoformat(fields["recorded"])
        fields["disclosed"] = tuple(tuple(item) for item in fields["disclosed"])
        records.append(AuditRecord(**fields))
    return records


@contextlib.contextmanager
def _spill_lock(directory: Path) -> Iterator[None]:
    with (directory / ".replay.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
