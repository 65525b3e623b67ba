"""Search as a use case: the caller's sites and limits, the matches, the total, the
resources `_include` and `_revinclude` add, and the audit record.

Everything a search returns passes the same checks as the matches: included resources are
limited to the caller's sites, and need the caller's right to read (`_include`) or search
(`_revinclude`) their type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from app.audit.trail import AuditRecord
from app.auth.permissions import Action
from app.auth.policy import SiteAccess, access_policy
from app.auth.principal import Principal, Role
from app.kit.errors import Forbidden
from app.services import subjects
from app.services.context import ServiceContext
from app.services.resources import Stored
from app.store import repository as repo
from app.store.criteria import Include, SearchFilter, SortKey


@dataclass(frozen=True)
class SearchRequest:
    """What one search asks: the filter, the page (sort, cursor, count), the totals, the
    included resources, and the query as the client wrote it (for the audit record)."""

    criteria: SearchFilter
    sort: Sequence[SortKey] = ()
    after: Sequence[Any] | None = None
    count: int = 50
    total: bool = False
    count_only: bool = False
    includes: Sequence[Include] = ()
    revincludes: Sequence[Include] = ()
    include_limit: int = 1000
    query: str | None = None


@dataclass(frozen=True)
class SearchHit:
    stored: Stored
    key: tuple[Any, ...]  # the row's keyset values, `pk` last: the next page's cursor


@dataclass(frozen=True)
class SearchResult:
    hits: list[SearchHit]
    more: bool  # a next page exists
    total: int | None  # the number of matches, when asked for
    included: list[Stored]
    included_truncated: bool  # more resources were to be included than `include_limit`


async def search(
    ctx: ServiceContext,
    request: SearchRequest,
    principal: Principal,
    *,
    conn: AsyncConnection | None = None,
) -> SearchResult:
    """One page of matches (`count` at most). `count_only`: the total and nothing else.
    In a read transaction of its own, or in `conn` (a Bundle's, which sees its writes)."""
    criteria, includes, revincludes = request.criteria, request.includes, request.revincludes
    _authorize(principal, criteria, includes, revincludes)
    criteria = replace(
        subjects.normalise_criteria(criteria, ctx.codes),
        access=access_policy(principal).sites,
    )
    async with _connection(ctx, conn) as conn:
        number = await repo.count(conn, criteria) if request.total or request.count_only else None
        if request.count_only:
            ctx.audit.add(_searched(principal, criteria, request.query, ()))
            return SearchResult([], False, number, [], False)
        rows = await repo.search(
            conn, criteria, sort=request.sort, after=request.after, limit=request.count + 1
        )
        page = rows[: request.count]
        included, truncated = await _included(
            conn, [current for current, _ in page], criteria.access, request
        )
    hits = [SearchHit(Stored.of_current(current), key) for current, key in page]
    shown = [hit.stored for hit in hits] + included
    ctx.audit.add(_searched(principal, criteria, request.query, shown))
    return SearchResult(hits, len(rows) > request.count, number, included, truncated)


def _searched(
    principal: Principal, criteria: SearchFilter, query: str | None, shown: Sequence[Stored]
) -> AuditRecord:
    """The search's audit record, naming every resource version it showed the caller."""
    disclosed = {(s.resource_type, s.id): s.version_id for s in shown}
    return AuditRecord.of(
        principal,
        "search-type",
        entity_type=criteria.resource_type,
        query=query,
        disclosed=tuple((*key, version) for key, version in disclosed.items()),
    )


@asynccontextmanager
async def _connection(
    ctx: ServiceContext, conn: AsyncConnection | None
) -> AsyncIterator[AsyncConnection]:
    if conn is not None:
        yield conn
    else:
        async with ctx.db.read() as own:
            yield own


def authorize_criteria(principal: Principal, criteria: SearchFilter) -> None:
    """The checks a search makes of its criteria (a lab finds Patients by identifier only),
    for criteria used elsewhere: conditional writes and references."""
    _authorize(principal, criteria, (), ())


async def _included(
    conn: AsyncConnection,
    page: list[repo.Current],
    access: SiteAccess | None,
    request: SearchRequest,
) -> tuple[list[Stored], bool]:
    """The page's subjects (`_include`) and the records of the page's Patients
    (`_revinclude`), each once, at the caller's sites, `include_limit` at most."""
    limit = request.include_limit
    wanted: list[SearchFilter] = []
    if request.includes:
        subjects = sorted({c.patient_id for c in page if c.patient_id is not None})
        wanted.append(SearchFilter("Patient", ids=subjects, access=access))
    patients = [c.id for c in page]
    # Observation:subject and Observation:patient follow the same reference: one query.
    for source in dict.fromkeys(include.source for include in request.revincludes):
        wanted.append(SearchFilter(source, patients=patients, access=access))
    found: dict[tuple[str, str], Stored] = {}
    for criteria in wanted:
        if not page or len(found) > limit:
            break
        for current in await repo.first_matches(conn, criteria, limit + 1 - len(found)):
            found.setdefault((current.resource_type, current.id), Stored.of_current(current))
    included = list(found.values())
    return included[:limit], len(included) > limit


def _authorize(
    principal: Principal,
    criteria: SearchFilter,
    includes: Sequence[Include],
    revincludes: Sequence[Include],
) -> None:
    for include in includes:
        access_policy(principal).require(include.target, Action.READ)
    for include in revincludes:
        access_policy(principal).require(include.source, Action.SEARCH)
    if principal.role is not Role.LAB:
        return
    # A lab looks up the patient of a result by identifier; it never browses the trial's
    # patients: not by a Patient search, a chain, or the subjects of its results.
    if criteria.resource_type == "Patient" and not _identifies(criteria):
        raise Forbidden("role lab may search Patient by identifier only")
    if any(not _identifies(chain) for chain in criteria.chains or ()):
        raise Forbidden("role lab may chain to Patient by identifier only")
    if includes:
        raise Forbidden("role lab may not _include Patients; it looks them up by identifier")


def _identifies(criteria: SearchFilter) -> bool:
    """Whether the criteria name the patient: an identifier value (`system|value` or
    `value`) that every match must have."""
    return any(
        all(match.param == "identifier" and match.value for match in group)
        for group in criteria.tokens or ()
    )
