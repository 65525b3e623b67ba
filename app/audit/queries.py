"""Reading the audit trail: `GET /fhir/AuditEvent` (monitors and admins only)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, or_, select

from app.auth.policy import access_policy
from app.auth.principal import Principal
from app.kit.dates import fhir_range
from app.kit.errors import BadRequest, NotFound
from app.store.criteria import site_condition
from app.store.db import Database
from app.store.tables import audit_table as AE
from app.store.tables import disclosure_table as AD

_ACTIONS = frozenset({"C", "R", "U", "D", "E"})
PARAMETERS = ("_id", "entity", "agent", "date", "action")
_PREFIXES = ("eq", "lt", "le", "gt", "ge")


@dataclass(frozen=True)
class AuditHit:
    seq: int
    id: str
    content: str


def _sites(principal: Principal) -> list[ColumnElement[bool]]:
    # A monitor sees its sites' records; events about no site (a failed login) are an
    # admin's to review.
    return site_condition(AE.c.site, access_policy(principal).sites)


def _conditions(params: list[tuple[str, str]]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            # PostgreSQL text cannot hold NUL: a refusal, as in every other search, not a 500.
            raise BadRequest("Search parameters cannot contain NUL characters")
        if value == "":
            continue  # FHIR: a parameter without a value is ignored
        values = [v for v in value.split(",") if v]
        if name == "_id":
            where.append(AE.c.id.in_(values))
        elif name == "entity":
            # The resource an event is about, or one a search showed (audit_disclosure).
            alternatives = []
            for reference in values:
                kind, _, ident = reference.rpartition("/")
                about = AE.c.entity_id == ident
                shown = AD.c.entity_id == ident
                if kind:
                    about &= AE.c.entity_type == kind
                    shown &= AD.c.entity_type == kind
                alternatives.append(about)
                alternatives.append(AE.c.id.in_(select(AD.c.audit_id).where(shown)))
            where.append(or_(*alternatives))
        elif name == "agent":
            where.append(AE.c.agent.in_(values))
        elif name == "action":
            if not set(values) <= _ACTIONS:
                raise BadRequest(f"action={value!r}: one of C, R, U, D, E")
            where.append(AE.c.action.in_(values))
        elif name == "date":
            prefix, text = ("eq", value)
            if value[:2] in _PREFIXES:
                prefix, text = value[:2], value[2:]
            bounds = fhir_range(text)
            if bounds is None:
                raise BadRequest(f"date={value!r} is not a FHIR date or dateTime")
            start, end = bounds
            where.append(
                {
                    "eq": (AE.c.recorded >= start) & (AE.c.recorded <= end),
                    "lt": AE.c.recorded < start,
                    "le": AE.c.recorded <= end,
                    "gt": AE.c.recorded > end,
                    "ge": AE.c.recorded >= start,
                }[prefix]
            )
        elif name not in ("_count", "_cursor", "_format", "_pretty"):
            raise BadRequest(
                f"Unknown AuditEvent search parameter {name!r}; supported: " + ", ".join(PARAMETERS)
            )
    return where


async def search(
    db: Database,
    principal: Principal,
    params: list[tuple[str, str]],
    *,
    after: int | None,
    limit: int,
) -> list[AuditHit]:
    """Oldest first in chain order; `after` is the last `seq` of the previous page."""
    query = select(AE.c.seq, AE.c.id, AE.c.content).where(*_conditions(params), *_sites(principal))
    if after is not None:
        query = query.where(AE.c.seq > after)
    async with db.read() as conn:
        rows = (await conn.execute(query.order_by(AE.c.seq).limit(limit))).all()
    return [AuditHit(*row) for row in rows]


async def read(db: Database, principal: Principal, audit_id: str) -> AuditHit:
    query = select(AE.c.seq, AE.c.id, AE.c.content).where(AE.c.id == audit_id, *_sites(principal))
    async with db.read() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound(f"AuditEvent/{audit_id} does not exist")
    return AuditHit(*row)
