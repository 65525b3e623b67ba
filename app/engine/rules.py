"""The ITP response rules (docs/response-rules.md, version 2) as one pure function, `assess`.

Everything is evaluated in clinical-time order, ties broken by observation id (then value and
status), so the order in which data arrived can never change a result. Times are taken to
UTC first, so instants compare and subtract as instants; calendar days are dates in the trial
time zone. Distances in days are counted on the `confirm_clock`: calendar days (date minus
date) or instants (time minus time, a day being 24 hours).

`criteria.rules_version == 1` reproduces the rules before version 2 exactly (with the three
version-2 settings at `instant`, 0, 0, which `Criteria` insists on): a `stopped` study-drug
administration does not start treatment, a bleed on a day without a count is ignored, the
not-evaluable reasons are version 1's, and a patient with a count after the start is
evaluable even when every such count is under rescue.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from itertools import chain
from operator import attrgetter
from statistics import fmean
from typing import NamedTuple, TypeVar
from zoneinfo import ZoneInfo

from .model import (
    Administration,
    Assessment,
    Baseline,
    BestResponse,
    BleedingAssessment,
    BleedingEvent,
    Classification,
    ClassificationCode,
    Criteria,
    CrPeriod,
    Episode,
    PlateletCount,
    Status,
    Timeline,
)
from .tracing import EpisodeTrace, EpisodeTracer, Occasion, Pair

VALID_OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected"})
# Administrations that exposed the patient, study drug and rescue alike: an infusion
# interrupted part-way (`stopped`) has still exposed the patient, so it starts treatment, and
# a transfusion or IVIg stopped part-way has still raised the count it is ignored for.
EXPOSED_STATUSES = frozenset({"completed", "in-progress", "stopped"})
# Rules version 1 counted an administration only when completed or in progress.
VERSION_1_EXPOSED_STATUSES = frozenset({"completed", "in-progress"})
ACTUAL_EVENT = "actual"
DEFAULT_CRITERIA = Criteria()

# Why a patient is not evaluable, checked in this order.
NO_TREATMENT_START = "no treatment start"
NO_BASELINE = "no baseline"
BASELINE_ONLY_UNDER_RESCUE = "baseline only under rescue"
NO_EVALUABLE_COUNT = "no evaluable count"

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

_MICROSECONDS_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Clock:
    """Distances in days on the confirm clock, and the windows "N days after an event".

    `calendar`: the difference of two trial-zone dates; a window holds what is taken at or
    after the event's instant and on or before the calendar day event-date + N.
    `instant`: the difference of two instants, a day being 24 hours; a window is
    [event, event + N x 24 h].
    """

    def __init__(self, criteria: Criteria) -> None:
        self.calendar = criteria.confirm_clock == "calendar"
        self.zone = criteria.zone
        # Times are in UTC here (`_in_utc`): in a UTC trial their date is the calendar day.
        self.in_utc = self.zone.key == "UTC"

    def day(self, time: datetime) -> date:
        return time.date() if self.in_utc else local_day(time, self.zone)

    def position(self, time: datetime, day: date) -> int:
        if self.calendar:
            return day.toordinal()
        return (time - _EPOCH) // _MICROSECOND

    def gap(self, days: int) -> int:
        """`days` in the unit of `position`."""
        return days if self.calendar else days * _MICROSECONDS_PER_DAY

    def days_apart(self, earlier: datetime, later: datetime, days: int) -> bool:
        """Whether `later` is at least `days` after `earlier`."""
        if self.calendar:
            return (self.day(later) - self.day(earlier)).days >= days
        return later - earlier >= timedelta(days=days)

    def within(self, event: datetime, time: datetime, days: int) -> bool:
        """Whether `time` falls in the window of `days` days after `event`, ends included."""
        if time < event:
            return False
        if self.calendar:
            return (self.day(time) - self.day(event)).days <= days
        return time - event <= timedelta(days=days)


_Rescue = tuple[datetime, str]


def _covering_rescue(
    rescues: Sequence[_Rescue], time: datetime, days: int, clock: Clock
) -> str | None:
    """The rescue whose window of `days` holds `time`: the latest one at or before it (ties:
    the highest id). Windows end in the order their rescues were given, so if the latest
    one's window has closed, every earlier one's has too."""
    for given, ident in reversed(rescues):
        if given <= time:
            return ident if clock.within(given, time, days) else None
    return None


class Course(NamedTuple):
    """What every step after the treatment start judges a record against: the start, the
    rescues (time, id) in order, the qualifying bleeds by day, the confirm clock and the
    criteria."""

    start: datetime
    rescues: Sequence[_Rescue]
    bleeding: _Bleeding
    clock: Clock
    criteria: Criteria


class _Progress(NamedTuple):
    """How far the assessment of a patient got: the treatment start, the baseline, and how
    each record was classified on the way. A patient who is not evaluable keeps it, so a
    reviewer sees where the assessment stopped."""

    start: datetime | None = None
    baseline: Baseline | None = None
    classified: Sequence[Classification] = ()


# Clinical-time order, ties broken by id, then value and status (a C-level key: 1,000 counts
# are sorted on every recompute).
_COUNT_ORDER = attrgetter("time", "id", "value", "status")


def assess(timeline: Timeline, criteria: Criteria = DEFAULT_CRITERIA) -> Assessment:
    """Classify one patient's response from the whole timeline (recomputed, never patched)."""
    return assess_folded(timeline, criteria).assessment


