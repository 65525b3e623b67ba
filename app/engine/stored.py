"""A `FoldState` as JSON-ready values and back, so that it can be stored with the patient's
assessment and a later count appended to it in another request, process or replica.

The classifications are not in it: the caller stores them with the assessment already, and
restores the state with none (`FoldState.classified` then collects the new ones). The
criteria are: a state is only restored under the criteria it was made under (`None`
otherwise, and under another format), since every decision in it depends on them.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from .model import Baseline, Criteria, CrPeriod, Episode
from .rules import Clock, Course, FoldState, Settled
from .tracing import (
    Confirming,
    CrStretch,
    EpisodeTrace,
    EpisodeTracer,
    Losing,
    Occasion,
    OnsetSearch,
    Pair,
    Seen,
)

# Bumped whenever the shape below or the meaning of a state changes (then every stored
# state is refused, and the next write recomputes the patient in full and stores a new one).
FORMAT = 1

Json = Any


def dump_state(state: FoldState) -> dict[str, Json]:
    """The state as JSON-ready values (ISO 8601 times and dates), classifications left out."""
    course = state.course
    return {
        "format": FORMAT,
        "patient": state.patient,
        "criteria": course.criteria.as_dict(),
        "start": course.start.isoformat(),
        "rescues": [[time.isoformat(), ident] for time, ident in course.rescues],
        "bleeding": [
            [day.isoformat(), [[key, ident, time.isoformat()] for key, ident, time in bleeds]]
            for day, bleeds in course.bleeding.items()
        ],
        "baseline": [
            state.baseline.value,
            list(state.baseline.observations),
            state.baseline.date.isoformat(),
        ],
        "latest": state.latest.isoformat(),
        "any_count": state.any_count,
        "settled": [_settled(item) for item in state.settled],
        "tracer": _dump_tracer(state.tracer),
    }


def load_state(data: Json, criteria: Criteria) -> FoldState | None:
    """The state `dump_state` gave, with no classifications; None when it was made under
    other criteria or in another format, or cannot be read (a state is only ever a short
    cut: the caller then assesses the whole history, which stores a good one)."""
    if not isinstance(data, dict):
        return None
    if data.get("format") != FORMAT or data.get("criteria") != criteria.as_dict():
        return None
    try:
        return _state_of(data, criteria)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _state_of(data: dict[str, Json], criteria: Criteria) -> FoldState:
    clock = Clock(criteria)
    course = Course(
        start=_time(data["start"]),
        rescues=[(_time(time), ident) for time, ident in data["rescues"]],
        bleeding={
            date.fromisoformat(day): [(key, ident, _time(time)) for key, ident, time in bleeds]
            for day, bleeds in data["bleeding"]
        },
        clock=clock,
        criteria=criteria,
    )
    value, observations, day = data["baseline"]
    return FoldState(
        patient=data["patient"],
        course=course,
        baseline=Baseline(value, tuple(observations), date.fromisoformat(day)),
        tracer=_load_tracer(data["tracer"], clock.gap(criteria.confirm_days), clock, criteria),
        classified=[],
        latest=_time(data["latest"]),
        any_count=data["any_count"],
        settled=[_settled_of(item) for item in data["settled"]],
    )


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _day(text: str | None) -> date | None:
    return None if text is None else date.fromisoformat(text)


def _iso(day: date | None) -> str | None:
    return None if day is None else day.isoformat()


def _settled(item: Settled) -> list[Json]:
    episode = item.episode
    periods = [[period.start.isoformat(), _iso(period.end)] for period in episode.cr_periods]
    result = [
        episode.start.isoformat(),
        episode.level,
        _iso(episode.end),
        episode.duration_of_response_days,
        periods,
    ]
    return [result, [list(pair) for pair in item.evidence]]


def _settled_of(data: list[Json]) -> Settled:
    (start, level, end, duration, periods), evidence = data
    episode = Episode(
        start=date.fromisoformat(start),
        level=level,
        end=_day(end),
        duration_of_response_days=duration,
        cr_periods=tuple(CrPeriod(date.fromisoformat(a), _day(b)) for a, b in periods),
    )
    return Settled(episode, tuple((key, ident) for key, ident in evidence))


# -- the tracer ----------------------------------------------------------------------------


def _occasion(occasion: Occasion) -> list[Json]:
    ident, time, day, position, bleeding, r, cr, source = occasion
    return [ident, time.isoformat(), day.isoformat(), position, bleeding, r, cr, source]


def _occasion_of(data: list[Json]) -> Occasion:
    ident, time, day, position, bleeding, r, cr, source = data
    return Occasion(ident, _time(time), date.fromisoformat(day), position, bleeding, r, cr, source)


def _seen(seen: Seen | None) -> list[Json] | None:
    return None if seen is None else [seen.at, _occasion(seen.occasion)]


def _seen_of(data: list[Json] | None) -> Seen | None:
    return None if data is None else Seen(data[0], _occasion_of(data[1]))


def _pair(pair: Pair | None) -> list[Json] | None:
    if pair is None:
        return None
    return [pair.first_at, pair.second_at, _occasion(pair.first), _occasion(pair.second)]


def _pair_of(data: list[Json] | None) -> Pair | None:
    if data is None:
        return None
    first_at, second_at, first, second = data
    return Pair(first_at, second_at, _occasion_of(first), _occasion_of(second))


def _losing(losing: Losing) -> dict[str, Json]:
    return {"run": _seen(losing.run), "bleed": _seen(losing.bleed), "found": _pair(losing.found)}


def _losing_of(data: dict[str, Json], cr_level: bool, gap: int) -> Losing:
    losing = Losing(cr_level, gap)
    losing.run, losing.bleed = _seen_of(data["run"]), _seen_of(data["bleed"])
    losing.found = _pair_of(data["found"])
    return losing


def _confirming(search: Confirming | None) -> dict[str, Json] | None:
    # A search that found its pair is never kept (its owner starts the stretch or the
    # episode at once), so only the endpoint it holds is stored.
    return None if search is None else {"alive": _seen(search.alive)}


def _confirming_of(data: dict[str, Json] | None, cr_level: bool, gap: int) -> Confirming | None:
    if data is None:
        return None
    search = Confirming(cr_level, gap)
    search.alive = _seen_of(data["alive"])
    return search


def _episode(episode: EpisodeTrace) -> dict[str, Json]:
    return {
        "onset": _pair(episode.onset),
        "loss": _losing(episode.loss),
        "stretches": [
            {"confirmed": _pair(s.confirmed), "lost": _losing(s.lost)} for s in episode.stretches
        ],
        "cr_search": _confirming(episode.cr_search),
    }


def _episode_of(data: dict[str, Json], gap: int, loss_gap: int) -> EpisodeTrace:
    onset = _pair_of(data["onset"])
    assert onset is not None
    episode = EpisodeTrace(onset, gap, loss_gap)
    episode.loss = _losing_of(data["loss"], False, loss_gap)
    for item in data["stretches"]:
        confirmed = _pair_of(item["confirmed"])
        assert confirmed is not None
        episode.stretches.append(CrStretch(confirmed, _losing_of(item["lost"], True, loss_gap)))
    episode.cr_search = _confirming_of(data["cr_search"], True, gap)
    return episode


def _dump_tracer(tracer: EpisodeTracer) -> dict[str, Json]:
    # A trailing CR loss is one of an earlier episode's stretches: stored as where it is,
    # so that the restored tracer moves that very stretch's loss.
    where = {
        id(stretch.lost): [e, s]
        for e, episode in enumerate(tracer.episodes)
        for s, stretch in enumerate(episode.stretches)
    }
    onset = tracer.onset_search
    return {
        "seen": tracer.seen,
        "episodes": [_episode(episode) for episode in tracer.episodes],
        "latest": None if tracer.latest is None else _occasion(tracer.latest),
        "latest_count": None if tracer.latest_count is None else _occasion(tracer.latest_count),
        "bleeding": [_occasion(occasion) for occasion in tracer.bleeding],
        "onset": None
        if onset is None
        else {
            "r": _seen(onset.r.alive),
            "cr": _seen(onset.cr.alive),
            "recent": [_seen(seen) for seen in onset.recent],
        },
        "trailing": [where[id(lost)] for lost in tracer.trailing],
    }


def _load_tracer(
    data: dict[str, Json], gap: int, clock: Clock, criteria: Criteria
) -> EpisodeTracer:
    loss_gap = clock.gap(criteria.loss_confirm_days)
    tracer = EpisodeTracer(gap, loss_gap)
    tracer.seen = data["seen"]
    tracer.episodes = [_episode_of(item, gap, loss_gap) for item in data["episodes"]]
    tracer.latest = None if data["latest"] is None else _occasion_of(data["latest"])
    latest_count = data["latest_count"]
    tracer.latest_count = None if latest_count is None else _occasion_of(latest_count)
    tracer.bleeding = [_occasion_of(item) for item in data["bleeding"]]
    onset = data["onset"]
    if onset is None:
        tracer.onset_search = None
    else:
        search = tracer.onset_search = OnsetSearch(gap)
        search.r.alive, search.cr.alive = _seen_of(onset["r"]), _seen_of(onset["cr"])
        search.recent.extend(s for s in map(_seen_of, onset["recent"]) if s is not None)
    tracer.trailing = [tracer.episodes[e].stretches[s].lost for e, s in data["trailing"]]
    return tracer
