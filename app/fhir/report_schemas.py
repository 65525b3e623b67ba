"""Typed documentation of the trial report's JSON (plain JSON, not FHIR: null means "not
reached" or "none")."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.fhir.response_schemas import ResponseCriteria


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeCounts(_Model):
    """Patients per response code. For best response, NE counts the patients without one
    (no evaluable count) and LOR is always 0: a best response is CR, R or NR."""

    CR: int
    R: int
    NR: int
    LOR: int
    NE: int


class Proportion(_Model):
    responders: int
    n: int = Field(description="Treated patients (with a study-drug start)")
    rate: float | None = Field(description="responders / n; null when n is 0")
    ci95_low: float | None = Field(description="Exact binomial 95% interval, lower limit")
    ci95_high: float | None = Field(description="Exact binomial 95% interval, upper limit")
    method: str = Field(description='"Clopper-Pearson"')


class Description(_Model):
    n: int
    median: float | None
    min: float | None
    max: float | None


class DurationOfResponse(_Model):
    n: int = Field(description="Responders: each one's first episode")
    events: int = Field(description="First episodes that ended in a loss of response")
    median: float | None = Field(description="Kaplan-Meier median (days); null: not reached")
    ci95_low: float | None = Field(
        description="Brookmeyer-Crowley 95% limit (log-log Greenwood band); null: not reached"
    )
    ci95_high: float | None = Field(
        description="Brookmeyer-Crowley 95% limit (log-log Greenwood band); null: not reached"
    )


class Platelets(_Model):
    n_baseline: int
    baseline_median: float | None = Field(description="10^9/L, treated patients' baselines")
    n_peak: int
    peak_median: float | None = Field(
        description="10^9/L, median of each treated patient's highest count after the start"
    )


class Grades(_Model):
    one: int = Field(alias="1")
    two: int = Field(alias="2")
    three: int = Field(alias="3")
    four: int = Field(alias="4")
    five: int = Field(alias="5")


class AdverseEvents(_Model):
    events: int = Field(description="Actual adverse events (potential ones are not counted)")
    patients: int = Field(description="Patients with at least one")
    by_grade: Grades = Field(description="Events per CTCAE grade; ungraded ones in none")
    serious: int
    related: int = Field(
        description="WHO-UMC causality Certain, Probably-Likely or Possible for a suspect"
    )
    bleeding: int


class SiteReport(_Model):
    site: str
    n_enrolled: int
    n_treated: int
    status: CodeCounts
    best_response: CodeCounts
    orr: Proportion
    adverse_events: AdverseEvents


class TrialReport(_Model):
    generated_at: str
    criteria: ResponseCriteria
    sites: list[str] = Field(description="The sites reported on")
    n_enrolled: int
    n_treated: int = Field(description="Patients with a study-drug start")
    n_evaluable: int = Field(description="Patients whose status is not NE")
    status: CodeCounts
    best_response: CodeCounts
    orr: Proportion = Field(description="Best response CR or R, over the treated patients")
    cr_rate: Proportion = Field(description="Best response CR, over the treated patients")
    time_to_response_days: Description
    time_to_complete_response_days: Description
    duration_of_response_days: DurationOfResponse
    platelets: Platelets
    adverse_events: AdverseEvents
    by_site: list[SiteReport]


class ListingRow(_Model):
    subject: str | None = Field(description="Subject number (Patient.identifier)")
    patient: str = Field(description="Patient id")
    site: str | None
    treatment_start: str | None = Field(description="First study-drug dose (instant)")
    baseline: float | None = Field(description="Baseline count, 10^9/L")
    status: str
    best_response: str | None
    response_date: str | None
    time_to_response_days: int | None
    time_to_complete_response_days: int | None
    duration_of_response_days: int | None = Field(
        description="Of the current or last episode (ongoing: to the latest evaluable count)"
    )
    peak_count: float | None = Field(description="Highest count after the start, 10^9/L")
    rescue_count: int
    adverse_events: int = Field(description="Actual adverse events")


class ResponseListing(_Model):
    generated_at: str
    sites: list[str] = Field(description="The sites listed")
    rows: list[ListingRow] = Field(description="One per patient, in enrolment order")
