"""assessment fold state and classification rows: a later count appended without the
patient's whole history

The recompute after a platelet count dated after every other record of its patient no
longer reads and re-assesses the patient's whole timeline: it appends the count to the
state the engine kept after the previous recompute (`app.engine.stored`), stored here as
JSON beside the assessment it was made with, in the same write. NULL: no state (a row
stored before this revision, a patient not yet evaluable, or rules version 1); the next
recompute of that patient is a full one and stores a state when it can.

The classifications leave the assessment's JSON for rows of their own, each a JSON array
of a run of them: such a count adds a row of one, where it rewrote every classification,
and a full recompute writes runs of 256. `classification_count` and
`classification_digest` (their hash chain) say what the rows hold. NULL in a row stored
before this revision, whose classifications are still in its JSON until its next recompute
(`$response-status` serves either).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("response_assessment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fold_state", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("classification_count", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("classification_digest", sa.String(length=64), nullable=True))
    op.create_table(
        "response_classification",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", "seq"),
    )


def downgrade() -> None:
    # The classifications go back into nothing: every assessment written since loses them
    # until `python -m app recompute` writes them into its JSON under the older code.
    op.drop_table("response_classification")
    with op.batch_alter_table("response_assessment", schema=None) as batch_op:
        batch_op.drop_column("classification_digest")
        batch_op.drop_column("classification_count")
        batch_op.drop_column("fold_state")
