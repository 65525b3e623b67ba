"""Typed settings, read once from the environment.

`DATABASE_URL` is a contract shared with alembic, uvicorn, Docker and the README, so it is
read without a prefix; everything else of the app carries the `APP_` prefix and the response
criteria carry `ITP_` (see `CriteriaSettings`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    default_page_size: int = Field(default=50, ge=1)
    max_page_size: int = Field(default=1000, ge=1)
    log_level: str = "INFO"

    @property
    def data_dir(self) -> Path:
        return Path("data")


@lru_cache
def get_settings() -> Settings:
    return Settings()
