"""The response engine of rules version 1, exactly as it was released (it was the oracle of
`test_equivalence.py` until rules version 2), kept frozen as the oracle of
`test_version_1.py`: an assessment stored under version 1 must be reproduced by the current
engine with that assessment's stored criteria (`Criteria.from_stored`). Do not edit or
"improve" this file; its only change is this docstring."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from statistics import fmean
from typing import TypeVar
from zoneinfo import ZoneInfo

from app.engine.model import (
    Administration,
    Assessment,
    Baseline,
    BestResponse,
    BleedingAssessment,
    BleedingEvent,
    Criteria,
    CrPeriod,
    Episode,
    PlateletCount,
    Status,
    Timeline,
)

VALID_OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected"})
ACTIVE_ADMINISTRATION_STATUSES = frozenset({"completed", "in-progress"})
ACTUAL_EVENT = "actual"
DEFAULT_CRITERIA = Criteria()

# Each evidence key with the FHIR resource type of its ids, so a caller can build references.
EVIDENCE_RESOURCE_TYPES = {
    "baseline": "Observation",
    "response": "Observation",
    "complete_response": "Observation",
    "complete_response_loss": "Observation",
    "loss": "Observation",
    "bleeding": "Observation",
    "bleeding_events": "AdverseEvent",
}


@dataclass(frozen=True)
class _Count:
    """A post-start count that is not under rescue, classified once against the criteria."""

    id: str
    time: datetime
    day: date
    bleeding: bool
    r_qualifying: bool
    cr_qualifying: bool

    @property
    def qualifying(self) -> bool:
        """Not failing: a CR-qualifying count that misses the doubling rule still counts (spec)."""
        return self.r_qualifying or self.cr_qualifying


_Predicate = Callable[[_Count], bool]


def _is_r(count: _Count) -> bool:
    return count.r_qualifying


def _is_cr(count: _Count) -> bool:
    return count.cr_qualifying


def _is_qualifying(count: _Count) -> bool:
    return count.qualifying


def _is_failing(count: _Count) -> bool:
    return not count.qualifying


def _is_below_cr(count: _Count) -> bool:
    return not count.cr_qualifying


@dataclass(frozen=True)
class _Pair:
    """Indices of a decision's two counts (equal for a loss by a single bleeding count)."""

    first: int
    second: int


@dataclass(frozen=True)
class _CrTrace:
    confirmed: _Pair
    lost: _Pair | None


@dataclass(frozen=True)
class _EpisodeTrace:
    onset: _Pair
    loss: _Pair | None
    cr: tuple[_CrTrace, ...]


def assess(timeline: Timeline, criteria: Criteria = DEFAULT_CRITERIA) -> Assessment:
    """Classify one patient's response from the whole timeline (recomputed, never patched)."""
    timeline = _in_utc(timeline)
    counts = sorted(
        (count for count in timeline.counts if count.status in VALID_OBSERVATION_STATUSES),
        key=lambda count: (count.time, count.id, count.value, count.status),
    )
    start = _treatment_start(timeline.administrations)
    if start is None:
        return _not_evaluable(
            timeline.patient, criteria, "no study-drug administration", None, None
        )
    baseline = _baseline(counts, start, criteria)
    if baseline is None:
        reason = (
            "no platelet count in the "
            f"{criteria.baseline_lookback_days} days up to the treatment start"
        )
        return _not_evaluable(timeline.patient, criteria, reason, start, None)
    post_start = [count for count in counts if count.time > start]
    if not post_start:
        reason = "no platelet count after the treatment start"
        return _not_evaluable(timeline.patient, criteria, reason, start, baseline)

    bleeding = _bleeding_by_day(timeline.bleeding_assessments, timeline.bleeding_events, criteria)
    evaluable = _classify(
        post_start, baseline.value, bleeding, _rescue_times(timeline.administrations), criteria
    )
    traces = _trace_episodes(evaluable, criteria)
    episodes = tuple(_episode(trace, evaluable, criteria) for trace in traces)
    start_day = _day(start, criteria.zone)
    response_date = episodes[0].start if episodes else None
    complete_response_date = next(
        (episode.cr_start for episode in episodes if episode.cr_start is not None), None
    )
    return Assessment(
        patient=timeline.patient,
        status=_status(episodes),
        status_reason=None,
        best_response=_best_response(episodes),
        pending_confirmation=_pending(evaluable, episodes),
        baseline=baseline,
        treatment_start=start,
        response_date=response_date,
        complete_response_date=complete_response_date,
        time_to_response_days=_days_between(start_day, response_date),
        time_to_complete_response_days=_days_between(start_day, complete_response_date),
        episodes=episodes,
        evidence=_evidence(baseline, traces, evaluable, bleeding),
        criteria=criteria,
    )


