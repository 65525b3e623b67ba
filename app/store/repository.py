"""Core queries over the three tables. No ORM objects: the hot paths insert and read rows
directly (measured: ORM objects cost about 3x on create)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.auth.policy import SiteAccess
from app.kit.codes import ENGINE_RESOURCE_TYPES, KIND_RESPONSE_STATUS
from app.store.criteria import (
    DateMatch,
    HistoryFilter,
    Missing,
    NumberMatch,
    SearchFilter,
    SortKey,
    StringMatch,
    TokenMatch,
    site_condition,
)
from app.store.tables import (
    assessment_table,
    classification_table,
    quantity_table,
    resource_table,
    string_table,
    token_table,
    version_table,
)

# Sentinel so that rows without a clinical date sort last and still have a total order.
FAR_FUTURE = datetime(9999, 12, 31)


@dataclass
class Current:
    pk: int
    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    deleted: bool
    content: str | None
    patient_id: str | None
    kind: str | None
    site: str | None


@dataclass
class Version:
    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    method: str
    content: str | None


@dataclass
class IndexRow:
    patient_id: str | None
    effective_start: datetime | None
    effective_end: datetime | None
    value_norm: float | None
    kind: str | None
    status: str | None
    site: str | None
    tokens: Sequence[tuple[str, str, str]]
    strings: Sequence[tuple[str, str, str]] = ()  # (param, value, normalised)
    quantities: Sequence[tuple[str, float, str, str, float | None]] = ()
    subject: str | None = None  # a Patient's subject number (uq_resource_subject)

    def columns(self) -> dict[str, Any]:
        """The `resource` columns it fills (the search values go to their own tables)."""
        return {name: getattr(self, name) for name in _INDEX_COLUMNS}


_SEARCH_VALUES = ("tokens", "strings", "quantities")
_INDEX_COLUMNS = tuple(field.name for field in fields(IndexRow) if field.name not in _SEARCH_VALUES)
# The columns a Current and a Version are read from, in their fields' order.
_CURRENT_COLUMNS = tuple(resource_table.c[field.name] for field in fields(Current))
_VERSION_COLUMNS = tuple(version_table.c[field.name] for field in fields(Version))


# Kinds whose records have token search values and never string or quantity ones. The status
# Observation (`kit.codes.KIND_RESPONSE_STATUS`) is written by the
# server only (`services.response`; clients are refused that kind), as an Observation without
# `valueQuantity`, and Observations have no string parameters. Every write of one sets all its
# search values anew and `insert_search_values` refuses string or quantity values for these
# kinds, so a record whose current kind is one of them has none stored: its updates and its
# deletion skip those two DELETEs (two statements fewer per create that changes a status).
TOKEN_ONLY_KINDS = frozenset({KIND_RESPONSE_STATUS})


def _current(row: Sequence[Any]) -> Current:
    return Current(*row)


# Built once: the most frequent statement of the API (every read, every write, several
# times per write). Building `select(...)` per call cost a third of a read's CPU (issue 8,
# py-spy profile in bench/README.md); executing a prebuilt one is the same SQL.
_GET_CURRENT = select(*_CURRENT_COLUMNS).where(
    resource_table.c.resource_type == bindparam("resource_type"),
    resource_table.c.id == bindparam("resource_id"),
)
_GET_CURRENT_FOR_UPDATE = _GET_CURRENT.with_for_update()


async def get_current(
    conn: AsyncConnection, resource_type: str, resource_id: str, *, for_update: bool = False
) -> Current | None:
    query = (
        _GET_CURRENT_FOR_UPDATE
        if for_update and conn.dialect.name == "postgresql"
        else _GET_CURRENT
    )
    params = {"resource_type": resource_type, "resource_id": resource_id}
    row = (await conn.execute(query, params)).first()
    return _current(row) if row else None


async def lock(conn: AsyncConnection, key: str) -> None:
    """Serialise transactions that share `key` until they end (PostgreSQL advisory lock).

    SQLite needs nothing: its write transactions begin IMMEDIATE, one at a time.
    """
    if conn.dialect.name != "postgresql":
        return
    await conn.execute(_ADVISORY_LOCK, {"k": _advisory_key(key)})


async def try_lock(conn: AsyncConnection, key: str) -> bool:
    """`lock` without waiting: False when another transaction holds `key`.

    SQLite: always True (this write transaction is the only one)."""
    if conn.dialect.name != "postgresql":
        return True
    return bool((await conn.execute(_TRY_ADVISORY_LOCK, {"k": _advisory_key(key)})).scalar_one())


def _advisory_key(key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_TRY_ADVISORY_LOCK = text("SELECT pg_try_advisory_xact_lock(:k)")


@dataclass(frozen=True)
class NewResource:
    """A version 1 to insert (`insert_resources`)."""

    resource_type: str
    resource_id: str
    content: str
    index: IndexRow


# Built once, like _GET_CURRENT. SQLAlchemy's "insertmanyvalues" sends many rows as a few
# multi-row INSERTs. Each pk comes back with its id: asking for the rows in parameter order
# instead makes SQLite fall back to one INSERT per row.
_INSERT_RESOURCE = insert(resource_table).returning(
    resource_table.c.pk, resource_table.c.resource_type, resource_table.c.id
)
_INSERT_VERSION = insert(version_table)
_INSERT_SEARCH = {
    table.name: insert(table) for table in (token_table, string_table, quantity_table)
}
_DELETE_SEARCH = {
    table.name: delete(table).where(table.c.resource_pk == bindparam("pk"))
    for table in (token_table, string_table, quantity_table)
}
_UPDATE_RESOURCE = update(resource_table).where(resource_table.c.pk == bindparam("current_pk"))


class SubjectTaken(Exception):
    """The unique index refused a subject number another transaction committed meanwhile
    (PostgreSQL). The transaction is usable: the write was undone to a savepoint."""

    def __init__(self, subject: str) -> None:
        super().__init__(subject)
        self.subject = subject


async def _holding_subject(conn: AsyncConnection, index: IndexRow | None, write: Any) -> None:
    """Run `write()`; a subject number taken by a concurrent transaction becomes
    `SubjectTaken`. On SQLite writers are serial: the caller's check before is enough."""
    if index is None or index.subject is None or conn.dialect.name != "postgresql":
        await write()
        return
    try:
        async with conn.begin_nested():
            await write()
    except IntegrityError as exc:
        if "uq_resource_subject" not in str(exc.orig):
            raise
        raise SubjectTaken(index.subject) from None


