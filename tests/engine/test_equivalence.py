"""The optimised engine gives exactly the assessment of the engine as it was before
(`reference_rules.py`), for every timeline: issue 8 made it faster, never different."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, tzinfo

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import Criteria, PlateletCount, Timeline, assess
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