def _in_utc(timeline: Timeline) -> Timeline:
    """The same instants, all in UTC.

    Python subtracts, adds and compares two datetimes sharing a tzinfo on the wall clock, so
    across a daylight-saving change a ZoneInfo time would be an hour off; UTC has no such change.
    """
    return Timeline(
        patient=timeline.patient,
        counts=tuple(_utc(item) for item in timeline.counts),
        bleeding_assessments=tuple(_utc(item) for item in timeline.bleeding_assessments),
        bleeding_events=tuple(_utc(item) for item in timeline.bleeding_events),
        administrations=tuple(_utc(item) for item in timeline.administrations),
    )


_Timed = TypeVar("_Timed", PlateletCount, BleedingAssessment, BleedingEvent, Administration)


def _utc(item: _Timed) -> _Timed:
    return replace(item, time=item.time.astimezone(UTC))


def _not_evaluable(
    patient: str,
    criteria: Criteria,
    reason: str,
    start: datetime | None,
    baseline: Baseline | None,
) -> Assessment:
    """NE keeps whatever was already known, so a reviewer sees how far the patient got."""
    evidence = _empty_evidence()
    if baseline is not None:
        evidence["baseline"] = list(baseline.observations)
    return Assessment(
        patient=patient,
        status="NE",
        status_reason=reason,
        best_response=None,
        pending_confirmation=False,
        baseline=baseline,
        treatment_start=start,
        response_date=None,
        complete_response_date=None,
        time_to_response_days=None,
        time_to_complete_response_days=None,
        episodes=(),
        evidence=evidence,
        criteria=criteria,
    )


def _day(time: datetime, zone: ZoneInfo) -> date:
    return time.astimezone(zone).date()


def _days_between(start: date, end: date | None) -> int | None:
    return (end - start).days if end is not None else None


def _active(administrations: Iterable[Administration], role: str) -> list[datetime]:
    return [
        administration.time
        for administration in administrations
        if administration.role == role and administration.status in ACTIVE_ADMINISTRATION_STATUSES
    ]


def _treatment_start(administrations: Iterable[Administration]) -> datetime | None:
    """Earliest active study-drug dose."""
    times = _active(administrations, "study-drug")
    return min(times) if times else None


def _rescue_times(administrations: Iterable[Administration]) -> list[datetime]:
    return _active(administrations, "rescue")


def _baseline(
    counts: Sequence[PlateletCount], start: datetime, criteria: Criteria
) -> Baseline | None:
    """Counts at the start instant are baseline: blood is drawn before the dose is given."""
    earliest = start - timedelta(days=criteria.baseline_lookback_days)
    window = [count for count in counts if earliest <= count.time <= start]
    if not window:
        return None
    used = window if criteria.baseline_rule == "mean-before-start" else window[-1:]
    return Baseline(
        value=fmean(count.value for count in used),
        observations=tuple(count.id for count in used),
        date=_day(used[-1].time, criteria.zone),
    )


_Bleeding = dict[date, list[tuple[str, str]]]


def _bleeding_by_day(
    assessments: Iterable[BleedingAssessment],
    events: Iterable[BleedingEvent],
    criteria: Criteria,
) -> _Bleeding:
    """Documented bleeding per trial-zone calendar day as (evidence key, id), in clinical order."""
    found: list[tuple[datetime, str, str]] = [
        (assessment.time, "bleeding", assessment.id)
        for assessment in assessments
        if assessment.status in VALID_OBSERVATION_STATUSES
        and assessment.grade >= criteria.bleeding_min_grade
    ]
    found += [
        (event.time, "bleeding_events", event.id)
        for event in events
        if event.status == ACTUAL_EVENT
    ]
    by_day: _Bleeding = {}
    for time, key, ident in sorted(found):
        by_day.setdefault(_day(time, criteria.zone), []).append((key, ident))
    return by_day