_SUBJECT_HOLDER = select(*_CURRENT_COLUMNS).where(
    resource_table.c.resource_type == "Patient", resource_table.c.subject == bindparam("subject")
)


async def subject_holder(conn: AsyncConnection, subject: str) -> Current | None:
    """The live Patient with this subject number (deleted ones hold none)."""
    row = (await conn.execute(_SUBJECT_HOLDER, {"subject": subject})).first()
    return _current(row) if row else None


async def insert_resource(conn: AsyncConnection, new: NewResource, now: datetime) -> None:
    await _holding_subject(conn, new.index, lambda: insert_resources(conn, [new], now))


async def insert_resources(
    conn: AsyncConnection, rows: Sequence[NewResource], now: datetime
) -> None:
    """Insert new resources with their first version and search values: one statement per
    table however many rows (a transaction Bundle's creates go in together, issue 8)."""
    if not rows:
        return
    result = await conn.execute(
        _INSERT_RESOURCE,
        [
            {
                "resource_type": row.resource_type,
                "id": row.resource_id,
                "version_id": 1,
                "last_updated": now,
                "deleted": False,
                "content": row.content,
                **row.index.columns(),
            }
            for row in rows
        ],
    )
    pks = {(resource_type, resource_id): pk for pk, resource_type, resource_id in result.all()}
    await conn.execute(
        _INSERT_VERSION,
        [
            {
                "resource_type": row.resource_type,
                "id": row.resource_id,
                "version_id": 1,
                "last_updated": now,
                "method": "create",
                "content": row.content,
            }
            for row in rows
        ],
    )
    await _insert_search_values(
        conn,
        [(pks[row.resource_type, row.resource_id], row.resource_type, row.index) for row in rows],
    )


async def update_resource(
    conn: AsyncConnection, current: Current, content: str, index: IndexRow, now: datetime
) -> None:
    """Write the next version of `current`."""
    version = Version(
        current.resource_type, current.id, current.version_id + 1, now, "update", content
    )
    await _write_version(conn, current, version, index)


