"""`extend` (one more count, appended to a kept state) gives exactly what `assess` gives for
the whole timeline with that count, and declines only where it says it does."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import Criteria, PlateletCount, Timeline, assess
from app.engine.rules import NO_EVALUABLE_COUNT, assess_folded, extend, local_day
from bench.recompute import synthetic_timeline

from .test_examples import count, story
from .test_properties import COUNT_STATUSES, CRITERIA, VALUES, timelines

# Later counts, each 0 to 3 days after the one before (0: the same instant, which must
# not be appended: it is not later than every record).
STEPS = st.lists(st.tuples(st.integers(0, 12), VALUES, COUNT_STATUSES), min_size=1, max_size=12)


def _records(timeline: Timeline) -> list:  # type: ignore[type-arg]
    return [
        *timeline.counts,
        *timeline.bleeding_assessments,
        *timeline.bleeding_events,
        *timeline.administrations,
    ]


def _with(timeline: Timeline, count: PlateletCount) -> Timeline:
    return replace(timeline, counts=(*timeline.counts, count))


def _bleeding_days(timeline: Timeline, criteria: Criteria) -> set:  # type: ignore[type-arg]
    """The trial days of qualifying bleeds: a count on one of them is not appended."""
    grades = [
        b.time
        for b in timeline.bleeding_assessments
        if b.status in ("final", "amended", "corrected") and b.grade >= criteria.bleeding_min_grade
    ]
    events = [e.time for e in timeline.bleeding_events if e.status == "actual"]
    return {local_day(time, criteria.zone) for time in grades + events}


@settings(max_examples=400, deadline=None)
@given(timelines(), CRITERIA, STEPS)
def test_extend_equals_assess_of_the_whole_timeline(
    timeline: Timeline, criteria: Criteria, steps: list[tuple[int, float, str]]
) -> None:
    folded = assess_folded(timeline, criteria)
    assert folded.assessment == assess(timeline, criteria)
    time = max(record.time for record in _records(timeline))
    for n, (step, value, status) in enumerate(steps):
        later = time + timedelta(hours=6 * step)
        count = PlateletCount(f"x{n}", later, value, status)
        latest = max(record.time for record in _records(timeline))
        timeline = _with(timeline, count)
        expected = assess(timeline, criteria)
        extended = extend(folded, count)
        if extended is None:
            traced = folded.state is not None
            assert (
                not traced
                or later <= latest
                or local_day(later, criteria.zone) in _bleeding_days(timeline, criteria)
            ), "declined a count it can append"
            folded = assess_folded(timeline, criteria)
        else:
            assert extended.assessment == expected, f"after {n + 1} later counts"
            folded = extended
        time = later


def test_extend_declines_a_count_that_is_not_the_latest_record() -> None:
    timeline = synthetic_timeline(20)
    folded = assess_folded(timeline, Criteria())
    last = max(count.time for count in timeline.counts)
    assert extend(folded, PlateletCount("same", last, 150.0)) is None
    assert extend(folded, PlateletCount("earlier", last - timedelta(days=1), 150.0)) is None


def test_rules_version_1_is_never_extended() -> None:
    criteria = Criteria.from_stored({})  # every setting at version 1's value
    assert criteria.rules_version == 1
    timeline = synthetic_timeline(20)
    folded = assess_folded(timeline, criteria)
    last = max(count.time for count in timeline.counts)
    assert folded.state is None
    assert extend(folded, PlateletCount("later", last + timedelta(days=1), 150.0)) is None


def test_a_long_history_is_extended_count_by_count() -> None:
    """1,000 counts (the benchmark's long history), then 60 more a day apart: each is
    appended, and the result is the whole timeline's."""
    criteria = Criteria()
    timeline = synthetic_timeline(1_000)
    folded = assess_folded(timeline, criteria)
    last = max(record.time for record in _records(timeline))
    values = [20.0, 150.0, 160.0, 140.0, 25.0, 10.0]
    for n in range(60):
        count = PlateletCount(f"later{n}", last + timedelta(days=n + 1), values[n % len(values)])
        timeline = _with(timeline, count)
        extended = extend(folded, count)
        assert extended is not None, f"count {n} declined"
        folded = extended
    assert folded.assessment == assess(timeline, criteria)


def test_a_patient_without_an_evaluable_count_becomes_evaluable() -> None:
    """The only count after the start is on the start day (not evaluable): NE; two later
    ones confirm a response, appended one by one."""
    timeline = story(10.0, count("03-03", 12.0))
    criteria = Criteria()
    folded = assess_folded(timeline, criteria)
    assert folded.assessment.status_reason == NO_EVALUABLE_COUNT
    for n, when in enumerate(["03-05", "03-12"]):
        later = count(when, 150.0)
        timeline = _with(timeline, later)
        extended = extend(folded, later)
        assert extended is not None, f"count {n} declined"
        assert extended.assessment == assess(timeline, criteria)
        folded = extended
    assert folded.assessment.status == "CR"
