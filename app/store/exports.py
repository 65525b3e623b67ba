"""Core queries of the Bulk Data export: jobs, their files and chunks, and the rows a job
reads (`resource` in key order, older versions from `resource_version`).

A job is claimed, renewed and finished by compare-and-set UPDATEs on its lease, which work
alike on SQLite and PostgreSQL: two workers can never both hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.auth.policy import SiteAccess
from app.store.criteria import site_condition
from app.store.tables import (
    export_chunk_table,
    export_file_table,
    export_job_table,
    resource_table,
    version_table,
)

QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"


@dataclass
class Job:
    id: str
    owner: str
    sites: str | None
    request: str
    types: str
    since: datetime | None
    transaction_time: datetime
    status: str
    progress: str | None
    error: str | None
    lease_owner: str | None
    lease_expires: datetime | None
    attempts: int
    created: datetime
    finished: datetime | None
    expires: datetime


@dataclass
class File:
    pk: int
    job_id: str
    number: int
    resource_type: str
    first_pk: int
    last_pk: int | None
    count: int
    complete: bool


async def insert_job(conn: AsyncConnection, job: Job) -> None:
    await conn.execute(insert(export_job_table), job.__dict__)


async def get_job(conn: AsyncConnection, job_id: str) -> Job | None:
    row = (
        await conn.execute(select(export_job_table).where(export_job_table.c.id == job_id))
    ).first()
    return Job(**row._mapping) if row else None


async def delete_job(conn: AsyncConnection, job_id: str) -> bool:
    """The job, its files and their chunks (ON DELETE CASCADE)."""
    return bool(
        (
            await conn.execute(delete(export_job_table).where(export_job_table.c.id == job_id))
        ).rowcount
    )


def _held(job_id: str, worker: str) -> tuple[Any, ...]:
    """The job, while `worker` holds its lease and runs it."""
    jobs = export_job_table.c
    return jobs.id == job_id, jobs.lease_owner == worker, jobs.status == RUNNING


def _takeable(now: datetime) -> Any:
    return or_(
        export_job_table.c.status == QUEUED,
        and_(export_job_table.c.status == RUNNING, export_job_table.c.lease_expires < now),
    )


async def takeable_jobs(conn: AsyncConnection, now: datetime, limit: int = 10) -> list[str]:
    """Jobs nobody works on: queued, or running under a lease that ran out (a dead worker)."""
    rows = await conn.execute(
        select(export_job_table.c.id)
        .where(_takeable(now))
        .order_by(export_job_table.c.created)
        .limit(limit)
    )
    return [row[0] for row in rows]


@dataclass(frozen=True)
class Lease:
    """A worker's hold on a job, until it runs out (renewed with every chunk it writes)."""

    worker: str
    until: datetime


async def claim(
    conn: AsyncConnection, job_id: str, lease: Lease, now: datetime, max_attempts: int
) -> bool:
    """Take the job if nobody holds it and it has attempts left (compare-and-set)."""
    result = await conn.execute(
        update(export_job_table)
        .where(
            export_job_table.c.id == job_id,
            _takeable(now),
            export_job_table.c.attempts < max_attempts,
        )
        .values(
            status=RUNNING,
            lease_owner=lease.worker,
            lease_expires=lease.until,
            attempts=export_job_table.c.attempts + 1,
        )
    )
    return bool(result.rowcount)


async def exhausted_jobs(conn: AsyncConnection, now: datetime, max_attempts: int) -> list[str]:
    rows = await conn.execute(
        select(export_job_table.c.id)
        .where(_takeable(now), export_job_table.c.attempts >= max_attempts)
        .limit(100)
    )
    return [row[0] for row in rows]


async def fail_exhausted(
    conn: AsyncConnection, now: datetime, max_attempts: int, expires: datetime, error: str
) -> int:
    """Jobs whose workers died `max_attempts` times: failed, never left "in progress"."""
    result = await conn.execute(
        update(export_job_table)
        .where(_takeable(now), export_job_table.c.attempts >= max_attempts)
        .values(status=FAILED, error=error, finished=now, expires=expires, lease_owner=None)
    )
    return int(result.rowcount)


async def renew(
    conn: AsyncConnection, job_id: str, lease: Lease, progress: str | None = None
) -> bool:
    """Extend the worker's lease; False when the job was cancelled or another worker holds
    it."""
    values: dict[str, Any] = {"lease_expires": lease.until}
    if progress is not None:
        values["progress"] = progress[:100]
    result = await conn.execute(
        update(export_job_table).where(*_held(job_id, lease.worker)).values(**values)
    )
    return bool(result.rowcount)


