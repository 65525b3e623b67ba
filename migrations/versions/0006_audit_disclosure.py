"""audit disclosure: which resources each audited search returned

A search's AuditEvent named its query, not what it showed the caller: "who was shown this
patient's counts" had no answer. The record's content now lists each returned version
(AuditEvent.entity, under the record's hash); this table indexes them so that
`GET /fhir/AuditEvent?entity=Type/id` finds those searches. Append-only like the trail.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_disclosure",
        sa.Column("audit_id", sa.String(length=64), nullable=False),
        sa.Column("entity_type", sa.String(length=40), nullable=False),
        sa.Column("entity_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["audit_id"],
            ["audit_event.id"],
            name=op.f("fk_audit_disclosure_audit_id_audit_event"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint(
            "audit_id", "entity_type", "entity_id", name=op.f("pk_audit_disclosure")
        ),
    )
    with op.batch_alter_table("audit_disclosure", schema=None) as batch_op:
        batch_op.create_index(
            "ix_audit_disclosure_entity", ["entity_type", "entity_id"], unique=False
        )
    if op.get_bind().dialect.name == "postgresql":
        # The function of 0002 names its table in its message: one for this table.
        op.execute(
            """
            CREATE FUNCTION audit_disclosure_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'audit_disclosure is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            """
            CREATE TRIGGER audit_disclosure_append_only
            BEFORE UPDATE OR DELETE ON audit_disclosure
            FOR EACH ROW EXECUTE FUNCTION audit_disclosure_append_only()
            """
        )
        op.execute(
            """
            CREATE TRIGGER audit_disclosure_no_truncate
            BEFORE TRUNCATE ON audit_disclosure
            FOR EACH STATEMENT EXECUTE FUNCTION audit_disclosure_append_only()
            """
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_disclosure_no_truncate ON audit_disclosure")
        op.execute("DROP TRIGGER IF EXISTS audit_disclosure_append_only ON audit_disclosure")
        op.execute("DROP FUNCTION IF EXISTS audit_disclosure_append_only()")
    with op.batch_alter_table("audit_disclosure", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_disclosure_entity")
    op.drop_table("audit_disclosure")
