"""Recompute, in process: the pure engine, and the whole on-write recompute against the
bench database (read the patient's facts, build the timeline, assess, fingerprint, compare
with the stored assessment), inside a transaction that is rolled back."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from app.engine import Administration, BleedingAssessment, Criteria, PlateletCount, Timeline, assess


def _median_us(timings: list[float]) -> float:
    return statistics.median(timings) * 1e6


def synthetic_timeline(counts: int) -> Timeline:
    """A responder with `counts` counts after 8 weeks of dosing, some bleeding grades."""
    start = datetime(2025, 3, 3, 8, tzinfo=UTC)
    doses = tuple(
        Administration(f"d{n}", start + timedelta(days=n), "study-drug") for n in range(56)
    )
    step = timedelta(days=700) / max(counts, 1)
    values = [15.0] + [min(15 + n * 0.5, 160) - (n % 11) for n in range(1, counts)]
    items = [PlateletCount("c0", start - timedelta(hours=1), values[0])] + [
        PlateletCount(f"c{n}", start + step * n, values[n]) for n in range(1, counts)
    ]
    grades = tuple(
        BleedingAssessment(f"b{n}", start + timedelta(days=37 * n, hours=3), n % 2)
        for n in range(1, 8)
    )
    return Timeline("p", tuple(items), grades, (), doses)


def engine_timings(
    sizes: tuple[int, ...] = (100, 500, 1000, 2000), repeat: int = 30
) -> list[dict[str, Any]]:
    criteria = Criteria()
    results = []
    for size in sizes:
        timeline = synthetic_timeline(size)
        assess(timeline, criteria)
        timings = []
        for _ in range(repeat):
            started = time.perf_counter()
            assess(timeline, criteria)
            timings.append(time.perf_counter() - started)
        results.append({"counts": size, "engine_us": round(_median_us(timings), 1)})
    return results


class _Rollback(Exception):
    pass


async def database_timings(dsn: str, patient_id: str, repeat: int = 30) -> dict[str, Any]:
    """The on-write recompute of one patient, split into its parts, median µs each."""
    from app.audit.trail import AuditQueue
    from app.kit.codes import DEFAULT_BLEEDING_EVENT_CODES, DEFAULT_CODE_SYSTEM_BASE, CodeSystems
    from app.kit.dates import utc_now
    from app.services import response
    from app.services.context import ServiceContext
    from app.store import repository as repo
    from app.store.db import Database

    db = Database.from_url(dsn, pool_size=1, max_overflow=0)
    criteria = Criteria()
    ctx = ServiceContext(
        db,
        criteria,
        CodeSystems(DEFAULT_CODE_SYSTEM_BASE, DEFAULT_BLEEDING_EVENT_CODES),
        AuditQueue(db),
    )
    # read_facts: the patient's rows; engine: timeline + assess; recompute: the whole
    # on-write call (both, plus the fingerprint and its comparison with the stored one).
    parts: dict[str, list[float]] = {"read_facts": [], "engine": [], "recompute": []}
    counts = 0
    trial_resources = 0
    try:
        try:
            async with db.write() as conn:
                trial_resources = int(
                    (await conn.exec_driver_sql("SELECT count(*) FROM resource")).scalar_one()
                )
                await response.recompute(ctx, conn, patient_id, utc_now())  # warm, settle
                for _ in range(repeat):
                    started = time.perf_counter()
                    rows = await repo.patient_fact_rows(conn, patient_id, response.ENGINE_KINDS)
                    read = time.perf_counter()
                    assess(response.timeline_from_rows(patient_id, rows, criteria.zone), criteria)
                    parts["read_facts"].append(read - started)
                    parts["engine"].append(time.perf_counter() - read)
                    started = time.perf_counter()
                    await response.recompute(ctx, conn, patient_id, utc_now())
                    parts["recompute"].append(time.perf_counter() - started)
                counts = sum(1 for row in rows if row[0] == "platelet-count")
                raise _Rollback
        except _Rollback:
            pass
    finally:
        await db.dispose()
    return {
        "patient": patient_id,
        "counts": counts,
        "trial_resources": trial_resources,
        **{f"{name}_us": round(_median_us(values), 1) for name, values in parts.items()},
    }
