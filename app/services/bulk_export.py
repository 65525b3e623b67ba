"""FHIR Bulk Data export (Bulk Data Access IG 2.0, the asynchronous request pattern).

A kick-off stores a job (who, what, as of which instant) and returns; `ExportRunner`, one
per worker process, takes jobs nobody works on and writes their NDJSON files into the
database as chunks, so the status and the files are served by any worker of any replica.

Consistency: the export is the trial as it stood at `transactionTime` (the kick-off). Rows
are read in key order in batches; a resource changed since then is exported as its version
at that instant (from `resource_version`), one created since is left out, one deleted since
is still exported. So every resource last updated at or before `transactionTime` appears
exactly once and nothing later does, however long the job runs and whatever is written
meanwhile.

A worker that dies: its lease (renewed with every chunk it writes) runs out and another
worker takes the job over, after the last complete file (a half-written one is deleted).
After `MAX_ATTEMPTS` dead workers the job is failed, never left "in progress".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.auth.permissions import Action
from app.auth.policy import SiteAccess, access_policy
from app.auth.principal import Principal
from app.kit.codes import CLINICAL_RESOURCE_TYPES
from app.kit.dates import utc_now
from app.kit.errors import NotFound
from app.kit.failures import is_transient
from app.services.context import ServiceContext
from app.store import exports as store
from app.store.db import Database

log = logging.getLogger("app.exports")
_T = TypeVar("_T")

# The types a Bulk export writes, in this order (all of them are in the Patient compartment:
# every record has a Patient subject, so `Patient/$export` exports the same set).
EXPORT_TYPES: tuple[str, ...] = CLINICAL_RESOURCE_TYPES
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({NDJSON, "application/ndjson", "ndjson"})
# A chunk holds whole lines, about this many bytes: what a download holds in memory.
CHUNK_BYTES = 1 << 20
# Rows read per statement.
BATCH_ROWS = 2_000
MAX_ATTEMPTS = 3
# Seconds a client is asked to wait between two status requests.
RETRY_AFTER_SECONDS = 1
# PostgreSQL: a write computes its lastUpdated a moment before its first statement reaches
# the server; the job waits this long after the kick-off, then for every transaction begun
# before that to end, so no write stamped before transactionTime commits after the job read
# past it. (SQLite needs none: the kick-off's own write transaction waits for every writer.)
SETTLE_SECONDS = 0.3
SETTLE_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class ExportSettings:
    retention: timedelta
    file_resources: int
    lease: timedelta


@dataclass(frozen=True)
class ExportRequest:
    """A kick-off as the wire layer parsed it."""

    url: str  # the full kick-off URL (the manifest's `request`)
    types: tuple[str, ...] | None  # `_type`, None when absent
    since: datetime | None  # `_since`, naive UTC


def export_types(principal: Principal, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The types to export: those asked for (each must be allowed, 403 otherwise), or every
    type the caller may export ("all supported resources within the scope of the client
    authorization", IG); 403 when that is none."""
    if requested is not None:
        for resource_type in requested:
            access_policy(principal).require(resource_type, Action.EXPORT)
        return tuple(t for t in EXPORT_TYPES if t in requested)
    allowed = [t for t in EXPORT_TYPES if access_policy(principal).allows(t, Action.EXPORT)]
    if not allowed:
        # Raises the role's or the scope's refusal, with its WWW-Authenticate challenge.
        access_policy(principal).require(EXPORT_TYPES[0], Action.EXPORT)
    return tuple(allowed)


def _audit(principal: Principal, description: str, **fields: object) -> AuditRecord:
    return AuditRecord.of(principal, "operation", description=description, **fields)


async def kick_off(
    ctx: ServiceContext, settings: ExportSettings, principal: Principal, request: ExportRequest
) -> str:
    """Store the job and return its id; a runner does the work."""
    types = export_types(principal, request.types)
    sites = access_policy(principal).visible_sites
    job_id = str(uuid.uuid4())
    async with ctx.db.write() as conn:
        # Inside the write transaction: on SQLite every earlier writer has committed.
        now = utc_now()
        await store.insert_job(
            conn,
            store.Job(
                id=job_id,
                owner=principal.sub,
                sites=orjson.dumps(sorted(sites)).decode() if sites is not None else None,
                request=request.url,
                types=",".join(types),
                since=request.since,
                transaction_time=now,
                status=store.QUEUED,
                progress=None,
                error=None,
                lease_owner=None,
                lease_expires=None,
                attempts=0,
                created=now,
                finished=None,
                expires=now + settings.retention,
            ),
        )
    ctx.audit.add(_audit(principal, f"$export kick-off {job_id}", query=request.url))
    return job_id