async def delete_resource(conn: AsyncConnection, current: Current, now: datetime) -> None:
    """Write the next version of `current` as a deletion."""
    version = Version(
        current.resource_type, current.id, current.version_id + 1, now, "delete", None
    )
    await _write_version(conn, current, version, None)


async def _write_version(
    conn: AsyncConnection, current: Current, version: Version, index: IndexRow | None
) -> None:
    """Make `version` the current one: a deletion when its content is None (no `index`)."""
    values: dict[str, Any] = {
        "version_id": version.version_id,
        "last_updated": version.last_updated,
        "deleted": version.content is None,
        "content": version.content,
    }
    if index is not None:
        values.update(index.columns())
    else:
        values["subject"] = None  # a deleted Patient's subject number is free again
    await _holding_subject(
        conn, index, lambda: conn.execute(_UPDATE_RESOURCE, {**values, "current_pk": current.pk})
    )
    await delete_search_values(conn, current.pk, tokens_only=current.kind in TOKEN_ONLY_KINDS)
    if index is not None:
        await insert_search_values(conn, current.pk, current.resource_type, index)
    await conn.execute(
        _INSERT_VERSION,
        {
            "resource_type": version.resource_type,
            "id": version.id,
            "version_id": version.version_id,
            "last_updated": version.last_updated,
            "method": version.method,
            "content": version.content,
        },
    )


async def insert_search_values(
    conn: AsyncConnection, pk: int, resource_type: str, index: IndexRow
) -> None:
    await _insert_search_values(conn, [(pk, resource_type, index)])


async def _insert_search_values(
    conn: AsyncConnection, rows: Sequence[tuple[int, str, IndexRow]]
) -> None:
    tokens: list[dict[str, Any]] = []
    strings: list[dict[str, Any]] = []
    quantities: list[dict[str, Any]] = []
    for pk, resource_type, index in rows:
        if index.kind in TOKEN_ONLY_KINDS and (index.strings or index.quantities):
            # `delete_search_values` would leave these behind on the next write: refuse.
            raise ValueError(f"a {index.kind} record has token search values only")
        row = {"resource_pk": pk, "resource_type": resource_type}
        tokens.extend({**row, "param": p, "system": s, "value": v} for p, s, v in index.tokens)
        strings.extend(
            {**row, "param": p, "value": v, "normalised": n} for p, v, n in index.strings
        )
        quantities.extend(
            {**row, "param": p, "value": v, "system": s, "code": c, "value_norm": n}
            for p, v, s, c, n in index.quantities
        )
    for table, values in (
        (token_table, tokens),
        (string_table, strings),
        (quantity_table, quantities),
    ):
        if values:
            await conn.execute(_INSERT_SEARCH[table.name], values)


async def delete_search_values(
    conn: AsyncConnection, pk: int, *, tokens_only: bool = False
) -> None:
    """Delete a record's search values; `tokens_only` when its kind is in TOKEN_ONLY_KINDS,
    whose records never have string or quantity values (those DELETEs could not match)."""
    for table in (token_table,) if tokens_only else (token_table, string_table, quantity_table):
        await conn.execute(_DELETE_SEARCH[table.name], {"pk": pk})


async def get_version(
    conn: AsyncConnection, resource_type: str, resource_id: str, version_id: int
) -> Version | None:
    row = (
        await conn.execute(
            select(*_VERSION_COLUMNS).where(
                version_table.c.resource_type == resource_type,
                version_table.c.id == resource_id,
                version_table.c.version_id == version_id,
            )
        )
    ).first()
    return Version(*row) if row else None


async def history(
    conn: AsyncConnection,
    versions: HistoryFilter,
    access: SiteAccess,
    *,
    after: tuple[datetime, str, int] | None,
    limit: int,
) -> list[Version]:
    """Versions newest first, of resources `access` sees; `after` is the (last_updated, id,
    version) keyset cursor."""
    resource_id, since = versions.resource_id, versions.since
    query = select(*_VERSION_COLUMNS).where(version_table.c.resource_type == versions.resource_type)
    if resource_id is not None:
        query = query.where(version_table.c.id == resource_id)
    at_sites = site_condition(resource_table.c.site, access)
    if at_sites:
        # Versions follow their resource's current site (a moved patient's history moves).
        query = query.where(
            exists().where(
                resource_table.c.resource_type == version_table.c.resource_type,
                resource_table.c.id == version_table.c.id,
                *at_sites,
            )
        )
    if since is not None:
        query = query.where(version_table.c.last_updated >= since)
    if after is not None:
        query = query.where(
            tuple_(version_table.c.last_updated, version_table.c.id, version_table.c.version_id)
            < tuple_(*map(literal, after))
        )
    query = query.order_by(
        version_table.c.last_updated.desc(),
        version_table.c.id.desc(),
        version_table.c.version_id.desc(),
    )
    rows = (await conn.execute(query.limit(limit))).all()
    return [Version(*row) for row in rows]


