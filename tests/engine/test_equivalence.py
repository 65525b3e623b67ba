"""The optimised engine gives exactly the assessment of the engine as it was before
(`reference_rules.py`), for every timeline: issue 8 made it faster, never different."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import (
    Administration,
    BleedingAssessment,
    BleedingEvent,
    Criteria,
    PlateletCount,
    Timeline,
    assess,
)
from bench.recompute import synthetic_timeline

from . import reference_rules
from .test_properties import CRITERIA, ZONES, timelines

# UTC twice: the service layer hands the engine UTC times, the fast path must be hit often.
MIXED_ZONES: list[tzinfo] = [UTC, UTC, *ZONES]


def _in_zones(timeline: Timeline, zones: list[tzinfo]) -> Timeline:
    """The same instants, each item in one of `zones` (the engine must not care)."""

    def moved(items: tuple, offset: int) -> tuple:  # type: ignore[type-arg]
        return tuple(
            replace(item, time=item.time.astimezone(zones[(i + offset) % len(zones)]))
            for i, item in enumerate(items)
        )

    return Timeline(
        timeline.patient,
        moved(timeline.counts, 0),
        moved(timeline.bleeding_assessments, 1),
        moved(timeline.bleeding_events, 2),
        moved(timeline.administrations, 3),
    )


@settings(max_examples=300, deadline=None)
@given(timelines(), CRITERIA, st.lists(st.sampled_from(MIXED_ZONES), min_size=1, max_size=4))
def test_same_assessment_as_the_reference_engine(
    timeline: Timeline, criteria: Criteria, zones: list[tzinfo]
) -> None:
    timeline = _in_zones(timeline, zones)
    assert assess(timeline, criteria) == reference_rules.assess(timeline, criteria)


def test_same_assessment_for_a_long_history() -> None:
    """1,000 counts, what the benchmark times."""
    timeline = synthetic_timeline(1_000)
    for criteria in (Criteria(), Criteria(trial_timezone="Europe/Paris", rescue_window_days=3)):
        assert assess(timeline, criteria) == reference_rules.assess(timeline, criteria)


def test_fast_constructors_build_equal_objects() -> None:
    timeline = synthetic_timeline(3)
    for count in timeline.counts:
        fast = PlateletCount.fast(count.id, count.time, count.value, count.status)
        assert fast == count and hash(fast) == hash(count)


# Each input type with a status other than its default: a field the fast constructor stored
# under another name would otherwise read as the class default and still compare equal.
INPUTS: list[tuple[Any, dict[str, Any]]] = [
    (PlateletCount, {"id": "c", "value": 42.5, "status": "amended"}),
    (BleedingAssessment, {"id": "g", "grade": 3, "status": "corrected"}),
    (BleedingEvent, {"id": "e", "status": "potential"}),
    (Administration, {"id": "a", "role": "rescue", "status": "not-done"}),
]


@pytest.mark.parametrize(("kind", "fields"), INPUTS, ids=[kind.__name__ for kind, _ in INPUTS])
@pytest.mark.parametrize("zone", [UTC, ZoneInfo("Europe/Paris")], ids=str)
def test_fast_constructors_build_what_the_constructors_build(
    kind: Any, fields: dict[str, Any], zone: tzinfo
) -> None:
    time = datetime(2025, 3, 10, 9, tzinfo=zone)
    fast, built = kind.fast(time=time, **fields), kind(time=time, **fields)
    assert vars(fast) == vars(built)
    assert fast == built and hash(fast) == hash(built)


@pytest.mark.parametrize(("kind", "fields"), INPUTS, ids=[kind.__name__ for kind, _ in INPUTS])
def test_fast_constructors_refuse_a_naive_time(kind: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"{kind.__name__} '{fields['id']}'.*timezone-aware"):
        kind.fast(time=datetime(2025, 3, 10, 9), **fields)
