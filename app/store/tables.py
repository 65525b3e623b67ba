"""The tables. Alembic migrations create them; `SQLModel.metadata` is what `alembic check`
compares the migrations against.

Three tables serve all resource types:
- `resource`: the current version of every resource (also of deleted ones, as a tombstone),
  with the index columns search and the response engine need;
- `resource_version`: every version ever written, never changed: `_history` and the audit
  requirement that a change never obscures what was recorded before;
- `search_token`, `search_string`, `search_quantity`: the token, string and number/quantity
  search values of current versions, replaced whenever the resource changes.

`content` is the exact JSON served to clients, stored as text: a read returns it without
parsing or serialising again, the hot path the benchmark issue measures.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

# A naming convention before the first revision keeps constraint names identical on SQLite
# and PostgreSQL, so later migrations can refer to them.
SQLModel.metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigIntPk = BigInteger().with_variant(Integer(), "sqlite")


# What `repository.patient_fact_rows` filters on and returns besides the index's key
# (patient_id, kind): carried in ix_resource_facts so the read never visits the table.
FACT_COLUMNS = (
    "resource_type",
    "deleted",
    "id",
    "status",
    "effective_start",
    "effective_end",
    "value_norm",
)


class ResourceRow(SQLModel, table=True):
    """Current version of a resource. `pk` only grows: keyset paging orders on it."""

    __tablename__ = "resource"
    __table_args__ = (
        UniqueConstraint("resource_type", "id", name="uq_resource_type_id"),
        Index("ix_resource_patient", "resource_type", "patient_id", "effective_start", "pk"),
        Index("ix_resource_type_pk", "resource_type", "pk"),
        # The recompute's read (`repository.patient_fact_rows`) from the index alone: on
        # PostgreSQL every column it filters on or returns is in the index (migration 0005).
        Index(
            "ix_resource_facts",
            "patient_id",
            "kind",
            postgresql_include=FACT_COLUMNS,
        ),
        # One subject, one patient: a live Patient's subject number is unique in the trial
        # (migration 0007). Partial: the other rows, all without one, stay out of it.
        Index(
            "uq_resource_subject",
            "subject",
            unique=True,
            sqlite_where=text("subject IS NOT NULL"),
            postgresql_where=text("subject IS NOT NULL"),
        ),
    )

    pk: int | None = Field(default=None, sa_column=Column(BigIntPk, primary_key=True))
    resource_type: str = Field(sa_column=Column(String(40), nullable=False))
    id: str = Field(sa_column=Column(String(64), nullable=False))
    version_id: int = Field(sa_column=Column(Integer, nullable=False))
    last_updated: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    deleted: bool = Field(sa_column=Column(Boolean, nullable=False))
    content: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Index columns, derived from `content` on every write (naive UTC datetimes).
    patient_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    # The range the resource's date covers: its clinical time (effective[x],
    # AdverseEvent.date), for a Patient its birth date.
    effective_start: datetime | None = Field(
        default=None, sa_column=Column(DateTime(), nullable=True)
    )
    effective_end: datetime | None = Field(
        default=None, sa_column=Column(DateTime(), nullable=True)
    )
    value_norm: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    # What the response engine reads, so a recompute never parses stored JSON:
    # `kind` is the trial role (platelet-count, bleeding-grade, bleeding-event, study-drug,
    # rescue, concomitant, response-status), `status` the FHIR status (AdverseEvent:
    # actuality).
    kind: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    status: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    # The trial site: a Patient's own, every other record's inherited from its subject.
    # Site isolation filters on it.
    site: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    # A live Patient's subject number, normalised (services/subjects.py); None on every
    # other row, and on a deleted Patient's (its number is free again).
    subject: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


class ResponseAssessmentRow(SQLModel, table=True):
    """The latest assessment of each patient, as `$response-status` serves it.

    `fingerprint` hashes the assessment without its computation time: a recompute rewrites
    the row only when it differs. `decision_fingerprint` hashes the result alone (without the
    criteria and the classifications it rests on): the response-status Observation gets a
    new version only when that differs. NULL in a row written before it existed (rules
    version 1): the recompute then derives it from `content`. `fold_state` is what a later
    count is appended to; the classifications are rows of their own.
    """

    __tablename__ = "response_assessment"
    __table_args__ = (Index("ix_response_assessment_status", "status", "best_response"),)

    patient_id: str = Field(sa_column=Column(String(64), primary_key=True))
    status: str = Field(sa_column=Column(String(3), nullable=False))
    best_response: str | None = Field(default=None, sa_column=Column(String(3), nullable=True))
    fingerprint: str = Field(sa_column=Column(String(64), nullable=False))
    computed_at: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    observation_id: str = Field(sa_column=Column(String(64), nullable=False))
    content: str = Field(sa_column=Column(Text, nullable=False))
    decision_fingerprint: str | None = Field(
        default=None, sa_column=Column(String(64), nullable=True)
    )
    # The engine's state after this assessment (`app.engine.stored`, JSON): a later count is
    # appended to it instead of re-assessing the whole history. NULL: none kept.
    fold_state: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The classifications are rows of `response_classification` (so a later count adds one,
    # and the document is not rewritten whole): how many, and their hash chain. NULL: a row
    # written before them, whose classifications are in `content`.
    classification_count: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    classification_digest: str | None = Field(
        default=None, sa_column=Column(String(64), nullable=True)
    )


class ResponseClassificationRow(SQLModel, table=True):
    """A run of classifications of a patient's stored assessment: a JSON array of
    `Classification.as_dict` objects, `seq` the place of its first in clinical order (from
    0). A count appended adds a row of one; a full recompute writes runs of 256."""

    __tablename__ = "response_classification"

    patient_id: str = Field(sa_column=Column(String(64), primary_key=True))
    seq: int = Field(sa_column=Column(Integer, primary_key=True))
    content: str = Field(sa_column=Column(Text, nullable=False))


class ResourceVersion(SQLModel, table=True):
    """One immutable version; `content` is None for a deletion."""

    __tablename__ = "resource_version"
    __table_args__ = (Index("ix_resource_version_updated", "resource_type", "last_updated"),)

    resource_type: str = Field(sa_column=Column(String(40), primary_key=True))
    id: str = Field(sa_column=Column(String(64), primary_key=True))
    version_id: int = Field(sa_column=Column(Integer, primary_key=True))
    last_updated: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    method: str = Field(sa_column=Column(String(10), nullable=False))
    content: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class SearchValue(SQLModel):
    """What every search value row has: the resource whose current version it indexes (the
    rows go with it) and the search parameter."""

    pk: int | None = Field(default=None, primary_key=True, sa_type=BigIntPk)
    resource_pk: int = Field(
        sa_type=BigIntPk, foreign_key="resource.pk", ondelete="CASCADE", index=True
    )
    resource_type: str = Field(sa_type=String(40))
    param: str = Field(sa_type=String(40))


class SearchToken(SearchValue, table=True):
    """A token value of a current version; replaced whenever the resource changes."""

    __tablename__ = "search_token"
    __table_args__ = (Index("ix_search_token_lookup", "resource_type", "param", "value", "system"),)

    # '' rather than NULL for "no system", so `system|code` lookups are one equality.
    system: str = Field(sa_column=Column(String(255), nullable=False))
    value: str = Field(sa_column=Column(String(255), nullable=False))


class SearchString(SearchValue, table=True):
    """A string search value (Patient names) of a current version."""

    __tablename__ = "search_string"
    __table_args__ = (Index("ix_search_string_lookup", "resource_type", "param", "normalised"),)

    # As sent (`:exact`), and without case or accents (FHIR's default starts-with match and
    # `:contains`). Text: a name has no length limit in FHIR.
    value: str = Field(sa_column=Column(Text, nullable=False))
    normalised: str = Field(sa_column=Column(Text, nullable=False))


class SearchQuantity(SearchValue, table=True):
    """A number or quantity search value of a current version (Observation value-quantity,
    AdverseEvent grade)."""

    __tablename__ = "search_quantity"
    __table_args__ = (
        Index("ix_search_quantity_norm", "resource_type", "param", "value_norm"),
        Index("ix_search_quantity_value", "resource_type", "param", "code", "value"),
    )

    value: float = Field(sa_column=Column(Float, nullable=False))
    # '' when absent, as in `search_token`; `code` is the unit's code, else its display text.
    system: str = Field(sa_column=Column(String(255), nullable=False))
    code: str = Field(sa_column=Column(String(255), nullable=False))
    # The value in 10^9/L when the unit is a count per volume the server knows (codes.py),
    # so `lt30|http://unitsofmeasure.org|10*9/L` finds a count sent as 25000 /uL.
    value_norm: float | None = Field(default=None, sa_column=Column(Float, nullable=True))


class AuditEventRow(SQLModel, table=True):
    """The append-only audit trail: one FHIR AuditEvent per row, hash-chained in `chain_seq`
    order.

    A write inserts its record unchained (`digest` = sha256(id, content) only); the audit
    sequencer (`app.audit.chain`) gives it `chain_seq`, `prev_hash` and `hash` =
    sha256(prev_hash, id, content) after the commit. Editing or removing a row breaks the
    chain at that row, or its digest before it is chained (`python -m app audit verify`).
    On PostgreSQL a trigger refuses DELETE and every UPDATE but the sequencer's (migration
    0010); no API route changes a row.
    """

    __tablename__ = "audit_event"
    __table_args__ = (
        Index("ix_audit_event_entity", "entity_type", "entity_id"),
        Index("ix_audit_event_agent", "agent", "recorded"),
        Index("ix_audit_event_recorded", "recorded"),
        Index("uq_audit_event_chain_seq", "chain_seq", unique=True),
        Index(
            "ix_audit_event_unchained",
            "seq",
            sqlite_where=text("chain_seq IS NULL"),
            postgresql_where=text("chain_seq IS NULL"),
        ),
    )

    seq: int | None = Field(default=None, sa_column=Column(BigIntPk, primary_key=True))
    id: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    recorded: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    action: str = Field(sa_column=Column(String(1), nullable=False))  # C R U D E
    outcome: str = Field(sa_column=Column(String(2), nullable=False))  # 0 4 8 12
    agent: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    site: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    entity_type: str | None = Field(default=None, sa_column=Column(String(40), nullable=True))
    entity_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    content: str = Field(sa_column=Column(Text, nullable=False))
    # NULL on the records stored before migration 0010 (chained already, in `seq` order).
    digest: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    appended: datetime | None = Field(default=None, sa_column=Column(DateTime(), nullable=True))
    # Set by the sequencer, once; NULL until the record is chained.
    chain_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    prev_hash: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    hash: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


class AuditDisclosureRow(SQLModel, table=True):
    """A resource version an audited search returned (a match or an included resource): one
    row per resource, so `GET /fhir/AuditEvent?entity=Type/id` finds who was shown it.

    An index of what the record's content (AuditEvent.entity, covered by its hash) already
    holds, written in the record's transaction; append-only like the trail (PostgreSQL
    trigger)."""

    __tablename__ = "audit_disclosure"
    __table_args__ = (Index("ix_audit_disclosure_entity", "entity_type", "entity_id"),)

    audit_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("audit_event.id", ondelete="RESTRICT"), primary_key=True
        )
    )
    entity_type: str = Field(sa_column=Column(String(40), primary_key=True))
    entity_id: str = Field(sa_column=Column(String(64), primary_key=True))
    version: int = Field(sa_column=Column(Integer, nullable=False))


class ProvenanceRow(SQLModel, table=True):
    """Why a version was written: the client's Provenance (X-Provenance), completed by the
    server with the target version, the time and the signer from the token."""

    __tablename__ = "provenance"
    __table_args__ = (Index("ix_provenance_target", "target_type", "target_id"),)

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    target_type: str = Field(sa_column=Column(String(40), nullable=False))
    target_id: str = Field(sa_column=Column(String(64), nullable=False))
    target_version: int = Field(sa_column=Column(Integer, nullable=False))
    recorded: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    content: str = Field(sa_column=Column(Text, nullable=False))


class Hl7MessageRow(SQLModel, table=True):
    """An HL7 v2 message whose results were stored, and the ACK it was answered with.

    The unique key is the sender's own name for the message (MSH-10 within MSH-3/MSH-4) and
    the caller: a redelivery, even a concurrent one, finds its row and gets the same ACK;
    one caller never receives another's. Only the hash of the message is kept: the message
    itself may carry names the trial must not hold.
    """

    __tablename__ = "hl7_message"
    __table_args__ = (
        UniqueConstraint(
            "agent",
            "sending_application",
            "sending_facility",
            "control_id",
            name="uq_hl7_message_sender_control_id",
        ),
    )

    pk: int | None = Field(default=None, sa_column=Column(BigIntPk, primary_key=True))
    agent: str = Field(sa_column=Column(String(255), nullable=False))
    sending_application: str = Field(sa_column=Column(String(255), nullable=False))
    sending_facility: str = Field(sa_column=Column(String(255), nullable=False))
    control_id: str = Field(sa_column=Column(String(255), nullable=False))
    received: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    content_hash: str = Field(sa_column=Column(String(64), nullable=False))
    ack: str = Field(sa_column=Column(Text, nullable=False))


class ExportJobRow(SQLModel, table=True):
    """A Bulk Data export: who asked for what, as of which instant, and how far it got.

    The state lives here, not in a worker, so any worker of any replica answers its status
    and serves its files. `lease_owner`/`lease_expires` say which worker generates it and
    until when; a worker renews the lease as it writes, and another takes over a job whose
    lease ran out (its worker died) from the last complete file (`attempts` counts them).
    """

    __tablename__ = "export_job"
    __table_args__ = (
        Index("ix_export_job_status", "status", "lease_expires"),
        Index("ix_export_job_expires", "expires"),
    )

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    owner: str = Field(sa_column=Column(String(255), nullable=False))  # the token's sub
    # The caller's sites when it asked (JSON list), or NULL for every site (an admin).
    sites: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    request: str = Field(sa_column=Column(Text, nullable=False))  # the kick-off URL
    types: str = Field(sa_column=Column(String(255), nullable=False))  # comma-separated
    since: datetime | None = Field(default=None, sa_column=Column(DateTime(), nullable=True))
    transaction_time: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))  # queued running ...
    progress: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    lease_owner: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    lease_expires: datetime | None = Field(
        default=None, sa_column=Column(DateTime(), nullable=True)
    )
    attempts: int = Field(sa_column=Column(Integer, nullable=False))
    created: datetime = Field(sa_column=Column(DateTime(), nullable=False))
    finished: datetime | None = Field(default=None, sa_column=Column(DateTime(), nullable=True))
    # After this the job and its files are deleted (APP_EXPORT_RETENTION_HOURS).
    expires: datetime = Field(sa_column=Column(DateTime(), nullable=False))


class ExportFileRow(SQLModel, table=True):
    """One NDJSON file of a job: the resources of one type with `first_pk < pk <= last_pk`
    (the `resource` table's key, the order the job reads in), once `complete`."""

    __tablename__ = "export_file"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_export_file_job_number"),)

    pk: int | None = Field(default=None, sa_column=Column(BigIntPk, primary_key=True))
    job_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("export_job.id", ondelete="CASCADE"), nullable=False
        )
    )
    number: int = Field(sa_column=Column(Integer, nullable=False))
    resource_type: str = Field(sa_column=Column(String(40), nullable=False))
    first_pk: int = Field(sa_column=Column(BigInteger, nullable=False))
    last_pk: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    count: int = Field(sa_column=Column(Integer, nullable=False))
    complete: bool = Field(sa_column=Column(Boolean, nullable=False))