async def has_live_references(conn: AsyncConnection, patient_id: str) -> bool:
    """Whether records other than the server's own response status point at the patient."""
    query = select(
        exists().where(
            resource_table.c.resource_type != "Patient",
            resource_table.c.patient_id == patient_id,
            not_(resource_table.c.deleted),
            or_(resource_table.c.kind.is_(None), resource_table.c.kind != KIND_RESPONSE_STATUS),
        )
    )
    return bool((await conn.execute(query)).scalar())


async def move_records(conn: AsyncConnection, patient_id: str, site: str | None) -> None:
    """A patient moved to another site takes its records along (they inherit its site)."""
    await conn.execute(
        update(resource_table)
        .where(
            resource_table.c.resource_type != "Patient", resource_table.c.patient_id == patient_id
        )
        .values(site=site)
    )


# The engine's inputs as plain tuples: (kind, id, status, start, value, end), times aware UTC.
FactRow = tuple[str, str, str | None, datetime | None, float | None, datetime | None]
# On PostgreSQL the driver is asked directly (asyncpg prepares and caches the statement per
# connection): a patient's 1,000 counts are read without SQLAlchemy building a statement or
# wrapping each row, and PostgreSQL hands the times over already in UTC.
_FACT_ROWS_SQL = (
    "SELECT kind, id, status, effective_start AT TIME ZONE 'UTC', value_norm, "
    "effective_end AT TIME ZONE 'UTC' FROM resource "
    "WHERE resource_type = ANY($1::varchar[]) AND patient_id = $2 AND kind = ANY($3::varchar[]) "
    "AND NOT deleted"
)


# A FactRow's columns, in its order (the SQLAlchemy reads; _FACT_ROWS_SQL is the same).
_FACT_COLUMNS = (
    resource_table.c.kind,
    resource_table.c.id,
    resource_table.c.status,
    resource_table.c.effective_start,
    resource_table.c.value_norm,
    resource_table.c.effective_end,
)


def _finite(row: FactRow) -> bool:
    """Whether a row's times came back aware. asyncpg writes a naive datetime.min or
    datetime.max as -infinity or infinity, and reads those back naive whatever the query
    asks: a FHIR value in year 0001 starts exactly at datetime.min (`fhir_range`), one in
    9999 can end at datetime.max."""
    start, end = row[3], row[5]
    return (start is None or start.tzinfo is not None) and (end is None or end.tzinfo is not None)


def _at_utc(row: FactRow) -> FactRow:
    kind, ident, status, start, value, end = row
    return (
        kind,
        ident,
        status,
        start.replace(tzinfo=UTC) if start is not None else None,
        value,
        end.replace(tzinfo=UTC) if end is not None else None,
    )


def created_fact(resource_id: str, index: IndexRow) -> FactRow:
    """The row `patient_fact_rows` reads back for a record created with `index` (its times
    naive UTC, as the columns store them), without reading it."""
    start, end = index.effective_start, index.effective_end
    return _at_utc((index.kind or "", resource_id, index.status, start, index.value_norm, end))


async def patient_fact_rows(
    conn: AsyncConnection, patient_id: str, kinds: Sequence[str]
) -> list[FactRow]:
    """The patient's live records the engine reads, in the form the recompute consumes: the
    hot read of every write (one indexed query, the patient's history only, whatever the
    size of the trial). Times are timezone-aware UTC."""
    if conn.dialect.name == "postgresql":
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        # asyncpg's Records unpack like the tuples; only a row at the calendar's ends is rebuilt.
        rows = await driver.fetch(
            _FACT_ROWS_SQL, list(ENGINE_RESOURCE_TYPES), patient_id, list(kinds)
        )
        return [row if _finite(row) else _at_utc(row) for row in rows]
    result = await conn.execute(
        select(*_FACT_COLUMNS).where(
            resource_table.c.resource_type.in_(ENGINE_RESOURCE_TYPES),
            resource_table.c.patient_id == patient_id,
            resource_table.c.kind.in_(kinds),
            not_(resource_table.c.deleted),
        )
    )
    # SQLite hands back naive datetimes, which the columns store as UTC.
    return [_at_utc(tuple(row)) for row in result]


