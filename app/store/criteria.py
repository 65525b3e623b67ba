"""What a search asks for, independent of how the query string spelled it.

Each list of lists is an AND of ORs: one inner list per search parameter occurrence (its
comma-separated values, OR-ed), the occurrences AND-ed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement

from app.auth.policy import SiteAccess


@dataclass
class TokenMatch:
    param: str
    system: str | None  # None: any system; "": no system
    value: str | None  # None with a system: `system|` (any code in that system)


@dataclass
class DateMatch:
    prefix: str  # eq ne lt le gt ge sa eb
    start: datetime
    end: datetime


@dataclass
class StringMatch:
    param: str
    mode: str  # "start" (FHIR's default), "contains" or "exact"
    value: str  # normalised (see `normalise_text`) unless `mode` is "exact"


@dataclass
class NumberMatch:
    """A number or quantity compared to the indexed value.

    `normalised`: the query's unit converts to 10^9/L, so the value (already converted) is
    compared to each row's value in 10^9/L whatever unit the row was sent in. Otherwise the
    value is compared as sent, on rows with the same unit `code` (and `system`, when given).
    """

    param: str
    prefix: str  # eq ne lt le gt ge sa eb ap
    value: float
    low: float  # eq/ne: the range the query's precision implies, [low, high)
    high: float
    system: str | None = None
    code: str | None = None
    normalised: bool = False


@dataclass
class Missing:
    """`param:missing=true|false`; `index` says where the parameter is stored."""

    index: str  # token, string, number, effective, last-updated, patient, site
    param: str
    missing: bool


@dataclass
class SortKey:
    column: str  # id, last-updated, effective
    descending: bool = False


@dataclass
class Include:
    """`_include` / `_revinclude` along a record's subject: the only reference indexed."""

    source: str  # the type holding the reference (Observation in Observation:subject)
    param: str  # patient or subject
    target: str = "Patient"


@dataclass
class SearchFilter:
    resource_type: str
    ids: list[str] | None = None
    patients: list[str] | None = None
    tokens: list[list[TokenMatch]] | None = None
    dates: list[list[DateMatch]] | None = None  # on the effective range (clinical time)
    # Whose sites the search may return: the caller's policy, or the server's own access.
    # Unset, the search is refused (MissingSiteAccess): a query cannot forget it.
    access: SiteAccess | None = None
    # Site codes asked for (Patient `organization`), intersected like `ids`.
    organizations: list[str] | None = None
    # `:not`: a row matches when it has none of the tokens of each inner list.
    tokens_not: list[list[TokenMatch]] | None = None
    strings: list[list[StringMatch]] | None = None
    last_updated: list[list[DateMatch]] | None = None
    numbers: list[list[NumberMatch]] | None = None
    missing: list[Missing] | None = None
    # Chained parameters (`subject:Patient.identifier=...`): the record's Patient must
    # match each of these Patient criteria.
    chains: list[SearchFilter] | None = None


@dataclass(frozen=True)
class HistoryFilter:
    """Which versions a history shows: of a type, or of one resource of it (`resource_id`),
    written at or after `since`."""

    resource_type: str
    resource_id: str | None = None
    since: datetime | None = None


class MissingSiteAccess(RuntimeError):
    """A query of clinical data built without saying whose sites it may return: a bug."""


def site_condition(column: Any, access: SiteAccess | None) -> list[ColumnElement[bool]]:
    """The one place "which sites" becomes SQL: rows of `column` at the access's sites (no
    condition for every-site access). Every read of clinical data goes through here."""
    if access is None:
        raise MissingSiteAccess("a query of clinical data needs a SiteAccess")
    return [] if access.sites is None else [column.in_(access.sites)]
