"""The trial report and the response listing from the patients' data (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

from app.engine import Criteria
from app.report.model import PatientData
from app.report.statistics import Duration, describe, duration_of_response, proportion

CODES = ("CR", "R", "NR", "LOR", "NE")
RESPONDERS = frozenset({"CR", "R"})
GRADES = ("1", "2", "3", "4", "5")


def _counts(values: Sequence[str | None]) -> dict[str, int]:
    """Patients per code; a best response that is None (no evaluable count) counts as NE."""
    counts = dict.fromkeys(CODES, 0)
    for value in values:
        counts[value or "NE"] += 1
    return counts


def _orr(patients: Sequence[PatientData], codes: frozenset[str]) -> dict[str, Any]:
    treated = [p for p in patients if p.treated]
    responders = sum(1 for p in treated if p.assessment.best_response in codes)
    return proportion(responders, len(treated))


def adverse_events(patients: Sequence[PatientData]) -> dict[str, Any]:
    events = [event for p in patients for event in p.adverse_events]
    by_grade = dict.fromkeys(GRADES, 0)
    for event in events:
        if event.grade is not None and str(event.grade) in by_grade:
            by_grade[str(event.grade)] += 1
    return {
        "events": len(events),
        "patients": sum(1 for p in patients if p.adverse_events),
        "by_grade": by_grade,
        "serious": sum(1 for e in events if e.serious),
        "related": sum(1 for e in events if e.related),
        "bleeding": sum(1 for e in events if e.bleeding),
    }


def first_episode_durations(patients: Sequence[PatientData]) -> list[Duration]:
    """Each responder's first episode: an event at its loss of response, otherwise censored
    at the latest evaluable count (the engine's duration of an ongoing episode)."""
    durations = []
    for p in patients:
        episodes = p.assessment.episodes
        days = episodes[0].duration_of_response_days if episodes else None
        if days is not None:
            durations.append(Duration(days, episodes[0].end is not None))
    return durations


def _median(values: Sequence[float]) -> float | None:
    return median(values) if values else None


def trial_report(
    patients: Sequence[PatientData],
    sites: Sequence[str],
    criteria: Criteria,
    generated_at: str,
) -> dict[str, Any]:
    treated = [p for p in patients if p.treated]
    baselines = [p.assessment.baseline.value for p in treated if p.assessment.baseline]
    peaks = [peak for p in treated if (peak := p.peak_after_start()) is not None]
    return {
        "generated_at": generated_at,
        "criteria": criteria.as_dict(),
        "sites": list(sites),
        "n_enrolled": len(patients),
        "n_treated": len(treated),
        "n_evaluable": sum(1 for p in patients if p.assessment.status != "NE"),
        "status": _counts([p.assessment.status for p in patients]),
        "best_response": _counts([p.assessment.best_response for p in patients]),
        "orr": _orr(patients, RESPONDERS),
        "cr_rate": _orr(patients, frozenset({"CR"})),
        "time_to_response_days": describe(
            [d for p in patients if (d := p.assessment.time_to_response_days) is not None]
        ),
        "time_to_complete_response_days": describe(
            [d for p in patients if (d := p.assessment.time_to_complete_response_days) is not None]
        ),
        "duration_of_response_days": duration_of_response(first_episode_durations(patients)),
        "platelets": {
            "n_baseline": len(baselines),
            "baseline_median": _median(baselines),
            "n_peak": len(peaks),
            "peak_median": _median(peaks),
        },
        "adverse_events": adverse_events(patients),
        "by_site": [_site(site, [p for p in patients if p.site == site]) for site in sites],
    }


def _site(site: str, patients: Sequence[PatientData]) -> dict[str, Any]:
    return {
        "site": site,
        "n_enrolled": len(patients),
        "n_treated": sum(1 for p in patients if p.treated),
        "status": _counts([p.assessment.status for p in patients]),
        "best_response": _counts([p.assessment.best_response for p in patients]),
        "orr": _orr(patients, RESPONDERS),
        "adverse_events": adverse_events(patients),
    }


LISTING_COLUMNS = (
    "subject",
    "patient",
    "site",
    "treatment_start",
    "baseline",
    "status",
    "best_response",
    "response_date",
    "time_to_response_days",
    "time_to_complete_response_days",
    "duration_of_response_days",
    "peak_count",
    "rescue_count",
    "adverse_events",
)


def listing_row(patient: PatientData) -> dict[str, Any]:
    a = patient.assessment
    last = a.episodes[-1] if a.episodes else None
    return {
        "subject": patient.subject,
        "patient": patient.id,
        "site": patient.site,
        "treatment_start": a.treatment_start.isoformat() if a.treatment_start else None,
        "baseline": a.baseline.value if a.baseline else None,
        "status": a.status,
        "best_response": a.best_response,
        "response_date": a.response_date.isoformat() if a.response_date else None,
        "time_to_response_days": a.time_to_response_days,
        "time_to_complete_response_days": a.time_to_complete_response_days,
        "duration_of_response_days": last.duration_of_response_days if last else None,
        "peak_count": patient.peak_after_start(),
        "rescue_count": len(patient.administrations("rescue")),
        "adverse_events": len(patient.adverse_events),
    }