_STORED = select(
    assessment_table.c.fingerprint,
    assessment_table.c.decision_fingerprint,
    assessment_table.c.status,
    assessment_table.c.fold_state,
    assessment_table.c.classification_count,
    assessment_table.c.classification_digest,
).where(assessment_table.c.patient_id == bindparam("patient_id"))
# The SET clause comes from the parameters given; the WHERE names its own parameter.
_UPDATE_ASSESSMENT = update(assessment_table).where(
    assessment_table.c.patient_id == bindparam("row_patient_id")
)
_INSERT_ASSESSMENT = insert(assessment_table)


@dataclass(frozen=True)
class StoredAssessment:
    """What a recompute compares with and builds on: the fingerprints, the status, the
    engine's fold state, and what the classification rows hold (not the JSON)."""

    fingerprint: str
    decision_fingerprint: str | None  # None: stored before rules version 2
    status: str
    fold_state: str | None  # None: no state kept (`app.engine.stored`)
    classification_count: int | None  # None: the classifications are in the JSON
    classification_digest: str | None


async def stored_assessment(conn: AsyncConnection, patient_id: str) -> StoredAssessment | None:
    """The stored assessment's fingerprints, status, fold state and classification rows'
    count and digest. None when the patient has no assessment yet."""
    row = (await conn.execute(_STORED, {"patient_id": patient_id})).first()
    return StoredAssessment(*row) if row is not None else None


@dataclass
class AssessmentRow:
    patient_id: str
    status: str
    best_response: str | None
    fingerprint: str
    computed_at: datetime
    observation_id: str
    content: str
    decision_fingerprint: str | None = None
    fold_state: str | None = None
    classification_count: int | None = None
    classification_digest: str | None = None


async def get_assessment(conn: AsyncConnection, patient_id: str) -> AssessmentRow | None:
    row = (
        await conn.execute(
            select(assessment_table).where(assessment_table.c.patient_id == patient_id)
        )
    ).first()
    return AssessmentRow(**row._mapping) if row else None


async def save_assessment(conn: AsyncConnection, row: AssessmentRow, *, exists_: bool) -> None:
    if exists_:
        await conn.execute(_UPDATE_ASSESSMENT, {**row.__dict__, "row_patient_id": row.patient_id})
    else:
        await conn.execute(_INSERT_ASSESSMENT, row.__dict__)


async def delete_assessment(conn: AsyncConnection, patient_id: str) -> None:
    await conn.execute(delete(assessment_table).where(assessment_table.c.patient_id == patient_id))
    await conn.execute(_DELETE_CLASSIFICATIONS, {"patient_id": patient_id})


_DELETE_CLASSIFICATIONS = delete(classification_table).where(
    classification_table.c.patient_id == bindparam("patient_id")
)
_INSERT_CLASSIFICATION = insert(classification_table)


async def insert_classifications(
    conn: AsyncConnection, patient_id: str, rows: Sequence[tuple[int, str]]
) -> None:
    """Store rows of classifications: (the place of the first, a JSON array), one statement."""
    if rows:
        values = [
            {"patient_id": patient_id, "seq": seq, "content": content} for seq, content in rows
        ]
        await conn.execute(_INSERT_CLASSIFICATION, values)


async def save_classifications(
    conn: AsyncConnection, patient_id: str, rows: Sequence[tuple[int, str]]
) -> None:
    """The patient's classifications are `rows` (`insert_classifications`), and no others."""
    await conn.execute(_DELETE_CLASSIFICATIONS, {"patient_id": patient_id})
    await insert_classifications(conn, patient_id, rows)


async def classification_contents(conn: AsyncConnection, patient_id: str) -> list[str]:
    """The patient's stored classification rows (each a JSON array), in clinical order."""
    result = await conn.execute(
        select(classification_table.c.content)
        .where(classification_table.c.patient_id == patient_id)
        .order_by(classification_table.c.seq)
    )
    return list(result.scalars())


