"""subject numbers: one subject, one patient

A live Patient's subject number (identifier of system `<base>/sid/subject`) goes into
`resource.subject`, under a unique index: the same number cannot be enrolled twice. Before
it, `"S01-001 "`, the full-width `"S01-００１"` or one with a zero-width space inside each
made a second patient.

Numbers already stored are compared as a reader sees them (NFKC, without invisible
characters, trimmed: `app.services.subjects.comparison_key`). Patients whose numbers
compare equal are listed and the migration stops, changing nothing: decide which one is the
subject, move its records and delete the other (or give it its own number), then migrate
again. So does a Patient with two different numbers. Otherwise every number is normalised
where the server looks it up (`resource.subject` and the identifier's search value); the
stored resources keep what was sent (a version is never changed), and the Patients whose
stored number differs from its normalised form are printed, so a site can correct them with
an update and its reason.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections import defaultdict
from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The tables as this revision leaves them: the backfill must not follow later model changes.
_resource = sa.table(
    "resource",
    sa.column("pk", sa.BigInteger()),
    sa.column("resource_type", sa.String()),
    sa.column("id", sa.String()),
    sa.column("deleted", sa.Boolean()),
    sa.column("content", sa.Text()),
    sa.column("subject", sa.String()),
)
_token = sa.table(
    "search_token",
    *(sa.column(name) for name in ("resource_pk", "resource_type", "param", "system", "value")),
)


_SUBJECT_LENGTH = 64


class DuplicateSubjects(RuntimeError):
    """Stored Patients that are one subject to a reader: the migration cannot choose."""


def upgrade() -> None:
    # Checked before any change: SQLite's DDL is not transactional here, so a refusal after
    # the new column would leave it behind, and the next attempt would fail on it.
    numbers, renamed = _plan()
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject", sa.String(length=64), nullable=True))
    _backfill(numbers, renamed)
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.create_index(
            "uq_resource_subject",
            ["subject"],
            unique=True,
            sqlite_where=sa.text("subject IS NOT NULL"),
            postgresql_where=sa.text("subject IS NOT NULL"),
        )


def _plan() -> tuple[dict[int, tuple[str, set[str]]], list[tuple[str, str, str]]]:
    """Each live Patient's number as it will be found (by row pk, with the systems it was
    sent in), and the Patients whose stored number differs from it; raises, listing them,
    when Patients are one subject to a reader."""
    from app.services.subjects import comparison_key
    from app.settings import get_settings

    code_systems = get_settings().code_systems()
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_resource.c.pk, _resource.c.id, _resource.c.content)
        .where(_resource.c.resource_type == "Patient", sa.not_(_resource.c.deleted))
        .order_by(_resource.c.pk)
    ).all()
    holders: dict[str, list[tuple[str, str]]] = defaultdict(list)  # key -> (id, as stored)
    problems = []
    numbers: dict[int, tuple[str, set[str]]] = {}  # pk -> (key, the systems it was sent in)
    for pk, patient_id, content in rows:
        sent = [
            (identifier["system"], identifier["value"])
            for identifier in orjson.loads(content).get("identifier") or ()
            if isinstance(identifier, dict)
            and code_systems.is_subject(identifier.get("system"))
            and isinstance(identifier.get("value"), str)
        ]
        keys = {comparison_key(value) for _, value in sent}
        if len(keys) > 1:
            shown = ", ".join(repr(value) for _, value in sent)
            problems.append(f"Patient/{patient_id} has several subject numbers: {shown}")
            continue
        if keys:
            key = keys.pop()
            holders[key] += [(patient_id, value) for _, value in sent[:1]]
            if len(key) > _SUBJECT_LENGTH:  # no valid number either: nothing to protect
                print(f"migration {revision}: Patient/{patient_id} has no valid subject number")
                continue
            numbers[pk] = (key, {system for system, _ in sent})
    for key, patients in sorted(holders.items()):
        if len(patients) > 1:
            shown = ", ".join(f"Patient/{ident} ({value!r})" for ident, value in patients)
            problems.append(f"subject number {key!r} is held by {shown}")
    if problems:
        raise DuplicateSubjects(
            f"Migration {revision} stopped, nothing was changed: one subject, one patient. "
            + "; ".join(problems)
            + ". Keep one Patient per subject (move the other's records to it and delete "
            "it, or give it its own number), then run `alembic upgrade head` again."
        )
    renamed = [
        (ident, value, key)
        for key, patients in holders.items()
        if len(key) <= _SUBJECT_LENGTH
        for ident, value in patients
        if value != key
    ]
    return numbers, sorted(renamed)


def _backfill(
    numbers: dict[int, tuple[str, set[str]]], renamed: list[tuple[str, str, str]]
) -> None:
    bind = op.get_bind()
    for pk, (key, systems) in numbers.items():
        bind.execute(sa.update(_resource).where(_resource.c.pk == pk).values(subject=key))
        bind.execute(
            sa.update(_token)
            .where(
                _token.c.resource_pk == pk,
                _token.c.param == "identifier",
                _token.c.system.in_(sorted(systems)),
            )
            .values(value=key)
        )
    for ident, value, key in renamed:
        print(
            f"migration {revision}: Patient/{ident} stores subject number {value!r}; "
            f"found as {key!r}"
        )


def downgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_index("uq_resource_subject")
        batch_op.drop_column("subject")
