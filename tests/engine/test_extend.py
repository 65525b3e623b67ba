"""`extend` (one more count, appended to a kept state) gives exactly what `assess` gives for
the whole timeline with that count, and declines only where it says it does."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import (
    Administration,
    BleedingAssessment,
    BleedingEvent,
    Classification,
    Criteria,
    PlateletCount,
    Timeline,
    assess,
)
from app.engine.rules import NO_EVALUABLE_COUNT, FoldState, assess_folded, extend, local_day
from app.engine.stored import dump_state, load_state
from bench.recompute import synthetic_timeline

from .test_examples import DOSE, count, story
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


def _stored_and_restored(state: FoldState, criteria: Criteria) -> FoldState:
    """The state through JSON text and back, as the service stores it; restored, it is
    stored exactly as it was (nothing lost or changed on the way)."""
    stored = orjson.loads(orjson.dumps(dump_state(state)))
    restored = load_state(stored, criteria)
    assert restored is not None
    assert orjson.loads(orjson.dumps(dump_state(restored))) == stored
    return restored


@settings(max_examples=400, deadline=None)
@given(timelines(), CRITERIA, STEPS, st.lists(st.booleans(), min_size=12, max_size=12))
def test_extend_equals_assess_of_the_whole_timeline(
    timeline: Timeline,
    criteria: Criteria,
    steps: list[tuple[int, float, str]],
    restore: list[bool],
) -> None:
    """Each later count appended to the state, the state sometimes stored and restored in
    between (then it holds only the classifications made since, as in the service)."""
    folded = assess_folded(timeline, criteria)
    assert folded.assessment == assess(timeline, criteria)
    state = folded.state
    kept: list[Classification] = []  # the classifications stored apart from the state
    time = max(record.time for record in _records(timeline))
    for n, (step, value, status) in enumerate(steps):
        later = time + timedelta(hours=6 * step)
        count = PlateletCount(f"x{n}", later, value, status)
        timeline = _with(timeline, count)
        expected = assess(timeline, criteria)
        if state is not None and restore[n]:
            kept += state.classified
            state = _stored_and_restored(state, criteria)
        if state is not None and extend(state, count):
            made = state.assessment()
            whole = (*kept, *made.classifications)
            assert replace(made, classifications=whole) == expected, f"after {n + 1} counts"
        else:
            assert state is None or not _appendable(timeline, count, criteria), (
                "declined a count it can append"
            )
            folded = assess_folded(timeline, criteria)
            state, kept = folded.state, []
        time = later


def _appendable(timeline: Timeline, count: PlateletCount, criteria: Criteria) -> bool:
    """Later than every other record, a status the engine reads, no qualifying bleed that day."""
    others = [record for record in _records(timeline) if record is not count]
    return (
        count.time > max(record.time for record in others)
        and count.status in ("final", "amended", "corrected")
        and local_day(count.time, criteria.zone) not in _bleeding_days(timeline, criteria)
    )


def test_extend_declines_a_count_that_is_not_the_latest_record() -> None:
    timeline = synthetic_timeline(20)
    state = assess_folded(timeline, Criteria()).state
    assert state is not None
    last = max(count.time for count in timeline.counts)
    before = dump_state(state)
    assert not extend(state, PlateletCount("same", last, 150.0))
    assert not extend(state, PlateletCount("earlier", last - timedelta(days=1), 150.0))
    assert not extend(state, PlateletCount("void", last + timedelta(days=1), 150.0, "cancelled"))
    assert dump_state(state) == before  # a declined count leaves the state as it was


def test_rules_version_1_is_never_extended() -> None:
    criteria = Criteria.from_stored({})  # every setting at version 1's value
    assert criteria.rules_version == 1
    timeline = synthetic_timeline(20)
    assert assess_folded(timeline, criteria).state is None


def test_a_long_history_is_extended_count_by_count() -> None:
    """1,000 counts (the benchmark's long history), then 60 more a day apart: each is
    appended, and the result is the whole timeline's."""
    criteria = Criteria()
    timeline = synthetic_timeline(1_000)
    state = assess_folded(timeline, criteria).state
    assert state is not None
    last = max(record.time for record in _records(timeline))
    values = [20.0, 150.0, 160.0, 140.0, 25.0, 10.0]
    for n in range(60):
        value = values[n % len(values)]
        count = PlateletCount(f"later{n}", last + timedelta(days=n + 1), value)
        timeline = _with(timeline, count)
        assert extend(state, count), f"count {n} declined"
    assert state.assessment() == assess(timeline, criteria)


def test_a_patient_without_an_evaluable_count_becomes_evaluable() -> None:
    """The only count after the start is on the start day (not evaluable): NE; two later
    ones confirm a response, appended one by one."""
    timeline = story(10.0, count("03-03", 12.0))
    criteria = Criteria()
    folded = assess_folded(timeline, criteria)
    assert folded.assessment.status_reason == NO_EVALUABLE_COUNT
    state = folded.state
    assert state is not None
    for n, when in enumerate(["03-05", "03-12"]):
        later = count(when, 150.0)
        timeline = _with(timeline, later)
        assert extend(state, later), f"count {n} declined"
        assert state.assessment() == assess(timeline, criteria)
    assert state.assessment().status == "CR"


def test_a_state_is_restored_only_under_its_own_criteria_and_format() -> None:
    criteria = Criteria()
    state = assess_folded(synthetic_timeline(20), criteria).state
    assert state is not None
    data = orjson.loads(orjson.dumps(dump_state(state)))
    assert load_state(data, criteria) is not None
    assert load_state(data, Criteria(confirm_days=14)) is None
    assert load_state({**data, "format": -1}, criteria) is None


def test_settled_episodes_are_kept_as_results_and_restored() -> None:
    """The 1,000-count history's first episodes are settled (their losses final): the state
    keeps their results only, and a state restored from its stored form goes on giving what
    `assess` gives."""
    criteria = Criteria()
    timeline = synthetic_timeline(1_000)
    state = assess_folded(timeline, criteria).state
    assert state is not None and state.settled, "no settled episode"
    assert all(episode.end is not None for episode, _ in state.settled)
    kept: list[Classification] = []
    last = max(record.time for record in _records(timeline))
    for n in range(30):
        kept += state.classified
        state = _stored_and_restored(state, criteria)
        value = [20.0, 150.0, 160.0, 10.0, 12.0][n % 5]
        count = PlateletCount(f"later{n}", last + timedelta(days=n + 1), value)
        timeline = _with(timeline, count)
        assert extend(state, count)
        made = state.assessment()
        whole = (*kept, *made.classifications)
        assert replace(made, classifications=whole) == assess(timeline, criteria), n


@pytest.mark.parametrize("every", [3, 1_000], ids=["restored every third count", "once"])
def test_episodes_begin_end_and_regain_cr_after_a_restore(every: int) -> None:
    """Restored every third count, or once before them all, the state starts new episodes,
    loses them, loses CR while R holds and regains it, as `assess` of the whole timeline
    does: what a restored state builds afresh (new searches, new losses) gets the
    criteria's gaps."""
    criteria = Criteria()
    timeline = synthetic_timeline(200)  # ends in an ongoing episode, in CR
    state = assess_folded(timeline, criteria).state
    assert state is not None and state.assessment().status == "CR"
    kept: list[Classification] = []
    last = max(record.time for record in _records(timeline))
    # CR for 8 days, R only for 3 (CR lost, R holds), CR again for 8, then 3 failing days.
    values = ([150.0] * 8 + [60.0] * 3 + [150.0] * 8 + [10.0] * 3) * 3
    statuses = set()
    for n, value in enumerate(values):
        if n % every == 0:
            kept += state.classified
            state = _stored_and_restored(state, criteria)  # with no classifications
        count = PlateletCount(f"later{n}", last + timedelta(days=n + 1), value)
        timeline = _with(timeline, count)
        assert extend(state, count), n
        made = state.assessment()
        whole = (*kept, *made.classifications)
        assert replace(made, classifications=whole) == assess(timeline, criteria), n
        statuses.add(made.status)
    assert {"CR", "LOR"} <= statuses
    assert len(made.episodes) >= 3
    assert any(len(episode.cr_periods) >= 2 for episode in made.episodes)


def test_a_bleed_that_is_the_loss_so_far_is_stored_and_restored() -> None:
    """A response, then a failing count and a bleed the next day without a count: with
    losses confirmed over two days, the bleed is the loss only until a later count decides
    (the run is open). Stored and restored, the state keeps it, and goes on as `assess`."""
    criteria = Criteria(loss_confirm_days=2)
    base = synthetic_timeline(20)
    last = max(record.time for record in _records(base))
    counts = [PlateletCount(f"r{n}", last + timedelta(days=n + 1), 150.0) for n in range(8)]
    failing = PlateletCount("f", last + timedelta(days=10), 10.0)
    bleed = BleedingAssessment("b", last + timedelta(days=11), 3)
    timeline = replace(
        base,
        counts=(*base.counts, *counts, failing),
        bleeding_assessments=(*base.bleeding_assessments, bleed),
    )
    state = assess_folded(timeline, criteria).state
    assert state is not None
    assert state.tracer.episodes and state.tracer.episodes[-1].loss.bleed is not None
    kept = list(state.classified)
    state = _stored_and_restored(state, criteria)
    assert state.tracer.episodes[-1].loss.bleed is not None
    for n, value in enumerate([12.0, 150.0, 160.0]):
        count = PlateletCount(f"after{n}", last + timedelta(days=12 + n), value)
        timeline = _with(timeline, count)
        assert extend(state, count), n
        made = state.assessment()
        whole = (*kept, *made.classifications)
        assert replace(made, classifications=whole) == assess(timeline, criteria), n


def test_a_count_before_a_later_bleed_is_not_appended() -> None:
    """A bleed on a day after the last count is the latest record: a count between them
    would come after it in the episodes' order, so it is declined, for a graded bleed and
    for a bleeding event alike."""
    criteria = Criteria()
    base = synthetic_timeline(20)
    last = max(record.time for record in _records(base))
    between = PlateletCount("between", last + timedelta(days=1), 150.0)
    later = last + timedelta(days=3)
    graded = replace(
        base, bleeding_assessments=(*base.bleeding_assessments, BleedingAssessment("b", later, 3))
    )
    event = replace(base, bleeding_events=(BleedingEvent("e", later),))
    for timeline in (graded, event):
        state = assess_folded(timeline, criteria).state
        assert state is not None
        assert not extend(state, between)


def test_an_episode_whose_cr_loss_can_still_move_is_not_settled() -> None:
    """CR on days 1-2; day 3 is R only, day 4 R only with a bleed (the response lost that
    day; CR lost so far on the bleed); days 5-6 R only confirm the next response. CR's run
    below its threshold is still open, so the first episode is not settled: a count on
    day 10, seven days after day 3, moves its CR loss to day 3, as `assess` says."""
    criteria = Criteria(confirm_days=1, loss_confirm_days=7)
    start = DOSE
    day = [start + timedelta(days=n, hours=2) for n in range(12)]
    counts = [PlateletCount("base", start - timedelta(hours=1), 15.0)]
    counts += [PlateletCount(f"d{n}", day[n], v) for n, v in [(1, 150.0), (2, 150.0)]]
    counts += [PlateletCount(f"d{n}", day[n], 60.0) for n in (3, 4, 5, 6)]
    timeline = Timeline(
        "p",
        tuple(counts),
        (BleedingAssessment("bleed", day[4] - timedelta(hours=1), 3),),
        (),
        (Administration("dose", start, "study-drug"),),
    )
    state = assess_folded(timeline, criteria).state
    assert state is not None
    assert len(state.assessment().episodes) == 2 and not state.settled
    assert state.tracer.trailing  # the first episode's CR loss, fed past its end
    state = _stored_and_restored(state, criteria)  # the trailing loss stays that stretch's
    count = PlateletCount("d10", day[10], 60.0)
    assert extend(state, count)
    expected = assess(_with(timeline, count), criteria)
    made = state.assessment()
    assert made.episodes == expected.episodes
    assert made.episodes[0].cr_periods[0].end == day[3].date()


def test_a_restored_state_keeps_the_latest_count_for_an_ongoing_episode() -> None:
    """An ongoing episode runs to the latest evaluated count. After a restore, a count
    under rescue adds no occasion, so the duration still comes from the restored latest
    count, as `assess` says."""
    criteria = Criteria()
    base = synthetic_timeline(200)  # ends in an ongoing episode
    last = max(record.time for record in _records(base))
    rescue = Administration("rescue", last + timedelta(days=1), "rescue")
    timeline = replace(base, administrations=(*base.administrations, rescue))
    state = assess_folded(timeline, criteria).state
    assert state is not None and state.assessment().episodes[-1].end is None
    kept = list(state.classified)
    state = _stored_and_restored(state, criteria)
    count = PlateletCount("under-rescue", last + timedelta(days=2), 150.0)
    timeline = _with(timeline, count)
    assert extend(state, count)
    made = state.assessment()
    assert made.classifications[-1].classification == "under-rescue"
    whole = (*kept, *made.classifications)
    assert replace(made, classifications=whole) == assess(timeline, criteria)
