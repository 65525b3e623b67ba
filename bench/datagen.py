"""A synthetic trial at scale, loaded with COPY.

Every row is what the API itself would store: each resource's index and search values come
from the app's own `index_values`, and each patient's response is computed by the app's own
`response.recompute`. Only the HTTP layer and the per-resource transactions are skipped:
that is what makes a million counts load in minutes instead of hours. A bulk seed is not a
user action, so it writes no AuditEvents (the chain stays valid and empty).

The fast path: plain secondary indexes are dropped, the rows are COPYed in chunks, the
indexes rebuilt, the sequences moved past the loaded keys, and the tables analysed.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from app.kit import codes
from app.kit.limits import InputLimits
from app.services.indexing import index_values
from app.services.subjects import normalise_patient

SUBJECT_SYSTEM = codes.DEFAULT_CODE_SYSTEM_BASE + "/sid/subject"
SITE_SYSTEM = codes.DEFAULT_CODE_SYSTEM_BASE + "/sid/site"
CODE_SYSTEMS = codes.CodeSystems(codes.DEFAULT_CODE_SYSTEM_BASE, codes.DEFAULT_BLEEDING_EVENT_CODES)
# The trial enrols from here on; a new result posted by the bench is dated after the data.
TRIAL_START = datetime(2025, 1, 6, 8, 0, tzinfo=UTC)
DATA_END = datetime(2027, 12, 31, tzinfo=UTC)
SEED = 6776510
CHUNK = 20_000
SITES = [f"S{n:02d}" for n in range(1, 21)]
# A few patients carry exactly this many counts: the recompute scenario assesses one of them.
HEAVY_COUNTS = 1_000
HEAVY_PATIENTS = 4


@dataclass
class Scale:
    patients: int
    counts: int

    @property
    def label(self) -> str:
        return f"{self.patients}p-{self.counts}c"


@dataclass
class Loaded:
    """What the scenarios need to know about the data."""

    patients: list[str] = field(default_factory=list)
    heavy_patients: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)  # a sample of count ids
    sites: list[str] = field(default_factory=list)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def platelet_count(patient_id: str, moment: datetime, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": codes.LOINC,
                    "code": "777-3",
                    "display": "Platelets [#/volume] in Blood by Automated count",
                }
            ]
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _iso(moment),
        "valueQuantity": {
            "value": round(value, 1),
            "unit": "10*9/L",
            "system": codes.UCUM,
            "code": "10*9/L",
        },
    }


def patient(subject: str, site: str, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SUBJECT_SYSTEM, "value": subject}],
        "managingOrganization": {"identifier": {"system": SITE_SYSTEM, "value": site}},
        "gender": rng.choice(["female", "male"]),
        "birthDate": f"{rng.randint(1950, 2000)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }


def dose(patient_id: str, moment: datetime, role: str, drug: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "status": "completed",
        "category": {"coding": [{"system": CODE_SYSTEMS.medication_role, "code": role}]},
        "medicationCodeableConcept": {"text": drug},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _iso(moment),
    }


def bleeding_grade(patient_id: str, moment: datetime, grade: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {
            "coding": [{"system": CODE_SYSTEMS.trial_codes, "code": codes.WHO_BLEEDING_GRADE}]
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _iso(moment),
        "valueInteger": grade,
    }


def adverse_event(patient_id: str, moment: datetime, bleeding: bool, grade: int) -> dict[str, Any]:
    event: dict[str, Any] = (
        {"coding": [{"system": codes.SNOMED, "code": "131148009", "display": "Bleeding"}]}
        if bleeding
        else {"text": "Flushing during infusion"}
    )
    return {
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "event": event,
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": _iso(moment),
        "seriousness": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                    "code": "serious" if grade >= 3 else "non-serious",
                }
            ]
        },
        "extension": [{"url": codes.AE_GRADE_EXTENSION, "valueInteger": grade}],
    }


# Count trajectories (10^9/L) by week after the first dose, one per intended outcome.
def _trajectory(outcome: str, rng: random.Random) -> Callable[[float], float]:
    if outcome == "CR":
        return lambda week: min(15 + week * 20, 180) + rng.uniform(-8, 8)
    if outcome == "R":
        return lambda week: min(15 + week * 10, 75) + rng.uniform(-6, 6)
    if outcome == "LOR":
        return lambda week: (15 + week * 12 if week <= 6 else 18) + rng.uniform(-4, 4)
    return lambda week: 14 + rng.uniform(-6, 9)


def _story(patient_id: str, site: str, counts: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """One subject: a baseline, 8 weeks of NAD+ weekly and NMN daily, `counts` counts spread
    over the follow-up, a few WHO bleeding grades and adverse events."""
    enrolled = TRIAL_START + timedelta(days=rng.randint(0, 180), hours=rng.randint(0, 8))
    outcome = rng.choices(["CR", "R", "NR", "LOR"], weights=[3, 3, 3, 1])[0]
    level = _trajectory(outcome, rng)
    yield platelet_count(patient_id, enrolled - timedelta(hours=1), rng.uniform(6, 25))
    for day in range(56):
        moment = enrolled + timedelta(days=day)
        if day % 7 == 0:
            yield dose(
                patient_id, moment, "study-drug", "NAD+ (Coenzyme I for Injection) 500 mg IV"
            )
        yield dose(patient_id, moment + timedelta(hours=2), "study-drug", "NMN 1000 mg oral")
    if rng.random() < 0.05:
        yield dose(patient_id, enrolled + timedelta(days=20), "rescue", "IVIg 1 g/kg")
    follow_up = (DATA_END - timedelta(days=30) - enrolled).total_seconds()
    step = follow_up / max(counts - 1, 1)
    for n in range(1, counts):
        moment = enrolled + timedelta(seconds=step * n)
        week = (moment - enrolled).days / 7
        yield platelet_count(patient_id, moment, max(level(week), 1.0))
    for _ in range(rng.randint(2, 6)):
        moment = enrolled + timedelta(days=rng.randint(1, 700), hours=3)
        yield bleeding_grade(patient_id, moment, rng.choices([0, 1, 2], weights=[6, 3, 1])[0])
    for _ in range(rng.randint(0, 3)):
        moment = enrolled + timedelta(days=rng.randint(0, 400))
        yield adverse_event(patient_id, moment, rng.random() < 0.3, rng.randint(1, 3))


def _naive(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=None) if moment is not None and moment.tzinfo else moment


class _Rows:
    """Rows for COPY, table by table, with the resource primary keys assigned here."""

    def __init__(self, first_pk: int, now: datetime) -> None:
        self.pk = first_pk
        self.now = now
        self.resource: list[tuple[Any, ...]] = []
        self.version: list[tuple[Any, ...]] = []
        self.token: list[tuple[Any, ...]] = []
        self.string: list[tuple[Any, ...]] = []
        self.quantity: list[tuple[Any, ...]] = []

    def add(self, raw: dict[str, Any], resource_id: str) -> None:
        resource_type = raw["resourceType"]
        subject = None
        if resource_type == "Patient":  # its subject number as the API stores it
            raw, subject = normalise_patient(raw, CODE_SYSTEMS)
        values = index_values(resource_type, resource_id, raw, CODE_SYSTEMS, InputLimits())
        if resource_type != "Patient":
            values.site = self.site_of[values.patient_id]  # type: ignore[index]
        document = {
            "resourceType": resource_type,
            "id": resource_id,
            "meta": {"versionId": "1", "lastUpdated": self.now_text},
            **{k: v for k, v in raw.items() if k != "resourceType"},
        }
        content = orjson.dumps(document).decode()
        pk = self.pk
        self.pk += 1
        self.resource.append(
            (
                pk,
                resource_type,
                resource_id,
                1,
                self.now,
                False,
                content,
                values.patient_id,
                _naive(values.effective_start),
                _naive(values.effective_end),
                values.value_norm,
                values.kind,
                values.status,
                values.site,
                subject,
            )
        )
        self.version.append((resource_type, resource_id, 1, self.now, "create", content))
        for param, system, value in values.tokens:
            self.token.append((pk, resource_type, param, system, value))
        for param, value, normalised in values.strings:
            self.string.append((pk, resource_type, param, value, normalised))
        for param, number, system, code, norm in values.quantities:
            self.quantity.append((pk, resource_type, param, number, system, code, norm))

    site_of: dict[str, str]
    now_text: str

    def size(self) -> int:
        return len(self.resource)

    def take(self) -> dict[str, list[tuple[Any, ...]]]:
        taken = {
            "resource": self.resource,
            "resource_version": self.version,
            "search_token": self.token,
            "search_string": self.string,
            "search_quantity": self.quantity,
        }
        self.resource, self.version, self.token, self.string, self.quantity = [], [], [], [], []
        return taken


COLUMNS = {
    "resource": [
        "pk",
        "resource_type",
        "id",
        "version_id",
        "last_updated",
        "deleted",
        "content",
        "patient_id",
        "effective_start",
        "effective_end",
        "value_norm",
        "kind",
        "status",
        "site",
        "subject",
    ],
    "resource_version": ["resource_type", "id", "version_id", "last_updated", "method", "content"],
    "search_token": ["resource_pk", "resource_type", "param", "system", "value"],
    "search_string": ["resource_pk", "resource_type", "param", "value", "normalised"],
    "search_quantity": [
        "resource_pk",
        "resource_type",
        "param",
        "value",
        "system",
        "code",
        "value_norm",
    ],
}


async def _plain_indexes(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Secondary indexes of the loaded tables that back no constraint: safe to rebuild."""
    rows = await conn.fetch(
        """
        SELECT i.relname AS name, pg_get_indexdef(x.indexrelid) AS definition
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE t.relname = ANY($1::text[]) AND NOT x.indisprimary
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
        """,
        list(COLUMNS),
    )
    return [(row["name"], row["definition"]) for row in rows]