class ExportChunkRow(SQLModel, table=True):
    """A piece of a file's NDJSON (whole lines, about a MiB): a download streams them in
    `seq` order, one at a time, so neither writing nor serving holds a file in memory."""

    __tablename__ = "export_chunk"

    file_pk: int = Field(
        sa_column=Column(
            BigIntPk,
            ForeignKey("export_file.pk", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    seq: int = Field(sa_column=Column(Integer, primary_key=True))
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


resource_table = ResourceRow.__table__  # type: ignore[attr-defined]
version_table = ResourceVersion.__table__  # type: ignore[attr-defined]
token_table = SearchToken.__table__  # type: ignore[attr-defined]
string_table = SearchString.__table__  # type: ignore[attr-defined]
quantity_table = SearchQuantity.__table__  # type: ignore[attr-defined]
assessment_table = ResponseAssessmentRow.__table__  # type: ignore[attr-defined]
classification_table = ResponseClassificationRow.__table__  # type: ignore[attr-defined]
audit_table = AuditEventRow.__table__  # type: ignore[attr-defined]
disclosure_table = AuditDisclosureRow.__table__  # type: ignore[attr-defined]
provenance_table = ProvenanceRow.__table__  # type: ignore[attr-defined]
hl7_message_table = Hl7MessageRow.__table__  # type: ignore[attr-defined]
export_job_table = ExportJobRow.__table__  # type: ignore[attr-defined]
export_file_table = ExportFileRow.__table__  # type: ignore[attr-defined]
export_chunk_table = ExportChunkRow.__table__  # type: ignore[attr-defined]
