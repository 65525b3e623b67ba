"""Reading the audit trail: `GET /fhir/AuditEvent` (monitors and admins only)."""

from __future__ import annotations

from collections.abc import Callable
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
        condition = _CONDITIONS.get(name)
        if condition is not None:
            where.append(condition(value))
        elif name not in _CONTROLS:
            raise BadRequest(
                f"Unknown AuditEvent search parameter {name!r}; supported: " + ", ".join(PARAMETERS)
            )
    return where


def _values(value: str) -> list[str]:
    """A parameter's comma-separated values, OR-ed."""
    return [v for v in value.split(",") if v]


def _one_of(column: ColumnElement[str], value: str) -> ColumnElement[bool]:
    return column.in_(_values(value))


def _entity_condition(value: str) -> ColumnElement[bool]:
    # The resource an event is about, or one a search showed (audit_disclosure).
    alternatives = []
    for reference in _values(value):
        kind, _, ident = reference.rpartition("/")
        about = AE.c.entity_id == ident
        shown = AD.c.entity_id == ident
        if kind:
            about &= AE.c.entity_type == kind
            shown &= AD.c.entity_type == kind
        alternatives.append(about)
        alternatives.append(AE.c.id.in_(select(AD.c.audit_id).where(shown)))
    return or_(*alternatives)


def _action_condition(value: str) -> ColumnElement[bool]:
    if not set(_values(value)) <= _ACTIONS:
        raise BadRequest(f"action={value!r}: one of C, R, U, D, E")
    return _one_of(AE.c.action, value)


def _date_condition(value: str) -> ColumnElement[bool]:
    prefix, text = ("eq", value)
    if value[:2] in _PREFIXES:
        prefix, text = value[:2], value[2:]
    bounds = fhir_range(text)
    if bounds is None:
        raise BadRequest(f"date={value!r} is not a FHIR date or dateTime")
    start, end = bounds
    comparisons: dict[str, ColumnElement[bool]] = {
        "eq": (AE.c.recorded >= start) & (AE.c.recorded <= end),
        "lt": AE.c.recorded < start,
        "le": AE.c.recorded <= end,
        "gt": AE.c.recorded > end,
        "ge": AE.c.recorded >= start,
    }
    return comparisons[prefix]


# One condition per parameter in PARAMETERS, from its (non-empty) value.
_CONDITIONS: dict[str, Callable[[str], ColumnElement[bool]]] = {
    "_id": lambda value: _one_of(AE.c.id, value),
    "entity": _entity_condition,
    "agent": lambda value: _one_of(AE.c.agent, value),
    "date": _date_condition,
    "action": _action_condition,
}
# Paging and formatting: the route's business, not a condition on the events.
_CONTROLS = ("_count", "_cursor", "_format", "_pretty")


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
