"""The worked examples of the response rules (docs/response-rules.md), one test per row.

Examples 1-10 (version 1's table, unchanged under version 2's defaults): first dose
2025-03-03T08:00 UTC, baseline that morning at 07:00, every other count at 09:00.
Examples 11-15 (version 2): first dose at 09:00, counts at 08:00 unless the row says.
The small builders here are shared by the other engine tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from itertools import permutations

import pytest

from app.engine import (
    Administration,
    Assessment,
    BleedingAssessment,
    BleedingEvent,
    Criteria,
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


# --- version 2: examples 11-15 ------------------------------------------------------------

DOSE_2 = at(3, 3, 9)


def count_2(text: str, value: float, hour: int = 8, minute: int = 0) -> PlateletCount:
    """A count on day 'MM-DD' at 08:00 UTC unless said, id 'c-MM-DD'."""
    when = datetime.combine(day(text), time(hour, minute), UTC)
    return PlateletCount(id=f"c-{text}", time=when, value=value)


def story_2(
    *counts: PlateletCount,
    dose_status: str = "completed",
    rescues: tuple[Administration, ...] = (),
    bleeding_assessments: tuple[BleedingAssessment, ...] = (),
) -> Timeline:
    """Version 2's stories: the first dose at 09:00, the counts as given (baseline included)."""
    return Timeline(
        patient="patient-1",
        counts=counts,
        bleeding_assessments=bleeding_assessments,
        administrations=(dose(DOSE_2, status=dose_status), *rescues),
    )


EXAMPLE_2_V2 = (count_2("03-03", 12), count_2("03-10", 35), count_2("03-17", 48))
IVIG = Administration("ivig", at(2, 25, 10), role="rescue")
EXAMPLE_11 = story_2(count_2("03-03", 12), count_2("03-10", 40, hour=10), count_2("03-17", 45))
EXAMPLE_12 = story_2(
    count_2("02-24", 12),
    count_2("03-03", 60, hour=7),
    count_2("04-28", 40),
    count_2("05-05", 45),
    rescues=(IVIG,),
)

EXAMPLES_2 = {
    "11 calendar-day confirmation": (
        EXAMPLE_11,
        Criteria(),
        Expected("R", "R", ttr=7, episodes=(("03-10", None, 7, "R", None),)),
    ),
    "11 as instants": (
        EXAMPLE_11,
        Criteria(confirm_clock="instant"),
        Expected("NR", "NR", pending=True),
    ),
    "12 baseline untouched by rescue": (
        EXAMPLE_12,
        Criteria(),
        Expected("R", "R", ttr=56, episodes=(("04-28", None, 7, "R", None),)),
    ),
    "12 with the version 1 baseline": (
        EXAMPLE_12,
        Criteria(baseline_rescue_exclusion_days=0),
        Expected("NR", "NR"),  # 40 and 45 fail: below 2 x 60
    ),
    "13 start-day count": (
        story_2(
            count_2("03-03", 10),
            count_2("03-03", 50, hour=10, minute=30),
            count_2("03-10", 45),
            count_2("03-17", 50),
        ),
        Criteria(),
        Expected("R", "R", ttr=7, episodes=(("03-10", None, 7, "R", None),)),
    ),
    "13 start day evaluable": (
        story_2(
            count_2("03-03", 10),
            PlateletCount("c-03-03-b", at(3, 3, 10, 30), 50),
            count_2("03-10", 45),
            count_2("03-17", 50),
        ),
        Criteria(first_evaluable_day=0),
        Expected("R", "R", ttr=0, episodes=(("03-03", None, 14, "R", None),)),
    ),
    "14 bleeding without a count": (
        story_2(
            count_2("03-03", 10),
            count_2("03-10", 40),
            count_2("03-17", 45),
            count_2("04-07", 50),
            count_2("04-14", 55),
            bleeding_assessments=(BleedingAssessment("who-0401", at(4, 1, 11), grade=2),),
        ),
        Criteria(),
        Expected(
            "R",
            "R",
            ttr=7,
            episodes=(("03-10", "04-01", 22, "R", None), ("04-07", None, 7, "R", None)),
        ),
    ),
    "15 stopped first dose": (
        story_2(*EXAMPLE_2_V2, dose_status="stopped"),
        Criteria(),
        Expected("R", "R", ttr=7, episodes=(("03-10", None, 7, "R", None),)),
    ),
}


@pytest.mark.parametrize("name", EXAMPLES_2)
def test_worked_example_of_version_2(name: str) -> None:
    timeline, criteria, expected = EXAMPLES_2[name]
    check(assess(timeline, criteria), expected)


def test_example_11_is_a_week_on_the_calendar_not_in_hours() -> None:
    timeline = EXAMPLES_2["11 calendar-day confirmation"][0]
    first, second = timeline.counts[1], timeline.counts[2]
    assert second.time - first.time == timedelta(days=6, hours=22)
    assert assess(timeline).evidence["response"] == ["c-03-10", "c-03-17"]


def test_example_12_baseline_and_rescue_window() -> None:
    timeline = EXAMPLES_2["12 baseline untouched by rescue"][0]
    result = assess(timeline)
    assert result.baseline is not None
    assert (result.baseline.value, result.baseline.observation) == (12, "c-02-24")
    assert result.evidence["baseline"] == ["c-02-24"]
    excluded = result.classifications[1]
    assert (excluded.id, excluded.classification, excluded.rescue) == (
        "c-03-03",
        "excluded-by-rescue",
        "ivig",
    )
    # Counts up to 04-22 are under rescue (02-25 + 56 days), from 04-23 on they are not.
    edge = replace(
        timeline,
        counts=(*timeline.counts, count_2("04-22", 5, hour=23), count_2("04-23", 5)),
    )
    by_id = {c.id: c.classification for c in assess(edge).classifications}
    assert (by_id["c-04-22"], by_id["c-04-23"]) == ("under-rescue", "failing")


def test_example_13_start_day_count_is_not_evaluable() -> None:
    result = assess(EXAMPLES_2["13 start-day count"][0])
    assert [(c.time.hour, c.classification) for c in result.classifications[:2]] == [
        (8, "baseline-candidate"),
        (10, "not-evaluable"),
    ]


def test_example_14_the_bleed_is_the_loss() -> None:
    result = assess(EXAMPLES_2["14 bleeding without a count"][0])
    assert result.evidence["bleeding"] == ["who-0401"]
    assert result.evidence["response"] == ["c-03-10", "c-03-17", "c-04-07", "c-04-14"]
    [bleed] = [c for c in result.classifications if c.value is None]
    assert (bleed.resource_type, bleed.id, bleed.classification, bleed.detail) == (
        "Observation",
        "who-0401",
        "failing",
        "bleeding without a count",
    )


def test_example_15_a_stopped_dose_starts_treatment() -> None:
    stopped = assess(EXAMPLES_2["15 stopped first dose"][0])
    completed = assess(story_2(*EXAMPLE_2_V2))
    assert stopped == completed
    assert stopped.treatment_start == DOSE_2