async def assessment_counts(
    conn: AsyncConnection, access: SiteAccess
) -> list[tuple[str, str | None, int]]:
    """(status, best response, patients) over the live patients `access` sees."""
    conditions = [
        resource_table.c.resource_type == "Patient",
        resource_table.c.id == assessment_table.c.patient_id,
        not_(resource_table.c.deleted),
    ]
    conditions.extend(site_condition(resource_table.c.site, access))
    live = exists().where(*conditions)
    rows = await conn.execute(
        select(assessment_table.c.status, assessment_table.c.best_response, func.count())
        .where(live)
        .group_by(assessment_table.c.status, assessment_table.c.best_response)
    )
    return [(status, best, int(n)) for status, best, n in rows]


# --- the trial report: every patient of some sites at once ------------------------------


def _live(access: SiteAccess, patient_id: str | None) -> list[ColumnElement[bool]]:
    """Live records `access` sees, of one patient when `patient_id` is given."""
    conditions = [not_(resource_table.c.deleted), *site_condition(resource_table.c.site, access)]
    if patient_id is not None:
        conditions.append(resource_table.c.patient_id == patient_id)
    return conditions


async def live_patients(
    conn: AsyncConnection, access: SiteAccess, patient_id: str | None = None
) -> list[tuple[str, int, str | None, str | None]]:
    """(id, version, site, content) of the live Patients `access` sees, in enrolment order."""
    conditions = [resource_table.c.resource_type == "Patient", not_(resource_table.c.deleted)]
    conditions.extend(site_condition(resource_table.c.site, access))
    if patient_id is not None:
        conditions.append(resource_table.c.id == patient_id)
    rows = await conn.execute(
        select(
            resource_table.c.id,
            resource_table.c.version_id,
            resource_table.c.site,
            resource_table.c.content,
        )
        .where(*conditions)
        .order_by(resource_table.c.pk)
    )
    return [(ident, version, site, content) for ident, version, site, content in rows]


async def fact_rows_by_patient(
    conn: AsyncConnection,
    kinds: Sequence[str],
    access: SiteAccess,
    patient_id: str | None = None,
) -> dict[str, list[FactRow]]:
    """What `patient_fact_rows` reads, for every patient `access` sees in one query (or one
    patient), keyed by patient id; times timezone-aware UTC."""
    rows = await conn.execute(
        select(resource_table.c.patient_id, *_FACT_COLUMNS).where(
            resource_table.c.resource_type.in_(ENGINE_RESOURCE_TYPES),
            resource_table.c.kind.in_(kinds),
            *_live(access, patient_id),
        )
    )
    by_patient: dict[str, list[FactRow]] = {}
    for owner, *fact in rows:
        by_patient.setdefault(owner, []).append(_at_utc(tuple(fact)))
    return by_patient


async def adverse_event_rows(
    conn: AsyncConnection, access: SiteAccess, patient_id: str | None = None
) -> list[tuple[str, str, str | None, datetime | None, str]]:
    """(patient id, id, kind, time (aware UTC), content) of the live AdverseEvents."""
    rows = await conn.execute(
        select(
            resource_table.c.patient_id,
            resource_table.c.id,
            resource_table.c.kind,
            resource_table.c.effective_start,
            resource_table.c.content,
        ).where(resource_table.c.resource_type == "AdverseEvent", *_live(access, patient_id))
    )
    return [
        (owner, ident, kind, start.replace(tzinfo=UTC) if start is not None else None, content)
        for owner, ident, kind, start, content in rows
        if owner is not None and content is not None
    ]


async def all_patient_ids(conn: AsyncConnection) -> list[str]:
    rows = await conn.execute(
        select(resource_table.c.id)
        .where(resource_table.c.resource_type == "Patient", not_(resource_table.c.deleted))
        .order_by(resource_table.c.pk)
    )
    return [row[0] for row in rows]


# --- search -----------------------------------------------------------------------------
# `resources` is the resource table, or an alias of it in a chained search's subquery.


def _token_clause(
    resource_type: str, resources: Any, matches: list[TokenMatch]
) -> ColumnElement[bool]:
    alternatives = []
    for match in matches:
        conditions = [token_table.c.param == match.param]
        if match.value is not None:
            conditions.append(token_table.c.value == match.value)
        if match.system is not None:
            conditions.append(token_table.c.system == match.system)
        alternatives.append(and_(*conditions))
    return exists().where(
        token_table.c.resource_pk == resources.c.pk,
        token_table.c.resource_type == resource_type,
        or_(*alternatives),
    )