async def generate(
    dsn: str,
    scale: Scale,
    progress: Callable[[str], None] = print,
) -> None:
    """Load `scale` into the (migrated, empty) database at `dsn`, then assess every patient."""
    rng = random.Random(SEED)
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    try:
        indexes = await _plain_indexes(conn)
        for name, _ in indexes:
            await conn.execute(f'DROP INDEX IF EXISTS "{name}"')
        first_pk = int(await conn.fetchval("SELECT coalesce(max(pk), 0) + 1 FROM resource"))
        rows = _Rows(first_pk, now)
        rows.now_text = now.isoformat(timespec="milliseconds") + "Z"
        rows.site_of = {}
        # Heavy patients only where they are a small part of the trial.
        heavy = HEAVY_PATIENTS if scale.counts >= 4 * HEAVY_PATIENTS * HEAVY_COUNTS else 0
        heavy = min(heavy, scale.patients - 1)
        light = scale.patients - heavy
        per_light = max((scale.counts - heavy * HEAVY_COUNTS) // max(light, 1), 2)
        written = counts_written = 0
        for number in range(1, scale.patients + 1):
            patient_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            site = SITES[(number - 1) % len(SITES)]
            rows.site_of[patient_id] = site
            rows.add(patient(f"BENCH-{number:06d}", site, rng), patient_id)
            counts = HEAVY_COUNTS if number <= heavy else per_light
            for raw in _story(patient_id, site, counts, rng):
                rows.add(raw, str(uuid.UUID(int=rng.getrandbits(128), version=4)))
                counts_written += raw["resourceType"] == "Observation" and "valueQuantity" in raw
            if rows.size() >= CHUNK or number == scale.patients:
                written += rows.size()
                for table, chunk in rows.take().items():
                    if chunk:
                        await conn.copy_records_to_table(
                            table, records=chunk, columns=COLUMNS[table]
                        )
                elapsed = time.perf_counter() - started
                progress(
                    f"  {number}/{scale.patients} patients, {counts_written:,} counts, "
                    f"{written:,} resources, {written / elapsed:,.0f} resources/s"
                )
        progress(f"  rebuilding {len(indexes)} indexes")
        for _, definition in indexes:
            await conn.execute(definition)
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('resource', 'pk'), "
            "(SELECT max(pk) FROM resource))"
        )
        progress("  analysing")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    progress(f"  loaded in {time.perf_counter() - started:,.0f} s; assessing every patient")
    await assess_all(dsn, progress)
    progress(f"  generated in {time.perf_counter() - started:,.0f} s")