@dataclass(frozen=True)
class JobView:
    job: store.Job
    files: list[store.File]


async def _owned_job(ctx: ServiceContext, principal: Principal, job_id: str) -> store.Job:
    """The caller's own live job; anyone else's, an expired or a cancelled one: 404."""
    async with ctx.db.read_statement() as conn:
        job = await store.get_job(conn, job_id)
    if job is None or job.owner != principal.sub or job.expires < utc_now():
        raise NotFound(f"No export job {job_id}")
    return job


async def status(ctx: ServiceContext, principal: Principal, job_id: str) -> JobView:
    job = await _owned_job(ctx, principal, job_id)
    files: list[store.File] = []
    if job.status == store.COMPLETED:
        async with ctx.db.read_statement() as conn:
            files = await store.files(conn, job_id)
    ctx.audit.add(_audit(principal, f"$export status {job_id}: {job.status}"))
    return JobView(job, files)


async def cancel(ctx: ServiceContext, principal: Principal, job_id: str) -> None:
    """DELETE on the status URL: the job and its files go (a running worker notices at its
    next chunk and stops)."""
    await _owned_job(ctx, principal, job_id)
    async with ctx.db.write() as conn:
        deleted = await store.delete_job(conn, job_id)
    if not deleted:
        raise NotFound(f"No export job {job_id}")
    ctx.audit.add(_audit(principal, f"$export cancel {job_id}"))


def file_name(file: store.File) -> str:
    return f"{file.resource_type}-{file.number}.ndjson"


async def download(
    ctx: ServiceContext, principal: Principal, job_id: str, name: str
) -> tuple[store.File, AsyncIterator[bytes]]:
    """A complete file of the caller's completed job, as a stream of its chunks."""
    job = await _owned_job(ctx, principal, job_id)
    found = None
    if job.status == store.COMPLETED:
        async with ctx.db.read_statement() as conn:
            found = next((f for f in await store.files(conn, job_id) if file_name(f) == name), None)
    if found is None or not found.complete:
        raise NotFound(f"No file {name} in export job {job_id}")
    ctx.audit.add(
        _audit(
            principal,
            f"$export file {job_id}/{name}: {found.count} {found.resource_type} resources",
            entity_type=found.resource_type,
        )
    )
    return found, _chunks(ctx.db, found.pk)


async def _chunks(db: Database, file_pk: int) -> AsyncIterator[bytes]:
    seq = 0
    while True:
        async with db.read_statement() as conn:
            data = await store.chunk(conn, file_pk, seq)
        if data is None:
            return
        yield data
        seq += 1


# --- generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSelection:
    """What an export takes of each type: the resources as they stood at `moment` (the
    kick-off's transactionTime), changed after `since`, at `sites` (None: every site)."""

    moment: datetime
    since: datetime | None = None
    sites: frozenset[str] | None = None


