"""Typed settings, read once from the environment.

`DATABASE_URL` is a contract shared with alembic, uvicorn, Docker and the README, so it is
read without a prefix; everything else of the app carries the `APP_` prefix and the response
criteria carry `ITP_` (see `CriteriaSettings`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine import Criteria
from app.kit.codes import DEFAULT_BLEEDING_EVENT_CODES, PLATELET_CODES, CodeSystems
from app.kit.errors import ConfigurationError
from app.kit.limits import PLATELET_MAX_DEFAULT, InputLimits

DEFAULT_DATABASE_URL = "sqlite:///data/itp-trial.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore")

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("DATABASE_URL", "APP_DATABASE_URL"),
    )
    environment: Literal["development", "test", "production"] = "development"
    # Base of the project's own code systems; clients that use the default must keep working,
    # so only the base can move, never the paths below it.
    code_system_base: str = "https://itp-trial.example/fhir"
    # Pool sizes matter for PostgreSQL only; SQLite serialises writers anyway.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # Seconds a request waits for a pooled connection; then it is answered 503 (transient).
    db_pool_timeout: float = Field(default=30.0, gt=0)
    default_page_size: int = Field(default=50, ge=1)
    max_page_size: int = Field(default=1000, ge=1)
    # Write requests a worker runs at once (the rest wait; see WriteLimitMiddleware for why
    # and what is still to measure). 0: no limit.
    max_concurrent_writes: int = Field(default=2, ge=0)
    # Move the objects a worker holds once started (modules, FHIR models, the app) out of the
    # garbage collector's sight (gc.freeze): a full collection walks ~180,000 of them, 40-50
    # ms during which the worker answers nothing (bench/README.md, optimisation 14). Unset: on in
    # production only; tests build many apps in one process, and frozen objects are never
    # collected.
    gc_freeze: bool | None = None
    # Request bodies above this are refused with 413 before they are read (1 MiB).
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # A Bundle at POST /fhir carries many resources: a lab's day of results as one
    # transaction (1,000 Observations are ~1 MiB). Its own limits, 413 above either.
    max_bundle_bytes: int = Field(default=16_777_216, ge=1024)
    max_bundle_entries: int = Field(default=10_000, ge=1)
    # AdverseEvent codings (system|code) that count as bleeding, besides SNOMED CT 131148009.
    bleeding_event_codes: list[str] = Field(default_factory=list)
    # Browser origins allowed to call the API (the study team's frontends); none by default.
    cors_origins: list[str] = Field(default_factory=list)
    # HL7 v2 lab feeds: a lab's own OBX-3 codes for a platelet count, mapped onto its LOINC
    # code: {"CODING-SYSTEM|CODE": "777-3"} (OBX-3.3|OBX-3.1; "|CODE" when none is sent).
    hl7_local_codes: dict[str, str] = Field(default_factory=dict)
    # Reads, searches and refusals waiting for the audit trail (a database outage): beyond
    # this many a read is refused with 503 rather than served unaudited.
    audit_queue_max: int = Field(default=100_000, ge=1)
    # Where a worker that stops during an outage leaves its queued audit records; the next
    # start writes them to the trail before serving.
    audit_spill_dir: Path = Path("data/audit-spill")
    # Within this many milliseconds of its commit a record is in the hash chain (the
    # sequencer, app.audit.chain); `audit verify` reports a record older than this that is
    # still unchained.
    audit_chain_delay_ms: int = Field(default=1000, ge=1)
    # Exports (Bulk Data $export, SDTM). STUDYID of every SDTM dataset.
    study_id: str = Field(default="NCT06776510", min_length=1, max_length=200)
    # A Bulk export's files, kept in the database, are deleted this long after the job ends
    # (or, unfinished, after it was started); the status URL answers 404 from then on.
    export_retention_hours: float = Field(default=24.0, gt=0)
    # Resources per NDJSON file: a larger type is split into several files.
    export_file_resources: int = Field(default=100_000, ge=1)
    # A running job's lease: its worker renews it while it writes; a job whose lease ran out
    # (the worker died) is taken over by another worker, from its last complete file.
    export_lease_seconds: float = Field(default=30.0, gt=0)

    @property
    def freezes_gc(self) -> bool:
        return self.environment == "production" if self.gc_freeze is None else self.gc_freeze

    @field_validator("hl7_local_codes")
    @classmethod
    def _platelet_codes_only(cls, mapping: dict[str, str]) -> dict[str, str]:
        for key, loinc in mapping.items():
            if not key.partition("|")[2]:
                raise ValueError(f"APP_HL7_LOCAL_CODES key {key!r} is not CODING-SYSTEM|CODE")
            if loinc not in PLATELET_CODES:
                raise ValueError(
                    f"APP_HL7_LOCAL_CODES maps {key!r} to {loinc!r}: only the platelet count "
                    f"LOINC codes {', '.join(sorted(PLATELET_CODES))} can be mapped onto"
                )
        return mapping

    def code_systems(self) -> CodeSystems:
        extra = set()
        for token in self.bleeding_event_codes:
            system, bar, code = token.partition("|")
            if not bar or not system or not code:
                raise ConfigurationError(
                    f"APP_BLEEDING_EVENT_CODES entry {token!r} is not system|code"
                )
            extra.add((system, code))
        return CodeSystems(self.code_system_base, DEFAULT_BLEEDING_EVENT_CODES | extra)


@lru_cache
def get_settings() -> Settings:
    return Settings()


class CriteriaSettings(BaseSettings):
    """The response criteria the rules leave to the protocol (docs/response-rules.md), read
    from `ITP_*`. Every assessment stores the values it used, so it can be reproduced; the
    rules version is not a setting: the server assesses under the current rules (2)."""

    model_config = SettingsConfigDict(env_prefix="ITP_", extra="ignore")

    r_threshold: float = Field(default=30.0, gt=0)
    cr_threshold: float = Field(default=100.0, gt=0)
    doubling_factor: float = Field(default=2.0, gt=0)
    confirm_days: int = Field(default=7, ge=0)
    loss_confirm_days: int = Field(default=1, ge=0)
    bleeding_min_grade: int = Field(default=1, ge=0, le=4)
    rescue_window_days: int = Field(default=56, ge=0)
    baseline_rule: Literal["last-before-start", "mean-before-start"] = "last-before-start"
    baseline_lookback_days: int = Field(default=14, ge=0)
    response_date_anchor: Literal["first", "confirming"] = "first"
    trial_timezone: str = "UTC"
    # Rules version 2's; `instant`, 0 and 0 give version 1's results (docs/response-rules.md).
    confirm_clock: Literal["calendar", "instant"] = "calendar"
    baseline_rescue_exclusion_days: int = Field(default=14, ge=0)
    first_evaluable_day: int = Field(default=1, ge=0)
    # An input limit, not a response criterion: a platelet count above it (in 10^9/L, after
    # unit conversion) is refused on every path. Not part of an assessment's `criteria`.
    platelet_max: float = Field(default=PLATELET_MAX_DEFAULT, gt=0, allow_inf_nan=False)

    @field_validator("trial_timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {name!r}: expected an IANA name such as Europe/Paris"
            ) from None
        return name

    def to_criteria(self) -> Criteria:
        return Criteria(**self.model_dump(exclude={"platelet_max"}))

    def input_limits(self) -> InputLimits:
        return InputLimits(platelet_max=self.platelet_max)


@lru_cache
def get_criteria_settings() -> CriteriaSettings:
    return CriteriaSettings()
