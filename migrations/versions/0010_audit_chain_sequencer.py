"""audit chain built after commit, by one sequencer

Until now every write took one lock for the whole trail (an advisory lock on PostgreSQL),
read the chain's head and hashed its record under it, and held the lock until its COMMIT:
writes from every worker and replica ran one at a time through that window. From this
revision a write inserts its record *unchained* (no `prev_hash`, `hash` or `chain_seq`,
but with `digest`, the SHA-256 of its id and content) in its own transaction, and the
sequencer (`app.audit.chain`) links committed records into the chain afterwards.

- `chain_seq`: the record's position in the chain, given by the sequencer (NULL until
  then). The records already stored are chained in `seq` order, so they take `chain_seq =
  seq` and every hash and anchor printed before stays valid.
- `digest`: fixed at insert, so a record changed between its commit and its chaining is
  seen (the sequencer refuses to chain it; `audit verify` names it).
- `appended`: when the record was inserted (UTC), so `audit verify` can tell a record the
  sequencer is late with from one it has not had time to reach.

PostgreSQL's append-only trigger now lets exactly one UPDATE through: the sequencer's,
which fills in the chain columns of an unchained record and changes nothing else.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RECORD_COLUMNS = (
    "seq, id, recorded, action, outcome, agent, site, entity_type, entity_id, content, "
    "digest, appended"
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # The backfill below is an UPDATE, which the trigger of 0002 refuses to everyone.
        op.execute("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only")
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chain_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("appended", sa.DateTime(), nullable=True))
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=True)
    op.execute("UPDATE audit_event SET chain_seq = seq")
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.create_index("uq_audit_event_chain_seq", ["chain_seq"], unique=True)
        # The sequencer's work list: small (what is not chained yet), read every pass.
        batch_op.create_index(
            "ix_audit_event_unchained",
            ["seq"],
            unique=False,
            sqlite_where=sa.text("chain_seq IS NULL"),
            postgresql_where=sa.text("chain_seq IS NULL"),
        )
    if not postgresql:
        return
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
        BEGIN
            -- The sequencer links an unchained record: it sets the three chain columns,
            -- once, and every other column stays as it was inserted.
            IF TG_OP = 'UPDATE' AND OLD.chain_seq IS NULL AND NEW.chain_seq IS NOT NULL
                AND NEW.prev_hash IS NOT NULL AND NEW.hash IS NOT NULL
                AND ROW({", ".join(f"NEW.{c.strip()}" for c in _RECORD_COLUMNS.split(","))})
                    IS NOT DISTINCT FROM
                    ROW({", ".join(f"OLD.{c.strip()}" for c in _RECORD_COLUMNS.split(","))})
            THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'audit_event is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute("ALTER TABLE audit_event ENABLE TRIGGER audit_event_append_only")


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    bind = op.get_bind()
    unchained = bind.execute(
        sa.text("SELECT count(*) FROM audit_event WHERE chain_seq IS NULL")
    ).scalar_one()
    # The revisions before this one walk the chain in `seq` order.
    reordered = bind.execute(
        sa.text(
            "SELECT count(*) FROM (SELECT chain_seq, lag(chain_seq) OVER (ORDER BY seq) AS "
            "before FROM audit_event) AS walk WHERE before > chain_seq"
        )
    ).scalar_one()
    if unchained or reordered:
        raise RuntimeError(
            f"cannot downgrade: {unchained} audit records are not chained yet (start the "
            f"server until they are) and {reordered} are chained out of `seq` order, which "
            "the older revisions cannot verify"
        )
    if postgresql:
        op.execute(
            """
            CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'audit_event is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END;
            $$ LANGUAGE plpgsql
            """
        )
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_event_unchained")
        batch_op.drop_index("uq_audit_event_chain_seq")
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("appended")
        batch_op.drop_column("digest")
        batch_op.drop_column("chain_seq")
