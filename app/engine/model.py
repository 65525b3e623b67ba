"""Inputs, settings and outputs of the response engine.

Plain frozen dataclasses, standard library only, so the engine stays a pure function that a
monitor can re-run years later on a stored timeline and the stored criteria.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, NamedTuple, TypeVar, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

BaselineRule = Literal["last-before-start", "mean-before-start"]
ResponseDateAnchor = Literal["first", "confirming"]
ConfirmClock = Literal["calendar", "instant"]
AdministrationRole = Literal["study-drug", "rescue", "concomitant"]
ResponseLevel = Literal["R", "CR"]
Status = Literal["NE", "NR", "R", "CR", "LOR"]
# NE: never evaluable (rules version 2; version 1 gave no best response, None).
BestResponse = Literal["CR", "R", "NR", "NE"]
ClassificationCode = Literal[
    "baseline-candidate",
    "excluded-by-rescue",
    "not-evaluable",
    "under-rescue",
    "qualifying-cr",
    "qualifying-r",
    "failing",
]

# The rules this engine implements (docs/response-rules.md). Version 1 is kept reachable so
# that an assessment stored under it can be reproduced exactly.
RULES_VERSION = 2
# A criteria mapping stored before version 2 has none of these keys: they are what version 1
# did without a setting (instants, no baseline exclusion, counts evaluable from the dose on).
VERSION_1_CRITERIA: dict[str, Any] = {
    "rules_version": 1,
    "confirm_clock": "instant",
    "baseline_rescue_exclusion_days": 0,
    "first_evaluable_day": 0,
}

_NON_NEGATIVE = (
    "r_threshold",
    "cr_threshold",
    "doubling_factor",
    "confirm_days",
    "loss_confirm_days",
    "bleeding_min_grade",
    "rescue_window_days",
    "baseline_lookback_days",
    "baseline_rescue_exclusion_days",
    "first_evaluable_day",
)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Criteria:
    """The settings of the response rules (docs/response-rules.md), with their defaults.

    `rules_version` is not a setting but the rules a result was made under: 1 reproduces
    an assessment stored before version 2 (see `from_stored`), 2 is the current rules.
    """

    r_threshold: float = 30.0
    cr_threshold: float = 100.0
    doubling_factor: float = 2.0
    confirm_days: int = 7
    loss_confirm_days: int = 1
    bleeding_min_grade: int = 1
    rescue_window_days: int = 56
    baseline_rule: BaselineRule = "last-before-start"
    baseline_lookback_days: int = 14
    response_date_anchor: ResponseDateAnchor = "first"
    trial_timezone: str = "UTC"
    confirm_clock: ConfirmClock = "calendar"
    baseline_rescue_exclusion_days: int = 14
    first_evaluable_day: int = 1
    rules_version: int = RULES_VERSION

    def __post_init__(self) -> None:
        """Refuse settings that would otherwise be silently misread (a typo in a rule name)."""
        if self.baseline_rule not in get_args(BaselineRule):
            raise ValueError(f"baseline_rule must be one of {get_args(BaselineRule)}")
        if self.response_date_anchor not in get_args(ResponseDateAnchor):
            raise ValueError(f"response_date_anchor must be one of {get_args(ResponseDateAnchor)}")
        if self.confirm_clock not in get_args(ConfirmClock):
            raise ValueError(f"confirm_clock must be one of {get_args(ConfirmClock)}")
        if self.rules_version not in (1, RULES_VERSION):
            raise ValueError(f"rules_version must be 1 or {RULES_VERSION}")
        if self.rules_version == 1 and any(
            getattr(self, name) != value
            for name, value in VERSION_1_CRITERIA.items()
            if name != "rules_version"
        ):
            # Version 1 had none of these settings: any other value is no version-1 result.
            raise ValueError(
                "rules_version 1 needs confirm_clock 'instant', "
                "baseline_rescue_exclusion_days 0 and first_evaluable_day 0"
            )
        negative = [name for name in _NON_NEGATIVE if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"criteria must not be negative: {', '.join(negative)}")
        try:
            ZoneInfo(self.trial_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown trial_timezone {self.trial_timezone!r}") from exc

    @property
    def zone(self) -> ZoneInfo:
        """The trial time zone, in which calendar days are counted."""
        return ZoneInfo(self.trial_timezone)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready setting values, stored beside each result so it can be reproduced."""
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> Criteria:
        """The criteria of a stored assessment (`as_dict` of its time).

        A key the mapping lacks was no setting when it was stored: it takes version 1's
        value, so an assessment stored under version 1 is reproduced under version 1.
        """
        return cls(**{**VERSION_1_CRITERIA, **values})


