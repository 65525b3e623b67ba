"""What every use case needs, built once at start-up and passed explicitly (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

from app.audit.trail import AuditQueue
from app.engine import Criteria
from app.kit.codes import CodeSystems
from app.kit.limits import InputLimits
from app.store.db import Database


@dataclass(frozen=True)
class ServiceContext:
    db: Database
    criteria: Criteria
    codes: CodeSystems
    audit: AuditQueue
    limits: InputLimits = InputLimits()