def _classify(
    post_start: Sequence[PlateletCount],
    baseline: float,
    bleeding: _Bleeding,
    rescues: Sequence[datetime],
    criteria: Criteria,
) -> list[_Count]:
    """Drop counts under rescue (they neither confirm nor lose a response) and classify the rest."""
    window = timedelta(days=criteria.rescue_window_days)
    evaluable: list[_Count] = []
    for count in post_start:
        if any(rescue <= count.time <= rescue + window for rescue in rescues):
            continue
        day = _day(count.time, criteria.zone)
        with_bleeding = day in bleeding
        cr = not with_bleeding and count.value >= criteria.cr_threshold
        r = (
            not with_bleeding
            and count.value >= criteria.r_threshold
            and count.value >= criteria.doubling_factor * baseline
        )
        evaluable.append(_Count(count.id, count.time, day, with_bleeding, r, cr))
    return evaluable


def _first_confirmed(
    counts: Sequence[_Count],
    lo: int,
    hi: int,
    endpoint: _Predicate,
    breaks: _Predicate,
    gap: timedelta,
) -> _Pair | None:
    """The first count A in counts[lo:hi] that a later count B confirms.

    A and B satisfy `endpoint`, B is at least `gap` after A, and no count between them
    `breaks` the chain. The R rule and the CR rule share this shape.
    """
    for a in range(lo, hi):
        if not endpoint(counts[a]):
            continue
        for b in range(a + 1, hi):
            if breaks(counts[b]):
                break
            if endpoint(counts[b]) and counts[b].time - counts[a].time >= gap:
                return _Pair(a, b)
    return None


def _first_loss(
    counts: Sequence[_Count], lo: int, holds: _Predicate, gap: timedelta
) -> _Pair | None:
    """The first loss of a level from counts[lo] on.

    Either one count with bleeding, or a count that does not `hold` the level confirmed by a
    later one at least `gap` after it with none holding the level in between. The loss date is
    the first count of the pair, so the earliest such first count wins.
    """
    for f in range(lo, len(counts)):
        if counts[f].bleeding:
            return _Pair(f, f)
        if holds(counts[f]):
            continue
        for g in range(f + 1, len(counts)):
            if holds(counts[g]):
                break
            if counts[g].time - counts[f].time >= gap:
                return _Pair(f, g)
    return None


def _onset(counts: Sequence[_Count], lo: int, gap: timedelta) -> _Pair | None:
    """The next response from counts[lo] on.

    Usually an R pair; a CR pair alone when its counts miss the doubling rule (baseline > 50).
    """
    candidates = [
        pair
        for pair in (
            _first_confirmed(counts, lo, len(counts), _is_r, _is_failing, gap),
            _first_confirmed(counts, lo, len(counts), _is_cr, _is_below_cr, gap),
        )
        if pair is not None
    ]
    return min(candidates, key=lambda pair: (pair.first, pair.second), default=None)


def _trace_episodes(counts: Sequence[_Count], criteria: Criteria) -> list[_EpisodeTrace]:
    """Walk the counts: response, CR stretches inside it, loss; then look for the next response.

    A confirming pair never straddles a loss (no failing count lies between its two counts),
    so the episodes can be found one after the other without overlap.
    """
    gap = timedelta(days=criteria.confirm_days)
    loss_gap = timedelta(days=criteria.loss_confirm_days)
    traces: list[_EpisodeTrace] = []
    lo = 0
    while (onset := _onset(counts, lo, gap)) is not None:
        loss = _first_loss(counts, onset.first, _is_qualifying, loss_gap)
        end = loss.first if loss is not None else len(counts)
        cr = _cr_stretches(counts, onset.first, end, gap, loss_gap)
        traces.append(_EpisodeTrace(onset, loss, cr))
        if loss is None:
            break
        lo = loss.second + 1
    return traces