async def release(
    conn: AsyncConnection, job_id: str, worker: str, now: datetime, *, count: bool = False
) -> None:
    """Give the job back at once: a worker that stops (the attempt does not count) or one
    whose attempt failed (`count`)."""
    await conn.execute(
        update(export_job_table)
        .where(*_held(job_id, worker))
        .values(
            lease_expires=now,
            attempts=export_job_table.c.attempts if count else export_job_table.c.attempts - 1,
        )
    )


@dataclass(frozen=True)
class Outcome:
    """How a job ends: its status, when its files expire, and what it says about itself."""

    status: str
    expires: datetime
    error: str | None = None
    progress: str | None = None


async def finish(
    conn: AsyncConnection, job_id: str, worker: str, now: datetime, outcome: Outcome
) -> bool:
    result = await conn.execute(
        update(export_job_table)
        .where(*_held(job_id, worker))
        .values(**asdict(outcome), finished=now, lease_owner=None, lease_expires=None)
    )
    return bool(result.rowcount)


async def expired_jobs(conn: AsyncConnection, now: datetime, limit: int = 100) -> list[str]:
    rows = await conn.execute(
        select(export_job_table.c.id).where(export_job_table.c.expires < now).limit(limit)
    )
    return [row[0] for row in rows]


async def files(conn: AsyncConnection, job_id: str) -> list[File]:
    rows = await conn.execute(
        select(export_file_table)
        .where(export_file_table.c.job_id == job_id)
        .order_by(export_file_table.c.number)
    )
    return [File(**row._mapping) for row in rows]


async def delete_incomplete_files(conn: AsyncConnection, job_id: str) -> None:
    """What a dead worker left half-written; the job resumes after its last complete file."""
    await conn.execute(
        delete(export_file_table).where(
            export_file_table.c.job_id == job_id, not_(export_file_table.c.complete)
        )
    )


async def new_file(
    conn: AsyncConnection, job_id: str, number: int, resource_type: str, first_pk: int
) -> int:
    result = await conn.execute(
        insert(export_file_table).returning(export_file_table.c.pk),
        {
            "job_id": job_id,
            "number": number,
            "resource_type": resource_type,
            "first_pk": first_pk,
            "last_pk": None,
            "count": 0,
            "complete": False,
        },
    )
    return int(result.scalar_one())


async def add_chunk(conn: AsyncConnection, file_pk: int, seq: int, data: bytes) -> None:
    await conn.execute(insert(export_chunk_table), {"file_pk": file_pk, "seq": seq, "data": data})


async def close_file(conn: AsyncConnection, file_pk: int, last_pk: int, count: int) -> None:
    await conn.execute(
        update(export_file_table)
        .where(export_file_table.c.pk == file_pk)
        .values(last_pk=last_pk, count=count, complete=True)
    )


async def chunk(conn: AsyncConnection, file_pk: int, seq: int) -> bytes | None:
    row = (
        await conn.execute(
            select(export_chunk_table.c.data).where(
                export_chunk_table.c.file_pk == file_pk, export_chunk_table.c.seq == seq
            )
        )
    ).first()
    return bytes(row[0]) if row else None


@dataclass
class ExportRow:
    pk: int
    id: str
    last_updated: datetime
    deleted: bool
    content: str | None


async def resource_batch(
    conn: AsyncConnection,
    resource_type: str,
    after_pk: int,
    access: SiteAccess,
    limit: int,
) -> list[ExportRow]:
    """The next `limit` current rows of the type after `after_pk`, in key order (an index
    range scan of ix_resource_type_pk), that `access` sees."""
    query = select(
        resource_table.c.pk,
        resource_table.c.id,
        resource_table.c.last_updated,
        resource_table.c.deleted,
        resource_table.c.content,
    ).where(
        resource_table.c.resource_type == resource_type,
        resource_table.c.pk > after_pk,
        *site_condition(resource_table.c.site, access),
    )
    rows = await conn.execute(query.order_by(resource_table.c.pk).limit(limit))
    return [ExportRow(*row) for row in rows]


async def versions_at(
    conn: AsyncConnection, resource_type: str, ids: Sequence[str], moment: datetime
) -> dict[str, tuple[datetime, str | None]]:
    """For resources changed after `moment`: each one's version as it stood at `moment`
    (its last_updated and content; content None for a deletion). Ids without a version
    by then (created later) are absent."""
    latest = (
        select(version_table.c.id, func.max(version_table.c.version_id).label("version_id"))
        .where(
            version_table.c.resource_type == resource_type,
            version_table.c.id.in_(ids),
            version_table.c.last_updated <= moment,
        )
        .group_by(version_table.c.id)
        .subquery()
    )
    rows = await conn.execute(
        select(version_table.c.id, version_table.c.last_updated, version_table.c.content).join(
            latest,
            and_(
                version_table.c.resource_type == resource_type,
                version_table.c.id == latest.c.id,
                version_table.c.version_id == latest.c.version_id,
            ),
        )
    )
    return {ident: (updated, content) for ident, updated, content in rows}