@dataclass
class FoldState:
    """What an assessment under rules version 2 was made from that a later count needs:
    the course (start, rescues, bleeds), the baseline, the episodes traced so far, the
    classifications, and the time of the latest record of any kind on the timeline.

    `classified` may hold only the classifications made since the state was stored (a
    caller that keeps them elsewhere restores the state with none, `app.engine.stored`);
    `assessment()` then carries only those.
    """

    patient: str
    course: Course
    baseline: Baseline
    tracer: EpisodeTracer
    classified: list[Classification]
    latest: datetime
    any_count: bool  # whether any count was evaluated (bleeding occasions alone are not)
    # The first episodes, once nothing can change them (`settle`): their results only.
    settled: list[Settled] = field(default_factory=list)

    def assessment(self) -> Assessment:
        if not self.any_count:
            progress = _Progress(self.course.start, self.baseline, self.classified)
            criteria = self.course.criteria
            return _not_evaluable(self.patient, criteria, NO_EVALUABLE_COUNT, progress)
        traced = _Traced(self.tracer, self.settled)
        return _evaluated(self.patient, self.course, self.baseline, traced, self.classified)

    def settle(self) -> None:
        """Keep only the results of the first episodes whose losses, of response and of
        every CR stretch, are final: no later occasion can change them, so the state (and
        its stored form) does not grow with the patient's past episodes."""
        episodes, criteria = self.tracer.episodes, self.course.criteria
        while episodes and _is_settled(episodes[0]):
            trace = episodes.pop(0)
            episode = _episode(trace, self.tracer.latest_count, criteria)
            self.settled.append(Settled(episode, tuple(_decision_evidence([trace]))))


class Settled(NamedTuple):
    """An episode nothing can change any more, as its result and the (key, id) of the
    counts its decisions rest on."""

    episode: Episode
    evidence: tuple[tuple[str, str], ...]


def _is_settled(trace: EpisodeTrace) -> bool:
    return trace.loss.found is not None and all(
        stretch.lost.found is not None for stretch in trace.stretches
    )


class _Traced(NamedTuple):
    """The episodes of an assessment: those settled, then those the tracer still holds."""

    tracer: EpisodeTracer
    settled: Sequence[Settled] = ()


@dataclass(frozen=True)
class Folded:
    """An assessment, and the state `extend` appends a later count to (None: it cannot;
    the patient is not evaluable before the episodes are traced, or rules version 1)."""

    assessment: Assessment
    state: FoldState | None = None