def _cr_stretches(
    counts: Sequence[_Count], lo: int, hi: int, gap: timedelta, loss_gap: timedelta
) -> tuple[_CrTrace, ...]:
    """CR stretches of one episode (counts[lo:hi]); CR lost with R still holding can come back.

    The CR loss is searched without the episode's bound: a loss of response is always also a
    loss of CR, so the CR loss is found at or before the episode's loss.
    """
    stretches: list[_CrTrace] = []
    while (confirmed := _first_confirmed(counts, lo, hi, _is_cr, _is_below_cr, gap)) is not None:
        lost = _first_loss(counts, confirmed.first, _is_cr, loss_gap)
        stretches.append(_CrTrace(confirmed, lost))
        if lost is None:
            break
        lo = lost.second + 1
    return tuple(stretches)


def _anchor_day(pair: _Pair, counts: Sequence[_Count], criteria: Criteria) -> date:
    index = pair.first if criteria.response_date_anchor == "first" else pair.second
    return counts[index].day


def _episode(trace: _EpisodeTrace, counts: Sequence[_Count], criteria: Criteria) -> Episode:
    cr_periods = tuple(
        CrPeriod(
            start=_anchor_day(stretch.confirmed, counts, criteria),
            end=counts[stretch.lost.first].day if stretch.lost is not None else None,
        )
        for stretch in trace.cr
    )
    # With the `confirming` anchor a CR pair may be confirmed before an R pair that started
    # earlier (only under unusual thresholds); the episode never starts after its first CR.
    start = min([_anchor_day(trace.onset, counts, criteria)] + [p.start for p in cr_periods[:1]])
    end = counts[trace.loss.first].day if trace.loss is not None else None
    last_day = end if end is not None else counts[-1].day
    return Episode(
        start=start,
        level="CR" if cr_periods else "R",
        end=end,
        duration_of_response_days=(last_day - start).days,
        cr_periods=cr_periods,
    )


def _status(episodes: Sequence[Episode]) -> Status:
    if not episodes:
        return "NR"
    current = episodes[-1]
    if current.end is not None:
        return "LOR"
    return "CR" if current.in_complete_response else "R"


def _best_response(episodes: Sequence[Episode]) -> BestResponse:
    if any(episode.level == "CR" for episode in episodes):
        return "CR"
    return "R" if episodes else "NR"


def _pending(counts: Sequence[_Count], episodes: Sequence[Episode]) -> bool:
    """Whether a qualifying count awaits its confirming count.

    That is the case exactly when the latest evaluable count qualifies beyond the current
    level: an unconfirmed qualifying count with no failing count after it makes the latest
    count qualify too, and a confirmed one would already have raised the level.
    """
    if not counts:
        return False
    latest = counts[-1]
    if not episodes or episodes[-1].end is not None:
        return latest.qualifying
    if episodes[-1].in_complete_response:
        return False
    return latest.cr_qualifying


def _empty_evidence() -> dict[str, list[str]]:
    return {key: [] for key in EVIDENCE_RESOURCE_TYPES}


def _evidence(
    baseline: Baseline,
    traces: Sequence[_EpisodeTrace],
    counts: Sequence[_Count],
    bleeding: _Bleeding,
) -> dict[str, list[str]]:
    """Ids per decision, in clinical order, each id once per decision.

    Bleeding evidence is what marked an evaluable count "with bleeding"; AdverseEvent ids go
    under their own key because they are not Observations.
    """
    evidence = _empty_evidence()
    evidence["baseline"] = list(baseline.observations)

    def add(key: str, pair: _Pair | None) -> None:
        if pair is None:
            return
        for index in (pair.first, pair.second):
            if counts[index].id not in evidence[key]:
                evidence[key].append(counts[index].id)

    for trace in traces:
        add("response", trace.onset)
        add("loss", trace.loss)
        for stretch in trace.cr:
            add("complete_response", stretch.confirmed)
            add("complete_response_loss", stretch.lost)
    for count in counts:
        for key, ident in bleeding.get(count.day, []):
            if ident not in evidence[key]:
                evidence[key].append(ident)
    return evidence
