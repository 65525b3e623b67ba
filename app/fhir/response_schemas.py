"""Typed documentation of the response operations' JSON (not FHIR resources: plain JSON, so
nulls are meaningful here: "no response date yet")."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.engine.model import ClassificationCode

ResponseCode = Literal["NE", "NR", "R", "CR", "LOR"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponseBaseline(_Model):
    value: float = Field(description="Baseline platelet count, 10^9/L")
    observation: str | None = Field(description="Id of the (last) count used")
    observations: list[str] = Field(description="Ids of every count used (mean rule: several)")
    date: str = Field(description="Calendar date of the baseline, trial time zone")


class CrPeriod(_Model):
    start: str
    end: str | None


class ResponseEpisode(_Model):
    start: str = Field(description="Response date of the episode")
    level: Literal["R", "CR"] = Field(description="Best level reached in the episode")
    end: str | None = Field(description="Loss-of-response date; null while ongoing")
    duration_of_response_days: int | None
    cr_start: str | None
    cr_end: str | None
    cr_periods: list[CrPeriod]


class ResponseCriteria(_Model):
    r_threshold: float
    cr_threshold: float
    doubling_factor: float
    confirm_days: int
    loss_confirm_days: int
    bleeding_min_grade: int
    rescue_window_days: int
    baseline_rule: Literal["last-before-start", "mean-before-start"]
    baseline_lookback_days: int
    response_date_anchor: Literal["first", "confirming"]
    trial_timezone: str
    confirm_clock: Literal["calendar", "instant"] = Field(
        description="Distances in days: calendar days in the trial time zone, or instants"
    )
    baseline_rescue_exclusion_days: int = Field(
        description="A count this many days after a rescue is no baseline candidate (0: off)"
    )
    first_evaluable_day: int = Field(
        description="Counts are evaluable from this day of treatment (0: the start day)"
    )
    rules_version: Literal[1, 2] = Field(
        description="The rules the assessment was made under. 1: stored before version 2 "
        "(its criteria had none of the three settings above: version 1's values shown)"
    )


class ResponseClassification(_Model):
    resource_type: Literal["Observation", "AdverseEvent"] = Field(
        description="Observation: a platelet count or a WHO bleeding grade; AdverseEvent: a "
        "bleeding event"
    )
    id: str
    time: str = Field(description="Clinically relevant time (UTC)")
    date: str = Field(description="Calendar date in the trial time zone")
    value: float | None = Field(description="The count, 10^9/L; null for a bleed")
    classification: ClassificationCode
    detail: str | None = Field(description="Why, in words (e.g. 'below 30', 'with bleeding')")
    rescue: str | None = Field(
        description="Id of the rescue MedicationAdministration whose window holds it"
    )
    bleeding: list[str] = Field(
        description="References of the bleeds that make a count 'with bleeding'"
    )


class ResponseAssessment(_Model):
    patient: str
    status: ResponseCode
    status_reason: str | None = Field(
        description="Why the patient is not evaluable (NE): 'no treatment start', "
        "'no baseline', 'baseline only under rescue' or 'no evaluable count'"
    )
    best_response: Literal["CR", "R", "NR", "NE"] | None = Field(
        description="NE while never evaluable (null in an assessment stored under rules version 1)"
    )
    pending_confirmation: bool
    baseline: ResponseBaseline | None
    treatment_start: str | None
    response_date: str | None
    complete_response_date: str | None
    time_to_response_days: int | None
    time_to_complete_response_days: int | None
    episodes: list[ResponseEpisode]
    evidence: dict[str, list[str]] = Field(description="Observation ids each decision rests on")
    classifications: list[ResponseClassification] | None = Field(
        description="How every platelet count and every bleed on a day without a count was "
        "classified, in clinical order; null in an assessment stored under rules version 1"
    )
    criteria: ResponseCriteria
    computed_at: str
    observation: str = Field(
        description="The response-status Observation (its _history is "
        "the patient's response history)"
    )


class StatusCounts(_Model):
    CR: int
    R: int
    NR: int
    LOR: int
    NE: int


class BestResponseCounts(_Model):
    CR: int
    R: int
    NR: int
    NE: int = Field(description="Never evaluable (assessed under rules version 2)")


class ResponseSummary(_Model):
    patients: int
    evaluable: int = Field(description="Patients whose status is not NE")
    by_status: StatusCounts
    by_best_response: BestResponseCounts
    responders: int = Field(description="Evaluable patients whose best response is CR or R")
    overall_response_rate: float | None = Field(description="responders / evaluable")
    sites: list[str] | None = Field(description="The sites counted (the caller's); null: all")
    criteria: ResponseCriteria


class ExportOutputFile(_Model):
    type: str = Field(description="The resource type in the file (one type per file)")
    url: str = Field(description="Absolute URL of the NDJSON file (GET, same bearer token)")
    count: int = Field(description="Resources in the file")


class ExportManifest(_Model):
    """The complete status of a Bulk Data export (Bulk Data Access IG 2.0)."""

    transactionTime: str = Field(
        description="Every resource last updated at or before this instant is in the files "
        "exactly once (deleted ones excepted); nothing later is"
    )
    request: str = Field(description="The kick-off URL")
    requiresAccessToken: bool = Field(description="Always true: the files need the token")
    output: list[ExportOutputFile]
    error: list[ExportOutputFile] = Field(description="Always empty: no partial failures")
