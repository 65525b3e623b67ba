"""A synthetic 20-patient trial that follows the study, for a newcomer to see the engine work.

Refractory ITP, baseline < 30 x 10^9/L, NAD+ infusions weekly and oral NMN daily, weekly
platelet counts, some rescue, bleeding and adverse events, and a mix of CR, R, NR, LOR and NE.
Everything goes through the same use cases as the API (validation, recompute), and the
random generator is seeded, so every run writes the same trial.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson

from app.auth.principal import Principal, Role, parse_scopes
from app.kit import codes
from app.services import resources, search
from app.services.context import ServiceContext
from app.store.criteria import SearchFilter, TokenMatch

SUBJECT_SYSTEM = codes.DEFAULT_CODE_SYSTEM_BASE + "/sid/subject"
FIRST_DOSE = datetime(2025, 3, 3, 8, 0)
WEEKS = 12

# Weekly count trajectories (10^9/L) after the first dose, one per intended outcome.
PROFILES: dict[str, Callable[[random.Random, int], float]] = {
    "CR": lambda rng, week: min(15 + week * 25, 180) + rng.uniform(-5, 5),
    "R": lambda rng, week: min(15 + week * 12, 70) + rng.uniform(-4, 4),
    "NR": lambda rng, week: 14 + rng.uniform(-5, 8),
    "LOR": lambda rng, week: (15 + week * 15 if week <= 4 else 18) + rng.uniform(-3, 3),
}
# 20 subjects: intended outcome, site, and what else happens to them.
PLAN: list[tuple[str, str, set[str]]] = [
    ("CR", "S01", set()),
    ("CR", "S01", {"bleeding"}),
    ("CR", "S02", set()),
    ("CR", "S02", {"ae"}),
    ("CR", "S01", set()),
    ("R", "S01", set()),
    ("R", "S02", {"ae"}),
    ("R", "S02", set()),
    ("R", "S01", set()),
    ("R", "S02", {"bleeding"}),
    ("NR", "S01", set()),
    ("NR", "S02", {"rescue"}),
    ("NR", "S01", {"ae"}),
    ("NR", "S02", set()),
    ("LOR", "S01", set()),
    ("LOR", "S02", {"bleeding"}),
    ("LOR", "S01", set()),
    ("NE", "S02", {"not-treated"}),
    ("NE", "S01", {"no-counts"}),
    ("NE", "S02", {"no-baseline"}),
]


def _rescue_only(rng: random.Random, week: int) -> float:
    return (60 if week <= 8 else 14) + rng.uniform(-4, 4)


def _iso(moment: datetime) -> str:
    return moment.isoformat() + "Z"


class DemoAlreadyLoaded(RuntimeError):
    pass


# The loader acts as the server itself, at every site.
LOADER = Principal("system:demo-loader", Role.ADMIN, frozenset(), parse_scopes("system/*.cruds"))


async def load(ctx: ServiceContext, progress: Callable[[str], None] = print) -> None:
    demo_01 = SearchFilter(
        "Patient", tokens=[[TokenMatch("identifier", SUBJECT_SYSTEM, "DEMO-01")]]
    )
    existing = await search.search(ctx, search.SearchRequest(demo_01, count=1), LOADER)
    if existing.hits:
        raise DemoAlreadyLoaded("The demo trial is already loaded (subject DEMO-01 exists)")
    rng = random.Random(6776510)
    for number, (outcome, site, events) in enumerate(PLAN, start=1):
        subject = f"DEMO-{number:02d}"
        patient_id = await _patient(ctx, subject, site, rng)
        await _subject_story(ctx, patient_id, outcome, events, rng)
        progress(f"{subject} ({site}): planned {outcome}")


async def _post(ctx: ServiceContext, resource: dict[str, Any]) -> str:
    result = await resources.create(ctx, resource["resourceType"], orjson.dumps(resource), LOADER)
    return result.stored.id


async def _patient(ctx: ServiceContext, subject: str, site: str, rng: random.Random) -> str:
    return await _post(
        ctx,
        {
            "resourceType": "Patient",
            "identifier": [{"system": SUBJECT_SYSTEM, "value": subject}],
            "managingOrganization": {"identifier": {"system": ctx.codes.site, "value": site}},
            "gender": rng.choice(["female", "male"]),
            "birthDate": _birth_date(rng),
        },
    )


def _birth_date(rng: random.Random) -> str:
    return f"{rng.randint(1950, 2000)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _count(patient_id: str, moment: datetime, value: float) -> dict[str, Any]:
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


def _dose(
    ctx: ServiceContext, patient_id: str, moment: datetime, role: str, drug: str
) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "status": "completed",
        "category": {"coding": [{"system": ctx.codes.medication_role, "code": role}]},
        "medicationCodeableConcept": {"text": drug},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _iso(moment),
    }


async def _subject_story(
    ctx: ServiceContext, patient_id: str, outcome: str, events: set[str], rng: random.Random
) -> None:
    if "no-baseline" not in events:
        baseline = rng.uniform(6, 25)
        await _post(ctx, _count(patient_id, FIRST_DOSE - timedelta(hours=1), baseline))
    if "not-treated" in events:
        return
    for day in range(WEEKS * 7):
        moment = FIRST_DOSE + timedelta(days=day)
        if day % 7 == 0 and day < 8 * 7:
            await _post(
                ctx,
                _dose(
                    ctx,
                    patient_id,
                    moment,
                    "study-drug",
                    "NAD+ (Coenzyme I for Injection) 500 mg IV",
                ),
            )
        if day < 8 * 7:
            await _post(
                ctx,
                _dose(
                    ctx, patient_id, moment + timedelta(hours=2), "study-drug", "NMN 1000 mg oral"
                ),
            )
    if "rescue" in events:
        await _post(
            ctx, _dose(ctx, patient_id, FIRST_DOSE + timedelta(days=9), "rescue", "IVIg 1 g/kg")
        )
    if "no-counts" in events:
        return
    profile = PROFILES[outcome if outcome in PROFILES else "NR"]
    if "rescue" in events:
        # A rise while the rescue acts (8 weeks) does not count; after it, the count falls.
        profile = PROFILES["R"] if outcome != "NR" else _rescue_only
    for week in range(1, WEEKS + 1):
        moment = FIRST_DOSE + timedelta(weeks=week, hours=1)
        await _post(ctx, _count(patient_id, moment, max(profile(rng, week), 1)))
    if "bleeding" in events:
        await _post(
            ctx,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {
                    "coding": [{"system": ctx.codes.trial_codes, "code": codes.WHO_BLEEDING_GRADE}]
                },
                "subject": {"reference": f"Patient/{patient_id}"},
                "effectiveDateTime": _iso(FIRST_DOSE + timedelta(weeks=1, hours=3)),
                "valueInteger": 1,
            },
        )
    if "ae" in events:
        await _post(
            ctx,
            {
                "resourceType": "AdverseEvent",
                "actuality": "actual",
                "event": {"text": "Flushing during infusion"},
                "subject": {"reference": f"Patient/{patient_id}"},
                "date": _iso(FIRST_DOSE + timedelta(days=rng.randint(0, 20))),
                "seriousness": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                            "code": "non-serious",
                        }
                    ]
                },
                "extension": [{"url": codes.AE_GRADE_EXTENSION, "valueInteger": 1}],
            },
        )
