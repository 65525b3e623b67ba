"""A count appended to the stored fold state (issue 20, part 4) stores exactly what a full
recompute of the patient's whole history stores, whatever came before it: drawn histories
of later, earlier and simultaneous counts, amendments, deletions, bleeds, rescues and
counts of statuses the engine does not read, through the API, on both databases.

After every request the stored assessment (its JSON but the computation time, its
classification rows, both fingerprints, the status and the fold state) is compared with
what a full recompute makes from the database at that moment.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from app.services import response
from app.store import repository as repo
from tests import builders
from tests.test_crud import FHIR, create

DOSE = datetime(2025, 3, 10, 8, tzinfo=UTC)
VALUES = [5.0, 25.0, 35.0, 60.0, 99.0, 110.0, 150.0]
OPERATIONS = {
    "later": 45,
    "earlier": 8,
    "same instant": 5,
    "later, not read": 4,
    "amend": 10,
    "delete": 8,
    "bleed": 8,
    "rescue": 4,
    "later, a bleed's day": 8,
}


def _instant(time: datetime) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ")


async def _assert_stored_is_a_full_recompute(app: Any, patient_id: str, step: str) -> None:
    services = app.state.services
    async with services.db.read() as conn:
        stored = await repo.get_assessment(conn, patient_id)
        rows = await repo.classification_contents(conn, patient_id)
        made = await response._assessed(services, conn, patient_id)
    assert stored is not None
    document = orjson.loads(stored.content)
    expected = orjson.loads(
        response._document(made.assessment, made.result_document, stored.computed_at)
    )
    document.pop("computed_at"), expected.pop("computed_at")
    assert document == expected, step
    # The same classifications, however the rows run (appended ones, or runs of 256).
    expected_rows = response._classification_rows(made.assessment.classifications)
    assert _items(rows) == _items([content for _, content in expected_rows]), step
    assert (stored.fingerprint, stored.decision_fingerprint) == (made.fingerprint, made.result)
    assert stored.status == made.assessment.status, step
    assert stored.fold_state == made.fold_state, step
    assert (stored.classification_count, stored.classification_digest) == (
        made.classification_count,
        made.classification_digest,
    ), step


def _items(rows: list[str]) -> list[Any]:
    return [item for row in rows for item in orjson.loads(row)]


class _Story:
    """One patient's drawn history: what exists, and what to send next."""

    def __init__(self, client: Any, patient_id: str, rng: random.Random) -> None:
        self.client, self.patient_id, self.rng = client, patient_id, rng
        self.latest = DOSE
        self.counts: dict[str, tuple[datetime, float]] = {}
        self.bleed_days: list[datetime] = []

    async def count(self, time: datetime, **extra: Any) -> None:
        value = self.rng.choice(VALUES)
        body = builders.platelet_count(self.patient_id, _instant(time), value, **extra)
        made = (await create(self.client, body)).json()
        if extra.get("status", "final") == "final":
            self.counts[made["id"]] = (time, value)
        self.latest = max(self.latest, time)

    async def step(self, operation: str) -> None:
        rng, later = self.rng, self.latest + timedelta(hours=6 * self.rng.randint(1, 12))
        if operation == "later":
            await self.count(later)
        elif operation == "earlier":
            await self.count(DOSE + (self.latest - DOSE) * rng.random())
        elif operation == "same instant":
            await self.count(self.latest)
        elif operation == "later, not read":
            await self.count(later, status=rng.choice(["preliminary", "entered-in-error"]))
        elif operation == "later, a bleed's day" and self.bleed_days:
            await self.count(self.bleed_days[-1] + timedelta(hours=1))
        elif operation in ("amend", "delete") and self.counts:
            # In the order they were made: ids are random, the story must not be.
            await self._change(operation, rng.choice(list(self.counts)))
        elif operation == "bleed":
            self.bleed_days.append(later)
            body = builders.bleeding_grade(self.patient_id, _instant(later), rng.randint(0, 4))
            await create(self.client, body)
            self.latest = later
        elif operation == "rescue":
            body = builders.administration(self.patient_id, _instant(later), role="rescue")
            await create(self.client, body)
            self.latest = later
        else:
            await self.count(later)

    async def _change(self, operation: str, ident: str) -> None:
        path = f"/fhir/Observation/{ident}"
        if operation == "delete":
            assert (await self.client.delete(path)).status_code in (200, 204)
            del self.counts[ident]
            return
        time, _ = self.counts[ident]
        value = self.rng.choice(VALUES)
        body = {
            **builders.platelet_count(self.patient_id, _instant(time), value, status="amended"),
            "id": ident,
        }
        answer = await self.client.put(path, json=body, headers={"Content-Type": FHIR})
        assert answer.status_code == 200, answer.text
        self.counts[ident] = (time, value)


