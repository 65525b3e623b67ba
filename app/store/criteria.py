"""What a search asks for, independent of how the query string spelled it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class TokenMatch:
    param: str
    system: str | None  # None: any system; "": no system
    value: str | None  # None with a system: `system|` (any code in that system)


@dataclass
class DateMatch:
    prefix: str  # eq ne lt le gt ge sa eb ap
    start: datetime
    end: datetime


@dataclass
class Criteria:
    resource_type: str
    ids: list[str] | None = None
    patients: list[str] | None = None
    tokens: list[list[TokenMatch]] | None = None  # AND of ORs
    dates: list[list[DateMatch]] | None = None  # AND of ORs
    sites: frozenset[str] | None = None  # the caller's sites; None: every site
