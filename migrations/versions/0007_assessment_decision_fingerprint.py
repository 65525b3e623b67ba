"""assessment decision fingerprint: response rules version 2

A stored assessment now carries the classification of every record and the criteria it was
made under, and either can change without the result changing (a new count that decides
nothing, or new settings that give the same status). The response-status Observation must
get a new version only when the result changes, so the result gets its own fingerprint.
Rows stored before this revision have none (NULL): the recompute derives it from the stored
JSON the first time it meets them (`python -m app recompute` meets them all).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("response_assessment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decision_fingerprint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("response_assessment", schema=None) as batch_op:
        batch_op.drop_column("decision_fingerprint")
