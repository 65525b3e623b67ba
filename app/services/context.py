"""What every use case needs, built once at start-up and passed explicitly (no globals), and
what every write of the write path is done in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditQueue
from app.auth.principal import Principal
from app.engine import Criteria
from app.kit.codes import CodeSystems
from app.kit.limits import InputLimits
from app.store import repository as repo
from app.store.db import Database


@dataclass(frozen=True)
class ServiceContext:
    db: Database
    criteria: Criteria
    codes: CodeSystems
    audit: AuditQueue
    limits: InputLimits = InputLimits()


@dataclass
class LockedPatients:
    """What a transaction of several writes has locked up front: the Patient rows, so that
    each write does not fetch and lock them again. A write of a Patient drops its entry."""

    patients: dict[str, repo.Current] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteTransaction:
    """Where a write happens: the services, the transaction the caller opened and locked
    (`services.resources`, the lock order), who writes, and the time every version it
    stores carries."""

    ctx: ServiceContext
    conn: AsyncConnection
    principal: Principal
    now: datetime
    locked: LockedPatients | None = None  # a Bundle's Patients, locked before its writes