_new = object.__new__


def _built(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of a frozen input dataclass from all its fields, without `__init__`.

    The same object `cls(**fields)` makes (equal, same hash), built in about half the time:
    a frozen dataclass sets each field through `object.__setattr__`. The recompute builds
    one per record of the patient, so for 1,000 counts this is a measurable part of it.
    Each class's `fast` names its fields itself: one generic `fast` on `_Timed` (pairing
    `__match_args__` with the values) made `response.timeline_from_rows` twice as slow.
    """
    instance = _new(cls)
    instance.__dict__.update(fields)
    if fields["time"].tzinfo is not UTC:  # UTC is aware: the check only for other zones
        _require_aware(cls.__name__, fields["id"], fields["time"])
    return instance


@dataclass(frozen=True)
class _Timed:
    """What every input record has: an id, and the instant it happened, timezone-aware."""

    id: str
    time: datetime

    def __post_init__(self) -> None:
        _require_aware(type(self).__name__, self.id, self.time)


def _require_aware(record_type: str, ident: str, time: datetime) -> None:
    """Naive times would be read in the host's local zone: results would depend on the machine."""
    if time.utcoffset() is None:
        raise ValueError(f"{record_type} {ident!r}: time must be timezone-aware")


@dataclass(frozen=True)
class PlateletCount(_Timed):
    """A platelet-count Observation; `value` already normalised to 10^9/L."""

    value: float
    status: str = "final"

    @classmethod
    def fast(cls, id: str, time: datetime, value: float, status: str) -> PlateletCount:
        """`PlateletCount(...)` for the hot path of the recompute (see `_built`)."""
        return _built(cls, {"id": id, "time": time, "value": value, "status": status})


@dataclass(frozen=True)
class BleedingAssessment(_Timed):
    """A WHO bleeding-grade Observation (grade 0-4)."""

    grade: int
    status: str = "final"

    @classmethod
    def fast(cls, id: str, time: datetime, grade: int, status: str) -> BleedingAssessment:
        """`BleedingAssessment(...)` for the hot path of the recompute (see `_built`)."""
        return _built(cls, {"id": id, "time": time, "grade": grade, "status": status})


@dataclass(frozen=True)
class BleedingEvent(_Timed):
    """An AdverseEvent coded as bleeding; `status` is AdverseEvent.actuality."""

    status: str = "actual"

    @classmethod
    def fast(cls, id: str, time: datetime, status: str) -> BleedingEvent:
        """`BleedingEvent(...)` for the hot path of the recompute (see `_built`)."""
        return _built(cls, {"id": id, "time": time, "status": status})


@dataclass(frozen=True)
class Administration(_Timed):
    """A MedicationAdministration with its trial role."""

    role: AdministrationRole
    status: str = "completed"

    @classmethod
    def fast(cls, id: str, time: datetime, role: AdministrationRole, status: str) -> Administration:
        """`Administration(...)` for the hot path of the recompute (see `_built`)."""
        return _built(cls, {"id": id, "time": time, "role": role, "status": status})


@dataclass(frozen=True)
class Timeline:
    """Everything of one patient the engine reads, in any order."""

    patient: str
    counts: tuple[PlateletCount, ...] = ()
    bleeding_assessments: tuple[BleedingAssessment, ...] = ()
    bleeding_events: tuple[BleedingEvent, ...] = ()
    administrations: tuple[Administration, ...] = ()


@dataclass(frozen=True)
class Baseline:
    """The baseline: `observations` are all counts used (several under the mean rule).

    `date` is the trial-zone date of the last count used.
    """

    value: float
    observations: tuple[str, ...]
    date: dt.date  # `dt.` because the field name shadows the type inside the class body

    @property
    def observation(self) -> str | None:
        """The last count used, the single source under the default rule."""
        return self.observations[-1] if self.observations else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "observation": self.observation,
            "observations": list(self.observations),
            "date": self.date.isoformat(),
        }


