"""The pure ITP treatment-response engine: a patient's timeline and the criteria in, an
assessment out. Standard library only; nothing of the rest of the app is imported here."""

from .model import (
    Administration,
    Assessment,
    Baseline,
    BleedingAssessment,
    BleedingEvent,
    Criteria,
    CrPeriod,
    Episode,
    PlateletCount,
    Timeline,
)
from .rules import (
    ACTIVE_ADMINISTRATION_STATUSES,
    ACTUAL_EVENT,
    DEFAULT_CRITERIA,
    EVIDENCE_RESOURCE_TYPES,
    VALID_OBSERVATION_STATUSES,
    assess,
)

__all__ = [
    "ACTIVE_ADMINISTRATION_STATUSES",
    "ACTUAL_EVENT",
    "DEFAULT_CRITERIA",
    "EVIDENCE_RESOURCE_TYPES",
    "VALID_OBSERVATION_STATUSES",
    "Administration",
    "Assessment",
    "Baseline",
    "BleedingAssessment",
    "BleedingEvent",
    "CrPeriod",
    "Criteria",
    "Episode",
    "PlateletCount",
    "Timeline",
    "assess",
]
