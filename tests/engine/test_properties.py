"""Properties that must hold for every timeline: arrival order, determinism, representation."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone, tzinfo
from itertools import accumulate
from typing import TypeVar
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import (
    BASELINE_ONLY_UNDER_RESCUE,
    NO_BASELINE,
    NO_EVALUABLE_COUNT,
    NO_TREATMENT_START,
    Administration,
    Assessment,
    BleedingAssessment,
    BleedingEvent,
    Criteria,
    PlateletCount,
    Timeline,
    assess,
)

from .test_examples import DOSE

NE_REASONS = (NO_TREATMENT_START, NO_BASELINE, BASELINE_ONLY_UNDER_RESCUE, NO_EVALUABLE_COUNT)

# Times on a 6-hour grid around the dose (08:00 UTC): 08:00, 14:00, 20:00 and 02:00 the next
# day, so ties, same-day pairs, exact confirm_days / loss_confirm_days gaps, and pairs that
# are 7 calendar days but less than 7 x 24 hours apart (or the reverse) all happen often.
BASELINE_STEPS = st.integers(min_value=-12, max_value=0)
GAP_STEPS = st.integers(min_value=0, max_value=20)
BASELINE_VALUES = st.sampled_from([5.0, 10.0, 15.0, 60.0])
VALUES = st.sampled_from([5.0, 25.0, 35.0, 60.0, 60.0, 99.0, 110.0, 150.0])
COUNT_STATUSES = st.sampled_from(["final", "final", "final", "amended", "entered-in-error"])
# Bleeding crowded into few days, so reports often share a day with a count, or have one
# to themselves (a bleeding occasion without a count).
BLEEDING_STEPS = st.integers(min_value=-2, max_value=40)
DOSE_STATUSES = st.sampled_from(["completed", "completed", "stopped", "in-progress", "not-done"])
RESCUE_STATUSES = st.sampled_from(["completed", "completed", "stopped"])
FIXED_CRITERIA = [
    Criteria(),
    Criteria(trial_timezone="Asia/Tokyo", response_date_anchor="confirming"),
    Criteria(baseline_rule="mean-before-start", loss_confirm_days=0, rescue_window_days=3),
    Criteria(confirm_clock="instant", baseline_rescue_exclusion_days=0, first_evaluable_day=0),
]


def criteria_strategy(clock: str | None = None) -> st.SearchStrategy[Criteria]:
    """Criteria of rules version 2, every setting drawn (the clock fixed when given)."""
    return st.builds(
        Criteria,
        r_threshold=st.sampled_from([25.0, 30.0]),
        cr_threshold=st.sampled_from([90.0, 100.0]),
        doubling_factor=st.sampled_from([1.5, 2.0]),
        confirm_days=st.sampled_from([0, 1, 7, 7]),
        loss_confirm_days=st.sampled_from([0, 1, 1, 2]),
        bleeding_min_grade=st.sampled_from([1, 2]),
        rescue_window_days=st.sampled_from([0, 3, 56]),
        baseline_rule=st.sampled_from(["last-before-start", "mean-before-start"]),
        baseline_lookback_days=st.sampled_from([0, 2, 14, 14]),
        response_date_anchor=st.sampled_from(["first", "confirming"]),
        trial_timezone=st.sampled_from(["UTC", "Asia/Tokyo", "America/New_York"]),
        confirm_clock=st.sampled_from(["calendar", "instant"]) if clock is None else st.just(clock),
        baseline_rescue_exclusion_days=st.sampled_from([0, 1, 14]),
        first_evaluable_day=st.sampled_from([0, 1, 2]),
    )


CRITERIA = st.one_of(st.sampled_from(FIXED_CRITERIA), criteria_strategy())
ZONES: list[tzinfo] = [
    ZoneInfo("America/New_York"),
    ZoneInfo("Asia/Kolkata"),
    timezone(timedelta(hours=-11)),
    timezone(timedelta(hours=13, minutes=45)),
]


def _time(steps: int) -> datetime:
    return DOSE + timedelta(hours=6 * steps)


@st.composite
def timelines(draw: st.DrawFn) -> Timeline:
    """A patient story: doses and baseline counts, then counts at increasing times, bleeds,
    rescues.

    Ids are a random permutation of the time order, so ties are broken by id, not by position.
    """
    baseline = draw(st.lists(st.tuples(BASELINE_STEPS, BASELINE_VALUES), min_size=1, max_size=3))
    # Runs of one level, so responses, confirmations and losses actually happen.
    runs = draw(st.lists(st.tuples(VALUES, st.integers(1, 6)), min_size=1, max_size=6))
    follow_up = [value for value, length in runs for _ in range(length)]
    gaps = draw(st.lists(GAP_STEPS, min_size=len(follow_up), max_size=len(follow_up)))
    times = [t for t, _ in baseline] + list(accumulate(gaps, initial=1))[1:]
    values = [value for _, value in baseline] + follow_up
    statuses = ["final"] * len(baseline) + [draw(COUNT_STATUSES) for _ in follow_up]
    ids = draw(st.permutations(range(len(times))))
    grades = draw(st.lists(st.tuples(BLEEDING_STEPS, st.integers(0, 4)), max_size=5))
    events = draw(
        st.lists(st.tuples(BLEEDING_STEPS, st.sampled_from(["actual", "potential"])), max_size=3)
    )
    rescues = draw(st.lists(st.tuples(st.integers(-80, 60), RESCUE_STATUSES), max_size=2))
    doses = draw(st.lists(st.tuples(st.integers(-4, 4), DOSE_STATUSES), min_size=1, max_size=2))
    return Timeline(
        patient="p",
        counts=tuple(
            PlateletCount(f"c{ident}", _time(t), value, status)
            for ident, t, value, status in zip(ids, times, values, statuses, strict=True)
        ),
        bleeding_assessments=tuple(
            BleedingAssessment(f"g{i}", _time(t), g) for i, (t, g) in enumerate(grades)
        ),
        bleeding_events=tuple(
            BleedingEvent(f"e{i}", _time(t), s) for i, (t, s) in enumerate(events)
        ),
        administrations=tuple(
            Administration(f"d{i}", _time(t), "study-drug", s) for i, (t, s) in enumerate(doses)
        )
        + tuple(Administration(f"r{i}", _time(t), "rescue", s) for i, (t, s) in enumerate(rescues)),
    )


T = TypeVar("T")


def _shuffled(draw: st.DrawFn, items: tuple[T, ...]) -> tuple[T, ...]:
    return tuple(draw(st.permutations(items)))


@pytest.mark.parametrize("clock", ["calendar", "instant"])
@settings(max_examples=200, deadline=None)
@given(timeline=timelines(), data=st.data())
def test_arrival_order_never_changes_the_result(
    clock: str, timeline: Timeline, data: st.DataObject
) -> None:
    criteria = data.draw(criteria_strategy(clock))
    reordered = Timeline(
        patient=timeline.patient,
        counts=_shuffled(data.draw, timeline.counts),
        bleeding_assessments=_shuffled(data.draw, timeline.bleeding_assessments),
        bleeding_events=_shuffled(data.draw, timeline.bleeding_events),
        administrations=_shuffled(data.draw, timeline.administrations),
    )
    assert assess(reordered, criteria) == assess(timeline, criteria)


@settings(max_examples=150, deadline=None)
@given(timelines(), CRITERIA)
def test_the_engine_is_deterministic(timeline: Timeline, criteria: Criteria) -> None:
    first = assess(timeline, criteria)
    assert assess(timeline, criteria).as_dict() == first.as_dict()


@settings(max_examples=150, deadline=None)
@given(timelines(), CRITERIA, st.data())
def test_removing_a_count_and_adding_it_back(
    timeline: Timeline, criteria: Criteria, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(timeline.counts) - 1))
    removed = timeline.counts[index]
    without = replace(timeline, counts=timeline.counts[:index] + timeline.counts[index + 1 :])
    assess(without, criteria)  # recomputed in between, as the service does: no state may linger
    back = replace(without, counts=without.counts + (removed,))
    assert assess(back, criteria) == assess(timeline, criteria)


Timed = TypeVar("Timed", PlateletCount, BleedingAssessment, BleedingEvent, Administration)


def _moved(item: Timed, zone: tzinfo) -> Timed:
    return replace(item, time=item.time.astimezone(zone))


@settings(max_examples=150, deadline=None)
@given(timelines(), CRITERIA, st.sampled_from(ZONES))
def test_same_instants_in_another_zone_give_the_same_result(
    timeline: Timeline, criteria: Criteria, zone: tzinfo
) -> None:
    moved = Timeline(
        patient=timeline.patient,
        counts=tuple(_moved(item, zone) for item in timeline.counts),
        bleeding_assessments=tuple(_moved(item, zone) for item in timeline.bleeding_assessments),
        bleeding_events=tuple(_moved(item, zone) for item in timeline.bleeding_events),
        administrations=tuple(_moved(item, zone) for item in timeline.administrations),
    )
    assert assess(moved, criteria).as_dict() == assess(timeline, criteria).as_dict()


@settings(max_examples=150, deadline=None)
@given(timelines(), CRITERIA)
def test_result_is_internally_consistent(timeline: Timeline, criteria: Criteria) -> None:
    result = assess(timeline, criteria)
    if result.status == "NE":
        assert result.status_reason in NE_REASONS
        assert result.best_response == "NE" and not result.episodes
        return
    _check_status(result)
    ids = {
        item.id
        for item in (*timeline.counts, *timeline.bleeding_assessments, *timeline.bleeding_events)
    }
    assert {i for values in result.evidence.values() for i in values} <= ids
    for episode in result.episodes:
        assert (
            episode.duration_of_response_days is not None and episode.duration_of_response_days >= 0
        )
        assert episode.end is None or episode.end >= episode.start
        assert all(period.start >= episode.start for period in episode.cr_periods)
    if result.time_to_response_days is not None:
        assert result.time_to_response_days >= 0
        ttcr = result.time_to_complete_response_days
        assert ttcr is None or ttcr >= result.time_to_response_days


def _check_status(result: Assessment) -> None:
    expected_best = (
        "CR" if any(e.level == "CR" for e in result.episodes) else "R" if result.episodes else "NR"
    )
    assert result.best_response == expected_best
    assert (result.status == "NR") == (not result.episodes)
    assert (result.status == "LOR") == bool(result.episodes and result.episodes[-1].end is not None)
    assert all(e.end is not None for e in result.episodes[:-1])
    if result.status == "CR":
        assert not result.pending_confirmation
