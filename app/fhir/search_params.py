"""Search parameters: from a query string to `Criteria`, per resource type.

What each type supports is declared once in `SEARCH_PARAMETERS`; the CapabilityStatement is
built from the same table, so it can never list a parameter that is not implemented.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from app.errors import BadRequest, Issue
from app.services.dates import fhir_range
from app.services.indexing import patient_id_from_reference
from app.store.criteria import Criteria, DateMatch, TokenMatch


@dataclass(frozen=True)
class SearchParameter:
    name: str
    type: str  # FHIR search parameter type
    documentation: str


_ID = SearchParameter("_id", "token", "Logical id of the resource")
SEARCH_PARAMETERS: dict[str, tuple[SearchParameter, ...]] = {
    "Patient": (
        _ID,
        SearchParameter("identifier", "token", "A patient identifier (system|value)"),
    ),
    "Observation": (
        _ID,
        SearchParameter("patient", "reference", "The subject Patient (Patient/id or id)"),
        SearchParameter("subject", "reference", "The subject Patient (Patient/id or id)"),
        SearchParameter("code", "token", "The observation code (system|code)"),
        SearchParameter(
            "date", "date", "Clinical time (effective[x]); prefixes eq ne lt le gt ge sa eb"
        ),
        SearchParameter("identifier", "token", "An observation identifier (system|value)"),
    ),
    "MedicationAdministration": (
        _ID,
        SearchParameter("patient", "reference", "The subject Patient (Patient/id or id)"),
        SearchParameter("subject", "reference", "The subject Patient (Patient/id or id)"),
        SearchParameter("identifier", "token", "An administration identifier (system|value)"),
    ),
    "AdverseEvent": (
        _ID,
        SearchParameter("subject", "reference", "The subject Patient (Patient/id or id)"),
    ),
}
SORTABLE = {"Observation", "MedicationAdministration", "AdverseEvent"}
CONTROL_PARAMETERS = frozenset({"_count", "_sort", "_cursor", "_format", "_pretty"})
_DATE_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb")


@dataclass
class ParsedSearch:
    criteria: Criteria
    sort: str | None = None
    count: int = 50
    after: tuple[Any, int] | None = None
    warnings: list[Issue] = field(default_factory=list)
    # The parameters that were applied, for the Bundle's self link.
    applied: list[tuple[str, str]] = field(default_factory=list)


def parse_search(
    resource_type: str,
    params: Iterable[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool,
) -> ParsedSearch:
    known = {p.name: p for p in SEARCH_PARAMETERS[resource_type]}
    criteria = Criteria(resource_type)
    parsed = ParsedSearch(criteria, count=default_count)
    for name, value in params:
        if name in CONTROL_PARAMETERS:
            _control(parsed, resource_type, name, value, max_count)
            continue
        base, _, modifier = name.partition(":")
        parameter = known.get(base)
        if parameter is None or modifier:
            message = (
                f"Unknown or unsupported search parameter {name!r} for {resource_type}; "
                "it was ignored"
            )
            if strict:
                raise BadRequest(message)
            parsed.warnings.append(Issue("not-supported", message, severity="warning"))
            continue
        if value == "":
            continue  # FHIR: an empty parameter value is ignored
        _apply(criteria, parameter, value)
        parsed.applied.append((name, value))
    return parsed


def _control(
    parsed: ParsedSearch, resource_type: str, name: str, value: str, max_count: int
) -> None:
    if name == "_count":
        if not (value.isascii() and value.isdigit()):
            raise BadRequest(f"_count={value!r} is not a whole number")
        parsed.count = min(int(value), max_count)
        parsed.applied.append((name, str(parsed.count)))
    elif name == "_sort":
        if value not in ("date", "-date") or resource_type not in SORTABLE:
            raise BadRequest(
                f"_sort={value!r} is not supported for {resource_type}; "
                "supported: date, -date (clinical time)"
            )
        parsed.sort = value
        parsed.applied.append((name, value))
    elif name == "_cursor":
        parsed.after = decode_cursor(value, (datetime, int))  # type: ignore[assignment]


def _apply(criteria: Criteria, parameter: SearchParameter, value: str) -> None:
    values = value.split(",")
    if parameter.name == "_id":
        criteria.ids = _intersect(criteria.ids, values)
    elif parameter.type == "reference":
        patients = [_reference_id(parameter.name, v) for v in values]
        criteria.patients = _intersect(criteria.patients, patients)
    elif parameter.type == "token":
        criteria.tokens = [*(criteria.tokens or []), [_token(parameter.name, v) for v in values]]
    elif parameter.type == "date":
        criteria.dates = [*(criteria.dates or []), [_date(parameter.name, v) for v in values]]


def _intersect(existing: list[str] | None, new: list[str]) -> list[str]:
    # Repeated parameters are AND-ed: a row must match both value lists.
    return new if existing is None else [v for v in existing if v in new]


def _reference_id(name: str, value: str) -> str:
    if "/" not in value:
        return value
    patient_id = patient_id_from_reference(value)
    if patient_id is None:
        raise BadRequest(f"{name}={value!r} must reference a Patient (Patient/id or id)")
    return patient_id


def _token(name: str, value: str) -> TokenMatch:
    if "|" not in value:
        return TokenMatch(name, None, value)
    system, _, code = value.partition("|")
    return TokenMatch(name, system, code or None)


def _date(name: str, value: str) -> DateMatch:
    prefix = "eq"
    if value[:2] in _DATE_PREFIXES:
        prefix, value = value[:2], value[2:]
    bounds = fhir_range(value)
    if bounds is None:
        raise BadRequest(
            f"{name}={prefix}{value!r} is not a FHIR date or dateTime "
            "(e.g. 2025-03-10 or 2025-03-10T09:00:00Z, optionally with a prefix "
            "eq, ne, lt, le, gt, ge, sa, eb)"
        )
    return DateMatch(prefix, *bounds)


# Cursors are opaque to clients: the last row's keyset values, base64url JSON.
def encode_cursor(*key: datetime | str | int | None) -> str:
    values = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def decode_cursor(value: str, shape: tuple[type, ...]) -> tuple[Any, ...]:
    """Decode a cursor whose values have the types in `shape` (datetime may be None)."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        if not isinstance(values, list) or len(values) != len(shape):
            raise ValueError
        decoded: list[Any] = []
        for item, kind in zip(values, shape, strict=True):
            if kind is datetime:
                decoded.append(datetime.fromisoformat(item) if item is not None else None)
            elif isinstance(item, kind) and not isinstance(item, bool):
                decoded.append(item)
            else:
                raise ValueError
        return tuple(decoded)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise BadRequest("_cursor is not a cursor this server issued") from None


def criteria_key(criteria: Criteria) -> str:
    """A canonical text of criteria, so equal conditional creates share one lock."""
    return orjson.dumps(criteria).decode()
