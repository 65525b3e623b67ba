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
from app.services import resource_bodies, resources, search
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
_PLAN = """
CR  S01
CR  S01 bleeding
CR  S02
CR  S02 ae
CR  S01
R   S01
R   S02 ae
R   S02
R   S01
R   S02 bleeding
NR  S01
NR  S02 rescue
NR  S01 ae
NR  S02
LOR S01
LOR S02 bleeding
LOR S01
NE  S02 not-treated
NE  S01 no-counts
NE  S02 no-baseline
"""
PLAN: list[tuple[str, str, set[str]]] = [
    (outcome, site, set(events))
    for outcome, site, *events in (line.split() for line in _PLAN.strip().splitlines())
]
TREATMENT_WEEKS = 8


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
    return resource_bodies.platelet_count(f"Patient/{patient_id}", _iso(moment), round(value, 1))


def _dose(
    ctx: ServiceContext, patient_id: str, moment: datetime, role: str, drug: str
) -> dict[str, Any]:
    return resource_bodies.administration(
        f"Patient/{patient_id}", _iso(moment), ctx.codes.medication_role, role, drug
    )


async def _subject_story(
    ctx: ServiceContext, patient_id: str, outcome: str, events: set[str], rng: random.Random
) -> None:
    if "no-baseline" not in events:
        baseline = rng.uniform(6, 25)
        await _post(ctx, _count(patient_id, FIRST_DOSE - timedelta(hours=1), baseline))
    if "not-treated" in events:
        return
    await _treat(ctx, patient_id, rescue="rescue" in events)
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
        await _post(ctx, _bleeding(ctx, patient_id))
    if "ae" in events:
        date = _iso(FIRST_DOSE + timedelta(days=rng.randint(0, 20)))
        subject = f"Patient/{patient_id}"
        await _post(
            ctx, resource_bodies.adverse_event(subject, date, "Flushing during infusion", 1)
        )


async def _treat(ctx: ServiceContext, patient_id: str, *, rescue: bool) -> None:
    """NAD+ infusions weekly and NMN daily for the treatment weeks; IVIg on day 9 as rescue."""
    for day in range(TREATMENT_WEEKS * 7):
        moment = FIRST_DOSE + timedelta(days=day)
        if day % 7 == 0:
            infusion = "NAD+ (Coenzyme I for Injection) 500 mg IV"
            await _post(ctx, _dose(ctx, patient_id, moment, "study-drug", infusion))
        oral = _dose(ctx, patient_id, moment + timedelta(hours=2), "study-drug", "NMN 1000 mg oral")
        await _post(ctx, oral)
    if rescue:
        moment = FIRST_DOSE + timedelta(days=9)
        await _post(ctx, _dose(ctx, patient_id, moment, "rescue", "IVIg 1 g/kg"))


def _bleeding(ctx: ServiceContext, patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": ctx.codes.trial_codes, "code": codes.WHO_BLEEDING_GRADE}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _iso(FIRST_DOSE + timedelta(weeks=1, hours=3)),
        "valueInteger": 1,
    }