def assess_folded(timeline: Timeline, criteria: Criteria = DEFAULT_CRITERIA) -> Folded:
    """`assess`, keeping the state that `extend` takes."""
    timeline = _in_utc(timeline)
    version_1 = criteria.rules_version == 1
    patient = timeline.patient
    start = _treatment_start(timeline.administrations, version_1)
    if start is None:
        reason = "no study-drug administration" if version_1 else NO_TREATMENT_START
        return Folded(_not_evaluable(patient, criteria, reason, _Progress()))
    counts = sorted(
        (count for count in timeline.counts if count.status in VALID_OBSERVATION_STATUSES),
        key=_COUNT_ORDER,
    )
    rescues = _rescues(timeline.administrations, version_1)
    clock = Clock(criteria)
    bleeding = _bleeding_by_day(
        timeline.bleeding_assessments, timeline.bleeding_events, clock, criteria
    )
    course = Course(start, rescues, bleeding, clock, criteria)
    pre_start = [count for count in counts if count.time <= start]
    baseline, window, classified = _baseline(pre_start, course)
    if baseline is None:
        reason = _no_baseline_reason(criteria, window)
        return Folded(_not_evaluable(patient, criteria, reason, _Progress(start, None, classified)))
    post_start = counts[len(pre_start) :]
    evaluable = _classify(post_start, baseline.value, course, classified)
    if version_1:
        if not post_start:
            reason = "no platelet count after the treatment start"
            progress = _Progress(start, baseline, classified)
            return Folded(_not_evaluable(patient, criteria, reason, progress))
        tracer = _trace(evaluable, clock, criteria)
        return Folded(_evaluated(patient, course, baseline, _Traced(tracer), classified))
    any_count = bool(evaluable)  # bleeding occasions alone make no response
    evaluable = _with_bleeding_occasions(evaluable, course, classified)
    tracer = _trace(evaluable, clock, criteria)
    fold = FoldState(
        patient, course, baseline, tracer, classified, _latest_time(timeline), any_count
    )
    fold.settle()
    return Folded(fold.assessment(), fold)


def _latest_time(timeline: Timeline) -> datetime:
    """The time of the latest record on the timeline, whatever its kind or status."""
    records = chain(
        timeline.counts,
        timeline.bleeding_assessments,
        timeline.bleeding_events,
        timeline.administrations,
    )
    return max(record.time for record in records)


def extend(state: FoldState, count: PlateletCount) -> bool:
    """Append one more count to `state`, in steps that do not grow with the history; then
    `state.assessment()` is what `assess` gives for the whole timeline with that count.
    False when the count cannot simply be appended (`state` is left as it was; `assess`
    the whole timeline instead).

    It can when the count is later than every record on the timeline, of a status the
    engine reads, and no qualifying bleed shares its trial day (the count would take over
    the bleed's occasion). Tests hold `extend` equal to `assess` (tests/engine/test_extend.py).
    """
    count = _utc(count)
    course = state.course
    if (
        count.time <= state.latest
        or count.status not in VALID_OBSERVATION_STATUSES
        or course.clock.day(count.time) in course.bleeding
    ):
        return False
    state.latest = count.time
    for occasion in _classify([count], state.baseline.value, course, state.classified):
        state.any_count = True
        state.tracer.push(occasion)
    state.settle()
    return True


def _no_baseline_reason(criteria: Criteria, window: bool) -> str:
    """Why there is no baseline; `window`: whether the lookback window held any count."""
    if criteria.rules_version == 1:
        return (
            f"no platelet count in the {criteria.baseline_lookback_days} days up to the "
            "treatment start"
        )
    return BASELINE_ONLY_UNDER_RESCUE if window else NO_BASELINE