async def resource_lines(
    db: Database, resource_type: str, selection: ExportSelection, after_pk: int = 0
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Batches of (key, NDJSON line) of the type's selected resources after the key
    `after_pk`. Each batch is read in one short transaction: nothing is held open while the
    caller writes."""
    moment, since = selection.moment, selection.since
    access = SiteAccess.recorded(selection.sites)
    while True:
        async with db.read() as conn:
            rows = await store.resource_batch(conn, resource_type, after_pk, access, BATCH_ROWS)
            changed = [row.id for row in rows if row.last_updated > moment]
            older = await store.versions_at(conn, resource_type, changed, moment) if changed else {}
        if not rows:
            return
        lines = []
        for row in rows:
            if row.last_updated <= moment:
                updated, content = row.last_updated, None if row.deleted else row.content
            else:
                updated, content = older.get(row.id, (row.last_updated, None))
            if content is None or (since is not None and updated <= since):
                continue
            lines.append((row.pk, content.encode() + b"\n"))
        if lines:
            yield lines
        after_pk = rows[-1].pk


class LeaseLost(Exception):
    """The job was cancelled, or another worker took it over: stop writing."""


class _DatabaseFiles:
    """Writes a job's files as chunks, renewing the lease with every chunk."""

    def __init__(self, runner: ExportRunner, job: store.Job, number: int) -> None:
        self.runner = runner
        self.job = job
        self.number = number
        self.exported = 0
        self._file_pk: int | None = None
        self._buffer: list[bytes] = []
        self._size = self._count = self._seq = 0
        self._last_pk = 0

    @property
    def is_open(self) -> bool:
        return self._file_pk is not None

    async def add(self, resource_type: str, pk: int, line: bytes, first_pk: int) -> None:
        if self._file_pk is None:
            self.number += 1
            self._file_pk = await self.runner._write(
                self.job,
                lambda conn: store.new_file(
                    conn, self.job.id, self.number, resource_type, first_pk
                ),
            )
        self._buffer.append(line)
        self._size += len(line)
        self._count += 1
        self._last_pk = pk
        self.exported += 1
        if self._size >= CHUNK_BYTES:
            await self._flush(f"{resource_type}: {self.exported:,} resources written")
        if self._count >= self.runner.settings.file_resources:
            await self.close()

    async def _flush(self, progress: str | None = None) -> None:
        if not self._buffer or self._file_pk is None:
            return
        data, file_pk, seq = b"".join(self._buffer), self._file_pk, self._seq
        self._buffer, self._size = [], 0
        self._seq += 1
        await self.runner._write(
            self.job, lambda conn: store.add_chunk(conn, file_pk, seq, data), progress
        )

    async def close(self) -> int:
        """Ends the open file (if any); returns the key its next file starts after."""
        if self._file_pk is None:
            return self._last_pk
        await self._flush()
        file_pk, last_pk, count = self._file_pk, self._last_pk, self._count
        await self.runner._write(
            self.job, lambda conn: store.close_file(conn, file_pk, last_pk, count)
        )
        self._file_pk, self._count, self._seq = None, 0, 0
        return last_pk


class ExportRunner:
    """Takes export jobs nobody works on and generates them, one at a time, in this worker."""

    def __init__(self, ctx: ServiceContext, settings: ExportSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.poll_seconds = min(5.0, settings.lease.total_seconds() / 3)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """A job was queued in this worker: look now, not at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="export-runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_pending()
            except Exception as error:
                if is_transient(error):  # an outage: one line, as the audit queue reports it
                    log.warning(
                        "export runner: database unavailable (%s: %s); retrying in %ss",
                        type(error).__name__,
                        error,
                        self.poll_seconds,
                    )
                else:
                    log.exception(
                        "export runner: a pass failed; retrying in %ss", self.poll_seconds
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()

    async def run_pending(self) -> int:
        """Delete expired jobs, fail exhausted ones, then run every job this worker can take.
        Returns the number of jobs run."""
        now = utc_now()
        async with self.ctx.db.read_statement() as conn:
            expired = await store.expired_jobs(conn, now)
            exhausted = await store.exhausted_jobs(conn, now, MAX_ATTEMPTS)
        if expired or exhausted:  # a write transaction only when there is work for one
            async with self.ctx.db.write() as conn:
                for job_id in expired:
                    await store.delete_job(conn, job_id)
                await store.fail_exhausted(
                    conn,
                    now,
                    MAX_ATTEMPTS,
                    now + self.settings.retention,
                    f"the export was attempted {MAX_ATTEMPTS} times and did not finish (its worker "
                    "stopped or failed; see the server log)",
                )
        ran = 0
        while True:
            async with self.ctx.db.read_statement() as conn:
                candidates = await store.takeable_jobs(conn, utc_now())
            job = None
            for job_id in candidates:
                job = await self._claim(job_id)
                if job is not None:
                    break
            if job is None:
                return ran
            await self.run(job)
            ran += 1

    async def _claim(self, job_id: str) -> store.Job | None:
        now = utc_now()
        async with self.ctx.db.write() as conn:
            lease = store.Lease(self.worker, now + self.settings.lease)
            taken = await store.claim(conn, job_id, lease, now, MAX_ATTEMPTS)
            return await store.get_job(conn, job_id) if taken else None

    async def _write(
        self,
        job: store.Job,
        work: Callable[[AsyncConnection], Awaitable[_T]],
        progress: str | None = None,
    ) -> _T:
        """One write transaction that first renews the job's lease: a write of a job this
        worker no longer holds (cancelled, or taken over) is never made."""
        async with self.ctx.db.write() as conn:
            lease = store.Lease(self.worker, utc_now() + self.settings.lease)
            if not await store.renew(conn, job.id, lease, progress):
                raise LeaseLost(job.id)
            try:
                return await work(conn)
            except Exception:
                # A cancel between the renewal and this write (the file's job is gone).
                if await store.get_job(conn, job.id) is None:
                    raise LeaseLost(job.id) from None
                raise

    async def run(self, job: store.Job) -> None:
        try:
            exported = await self._generate(job)
        except LeaseLost:
            log.info("export %s was cancelled or taken over; stopped", job.id)
            return
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                async with self.ctx.db.write() as conn:
                    await store.release(conn, job.id, self.worker, utc_now())
            raise
        except Exception:
            # A database outage or a bug: the attempt counts, the job goes back at once, and
            # after MAX_ATTEMPTS it is failed (`run_pending`), never left in progress.
            log.exception(
                "export %s: attempt %s failed; the job is given back", job.id, job.attempts
            )
            with contextlib.suppress(Exception):
                async with self.ctx.db.write() as conn:
                    await store.release(conn, job.id, self.worker, utc_now(), count=True)
            return
        await self._finish(job, store.COMPLETED, progress=f"complete: {exported:,} resources")

    async def _finish(
        self, job: store.Job, status: str, *, error: str | None = None, progress: str | None = None
    ) -> None:
        """The job ends; its files are kept for the retention time from now."""
        now = utc_now()
        async with self.ctx.db.write() as conn:
            outcome = store.Outcome(status, now + self.settings.retention, error, progress)
            await store.finish(conn, job.id, self.worker, now, outcome)

    async def _generate(self, job: store.Job) -> int:
        await self._settle(job.transaction_time)
        sites = frozenset(orjson.loads(job.sites)) if job.sites is not None else None
        selection = ExportSelection(job.transaction_time, job.since, sites)
        await self._write(job, lambda conn: store.delete_incomplete_files(conn, job.id))
        async with self.ctx.db.read() as conn:
            done = await store.files(conn, job.id)
        writer = _DatabaseFiles(self, job, max((f.number for f in done), default=0))
        writer.exported = sum(f.count for f in done)
        for resource_type in job.types.split(","):
            # Resume after the last complete file of the type (a fresh job: from the start).
            after = max(
                (f.last_pk or 0 for f in done if f.resource_type == resource_type), default=0
            )
            first = after
            async for lines in resource_lines(self.ctx.db, resource_type, selection, after):
                for pk, line in lines:
                    await writer.add(resource_type, pk, line, first)
                    if not writer.is_open:  # the file just closed: the next starts after it
                        first = pk
            await writer.close()
        return writer.exported

    async def _settle(self, moment: datetime) -> None:
        db = self.ctx.db
        if db.dialect != "postgresql":
            return
        barrier = moment + timedelta(seconds=SETTLE_SECONDS)
        delay = (barrier - utc_now()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)
        deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT_SECONDS
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state <> 'idle' AND xact_start < :barrier"
        )
        while asyncio.get_running_loop().time() < deadline:
            async with db.read_statement() as conn:
                busy = (
                    await conn.execute(query, {"barrier": barrier.replace(tzinfo=UTC)})
                ).scalar_one()
            if not busy:
                return
            await asyncio.sleep(0.05)
        log.warning("export: transactions begun before %s still open; exporting anyway", barrier)


class _LocalFiles:
    """NDJSON files of one type in a directory, `limit` resources each, each written under a
    temporary name and renamed once complete."""

    def __init__(self, directory: Path, resource_type: str, limit: int) -> None:
        self.directory, self.resource_type, self.limit = directory, resource_type, limit
        self.output: list[dict[str, Any]] = []
        self._number = self._count = 0
        self._handle: BinaryIO | None = None

    def _temporary(self) -> Path:
        return self.directory / f".{self.resource_type}-{self._number}.ndjson.tmp"

    def write(self, line: bytes) -> None:
        if self._handle is None:
            self._number += 1
            self._handle = self._temporary().open("wb")
        self._handle.write(line)
        self._count += 1
        if self._count >= self.limit:
            self.close()

    def close(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        name = f"{self.resource_type}-{self._number}.ndjson"
        os.replace(self._temporary(), self.directory / name)
        self.output.append({"type": self.resource_type, "url": name, "count": self._count})
        self._handle, self._count = None, 0


async def write_ndjson(
    ctx: ServiceContext,
    directory: Path,
    file_resources: int,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """`python -m app export ndjson DIR`: what a Bulk export of every type at every site
    writes, as files in `directory`, with the manifest beside them (`manifest.json`, file
    names relative to it)."""
    async with ctx.db.write() as conn:
        await conn.execute(text("SELECT 1"))  # as a kick-off: after every earlier write
        moment = utc_now()
    output: list[dict[str, Any]] = []
    for resource_type in EXPORT_TYPES:
        files = _LocalFiles(directory, resource_type, file_resources)
        async for lines in resource_lines(ctx.db, resource_type, ExportSelection(moment)):
            for _, line in lines:
                files.write(line)
            if progress is not None:
                progress(resource_type, len(lines))
        files.close()
        output += files.output
    manifest = {
        "transactionTime": moment.isoformat(timespec="microseconds") + "Z",
        "request": "python -m app export ndjson",
        "requiresAccessToken": False,
        "output": output,
        "error": [],
    }
    (directory / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest
