"""The episode tracer (`app.engine.tracing`, a fold over the occasions) finds, after every
occasion it is given, exactly the episodes that searching the whole sequence so far finds.

The oracle below is the search-based tracer the engine had before the fold (issue 20,
part 4), kept verbatim but for names: index pairs over the whole list, searched forward
from each candidate. The sequences are drawn dense in the cases a fold can get wrong: runs
of failing occasions holding bleeds (a loss that a later count replaces), CR lost while R
holds (a CR loss still open after its episode closed), counts that qualify for CR but miss
the doubling rule, equal positions and exact gaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.tracing import EpisodeTracer, Occasion, Pair

# -- the oracle: the search-based tracer as it was ------------------------------------------

Predicate = Callable[[Occasion], bool]


class IndexPair(NamedTuple):
    first: int
    second: int


def _is_r(o: Occasion) -> bool:
    return o.r_qualifying


def _is_cr(o: Occasion) -> bool:
    return o.cr_qualifying


def _is_qualifying(o: Occasion) -> bool:
    return o.qualifying


def _is_failing(o: Occasion) -> bool:
    return not o.qualifying


def _is_below_cr(o: Occasion) -> bool:
    return not o.cr_qualifying


R_RULE = (_is_r, _is_failing)
CR_RULE = (_is_cr, _is_below_cr)


def first_confirmed(
    counts: Sequence[Occasion], lo: int, hi: int, rule: tuple[Predicate, Predicate], gap: int
) -> IndexPair | None:
    endpoint, breaks = rule
    for a in range(lo, hi):
        if not endpoint(counts[a]):
            continue
        for b in range(a + 1, hi):
            if breaks(counts[b]):
                break
            if endpoint(counts[b]) and counts[b].position - counts[a].position >= gap:
                return IndexPair(a, b)
    return None


def first_loss(counts: Sequence[Occasion], lo: int, holds: Predicate, gap: int) -> IndexPair | None:
    for f in range(lo, len(counts)):
        if counts[f].bleeding:
            return IndexPair(f, f)
        if holds(counts[f]):
            continue
        for g in range(f + 1, len(counts)):
            if holds(counts[g]):
                break
            if counts[g].position - counts[f].position >= gap:
                return IndexPair(f, g)
    return None


def onset(counts: Sequence[Occasion], lo: int, gap: int) -> IndexPair | None:
    candidates = [
        pair
        for pair in (
            first_confirmed(counts, lo, len(counts), R_RULE, gap),
            first_confirmed(counts, lo, len(counts), CR_RULE, gap),
        )
        if pair is not None
    ]
    return min(candidates, default=None)


Stretch = tuple[IndexPair, IndexPair | None]
Trace = tuple[IndexPair, IndexPair | None, tuple[Stretch, ...]]


def cr_stretches(
    counts: Sequence[Occasion], lo: int, hi: int, gap: int, loss_gap: int
) -> tuple[Stretch, ...]:
    stretches: list[Stretch] = []
    while (confirmed := first_confirmed(counts, lo, hi, CR_RULE, gap)) is not None:
        lost = first_loss(counts, confirmed.first, _is_cr, loss_gap)
        stretches.append((confirmed, lost))
        if lost is None:
            break
        lo = lost.second + 1
    return tuple(stretches)


def searched(counts: Sequence[Occasion], gap: int, loss_gap: int) -> list[Trace]:
    traces: list[Trace] = []
    lo = 0
    while (found := onset(counts, lo, gap)) is not None:
        loss = first_loss(counts, found.first, _is_qualifying, loss_gap)
        end = loss.first if loss is not None else len(counts)
        traces.append((found, loss, cr_stretches(counts, found.first, end, gap, loss_gap)))
        if loss is None:
            break
        lo = loss.second + 1
    return traces


# -- the fold's episodes in the oracle's terms ----------------------------------------------


def _indices(pair: Pair | None) -> IndexPair | None:
    return None if pair is None else IndexPair(pair.first_at, pair.second_at)


def folded(tracer: EpisodeTracer) -> list[Trace]:
    return [
        (
            IndexPair(episode.onset.first_at, episode.onset.second_at),
            _indices(episode.loss.result),
            tuple(
                (IndexPair(s.confirmed.first_at, s.confirmed.second_at), _indices(s.lost.result))
                for s in episode.stretches
            ),
        )
        for episode in tracer.episodes
    ]


def _pairs_hold_their_occasions(tracer: EpisodeTracer, occasions: list[Occasion]) -> None:
    """Each pair's occasions are the ones at its places."""
    for episode in tracer.episodes:
        pairs: list[Any] = [episode.onset, episode.loss.result]
        pairs += [p for s in episode.stretches for p in (s.confirmed, s.lost.result)]
        for pair in pairs:
            if pair is not None:
                assert pair.first is occasions[pair.first_at]
                assert pair.second is occasions[pair.second_at]


# -- sequences ------------------------------------------------------------------------------

START = datetime(2025, 3, 10, 8, tzinfo=UTC)
# One occasion's level: failing, R only, CR only, both. Real criteria allow only one of the
# two single levels in a patient (the R floor is at or below the CR threshold: every CR
# count is an R count; or above it: every R count is a CR count), so a sequence draws one.
FAILING, BOTH = (False, False), (True, True)
LEVELS = {
    "cr implies r": [FAILING, (True, False), BOTH],
    "r implies cr": [FAILING, (False, True), BOTH],
}


@st.composite
def occasions(draw: st.DrawFn) -> list[Occasion]:
    regime = LEVELS[draw(st.sampled_from(sorted(LEVELS)))]
    # Runs of one level, as a patient's counts come, each occasion possibly bleeding.
    runs = draw(
        st.lists(st.tuples(st.sampled_from(regime), st.integers(1, 5)), min_size=1, max_size=10)
    )
    levels = [level for level, length in runs for _ in range(length)]
    steps = draw(st.lists(st.integers(0, 3), min_size=len(levels), max_size=len(levels)))
    bleeds = draw(
        st.lists(
            st.sampled_from([False, False, False, True]), min_size=len(levels), max_size=len(levels)
        )
    )
    sources = draw(
        st.lists(
            st.sampled_from(["count", "count", "bleeding"]),
            min_size=len(levels),
            max_size=len(levels),
        )
    )
    result = []
    for i, (position, level, bleeding, source) in enumerate(
        zip(accumulate(steps), levels, bleeds, sources, strict=True)
    ):
        time = START + timedelta(days=position)
        if bleeding:  # a bleeding occasion fails: a count with bleeding, or a bleed alone
            result.append(
                Occasion(f"o{i}", time, time.date(), position, True, False, False, source)
            )
        else:
            result.append(Occasion(f"o{i}", time, time.date(), position, False, *level))
    return result


GAPS = st.sampled_from([0, 1, 2, 3, 7])


@settings(max_examples=3000, deadline=None)
@given(occasions(), GAPS, GAPS)
def test_the_fold_finds_what_the_search_finds_after_every_occasion(
    sequence: list[Occasion], gap: int, loss_gap: int
) -> None:
    tracer = EpisodeTracer(gap, loss_gap)
    for n, occasion in enumerate(sequence, start=1):
        tracer.push(occasion)
        assert folded(tracer) == searched(sequence[:n], gap, loss_gap), f"after {n} occasions"
    _pairs_hold_their_occasions(tracer, sequence)
    counts = [o for o in sequence if o.is_count]
    assert tracer.latest == sequence[-1]
    assert tracer.latest_count == (counts[-1] if counts else None)
    assert tracer.bleeding == [o for o in sequence if o.bleeding]


def _occasion(i: int, day: int, level: tuple[bool, bool], bleeding: bool = False) -> Occasion:
    time = START + timedelta(days=day)
    if bleeding:
        return Occasion(f"o{i}", time, time.date(), day, True, False, False)
    return Occasion(f"o{i}", time, time.date(), day, False, *level)


def test_a_bleed_is_the_loss_until_a_later_count_confirms_the_run_first_failing_one() -> None:
    """Response on days 0/7; day 8 fails, day 9 bleeds (the loss so far: its own day); day
    10 fails two days after day 8, which makes day 8 the loss."""
    r = (True, True)
    days = [(0, r, False), (7, r, False), (8, FAILING, False), (9, FAILING, True)]
    sequence = [_occasion(i, d, level, b) for i, (d, level, b) in enumerate(days)]
    tracer = EpisodeTracer(7, 2)
    for occasion in sequence:
        tracer.push(occasion)
    loss = tracer.episodes[0].loss.result
    assert loss is not None and (loss.first_at, loss.second_at) == (3, 3)
    sequence.append(_occasion(4, 10, FAILING))
    tracer.push(sequence[-1])
    loss = tracer.episodes[0].loss.result
    assert loss is not None and (loss.first_at, loss.second_at) == (2, 4)
    assert folded(tracer) == searched(sequence, 7, 2)


def test_a_cr_loss_moves_after_its_episode_ended() -> None:
    """CR on days 0/7; day 8 is R only (below CR), day 9 bleeds: response and CR are both
    lost on day 9 so far. Day 10 is R again: the response's loss is final (the bleed), but
    not CR's, whose run of counts below CR goes on; day 12 is R only, far enough from day 8,
    so CR was lost on day 8, after the episode's loss was settled."""
    cr, r_only = (True, True), (True, False)
    days = [
        (0, cr, False),
        (7, cr, False),
        (8, r_only, False),
        (9, FAILING, True),
        (10, r_only, False),
    ]
    tracer = EpisodeTracer(7, 3)
    for i, (d, level, b) in enumerate(days):
        tracer.push(_occasion(i, d, level, b))
    episode = tracer.episodes[0]
    assert _indices(episode.loss.result) == (3, 3) and episode.loss.found is not None
    assert _indices(episode.stretches[0].lost.result) == (3, 3)
    assert episode.stretches[0].lost.found is None
    tracer.push(_occasion(5, 12, r_only))
    assert _indices(episode.stretches[0].lost.result) == (2, 5)


def test_the_episode_searches_cr_from_the_response_first_count() -> None:
    """The response is confirmed at its second count; the CR stretch that begins at its
    first count is found too, from the occasions the tracer kept for that."""
    cr = (True, True)
    tracer = EpisodeTracer(7, 1)
    for i, day in enumerate([0, 3, 7]):
        tracer.push(_occasion(i, day, cr))
    (episode,) = tracer.episodes
    assert _indices(episode.onset) == (0, 2)
    assert [_indices(s.confirmed) for s in episode.stretches] == [(0, 2)]


def test_positions_on_the_instant_clock() -> None:
    """The fold compares positions by subtraction only: microseconds work as days do."""
    day = 86_400_000_000
    cr = (True, True)
    tracer = EpisodeTracer(7 * day, 1 * day)
    moments = [0, 7 * day - 1, 7 * day]
    for i, position in enumerate(moments):
        time = START + timedelta(microseconds=position)
        tracer.push(Occasion(f"o{i}", time, date(2025, 3, 10), position, False, *cr))
    assert _indices(tracer.episodes[0].onset) == (0, 2)


def test_a_cr_loss_still_open_when_the_next_response_begins() -> None:
    """CR on days 0/1; day 2 is R only (below CR), then a bleed the same day: response and
    CR lost so far on the bleed. R only again on day 2 settles the response's loss; days 2
    and 3 (R only, a day apart) confirm the next response while CR's run below its threshold
    is still open; day 9, seven days after day 2, then moves the first episode's CR loss to
    day 2, inside the second episode."""
    cr, r_only = (True, True), (True, False)
    days = [(0, cr, False), (1, cr, False), (2, r_only, False), (2, FAILING, True)]
    days += [(2, r_only, False), (3, r_only, False), (9, r_only, False)]
    sequence = [_occasion(i, d, level, b) for i, (d, level, b) in enumerate(days)]
    tracer = EpisodeTracer(1, 7)
    for n, occasion in enumerate(sequence, start=1):
        tracer.push(occasion)
        assert folded(tracer) == searched(sequence[:n], 1, 7), f"after {n} occasions"
    first, second = tracer.episodes
    assert _indices(first.loss.result) == (3, 3)
    assert _indices(second.onset) == (4, 5)
    assert _indices(first.stretches[0].lost.result) == (2, 6)
