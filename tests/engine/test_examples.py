"""The worked examples of response-criteria.md, one test per table row.

First dose 2025-03-03T08:00 UTC, baseline that morning at 07:00, every other count at 09:00.
The small builders here are shared by the other engine tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from itertools import permutations

import pytest

from app.engine import (
    Administration,
    Assessment,
    BleedingAssessment,
    BleedingEvent,
    PlateletCount,
    Timeline,
    assess,
)

DOSE = datetime(2025, 3, 3, 8, tzinfo=UTC)
BASELINE_TIME = datetime(2025, 3, 3, 7, tzinfo=UTC)


def at(month: int, day: int, hour: int = 9, minute: int = 0, second: int = 0) -> datetime:
    """An instant in 2025, UTC."""
    return datetime(2025, month, day, hour, minute, second, tzinfo=UTC)


def day(text: str) -> date:
    """'03-10' -> 2025-03-10."""
    return date.fromisoformat(f"2025-{text}")


def count(text: str, value: float, status: str = "final") -> PlateletCount:
    """A count at 09:00 UTC on day 'MM-DD', id 'c-MM-DD'."""
    when = datetime.combine(day(text), time(9), UTC)
    return PlateletCount(id=f"c-{text}", time=when, value=value, status=status)


def dose(when: datetime = DOSE, ident: str = "dose-1", status: str = "completed") -> Administration:
    return Administration(id=ident, time=when, role="study-drug", status=status)


def story(
    baseline: float | None,
    *counts: PlateletCount,
    administrations: tuple[Administration, ...] | None = None,
    bleeding_assessments: tuple[BleedingAssessment, ...] = (),
    bleeding_events: tuple[BleedingEvent, ...] = (),
) -> Timeline:
    """One patient's clinical story: a baseline count at 07:00 on the dose day, then `counts`."""
    base = () if baseline is None else (PlateletCount("baseline", BASELINE_TIME, baseline),)
    return Timeline(
        patient="patient-1",
        counts=base + counts,
        bleeding_assessments=bleeding_assessments,
        bleeding_events=bleeding_events,
        administrations=(dose(),) if administrations is None else administrations,
    )


@dataclass(frozen=True)
class Expected:
    status: str
    best: str
    ttr: int | None = None
    ttcr: int | None = None
    pending: bool = False
    # (start, end, duration, level, cr_end) per episode
    episodes: tuple[tuple[str, str | None, int, str, str | None], ...] = ()


def check(result: Assessment, expected: Expected) -> None:
    assert result.status == expected.status
    assert result.status_reason is None
    assert result.best_response == expected.best
    assert result.time_to_response_days == expected.ttr
    assert result.time_to_complete_response_days == expected.ttcr
    assert result.pending_confirmation is expected.pending
    episodes = [
        (
            e.start.isoformat()[5:],
            e.end.isoformat()[5:] if e.end else None,
            e.duration_of_response_days,
            e.level,
            e.cr_end.isoformat()[5:] if e.cr_end else None,
        )
        for e in result.episodes
    ]
    assert episodes == list(expected.episodes)


EXAMPLE_2 = story(12, count("03-10", 35), count("03-17", 48))

EXAMPLES = {
    "1 CR after R": (
        story(15, count("03-10", 60), count("03-17", 110), count("03-24", 125)),
        Expected("CR", "CR", ttr=7, ttcr=14, episodes=(("03-10", None, 14, "CR", None),)),
    ),
    "2 R": (EXAMPLE_2, Expected("R", "R", ttr=7, episodes=(("03-10", None, 7, "R", None),))),
    "3 too close to confirm": (
        story(10, count("03-10", 120), count("03-14", 105)),
        Expected("NR", "NR", pending=True),
    ),
    "4 below threshold": (story(8, count("03-10", 12), count("03-11", 14)), Expected("NR", "NR")),
    "5 below doubling": (story(20, count("03-10", 35), count("03-17", 38)), Expected("NR", "NR")),
    "6 LOR": (
        story(10, count("03-10", 40), count("03-17", 45), count("04-07", 25), count("04-08", 22)),
        Expected("LOR", "R", ttr=7, episodes=(("03-10", "04-07", 28, "R", None),)),
    ),
    "7 CR lost, R kept": (
        story(10, count("03-10", 110), count("03-17", 130), count("04-07", 70), count("04-08", 65)),
        Expected("R", "CR", ttr=7, ttcr=7, episodes=(("03-10", None, 29, "CR", "04-07"),)),
    ),
    "8 bleeding count": (
        story(
            10,
            count("03-10", 60),
            count("03-17", 65),
            count("03-24", 70),
            bleeding_assessments=(BleedingAssessment("who-1", at(3, 10, 11), grade=2),),
        ),
        Expected("R", "R", ttr=14, episodes=(("03-17", None, 7, "R", None),)),
    ),
    "10 normalised units": (
        story(15, count("03-10", 95), count("03-17", 102), count("03-24", 110)),
        Expected("CR", "CR", ttr=7, ttcr=14, episodes=(("03-10", None, 14, "CR", None),)),
    ),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_worked_example(name: str) -> None:
    timeline, expected = EXAMPLES[name]
    check(assess(timeline), expected)


def test_example_1_dates_and_evidence() -> None:
    result = assess(EXAMPLES["1 CR after R"][0])
    assert result.response_date == day("03-10")
    assert result.complete_response_date == day("03-17")
    assert result.baseline is not None and result.baseline.value == 15
    assert result.baseline.observation == "baseline"
    assert result.treatment_start == DOSE
    assert result.evidence["response"] == ["c-03-10", "c-03-17"]
    assert result.evidence["complete_response"] == ["c-03-17", "c-03-24"]


def test_example_7_records_cr_loss() -> None:
    result = assess(EXAMPLES["7 CR lost, R kept"][0])
    assert result.episodes[0].cr_start == day("03-10")
    assert result.evidence["complete_response_loss"] == ["c-04-07", "c-04-08"]
    assert result.evidence["loss"] == []


def test_example_8_bleeding_is_evidence() -> None:
    result = assess(EXAMPLES["8 bleeding count"][0])
    assert result.evidence["bleeding"] == ["who-1"]
    assert result.evidence["response"] == ["c-03-17", "c-03-24"]


def test_example_9_any_posting_order_gives_identical_result() -> None:
    expected = assess(EXAMPLE_2)
    check(expected, EXAMPLES["2 R"][1])
    for order in permutations(EXAMPLE_2.counts):
        reordered = Timeline(
            EXAMPLE_2.patient, counts=order, administrations=EXAMPLE_2.administrations
        )
        assert assess(reordered) == expected
        assert assess(reordered).as_dict() == expected.as_dict()