async def assess_all(dsn: str, progress: Callable[[str], None]) -> None:
    """Every patient's assessment and response-status Observation, through the app's own
    recompute, many patients per transaction (a seed, not user writes)."""
    from app.audit.trail import AuditQueue
    from app.engine import Criteria
    from app.kit.dates import utc_now
    from app.services import response
    from app.services.context import ServiceContext
    from app.store import repository as repo
    from app.store.db import Database

    db = Database.from_url(dsn, pool_size=2, max_overflow=0)
    ctx = ServiceContext(db, Criteria(), CODE_SYSTEMS, AuditQueue(db))
    try:
        async with db.read() as conn:
            patient_ids = await repo.all_patient_ids(conn)
        batch = 50
        for start in range(0, len(patient_ids), batch):
            async with db.write() as conn:
                for patient_id in patient_ids[start : start + batch]:
                    await response.recompute(ctx, conn, patient_id, utc_now())
            done = min(start + batch, len(patient_ids))
            if done % 500 == 0 or done == len(patient_ids):
                progress(f"  assessed {done}/{len(patient_ids)} patients")
    finally:
        await db.dispose()


async def describe(dsn: str, sample: int = 5_000) -> Loaded:
    """Ids the scenarios draw from: patients, the heaviest ones, a sample of counts."""
    conn = await asyncpg.connect(dsn)
    try:
        loaded = Loaded()
        rows = await conn.fetch(
            "SELECT id, site FROM resource WHERE resource_type = 'Patient' AND NOT deleted "
            "AND id IN (SELECT patient_id FROM response_assessment) ORDER BY pk"
        )
        loaded.patients = [row["id"] for row in rows]
        loaded.sites = sorted({row["site"] for row in rows})
        heavy = await conn.fetch(
            "SELECT patient_id, count(*) AS n FROM resource WHERE resource_type = 'Observation' "
            "AND kind = 'platelet-count' AND patient_id = ANY($1::text[]) GROUP BY patient_id "
            "ORDER BY n DESC LIMIT $2",
            loaded.patients[: HEAVY_PATIENTS * 2],
            HEAVY_PATIENTS,
        )
        loaded.heavy_patients = [row["patient_id"] for row in heavy]
        total = await conn.fetchval(
            "SELECT max(pk) FROM resource WHERE resource_type = 'Observation'"
        )
        step = max(int((total or 1) // sample), 1)
        rows = await conn.fetch(
            "SELECT id FROM resource WHERE resource_type = 'Observation' "
            "AND kind = 'platelet-count' AND NOT deleted AND pk % $1 = 0 LIMIT $2",
            step,
            sample,
        )
        loaded.observations = [row["id"] for row in rows]
        return loaded
    finally:
        await conn.close()