def _string_clause(
    resource_type: str, resources: Any, matches: list[StringMatch]
) -> ColumnElement[bool]:
    alternatives = []
    for match in matches:
        if match.mode == "exact":
            condition = string_table.c.value == match.value
        elif match.mode == "contains":
            condition = string_table.c.normalised.contains(match.value, autoescape=True)
        else:
            condition = string_table.c.normalised.startswith(match.value, autoescape=True)
        alternatives.append(and_(string_table.c.param == match.param, condition))
    return exists().where(
        string_table.c.resource_pk == resources.c.pk,
        string_table.c.resource_type == resource_type,
        or_(*alternatives),
    )


def _number_condition(match: NumberMatch) -> ColumnElement[bool]:
    column = quantity_table.c.value_norm if match.normalised else quantity_table.c.value
    comparisons: dict[str, ColumnElement[bool]] = {
        "eq": and_(column >= match.low, column < match.high),
        "ne": or_(column < match.low, column >= match.high),
        "ap": and_(column >= match.low, column <= match.high),
        "lt": column < match.value,
        "le": column <= match.value,
        "gt": column > match.value,
        "ge": column >= match.value,
        "sa": column > match.value,
        "eb": column < match.value,
    }
    conditions = [quantity_table.c.param == match.param, comparisons[match.prefix]]
    if not match.normalised:
        if match.code is not None:
            conditions.append(quantity_table.c.code == match.code)
        if match.system is not None:
            conditions.append(quantity_table.c.system == match.system)
    return and_(*conditions)


def _number_clause(
    resource_type: str, resources: Any, matches: list[NumberMatch]
) -> ColumnElement[bool]:
    return exists().where(
        quantity_table.c.resource_pk == resources.c.pk,
        quantity_table.c.resource_type == resource_type,
        or_(*(_number_condition(m) for m in matches)),
    )


def _date_clause(
    match: DateMatch, start: ColumnElement[Any], end: ColumnElement[Any]
) -> ColumnElement[bool]:
    """FHIR date comparison of the row's range [start, end] with the query's range."""
    within = and_(start >= match.start, end <= match.end)
    match match.prefix:
        case "eq":
            return within
        case "ne":
            return not_(within)
        case "lt":
            return start < match.start
        case "le":
            return start <= match.end
        case "gt":
            return end > match.end
        case "ge":
            return end >= match.start
        case "sa":
            return start > match.end
        case "eb":
            return end < match.start
    raise ValueError(f"unknown date prefix {match.prefix}")


def _present(resource_type: str, resources: Any, missing: Missing) -> ColumnElement[bool]:
    """Whether the row has a value for the parameter (the opposite of `:missing=true`)."""
    tables = {"token": token_table, "string": string_table, "number": quantity_table}
    if missing.index in tables:
        table = tables[missing.index]
        return exists().where(
            table.c.resource_pk == resources.c.pk,
            table.c.resource_type == resource_type,
            table.c.param == missing.param,
        )
    columns: dict[str, ColumnElement[Any]] = {
        "effective": resources.c.effective_start,
        "last-updated": resources.c.last_updated,
        "patient": resources.c.patient_id,
        "site": resources.c.site,
    }
    return columns[missing.index].is_not(None)


def _where(criteria: SearchFilter, resources: Any = resource_table) -> list[ColumnElement[bool]]:
    resource_type = criteria.resource_type
    where: list[ColumnElement[bool]] = [
        resources.c.resource_type == resource_type,
        not_(resources.c.deleted),
    ]
    where.extend(site_condition(resources.c.site, criteria.access))
    if criteria.ids is not None:
        where.append(resources.c.id.in_(criteria.ids))
    if criteria.patients is not None:
        where.append(resources.c.patient_id.in_(criteria.patients))
    if criteria.organizations is not None:
        where.append(resources.c.site.in_(criteria.organizations))
    where.extend(_index_conditions(criteria, resources))
    where.extend(_date_conditions(criteria, resources))
    for missing in criteria.missing or ():
        present = _present(resource_type, resources, missing)
        where.append(not_(present) if missing.missing else present)
    for chain in criteria.chains or ():
        # The record's Patient must match: a subquery on the Patients the caller may see.
        patient = resource_table.alias()
        visible = replace(chain, access=criteria.access)
        where.append(
            resources.c.patient_id.in_(select(patient.c.id).where(*_where(visible, patient)))
        )
    return where