def _evaluated(
    patient: str,
    course: Course,
    baseline: Baseline,
    traced: _Traced,
    classified: list[Classification],
) -> Assessment:
    """The assessment of an evaluable patient, from the episodes of its occasions."""
    criteria, bleeding = course.criteria, course.bleeding
    tracer, settled = traced
    latest_count = tracer.latest_count
    episodes = tuple(item.episode for item in settled) + tuple(
        _episode(item, latest_count, criteria) for item in tracer.episodes
    )
    start_day = local_day(course.start, criteria.zone)
    response_date = episodes[0].start if episodes else None
    complete_response_date = next(
        (episode.cr_start for episode in episodes if episode.cr_start is not None), None
    )
    return Assessment(
        patient=patient,
        status=_status(episodes),
        status_reason=None,
        best_response=_best_response(episodes),
        pending_confirmation=_pending(tracer.latest, episodes),
        baseline=baseline,
        treatment_start=course.start,
        response_date=response_date,
        complete_response_date=complete_response_date,
        time_to_response_days=_days_between(start_day, response_date),
        time_to_complete_response_days=_days_between(start_day, complete_response_date),
        episodes=episodes,
        evidence=_evidence(baseline, traced, bleeding),
        criteria=criteria,
        classifications=tuple(classified),
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
    # Already in UTC (what the service layer passes for every timed fact): the same instant
    # in the same zone, so the item itself; `replace` would rebuild and re-check it.
    if item.time.tzinfo is UTC:
        return item
    return replace(item, time=item.time.astimezone(UTC))


def _not_evaluable(
    patient: str, criteria: Criteria, reason: str, progress: _Progress
) -> Assessment:
    """NE keeps whatever was already known, so a reviewer sees how far the patient got."""
    start, baseline, classified = progress
    evidence = _empty_evidence()
    if baseline is not None:
        evidence["baseline"] = list(baseline.observations)
    return Assessment(
        patient=patient,
        status="NE",
        status_reason=reason,
        best_response=None if criteria.rules_version == 1 else "NE",
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
        classifications=tuple(classified),
    )


def local_day(time: datetime, zone: ZoneInfo) -> date:
    """The calendar day of `time` in `zone`. FHIR's years run 0001-9999, and a time on the
    calendar's first or last day may fall outside it in the trial's zone (0001-01-01T00:00Z
    in New York): that day is the calendar's first or last, the nearest one Python has."""
    try:
        return time.astimezone(zone).date()
    except OverflowError:
        return date.min if time.year == date.min.year else date.max


def _days_between(start: date, end: date | None) -> int | None:
    return (end - start).days if end is not None else None


def _treatment_start(administrations: Iterable[Administration], version_1: bool) -> datetime | None:
    """Earliest study-drug dose that exposed the patient."""
    statuses = _exposed_statuses(version_1)
    times = [
        administration.time
        for administration in administrations
        if administration.role == "study-drug" and administration.status in statuses
    ]
    return min(times) if times else None


def _exposed_statuses(version_1: bool) -> frozenset[str]:
    return VERSION_1_EXPOSED_STATUSES if version_1 else EXPOSED_STATUSES


def _rescues(administrations: Iterable[Administration], version_1: bool) -> list[_Rescue]:
    statuses = _exposed_statuses(version_1)
    return sorted(
        (administration.time, administration.id)
        for administration in administrations
        if administration.role == "rescue" and administration.status in statuses
    )


def _count_entry(
    count: PlateletCount,
    day: date,
    classification: ClassificationCode,
    detail: str | None = None,
    rescue: str | None = None,
) -> Classification:
    """The entry of a count at or before the start (no bleeding is judged there)."""
    return Classification(
        "Observation", count.id, count.time, day, count.value, classification, detail, rescue
    )


def _baseline(
    pre_start: Sequence[PlateletCount], course: Course
) -> tuple[Baseline | None, bool, list[Classification]]:
    """The baseline, whether the lookback window held any count, and how each count at or
    before the start was classified.

    Counts at the start instant are baseline: blood is drawn before the dose is given. A
    count within `baseline_rescue_exclusion_days` after a rescue is no candidate (0: none
    is excluded).
    """
    start, rescues, _, clock, criteria = course
    lookback = criteria.baseline_lookback_days
    exclusion = criteria.baseline_rescue_exclusion_days
    in_window = False
    entries: list[Classification] = []
    candidates: list[tuple[int, PlateletCount]] = []  # with the index of its entry
    for count in pre_start:
        day = clock.day(count.time)
        if not _in_lookback(clock, count.time, start, lookback):
            entries.append(_count_entry(count, day, "not-evaluable", "before the baseline window"))
            continue
        in_window = True
        rescue = _covering_rescue(rescues, count.time, exclusion, clock) if exclusion else None
        if rescue is not None:
            detail = _after_rescue(exclusion)
            entries.append(_count_entry(count, day, "excluded-by-rescue", detail, rescue))
            continue
        candidates.append((len(entries), count))
        entries.append(_count_entry(count, day, "baseline-candidate", _NOT_USED))
    used = candidates if criteria.baseline_rule == "mean-before-start" else candidates[-1:]
    if not used:
        return None, in_window, entries
    for index, _ in used:
        entries[index] = entries[index]._replace(detail=_USED)
    baseline = Baseline(
        value=fmean(count.value for _, count in used),
        observations=tuple(count.id for _, count in used),
        date=clock.day(used[-1][1].time),
    )
    return baseline, True, entries


_USED = "used as the baseline"
_NOT_USED = "not used (a later count is the baseline)"


def _before_day(first_day: int) -> str:
    return f"before day {first_day} of treatment"


def _after_rescue(days: int) -> str:
    return f"within {days} days after a rescue"


def _in_lookback(clock: Clock, time: datetime, start: datetime, lookback: int) -> bool:
    """Whether a count at or before the start is no more than `lookback` days before it."""
    if clock.calendar:
        return (clock.day(start) - clock.day(time)).days <= lookback
    return start - time <= timedelta(days=lookback)


# Documented bleeding per trial-zone calendar day: (evidence key, id, time), clinical order.
_Bleeding = dict[date, list[tuple[str, str, datetime]]]
_BLEEDING_TYPES = {"bleeding": "Observation", "bleeding_events": "AdverseEvent"}


def _bleeding_by_day(
    assessments: Iterable[BleedingAssessment],
    events: Iterable[BleedingEvent],
    clock: Clock,
    criteria: Criteria,
) -> _Bleeding:
    """Qualifying bleeds: a grade of at least `bleeding_min_grade`, or a bleeding event."""
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
        by_day.setdefault(clock.day(time), []).append((key, ident, time))
    return by_day


def _references(bleeds: Iterable[tuple[str, str, datetime]]) -> tuple[str, ...]:
    return tuple(f"{_BLEEDING_TYPES[key]}/{ident}" for key, ident, _ in bleeds)


class _Levels(NamedTuple):
    """The response levels a count after the start is held against, and the words for why
    it misses the R rule."""

    r_floor: float  # the R threshold, or twice the baseline where that is higher
    r_threshold: float
    cr_threshold: float
    below_r: str
    below_doubling: str


def _levels(criteria: Criteria, baseline: float) -> _Levels:
    r_threshold = criteria.r_threshold
    return _Levels(
        r_floor=max(r_threshold, criteria.doubling_factor * baseline),
        r_threshold=r_threshold,
        cr_threshold=criteria.cr_threshold,
        below_r=f"below {r_threshold:g}",
        below_doubling=f"below {criteria.doubling_factor:g} x baseline",
    )


def _classify(
    post_start: Sequence[PlateletCount],
    baseline: float,
    course: Course,
    classified: list[Classification],
) -> list[Occasion]:
    """Classify each count after the start; return the evaluable ones.

    A count on a day that is not evaluable yet, or under rescue, is neither qualifying nor
    failing: it is left out of the evaluation (and said so in `classified`).
    """
    start, rescues, bleeding, clock, criteria = course
    first_day, window = criteria.first_evaluable_day, criteria.rescue_window_days
    start_day = clock.day(start)
    # The `instant` clock's first evaluable time, as a distance from the start: start + N days
    # overflows for a start on the calendar's last days (FHIR allows 9999-12-31).
    first_window = timedelta(days=first_day)
    not_evaluable, under_rescue = _before_day(first_day), _after_rescue(window)
    r_floor, r_threshold, cr_threshold, below_r, below_doubling = _levels(criteria, baseline)
    calendar, zone, in_utc = clock.calendar, clock.zone, clock.in_utc
    evaluable: list[Occasion] = []
    append, entry = evaluable.append, classified.append
    # The hot loop (1,000 counts on every recompute): entries built as plain tuples, days
    # and positions inline rather than through `clock`.
    new, observation = tuple.__new__, "Observation"
    for count in post_start:
        time = count.time
        day = time.date() if in_utc else local_day(time, zone)
        ident, value = count.id, count.value
        head = (observation, ident, time, day, value)  # the entry's first five fields
        if first_day and (
            (day - start_day).days < first_day if calendar else time - start < first_window
        ):
            entry(new(_Entry, (*head, "not-evaluable", not_evaluable, None, ())))
            continue
        if rescues:
            rescue = _covering_rescue(rescues, time, window, clock)
            if rescue is not None:
                entry(new(_Entry, (*head, "under-rescue", under_rescue, rescue, ())))
                continue
        position = day.toordinal() if calendar else (time - _EPOCH) // _MICROSECOND
        bleeds = bleeding.get(day)
        if bleeds:
            append(Occasion(ident, time, day, position, True, False, False))
            entry(new(_Entry, (*head, "failing", "with bleeding", None, _references(bleeds))))
            continue
        r, cr = value >= r_floor, value >= cr_threshold
        append(Occasion(ident, time, day, position, False, r, cr))
        if r:
            code, detail = ("qualifying-cr" if cr else "qualifying-r"), None
        else:  # why it misses the R rule
            code = "qualifying-cr" if cr else "failing"
            detail = below_r if value < r_threshold else below_doubling
        entry(new(_Entry, (*head, code, detail, None, ())))
    return evaluable


_Entry = Classification


def _with_bleeding_occasions(
    evaluable: list[Occasion], course: Course, classified: list[Classification]
) -> list[Occasion]:
    """Add each qualifying bleed after the start on a day without any count: a failing
    occasion at the bleed's time, unless under rescue or on a day that is not evaluable.

    The classifications are merged in clinical order too: no count shares an occasion's day,
    so no count shares its time.
    """
    start, rescues, bleeding, clock, criteria = course
    first_day, window = criteria.first_evaluable_day, criteria.rescue_window_days
    occasions: list[Occasion] = []
    entries: list[Classification] = []
    after_start = sorted(day for day, bleeds in bleeding.items() if bleeds[-1][2] > start)
    if not after_start:
        return evaluable
    # Every input count has its entry by now, with its trial-zone date (field 3).
    count_days = {entry[3] for entry in classified}
    for day in after_start:
        if day in count_days:
            continue
        for key, ident, time in bleeding[day]:
            if time <= start:
                continue
            head = (_BLEEDING_TYPES[key], ident, time, day, None)
            if first_day and not clock.days_apart(start, time, first_day):
                entries.append(Classification(*head, "not-evaluable", _before_day(first_day)))
                continue
            rescue = _covering_rescue(rescues, time, window, clock)
            if rescue is not None:
                entries.append(Classification(*head, "under-rescue", _after_rescue(window), rescue))
                continue
            entries.append(Classification(*head, "failing", "bleeding without a count"))
            position = clock.position(time, day)
            occasions.append(Occasion(ident, time, day, position, True, False, False, key))
    if entries:
        # A stable sort: the counts keep their order, and no count shares an entry's time.
        classified[:] = sorted([*classified, *entries], key=attrgetter("time"))
    if not occasions:
        return evaluable
    return sorted([*evaluable, *occasions], key=attrgetter("time"))


def _trace(occasions: Iterable[Occasion], clock: Clock, criteria: Criteria) -> EpisodeTracer:
    """The episodes of the evaluated occasions (`tracing`), walked once in clinical order."""
    tracer = EpisodeTracer(clock.gap(criteria.confirm_days), clock.gap(criteria.loss_confirm_days))
    for occasion in occasions:
        tracer.push(occasion)
    return tracer


def _anchor_day(pair: Pair, criteria: Criteria) -> date:
    occasion = pair.first if criteria.response_date_anchor == "first" else pair.second
    return occasion.day


def _episode(trace: EpisodeTrace, latest_count: Occasion | None, criteria: Criteria) -> Episode:
    cr_periods = []
    for stretch in trace.stretches:
        lost = stretch.lost.result
        start = _anchor_day(stretch.confirmed, criteria)
        cr_periods.append(CrPeriod(start=start, end=lost.first.day if lost else None))
    # With the `confirming` anchor a CR pair may be confirmed before an R pair that started
    # earlier (only under unusual thresholds); the episode never starts after its first CR.
    start = min([_anchor_day(trace.onset, criteria)] + [p.start for p in cr_periods[:1]])
    loss = trace.loss.result
    end = loss.first.day if loss is not None else None
    # An ongoing episode runs to the latest evaluable count (a bleeding occasion after its
    # start would have ended it, so the latest occasion is a count; said here all the same).
    # Its response pair is two counts, so there is a latest count.
    latest = latest_count if latest_count is not None else trace.onset.second
    last_day = end if end is not None else latest.day
    return Episode(
        start=start,
        level="CR" if cr_periods else "R",
        end=end,
        duration_of_response_days=(last_day - start).days,
        cr_periods=tuple(cr_periods),
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


def _pending(latest: Occasion | None, episodes: Sequence[Episode]) -> bool:
    """Whether a qualifying count that would raise the status awaits its confirming count.

    That is the case exactly when the latest evaluated occasion qualifies beyond the current
    level: an unconfirmed qualifying count with no failing occasion after it makes the latest
    occasion qualify too (for CR: none below the CR threshold, which would break its
    confirmation for good), and a confirmed one would already have raised the level.
    """
    if latest is None:
        return False
    if not episodes or episodes[-1].end is not None:
        return latest.qualifying
    if episodes[-1].in_complete_response:
        return False
    return latest.cr_qualifying


def _empty_evidence() -> dict[str, list[str]]:
    return {key: [] for key in EVIDENCE_RESOURCE_TYPES}


def _evidence(baseline: Baseline, traced: _Traced, bleeding: _Bleeding) -> dict[str, list[str]]:
    """Ids per decision, in clinical order, each id once per decision.

    The decision keys name counts only. Bleeding evidence is what marked an evaluated count
    "with bleeding", and every bleed that was a failing occasion itself; AdverseEvent ids go
    under their own key because they are not Observations.
    """
    evidence = _empty_evidence()
    evidence["baseline"] = list(baseline.observations)
    tracer, settled = traced
    found = chain(
        (pair for item in settled for pair in item.evidence),
        _decision_evidence(tracer.episodes),
        _bleeding_evidence(tracer.bleeding, bleeding),
    )
    for key, ident in found:
        if ident not in evidence[key]:
            evidence[key].append(ident)
    return evidence


def _decision_evidence(traces: Sequence[EpisodeTrace]) -> Iterator[tuple[str, str]]:
    """(key, id) of the counts each decision rests on (a bleeding occasion is no count)."""
    for trace in traces:
        for key, pair in _decisions(trace):
            if pair is None:
                continue
            for occasion in (pair.first, pair.second):
                if occasion.is_count:
                    yield key, occasion.id


def _decisions(trace: EpisodeTrace) -> Iterator[tuple[str, Pair | None]]:
    """An episode's decisions under their evidence keys, in clinical order."""
    yield "response", trace.onset
    yield "loss", trace.loss.result
    for stretch in trace.stretches:
        yield "complete_response", stretch.confirmed
        yield "complete_response_loss", stretch.lost.result


def _bleeding_evidence(
    occasions: Iterable[Occasion], bleeding: _Bleeding
) -> Iterator[tuple[str, str]]:
    """(key, id) of what made each bleeding occasion one: the bleeds of a count's day, or
    the bleed that was the occasion itself."""
    for occasion in occasions:
        if occasion.is_count:
            yield from ((key, ident) for key, ident, _ in bleeding[occasion.day])
        else:
            yield occasion.source, occasion.id