@dataclass(frozen=True)
class CrPeriod:
    """A stretch of complete response inside an episode; `end` is the CR loss date."""

    start: date
    end: date | None

    def as_dict(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(frozen=True)
class Episode:
    """One response episode, from its response date to its loss of response (LOR).

    `level` is the best level reached in the episode, as the spec asks. A CR lost while the
    R rule still holds does not end the episode: it closes a `cr_periods` entry, and CR can be
    regained later in the same episode, so every CR stretch is kept.
    `duration_of_response_days` runs to `end`, or for an ongoing episode to the latest
    evaluable count.
    """

    start: date
    level: ResponseLevel
    end: date | None
    duration_of_response_days: int | None
    cr_periods: tuple[CrPeriod, ...] = ()

    @property
    def cr_start(self) -> date | None:
        """First day of complete response in this episode."""
        return self.cr_periods[0].start if self.cr_periods else None

    @property
    def cr_end(self) -> date | None:
        """Date the latest CR stretch was lost; None while CR holds or if never reached."""
        return self.cr_periods[-1].end if self.cr_periods else None

    @property
    def in_complete_response(self) -> bool:
        """Whether the episode's latest CR stretch is still open."""
        return bool(self.cr_periods) and self.cr_periods[-1].end is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "level": self.level,
            "end": _iso(self.end),
            "duration_of_response_days": self.duration_of_response_days,
            "cr_start": _iso(self.cr_start),
            "cr_end": _iso(self.cr_end),
            "cr_periods": [period.as_dict() for period in self.cr_periods],
        }


class Classification(NamedTuple):
    """How the engine classified one record: a platelet count, or a bleed on a day without a
    count (a bleeding occasion), so a reviewer can follow a decision without re-running it.

    `value` is the count in 10^9/L (None for a bleed); `detail` says why, in words;
    `rescue` is the MedicationAdministration id whose window holds the record; `bleeding` the
    references of the bleeds that make a count "with bleeding". A tuple, not a dataclass: a
    patient with 1,000 counts gets 1,000 of them on every recompute.
    """

    resource_type: str
    id: str
    time: datetime
    date: dt.date
    value: float | None
    classification: ClassificationCode
    detail: str | None = None
    rescue: str | None = None
    bleeding: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource_type": self.resource_type,
            "id": self.id,
            "time": self.time.isoformat(),
            "date": self.date.isoformat(),
            "value": self.value,
            "classification": self.classification,
            "detail": self.detail,
            "rescue": self.rescue,
            "bleeding": list(self.bleeding),
        }


@dataclass(frozen=True)
class Assessment:
    """The engine's result for one patient (see "Output per patient" in the spec)."""

    patient: str
    status: Status
    status_reason: str | None
    best_response: BestResponse | None
    pending_confirmation: bool
    baseline: Baseline | None
    treatment_start: datetime | None
    response_date: date | None
    complete_response_date: date | None
    time_to_response_days: int | None
    time_to_complete_response_days: int | None
    episodes: tuple[Episode, ...]
    evidence: dict[str, list[str]] = field(default_factory=dict)
    criteria: Criteria = field(default_factory=Criteria)
    # Every input count and every bleeding occasion, in clinical order (added in version 2).
    classifications: tuple[Classification, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: dates and instants as ISO 8601 strings."""
        document = _json_fields(self)
        # The criteria close the document, after the classifications added in version 2:
        # the order every stored and served assessment has.
        document["criteria"] = document.pop("criteria")
        return document


def _iso(value: date | datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _json_fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields, in order, JSON-ready (see `_json_ready`)."""
    return {
        item.name: _json_ready(getattr(record, item.name)) for item in dataclasses.fields(record)
    }


def _json_ready(value: Any) -> Any:
    """A result's value as JSON holds it: dates and instants ISO 8601, tuples lists, an
    object of this module its `as_dict`."""
    if hasattr(value, "as_dict"):  # before tuple: a Classification is a tuple
        return value.as_dict()
    if isinstance(value, date):  # a datetime too
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_json_ready(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    return value