def _index_conditions(criteria: SearchFilter, resources: Any) -> Iterator[ColumnElement[bool]]:
    """The criteria the search index tables answer: tokens (and `:not`), strings, numbers."""
    resource_type = criteria.resource_type
    for matches in criteria.tokens or ():
        yield _token_clause(resource_type, resources, matches)
    for matches in criteria.tokens_not or ():
        # FHIR `:not`: rows without any matching token, rows without the element included.
        yield not_(_token_clause(resource_type, resources, matches))
    for string_matches in criteria.strings or ():
        yield _string_clause(resource_type, resources, string_matches)
    for number_matches in criteria.numbers or ():
        yield _number_clause(resource_type, resources, number_matches)


def _date_conditions(criteria: SearchFilter, resources: Any) -> Iterator[ColumnElement[bool]]:
    """Clinical time (rows without one never match) and the last update."""
    start, end = resources.c.effective_start, resources.c.effective_end
    for date_matches in criteria.dates or ():
        yield and_(start.is_not(None), or_(*(_date_clause(m, start, end) for m in date_matches)))
    for date_matches in criteria.last_updated or ():
        at = resources.c.last_updated
        yield or_(*(_date_clause(m, at, at) for m in date_matches))


def _sort_column(key: SortKey) -> ColumnElement[Any]:
    columns: dict[str, ColumnElement[Any]] = {
        "id": resource_table.c.id,
        "last-updated": resource_table.c.last_updated,
        # Rows without a date sort as if dated at the end of time: a total order, for keysets.
        "effective": func.coalesce(resource_table.c.effective_start, literal(FAR_FUTURE)),
    }
    return columns[key.column]


def _after(order: list[tuple[ColumnElement[Any], bool]], key: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after `key` in the order `order` ((column, descending) pairs)."""
    if all(descending == order[0][1] for _, descending in order):
        # One direction: a row-value comparison, which an index can serve.
        row, bound = tuple_(*(c for c, _ in order)), tuple_(*map(literal, key))
        return row < bound if order[0][1] else row > bound
    alternatives = []
    for i, (column, descending) in enumerate(order):
        ties = [order[j][0] == key[j] for j in range(i)]
        alternatives.append(and_(*ties, column < key[i] if descending else column > key[i]))
    return or_(*alternatives)


async def search(
    conn: AsyncConnection,
    criteria: SearchFilter,
    *,
    sort: Sequence[SortKey],
    after: Sequence[Any] | None,
    limit: int,
) -> list[tuple[Current, tuple[Any, ...]]]:
    """Keyset-paged search; each row comes with its key (the sort values, then `pk`), from
    which the next page's cursor is made.

    The key always ends in `pk`, which only grows: a row inserted while a client pages is
    either after its cursor or not, never seen twice and never shifting others.
    """
    order = [(_sort_column(key), key.descending) for key in sort]
    order.append((resource_table.c.pk, sort[-1].descending if sort else False))
    values = [column.label(f"sort_{i}") for i, (column, _) in enumerate(order[:-1])]
    query = select(*_CURRENT_COLUMNS, *values).where(*_where(criteria))
    if after is not None:
        query = query.where(_after(order, after))
    query = query.order_by(*(c.desc() if descending else c for c, descending in order))
    rows = (await conn.execute(query.limit(limit))).all()
    width = len(_CURRENT_COLUMNS)
    return [(_current(row[:width]), (*row[width:], row[0])) for row in rows]


async def count(conn: AsyncConnection, criteria: SearchFilter) -> int:
    query = select(func.count()).select_from(resource_table).where(*_where(criteria))
    return int((await conn.execute(query)).scalar_one())


async def first_matches(conn: AsyncConnection, criteria: SearchFilter, limit: int) -> list[Current]:
    rows = (
        await conn.execute(
            select(*_CURRENT_COLUMNS)
            .where(*_where(criteria))
            .order_by(resource_table.c.pk)
            .limit(limit)
        )
    ).all()
    return [_current(row) for row in rows]