@pytest.mark.parametrize("seed", range(6))
async def test_appended_counts_store_what_a_full_recompute_stores(
    app: Any, client: Any, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    appended: list[bool] = []
    original = response._appended

    def counted(*args: Any) -> Any:
        made = original(*args)
        appended.append(made is not None)
        return made

    monkeypatch.setattr(response, "_appended", counted)
    # Runs of 4 classifications per row in half the stories, so that a full recompute
    # writes several rows and appended ones follow them.
    monkeypatch.setattr(response, "CLASSIFICATIONS_PER_ROW", 4 if seed % 2 else 256)
    rng = random.Random(seed)
    patient_id = (await create(client, builders.patient(f"S01-{seed:03d}"))).json()["id"]
    story = _Story(client, patient_id, rng)
    for hours in (-30, -6):
        await story.count(DOSE + timedelta(hours=hours))
    await create(client, builders.administration(patient_id, _instant(DOSE)))
    await _assert_stored_is_a_full_recompute(app, patient_id, "after the dose")
    operations, weights = zip(*OPERATIONS.items(), strict=True)
    for n in range(30):
        operation = rng.choices(operations, weights)[0]
        await story.step(operation)
        await _assert_stored_is_a_full_recompute(app, patient_id, f"step {n}: {operation}")
    # The story must have taken the fast path, and declined it too.
    assert appended.count(True) >= 8, appended
    assert appended.count(False) >= 1, appended


async def test_an_assessment_stored_before_classification_rows_is_served_then_moved(
    app: Any, client: Any
) -> None:
    """A row written before the classifications had rows of their own holds them in its
    JSON, and has no fold state: `$response-status` serves them from there, and the next
    count recomputes the patient in full and moves them into rows."""
    patient_id = (await create(client, builders.patient("S01-100"))).json()["id"]
    story = _Story(client, patient_id, random.Random(7))
    for hours in (-30, -6):
        await story.count(DOSE + timedelta(hours=hours))
    await create(client, builders.administration(patient_id, _instant(DOSE)))
    for _ in range(3):
        await story.count(story.latest + timedelta(days=2))
    path = f"/fhir/Patient/{patient_id}/$response-status"
    served = (await client.get(path)).json()
    assert len(served["classifications"]) == 5
    services = app.state.services
    async with services.db.write() as conn:
        stored = await repo.get_assessment(conn, patient_id)
        assert stored is not None
        document = orjson.loads(stored.content)
        old = {key: value for key, value in served.items() if key != "criteria"}
        old["criteria"] = served["criteria"]  # the order the older code wrote
        old["computed_at"], old["observation"] = document["computed_at"], document["observation"]
        await conn.execute(
            text(
                "UPDATE response_assessment SET content = :content, fold_state = NULL, "
                "classification_count = NULL, classification_digest = NULL "
                "WHERE patient_id = :patient_id"
            ),
            {"content": orjson.dumps(old).decode(), "patient_id": patient_id},
        )
        await conn.execute(text("DELETE FROM response_classification"))
    assert (await client.get(path)).json() == served
    await story.count(story.latest + timedelta(days=2))
    await _assert_stored_is_a_full_recompute(app, patient_id, "after the older row")
    again = (await client.get(path)).json()
    assert again["classifications"][:5] == served["classifications"]
    assert len(again["classifications"]) == 6


@pytest.mark.parametrize(
    "damage",
    ["not json", "[]", "without its tracer"],
)
async def test_a_state_that_cannot_be_read_means_a_full_recompute(
    app: Any, client: Any, damage: str
) -> None:
    """The fold state is a short cut, never the truth: one that is not JSON, not an object,
    or lacks a part is passed over, the patient is recomputed in full, and a good state is
    stored again."""
    patient_id = (await create(client, builders.patient("S01-200"))).json()["id"]
    story = _Story(client, patient_id, random.Random(3))
    for hours in (-30, -6):
        await story.count(DOSE + timedelta(hours=hours))
    await create(client, builders.administration(patient_id, _instant(DOSE)))
    await story.count(story.latest + timedelta(days=2))
    services = app.state.services
    async with services.db.write() as conn:
        stored = await repo.get_assessment(conn, patient_id)
        assert stored is not None and stored.fold_state is not None
        state = orjson.loads(stored.fold_state)
        del state["tracer"]
        damaged = {
            "not json": "{not json",
            "[]": "[]",
            "without its tracer": orjson.dumps(state).decode(),
        }[damage]
        await conn.execute(
            text("UPDATE response_assessment SET fold_state = :state WHERE patient_id = :id"),
            {"state": damaged, "id": patient_id},
        )
    await story.count(story.latest + timedelta(days=2))
    await _assert_stored_is_a_full_recompute(app, patient_id, damage)
