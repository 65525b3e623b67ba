"""What the report knows of one patient: the engine's timeline and assessment, and the
adverse events with what the safety table counts of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from app.engine import (
    EXPOSED_STATUSES,
    VALID_OBSERVATION_STATUSES,
    Administration,
    Assessment,
    Criteria,
    PlateletCount,
    Timeline,
    local_day,
)


@dataclass(frozen=True)
class AdverseEventFacts:
    """An actual AdverseEvent (not a potential one) as the safety table counts it."""

    id: str
    time: datetime | None
    grade: int | None  # CTCAE 1-5, None when not graded
    serious: bool
    related: bool  # WHO-UMC causality Certain, Probably-Likely or Possible
    bleeding: bool


@dataclass(frozen=True)
class PatientData:
    id: str
    version: int  # of the Patient resource, for the audit record of what was shown
    subject: str | None  # the subject number (identifier), None when it has none
    site: str | None
    timeline: Timeline
    assessment: Assessment
    adverse_events: tuple[AdverseEventFacts, ...]

    @property
    def label(self) -> str:
        return self.subject or self.id

    @property
    def treated(self) -> bool:
        return self.assessment.treatment_start is not None

    def counts(self) -> list[PlateletCount]:
        """Valid counts (final, amended, corrected), in time order."""
        valid = (c for c in self.timeline.counts if c.status in VALID_OBSERVATION_STATUSES)
        return sorted(valid, key=lambda count: (count.time, count.id))

    def administrations(self, role: str) -> list[Administration]:
        active = (
            a
            for a in self.timeline.administrations
            if a.role == role and a.status in EXPOSED_STATUSES
        )
        return sorted(active, key=lambda administration: (administration.time, administration.id))

    def counts_after_start(self) -> list[PlateletCount]:
        start = self.assessment.treatment_start
        return [c for c in self.counts() if start is not None and c.time > start]

    def peak_after_start(self) -> float | None:
        return max((c.value for c in self.counts_after_start()), default=None)

    def day(self, moment: datetime | date, criteria: Criteria) -> int:
        """Study day: calendar days (trial time zone) since the first study-drug dose, the
        day of the dose being 0, as the engine counts time to response."""
        origin = self.origin(criteria)
        when = local_day(moment, criteria.zone) if isinstance(moment, datetime) else moment
        return (when - origin).days

    def origin(self, criteria: Criteria) -> date:
        """Day 0: the treatment start, or for an untreated patient the first record."""
        start = self.assessment.treatment_start
        if start is None:
            times = [c.time for c in self.timeline.counts] + [
                a.time for a in self.timeline.administrations
            ]
            start = min(times) if times else None
        return local_day(start, criteria.zone) if start is not None else date.min

    def last_day(self, criteria: Criteria) -> int:
        """The last day with a valid count or an active administration: the follow-up."""
        moments = [c.time for c in self.counts()] + [
            a.time for a in self.timeline.administrations if a.status in EXPOSED_STATUSES
        ]
        return max((self.day(m, criteria) for m in moments), default=0)
