"""Rules version 2 read as plainly as they are written (docs/response-rules.md), with no
concern for speed: the oracle of `test_equivalence.py`. The engine (`app/engine/rules.py`) is
written for speed; this file is written to be checked against the rules sentence by sentence.
Keep it that way: an independent reading, not a copy of the engine.

Only rules version 2: version 1 is checked against the released version-1 engine
(`version_1_rules.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from statistics import fmean

from app.engine.model import (
    Assessment,
    Baseline,
    Classification,
    Criteria,
    CrPeriod,
    Episode,
    Timeline,
)

GOOD_OBSERVATION = ("final", "amended", "corrected")
STARTS_TREATMENT = ("completed", "in-progress", "stopped")
RESCUE_GIVEN = STARTS_TREATMENT  # a rescue stopped part-way has still raised the count

EVIDENCE_KEYS = (
    "baseline",
    "response",
    "complete_response",
    "complete_response_loss",
    "loss",
    "bleeding",
    "bleeding_events",
)


@dataclass(frozen=True)
class Bleed:
    key: str  # evidence key: "bleeding" (a WHO grade Observation) or "bleeding_events"
    id: str
    time: datetime

    @property
    def resource_type(self) -> str:
        return "Observation" if self.key == "bleeding" else "AdverseEvent"

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True)
class Occasion:
    """Something evaluated after the start: a count, or a bleed on a day without a count."""

    id: str
    time: datetime
    day: date
    is_count: bool
    bleeding: bool  # a count with bleeding, or a bleed itself
    r: bool  # R-qualifying
    cr: bool  # CR-qualifying
    bleed_key: str | None = None

    @property
    def failing(self) -> bool:
        return not (self.r or self.cr)


class Rules:
    """The rules for one set of criteria: the clock, the windows, the thresholds."""

    def __init__(self, criteria: Criteria) -> None:
        assert criteria.rules_version == 2, "the reference reads rules version 2 only"
        self.c = criteria

    def day(self, time: datetime) -> date:
        return time.astimezone(self.c.zone).date()

    def at_least_days_apart(self, a: datetime, b: datetime, days: int) -> bool:
        """B at least `days` after A: calendar days (date of B minus date of A) or instants."""
        if self.c.confirm_clock == "calendar":
            return (self.day(b) - self.day(a)).days >= days
        return b - a >= timedelta(days=days)

    def within_days_after(self, event: datetime, time: datetime, days: int) -> bool:
        """`time` in the window of `days` days after `event`, both ends included."""
        if time < event:
            return False
        if self.c.confirm_clock == "calendar":
            return self.day(time) <= self.day(event) + timedelta(days=days)
        return time <= event + timedelta(days=days)

    def within_days_before(self, time: datetime, start: datetime, days: int) -> bool:
        """`time` at or before `start` and no more than `days` days before it."""
        if time > start:
            return False
        if self.c.confirm_clock == "calendar":
            return self.day(time) >= self.day(start) - timedelta(days=days)
        return time >= start - timedelta(days=days)

    def evaluable(self, time: datetime, start: datetime) -> bool:
        """After the start, and from day `first_evaluable_day` of treatment on."""
        return time > start and self.at_least_days_apart(start, time, self.c.first_evaluable_day)


def covering_rescue(
    rules: Rules, rescues: list[tuple[datetime, str]], time: datetime, days: int
) -> str | None:
    """Of the rescues whose window holds `time`, the latest (ties: the highest id)."""
    holding = [r for r in rescues if rules.within_days_after(r[0], time, days)]
    return max(holding)[1] if holding else None


def left_out(
    rules: Rules, rescues: list[tuple[datetime, str]], time: datetime, start: datetime
) -> tuple[str, str, str | None] | None:
    """Why a count or a bleed after the start is neither qualifying nor failing, if it is:
    (classification, detail, rescue)."""
    c = rules.c
    if not rules.evaluable(time, start):
        return "not-evaluable", f"before day {c.first_evaluable_day} of treatment", None
    rescue = covering_rescue(rules, rescues, time, c.rescue_window_days)
    if rescue is not None:
        return "under-rescue", f"within {c.rescue_window_days} days after a rescue", rescue
    return None


def assess(timeline: Timeline, criteria: Criteria) -> Assessment:
    rules = Rules(criteria)
    c = criteria
    counts = [
        x.__class__(x.id, x.time.astimezone(UTC), x.value, x.status)
        for x in timeline.counts
        if x.status in GOOD_OBSERVATION
    ]
    counts.sort(key=lambda x: (x.time, x.id, x.value, x.status))

    doses = [
        a.time.astimezone(UTC)
        for a in timeline.administrations
        if a.role == "study-drug" and a.status in STARTS_TREATMENT
    ]
    rescues = sorted(
        (a.time.astimezone(UTC), a.id)
        for a in timeline.administrations
        if a.role == "rescue" and a.status in RESCUE_GIVEN
    )
    bleeds = sorted(
        [
            Bleed("bleeding", b.id, b.time.astimezone(UTC))
            for b in timeline.bleeding_assessments
            if b.status in GOOD_OBSERVATION and b.grade >= c.bleeding_min_grade
        ]
        + [
            Bleed("bleeding_events", e.id, e.time.astimezone(UTC))
            for e in timeline.bleeding_events
            if e.status == "actual"
        ],
        key=lambda b: (b.time, b.key, b.id),
    )

    entries: list[tuple[tuple, Classification]] = []  # (sort key, entry)

    def count_entry(x, code, detail=None, rescue=None, bleeding=()):  # type: ignore[no-untyped-def]
        key = (x.time, 0, x.id, x.value, x.status)
        entry = Classification(
            "Observation", x.id, x.time, rules.day(x.time), x.value, code, detail, rescue, bleeding
        )
        entries.append((key, entry))

    def bleed_entry(b: Bleed, code, detail, rescue=None):  # type: ignore[no-untyped-def]
        key = (b.time, 1, b.key, b.id)
        entry = Classification(
            b.resource_type, b.id, b.time, rules.day(b.time), None, code, detail, rescue
        )
        entries.append((key, entry))

    def classifications() -> tuple[Classification, ...]:
        return tuple(entry for _, entry in sorted(entries, key=lambda pair: pair[0]))

    def not_evaluable(reason: str, start, baseline) -> Assessment:  # type: ignore[no-untyped-def]
        evidence: dict[str, list[str]] = {key: [] for key in EVIDENCE_KEYS}
        if baseline is not None:
            evidence["baseline"] = list(baseline.observations)
        return Assessment(
            timeline.patient, "NE", reason, "NE", False, baseline, start, None, None, None,
            None, (), evidence, c, classifications(),
        )  # fmt: skip

    if not doses:
        return not_evaluable("no treatment start", None, None)
    start = min(doses)

    # Baseline: the counts at or before the start in the lookback window, less those
    # within the exclusion window after a rescue.
    in_window, candidates = [], []
    for x in counts:
        if x.time > start:
            continue
        if not rules.within_days_before(x.time, start, c.baseline_lookback_days):
            count_entry(x, "not-evaluable", "before the baseline window")
            continue
        in_window.append(x)
        rescue = None
        if c.baseline_rescue_exclusion_days > 0:
            rescue = covering_rescue(rules, rescues, x.time, c.baseline_rescue_exclusion_days)
        if rescue is not None:
            detail = f"within {c.baseline_rescue_exclusion_days} days after a rescue"
            count_entry(x, "excluded-by-rescue", detail, rescue)
        else:
            candidates.append(x)
    used = candidates if c.baseline_rule == "mean-before-start" else candidates[-1:]
    for x in candidates:
        if any(x is u for u in used):
            count_entry(x, "baseline-candidate", "used as the baseline")
        else:
            count_entry(x, "baseline-candidate", "not used (a later count is the baseline)")
    if not in_window:
        return not_evaluable("no baseline", start, None)
    if not candidates:
        return not_evaluable("baseline only under rescue", start, None)
    baseline = Baseline(
        fmean(x.value for x in used), tuple(x.id for x in used), rules.day(used[-1].time)
    )

    def bleeds_on(day: date) -> list[Bleed]:
        return [b for b in bleeds if rules.day(b.time) == day]

    # Counts after the start.
    occasions: list[Occasion] = []
    for x in counts:
        if x.time <= start:
            continue
        day = rules.day(x.time)
        if (why := left_out(rules, rescues, x.time, start)) is not None:
            count_entry(x, *why)
            continue
        that_day = bleeds_on(day)
        if that_day:
            occasions.append(Occasion(x.id, x.time, day, True, True, False, False))
            count_entry(x, "failing", "with bleeding", None, tuple(b.reference for b in that_day))
            continue
        r = x.value >= c.r_threshold and x.value >= c.doubling_factor * baseline.value
        cr = x.value >= c.cr_threshold
        occasions.append(Occasion(x.id, x.time, day, True, False, r, cr))
        why_not_r = (
            f"below {c.r_threshold:g}"
            if x.value < c.r_threshold
            else f"below {c.doubling_factor:g} x baseline"
        )
        if cr:
            count_entry(x, "qualifying-cr", None if r else why_not_r)
        elif r:
            count_entry(x, "qualifying-r")
        else:
            count_entry(x, "failing", why_not_r)

    # Bleeds after the start on a day with no count at all.
    days_with_a_count = {rules.day(x.time) for x in counts}
    for b in bleeds:
        day = rules.day(b.time)
        if b.time <= start or day in days_with_a_count:
            continue
        if (why := left_out(rules, rescues, b.time, start)) is not None:
            bleed_entry(b, *why)
            continue
        bleed_entry(b, "failing", "bleeding without a count")
        occasions.append(Occasion(b.id, b.time, day, False, True, False, False, b.key))

    if not any(o.is_count for o in occasions):
        return not_evaluable("no evaluable count", start, baseline)
    occasions.sort(key=lambda o: o.time)  # stable: ties only within counts, already ordered

    episodes, decisions = _episodes(rules, occasions)
    start_day = rules.day(start)
    first_cr = next((e.cr_periods[0].start for e in episodes if e.cr_periods), None)
    if not episodes:
        status = "NR"
    elif episodes[-1].end is not None:
        status = "LOR"
    elif episodes[-1].cr_periods and episodes[-1].cr_periods[-1].end is None:
        status = "CR"
    else:
        status = "R"
    best = "CR" if any(e.cr_periods for e in episodes) else ("R" if episodes else "NR")
    return Assessment(
        patient=timeline.patient,
        status=status,
        status_reason=None,
        best_response=best,
        pending_confirmation=_pending(status, occasions),
        baseline=baseline,
        treatment_start=start,
        response_date=episodes[0].start if episodes else None,
        complete_response_date=first_cr,
        time_to_response_days=(episodes[0].start - start_day).days if episodes else None,
        time_to_complete_response_days=(first_cr - start_day).days if first_cr else None,
        episodes=tuple(episodes),
        evidence=_evidence(baseline, decisions, occasions, bleeds_on),
        criteria=c,
        classifications=classifications(),
    )


def _confirmed(rules: Rules, occasions: list[Occasion], lo: int, hi: int, level: str):  # type: ignore[no-untyped-def]
    """First A in occasions[lo:hi] at the level with a later B at the level at least
    `confirm_days` apart and nothing in between that breaks it: for R a failing occasion,
    for CR anything not CR-qualifying."""
    at_level = (lambda o: o.r) if level == "R" else (lambda o: o.cr)
    for i in range(lo, hi):
        if not at_level(occasions[i]):
            continue
        for j in range(i + 1, hi):
            o = occasions[j]
            breaks = o.failing if level == "R" else not o.cr
            if breaks:
                break
            if at_level(o) and rules.at_least_days_apart(
                occasions[i].time, o.time, rules.c.confirm_days
            ):
                return (i, j)
    return None


def _lost(rules: Rules, occasions: list[Occasion], lo: int, level: str):  # type: ignore[no-untyped-def]
    """First loss from occasions[lo] on: one bleeding occasion, or two occasions below the
    level (for R: failing; for CR: below the CR threshold) at least `loss_confirm_days` apart
    with none at the level between them. (first, second) indices."""
    holds = (lambda o: not o.failing) if level == "R" else (lambda o: o.cr)
    for i in range(lo, len(occasions)):
        if occasions[i].bleeding:
            return (i, i)
        if holds(occasions[i]):
            continue
        for j in range(i + 1, len(occasions)):
            if holds(occasions[j]):
                break
            if rules.at_least_days_apart(
                occasions[i].time, occasions[j].time, rules.c.loss_confirm_days
            ):
                return (i, j)
    return None


def _episodes(rules: Rules, occasions: list[Occasion]):  # type: ignore[no-untyped-def]
    """Response episodes, and the decisions (evidence key, index pair) they rest on."""
    c = rules.c
    episodes: list[Episode] = []
    decisions: list[tuple[str, tuple[int, int]]] = []

    def date_of(pair: tuple[int, int]) -> date:
        return occasions[pair[0] if c.response_date_anchor == "first" else pair[1]].day

    lo = 0
    while True:
        r_pair = _confirmed(rules, occasions, lo, len(occasions), "R")
        cr_pair = _confirmed(rules, occasions, lo, len(occasions), "CR")
        found = [p for p in (r_pair, cr_pair) if p is not None]
        if not found:
            break
        onset = min(found)
        loss = _lost(rules, occasions, onset[0], "R")
        decisions.append(("response", onset))
        if loss is not None:
            decisions.append(("loss", loss))
        end_index = loss[0] if loss is not None else len(occasions)
        periods = []
        k = onset[0]
        while (cr := _confirmed(rules, occasions, k, end_index, "CR")) is not None:
            cr_loss = _lost(rules, occasions, cr[0], "CR")
            decisions.append(("complete_response", cr))
            if cr_loss is not None:
                decisions.append(("complete_response_loss", cr_loss))
            periods.append(
                CrPeriod(date_of(cr), occasions[cr_loss[0]].day if cr_loss is not None else None)
            )
            if cr_loss is None:
                break
            k = cr_loss[1] + 1
        begin = date_of(onset)
        if periods and periods[0].start < begin:
            begin = periods[0].start
        if loss is not None:
            end = occasions[loss[0]].day
            last = end
        else:
            end = None
            last = [o for o in occasions if o.is_count][-1].day
        episodes.append(
            Episode(begin, "CR" if periods else "R", end, (last - begin).days, tuple(periods))
        )
        if loss is None:
            break
        lo = loss[1] + 1
    return episodes, decisions


def _pending(status: str, occasions: list[Occasion]) -> bool:
    """A qualifying count that would raise the status once confirmed, with nothing after it
    that breaks its confirmation (for a new response: a failing occasion; for CR from R:
    anything below the CR threshold)."""
    if status in ("NR", "LOR"):
        return any(
            not o.failing and all(not p.failing for p in occasions[i + 1 :])
            for i, o in enumerate(occasions)
        )
    if status == "R":
        return any(o.cr and all(p.cr for p in occasions[i + 1 :]) for i, o in enumerate(occasions))
    return False


def _evidence(baseline, decisions, occasions, bleeds_on):  # type: ignore[no-untyped-def]
    evidence: dict[str, list[str]] = {key: [] for key in EVIDENCE_KEYS}
    evidence["baseline"] = list(baseline.observations)
    # Decisions name counts only, in the order the decisions were taken.
    for key, pair in decisions:
        for index in pair:
            o = occasions[index]
            if o.is_count and o.id not in evidence[key]:
                evidence[key].append(o.id)
    # The bleeds that made a count "with bleeding", and the bleeds that were occasions.
    for o in occasions:
        found = [(b.key, b.id) for b in bleeds_on(o.day)] if o.is_count else [(o.bleed_key, o.id)]
        for key, ident in found:
            if o.is_count and not o.bleeding:
                continue
            if ident not in evidence[key]:
                evidence[key].append(ident)
    return evidence
