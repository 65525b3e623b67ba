"""resource facts index: the recompute's read from a covering index

Every write of a patient's record recomputes the patient's response and reads its rows
(`repository.patient_fact_rows`: resource_type, patient_id, kind and deleted filter; kind,
id, status, effective_start, value_norm, effective_end are returned). Through
ix_resource_patient PostgreSQL fetched each of a patient's ~1,000 rows from the table (208
buffers per recompute, bench/README.md, proposal 4). This index has the key
(patient_id, kind) and carries the other columns (INCLUDE), so the read is an index-only
scan once VACUUM has marked the table's pages all-visible (autovacuum does). It costs every
resource insert one more index entry (~2.5 us of server time per row, measured), and its
build blocks writes to `resource` while it runs (not CONCURRENTLY, which cannot run in the
migration's transaction): about a second per 200,000 resources on the bench machine.

On SQLite the index is the plain (patient_id, kind): SQLite has no INCLUDE, and the models
declare one index for both databases (`alembic check` compares them on each). It still
lets SQLite seek a patient's rows of the engine's kinds directly; SQLite serves development
and tests, where the covering part does not matter.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As `app.store.tables.FACT_COLUMNS` when this revision was written (a migration must not
# change when the models do).
FACT_COLUMNS = [
    "resource_type",
    "deleted",
    "id",
    "status",
    "effective_start",
    "effective_end",
    "value_norm",
]


def upgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.create_index(
            "ix_resource_facts",
            ["patient_id", "kind"],
            unique=False,
            postgresql_include=FACT_COLUMNS,
        )


def downgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_index("ix_resource_facts")
