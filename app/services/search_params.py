"""Search parameters: from a query string to `SearchFilter`, per resource type.

What each type supports is declared once in `SEARCH_PARAMETERS`; the CapabilityStatement and
the OpenAPI documentation are built from the same table, so neither can list a parameter
that is not implemented. The result controls (`_sort`, `_count`, `_total`, `_summary`,
`_elements`, `_include`, `_revinclude`) are parsed here too; what they do to the answer is
the searchset's business (`app.fhir.search_routes`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

import orjson

from app.kit import codes
from app.kit.dates import fhir_range
from app.kit.errors import BadRequest, Issue
from app.services.indexing import normalise_text
from app.services.search import SearchRequest
from app.store import criteria as filters


@dataclass(frozen=True)
class SearchParameter:
    name: str
    type: str  # FHIR search parameter type: token, string, date, reference, quantity, number
    documentation: str
    # Where the values are indexed: id, token, string, number (number and quantity),
    # effective (the date range), last-updated, patient (the subject), site.
    index: str

    @property
    def modifiers(self) -> tuple[str, ...]:
        """The modifiers accepted (`name:modifier=value`)."""
        if self.index == "id":
            return ()
        if self.index == "patient":
            return ("missing", "Patient")
        if self.index == "site":
            return ("missing", "identifier", "Organization")
        return {
            "token": ("not", "missing"),
            "string": ("exact", "contains", "missing"),
        }.get(self.type, ("missing",))


_SUBJECT_DOC = (
    "The subject Patient: Patient/id or id. Chained: {name}:Patient.identifier=system|value "
    "(or {name}.identifier=..., any Patient parameter)"
)


def _subject(name: str) -> SearchParameter:
    return SearchParameter(name, "reference", _SUBJECT_DOC.format(name=name), "patient")


def _date(name: str, what: str) -> SearchParameter:
    return SearchParameter(
        name,
        "date",
        f"{what}; prefixes eq ne lt le gt ge sa eb, partial dates (2025, 2025-03)",
        "effective",
    )


_ID = SearchParameter("_id", "token", "Logical id of the resource", "id")
_LAST_UPDATED = SearchParameter(
    "_lastUpdated",
    "date",
    "When the current version was written (meta.lastUpdated); prefixes as for dates",
    "last-updated",
)
SEARCH_PARAMETERS: dict[str, tuple[SearchParameter, ...]] = {
    "Patient": (
        _ID,
        _LAST_UPDATED,
        SearchParameter(
            "identifier",
            "token",
            "A patient identifier (system|value), e.g. the subject number",
            "token",
        ),
        SearchParameter(
            "name", "string", "Any part of a name (family, given, prefix, suffix, text)", "string"
        ),
        SearchParameter("family", "string", "Family name", "string"),
        SearchParameter("given", "string", "Given name", "string"),
        _date("birthdate", "Date of birth"),
        SearchParameter("gender", "token", "male | female | other | unknown", "token"),
        SearchParameter(
            "organization",
            "reference",
            "The trial site: its code (S01 or Organization/S01), or "
            "organization:identifier=https://itp-trial.example/fhir/sid/site|S01",
            "site",
        ),
    ),
    "Observation": (
        _ID,
        _LAST_UPDATED,
        _subject("patient"),
        _subject("subject"),
        SearchParameter("code", "token", "The observation code (system|code)", "token"),
        SearchParameter("category", "token", "The observation category (system|code)", "token"),
        SearchParameter(
            "status", "token", "registered | preliminary | final | amended | ...", "token"
        ),
        _date("date", "Clinical time (effective[x])"),
        SearchParameter(
            "value-quantity",
            "quantity",
            "valueQuantity: [prefix]number|system|code. A count per volume is compared in "
            "10^9/L whatever its unit: lt30|http://unitsofmeasure.org|10*9/L finds 25000 /uL",
            "number",
        ),
        SearchParameter("identifier", "token", "An observation identifier (system|value)", "token"),
    ),
    "MedicationAdministration": (
        _ID,
        _LAST_UPDATED,
        _subject("patient"),
        _subject("subject"),
        _date("effective-time", "When the dose was given (effective[x])"),
        SearchParameter("status", "token", "in-progress | completed | stopped | ...", "token"),
        SearchParameter(
            "code", "token", "The medication (medicationCodeableConcept, system|code)", "token"
        ),
        SearchParameter(
            "identifier", "token", "An administration identifier (system|value)", "token"
        ),
        SearchParameter("category", "token", "The category as coded (system|code)", "token"),
        SearchParameter(
            "medication-role",
            "token",
            "The trial role: study-drug | rescue | concomitant (CodeSystem medication-role); "
            "an administration without a role is concomitant",
            "token",
        ),
    ),
    "AdverseEvent": (
        _ID,
        _LAST_UPDATED,
        _subject("subject"),
        _date("date", "When the event occurred"),
        SearchParameter("seriousness", "token", "serious | non-serious (system|code)", "token"),
        SearchParameter(
            "event", "token", "The event (system|code), e.g. SNOMED CT 131148009", "token"
        ),
        SearchParameter(
            "grade",
            "number",
            "CTCAE grade 1-5 (the ae-grade extension); prefixes eq ne lt le gt ge sa eb ap, "
            "e.g. ge3",
            "number",
        ),
        SearchParameter(
            "identifier", "token", "An adverse event identifier (system|value)", "token"
        ),
    ),
}
_BY_NAME = {
    resource_type: {parameter.name: parameter for parameter in params}
    for resource_type, params in SEARCH_PARAMETERS.items()
}


def search_parameter(resource_type: str, name: str) -> SearchParameter:
    """A parameter `SEARCH_PARAMETERS` declares for the type (KeyError for another name)."""
    return _BY_NAME[resource_type][name]


# `_sort` keys: the id, the last update, and the type's date (clinical time, birth date).
SORT_KEYS: dict[str, dict[str, str]] = {
    resource_type: {
        "_id": "id",
        "_lastUpdated": "last-updated",
        **{parameter.name: "effective" for parameter in params if parameter.index == "effective"},
    }
    for resource_type, params in SEARCH_PARAMETERS.items()
}
# `_include` along each type's subject; `_revinclude` of those records on a Patient search.
INCLUDES: dict[str, tuple[str, ...]] = {
    resource_type: tuple(
        f"{resource_type}:{parameter.name}" for parameter in params if parameter.index == "patient"
    )
    for resource_type, params in SEARCH_PARAMETERS.items()
}
REVINCLUDES: dict[str, tuple[str, ...]] = {
    "Patient": tuple(value for values in INCLUDES.values() for value in values)
}
SUMMARY_MODES = ("true", "text", "data", "count", "false")
TOTAL_MODES = ("none", "estimate", "accurate")
CONTROL_PARAMETERS = frozenset(
    {
        "_count",
        "_sort",
        "_cursor",
        "_format",
        "_pretty",
        "_total",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
    }
)
# Controls that say one thing about the whole answer: given twice, which one counts is a
# guess (the last used to win silently), so a repeat is a 400.
SINGLE_CONTROLS = frozenset({"_count", "_summary", "_total", "_elements", "_sort"})
# Controls whose documented schema admits no empty string (an integer, an enumeration): an
# empty value is malformed, a 400, unlike an empty search parameter, which FHIR ignores.
_EMPTY_IS_MALFORMED = frozenset({"_count", "_total", "_summary", "_include", "_revinclude"})
_DATE_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb")
_NUMBER_PREFIXES = (*_DATE_PREFIXES, "ap")
_ELEMENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_ESCAPED = re.compile(r"\\([\\,|$])")


@dataclass
class ParsedSearch:
    criteria: filters.SearchFilter
    sort: list[filters.SortKey] = field(default_factory=list)
    count: int = 50
    after: tuple[Any, ...] | None = None
    total: bool = False  # _total=accurate (or estimate, answered accurately)
    summary: str | None = None  # _summary: count, true, text or data (false: None)
    elements: tuple[str, ...] | None = None  # _elements
    includes: list[filters.Include] = field(default_factory=list)
    revincludes: list[filters.Include] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    # The parameters that were applied, for the Bundle's next link.
    applied: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count_only(self) -> bool:
        """Only the number of matches: `_summary=count`, or `_count=0` (how fhirpy's
        `count()` and others ask for `Bundle.total` alone)."""
        return self.summary == "count" or self.count == 0

    @property
    def has_criteria(self) -> bool:
        """Whether a parameter narrows the matches (not only `_count`, `_sort`, ...)."""
        return any(name not in CONTROL_PARAMETERS for name, _ in self.applied)


class _Unsupported(Exception):
    """A parameter, modifier or value this server does not implement: ignored with a
    warning, or a 400 with `Prefer: handling=strict`."""


def parse_search(
    resource_type: str,
    params: Iterable[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool,
) -> ParsedSearch:
    parsed = ParsedSearch(filters.SearchFilter(resource_type), count=default_count)
    cursor = None
    given: set[str] = set()
    for name, value in params:
        _refuse_malformed(name, value, given)
        if name == "_cursor":
            cursor = value
            continue
        try:
            _parameter(parsed, resource_type, name, value, max_count)
        except _Unsupported as unsupported:
            message = f"Search parameter {unsupported} is not supported for {resource_type}"
            if strict:
                raise BadRequest(message) from None
            parsed.warnings.append(_warning(message + "; it was ignored"))
    if cursor is not None:
        _resume(parsed, cursor, strict)
    if parsed.elements is not None and parsed.summary in ("true", "text", "data"):
        parsed.warnings.append(
            _warning(
                f"_summary={parsed.summary} was ignored: _elements says which elements to return"
            )
        )
        parsed.summary = None
    return parsed


def _warning(message: str) -> Issue:
    return Issue("not-supported", message, severity="warning")


def _refuse_malformed(name: str, value: str, given: set[str]) -> None:
    """NUL anywhere, or a second value of a control that takes one (`given`: those seen)."""
    if "\x00" in name or "\x00" in value:
        raise BadRequest("Search parameters cannot contain NUL characters")
    if name in SINGLE_CONTROLS:
        if name in given:
            raise BadRequest(
                f"{name} is given more than once; give it once (which one was meant "
                "cannot be told)",
                expression=[name],
            )
        given.add(name)


def _parameter(
    parsed: ParsedSearch, resource_type: str, name: str, value: str, max_count: int
) -> None:
    """One parameter other than `_cursor`: a control, or a criterion added to the filter."""
    if name in CONTROL_PARAMETERS:
        if value != "" or name in _EMPTY_IS_MALFORMED:
            _control(parsed, resource_type, name, value, max_count)
        return
    if name.partition(":")[0] in ("_include", "_revinclude"):
        raise _Unsupported(f"{name} (iterate and recurse are not supported)")
    parameter, modifier, chain = _resolve(resource_type, name)
    if value == "":
        return  # FHIR: an empty parameter value is ignored
    if chain is None:
        _apply(parsed.criteria, parameter, modifier, value)
    else:
        patient = filters.SearchFilter("Patient")
        _apply(patient, *chain, value)
        parsed.criteria.chains = [*(parsed.criteria.chains or []), patient]
    parsed.applied.append((name, value))


def _resume(parsed: ParsedSearch, cursor: str, strict: bool) -> None:
    """Where the page starts: after the row a `_cursor` names, in the order of `_sort`."""
    shape = tuple(str if key.column == "id" else datetime for key in parsed.sort)
    if not _CURSOR_FORM.fullmatch(cursor):
        raise BadRequest(f"_cursor={cursor!r} is not a cursor: letters, digits, - and _")
    try:
        parsed.after = decode_cursor(cursor, (*shape, int))
    except BadRequest as unusable:
        # Handled like an unknown parameter: a client that mangled a next link (or
        # changed _sort under it) gets the first page and a warning, or with
        # Prefer: handling=strict the 400.
        if strict:
            raise
        parsed.warnings.append(
            _warning(f"{unusable.diagnostics}; it was ignored and this is the first page")
        )


def _resolve(
    resource_type: str, name: str
) -> tuple[SearchParameter, str, tuple[SearchParameter, str] | None]:
    """The parameter, its modifier, and for a chain (`subject:Patient.identifier`) the
    Patient parameter and modifier at its end."""
    head, dot, tail = name.partition(".")
    base, _, modifier = head.partition(":")
    parameter = _BY_NAME[resource_type].get(base)
    if parameter is None:
        raise _Unsupported(repr(name))
    if not dot:
        if modifier and modifier not in parameter.modifiers:
            raise _Unsupported(f"{name!r} (modifier :{modifier})")
        return parameter, modifier, None
    chained_name, _, chained_modifier = tail.partition(":")
    chained = _BY_NAME["Patient"].get(chained_name)
    if (
        parameter.index != "patient"
        or modifier not in ("", "Patient")
        or chained is None
        or "." in tail
        or (chained_modifier and chained_modifier not in chained.modifiers)
    ):
        raise _Unsupported(f"{name!r} (chains go from a subject to one Patient parameter)")
    return parameter, modifier, (chained, chained_modifier)


def _control(
    parsed: ParsedSearch, resource_type: str, name: str, value: str, max_count: int
) -> None:
    match name:
        case "_count":
            parsed.count = _count(value, max_count)
            value = str(parsed.count)  # the next link asks for the count answered
        case "_sort":
            _sort(parsed, resource_type, value)
        case "_total":
            parsed.total = _total(value)
        case "_summary":
            parsed.summary = _summary(value)
        case "_elements":
            parsed.elements = _elements(value)
        case "_include" | "_revinclude":
            _include(parsed, resource_type, name, value)
        case _:
            return  # _format and _pretty shape the response, not the search
    parsed.applied.append((name, value))


def _count(value: str, max_count: int) -> int:
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"_count={value!r} is not a whole number")
    return min(int(value), max_count)


def _total(value: str) -> bool:
    """Whether Bundle.total is counted (estimate is answered accurately)."""
    if value not in TOTAL_MODES:
        raise BadRequest(f"_total={value!r}: use none, estimate or accurate")
    return value != "none"


def _summary(value: str) -> str | None:
    if value not in SUMMARY_MODES:
        raise BadRequest(f"_summary={value!r}: use true, text, data, count or false")
    return None if value == "false" else value


def _elements(value: str) -> tuple[str, ...]:
    names = [part.strip() for part in value.split(",")]
    if not all(_ELEMENT_NAME.fullmatch(n) for n in names):
        raise BadRequest(f"_elements={value!r} is not a comma-separated list of elements")
    return tuple(dict.fromkeys(names))


def _sort(parsed: ParsedSearch, resource_type: str, value: str) -> None:
    keys = SORT_KEYS[resource_type]
    for item in value.split(","):
        name = item.strip().removeprefix("-")
        if name not in keys:
            supported = ", ".join(keys)
            raise BadRequest(
                f"_sort={value!r}: {name!r} is not a sort key of {resource_type} "
                f"(supported: {supported}; a leading - sorts descending)"
            )
        column = keys[name]
        # A key already sorted on decides nothing more; dropping it keeps the cursor short.
        if all(key.column != column for key in parsed.sort):
            parsed.sort.append(filters.SortKey(column, descending=item.strip().startswith("-")))


def _include(parsed: ParsedSearch, resource_type: str, name: str, value: str) -> None:
    source, _, rest = value.partition(":")
    param, _, target = rest.partition(":")
    supported = (INCLUDES if name == "_include" else REVINCLUDES).get(resource_type, ())
    if not supported:
        # This type has no such parameter: ignored like any unknown one (or 400, strict).
        raise _Unsupported(f"{name} (this type has no {name} paths)")
    if f"{source}:{param}" not in supported or target not in ("", "Patient"):
        # The type documents exactly which paths it includes; asking for another is a
        # malformed request (as HAPI FHIR answers it), not a parameter to ignore.
        raise BadRequest(
            f"{name}={value!r} is not an include path of {resource_type}; "
            f"supported: {', '.join(supported)}",
            expression=[name],
        )
    include = filters.Include(source, param)
    chosen = parsed.includes if name == "_include" else parsed.revincludes
    if include not in chosen:
        chosen.append(include)


def _values(value: str) -> list[str]:
    """Comma-separated values (OR-ed), `\\,` being a comma inside a value."""
    return _split(value, ",")


def _split(value: str, separator: str, maxsplit: int = -1) -> list[str]:
    """Split on separators that are not escaped with a backslash; escapes are kept."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            current.append(value[i : i + 2])
            i += 2
            continue
        if char == separator and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return _ESCAPED.sub(r"\1", value)


def _apply(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, value: str
) -> None:
    if modifier == "missing":
        if value not in ("true", "false"):
            raise BadRequest(f"{parameter.name}:missing={value!r} must be true or false")
        missing = filters.Missing(parameter.index, parameter.name, value == "true")
        criteria.missing = [*(criteria.missing or []), missing]
        return
    values = _values(value)
    apply = _APPLY_BY_INDEX.get(parameter.index)
    if apply is None:
        raise ValueError(f"no index {parameter.index} for {parameter.name}")
    apply(criteria, parameter, modifier, values)


def _apply_ids(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    ids = [_unescape(v) for v in values]
    for resource_id in ids:
        if not _SEARCH_ID.fullmatch(resource_id):
            # No resource has such an id: a malformed request, not an empty match.
            raise BadRequest(
                f"_id={resource_id!r} is not a FHIR id (letters, digits, - and ., up to 64)",
                expression=["_id"],
            )
    criteria.ids = _intersect(criteria.ids, ids)


def _apply_patients(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    patients = [_reference_id(parameter.name, _unescape(v)) for v in values]
    criteria.patients = _intersect(criteria.patients, patients)


def _apply_sites(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    if modifier == "identifier":
        matches = [_token("organization", v) for v in values]
        criteria.tokens = [*(criteria.tokens or []), matches]
    else:
        sites = [_site(parameter.name, _unescape(v)) for v in values]
        criteria.organizations = _intersect(criteria.organizations, sites)


def _apply_tokens(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    matches = [_token(parameter.name, v) for v in values]
    if modifier == "not":
        criteria.tokens_not = [*(criteria.tokens_not or []), matches]
    else:
        criteria.tokens = [*(criteria.tokens or []), matches]


def _apply_strings(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    strings = [_string(parameter.name, modifier, _unescape(v)) for v in values]
    criteria.strings = [*(criteria.strings or []), strings]


def _apply_numbers(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    numbers = [_number(parameter, v) for v in values]
    criteria.numbers = [*(criteria.numbers or []), numbers]


def _apply_dates(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    dates = [_date_match(parameter.name, v) for v in values]
    criteria.dates = [*(criteria.dates or []), dates]


def _apply_last_updated(
    criteria: filters.SearchFilter, parameter: SearchParameter, modifier: str, values: list[str]
) -> None:
    dates = [_date_match(parameter.name, v) for v in values]
    criteria.last_updated = [*(criteria.last_updated or []), dates]


# What a parameter's comma-separated values (OR-ed) add to the criteria, by the index that
# holds them; a repeated parameter is AND-ed with what the criteria hold already.
_APPLY_BY_INDEX: dict[
    str, Callable[[filters.SearchFilter, SearchParameter, str, list[str]], None]
] = {
    "id": _apply_ids,
    "patient": _apply_patients,
    "site": _apply_sites,
    "token": _apply_tokens,
    "string": _apply_strings,
    "number": _apply_numbers,
    "effective": _apply_dates,
    "last-updated": _apply_last_updated,
}


def _intersect(existing: list[str] | None, new: list[str]) -> list[str]:
    # Repeated parameters are AND-ed: a row must match both value lists.
    return new if existing is None else [v for v in existing if v in new]


# A reference search value: `id`, `Type/id` or an absolute URL ending in `Type/id`. The
# OpenAPI document states the same grammar (app/fhir/search_routes.py), so what the schema
# refuses the server refuses too. The URL part is printable ASCII without a comma (commas
# separate OR-ed values); the id is a FHIR id.
SEARCH_ID = r"[A-Za-z0-9\-.]{1,64}"
_URL_PREFIX = r"(https?://[!-+\--~]+/)?"
_SEARCH_ID = re.compile(SEARCH_ID)


def reference_value_pattern(target: str, url_prefix: str = _URL_PREFIX) -> str:
    return f"({url_prefix}{target}/)?{SEARCH_ID}"


_REFERENCE_VALUE = {
    target: re.compile(reference_value_pattern(target)) for target in ("Patient", "Organization")
}


def _referenced_id(name: str, value: str, target: str) -> str:
    if not _REFERENCE_VALUE[target].fullmatch(value):
        raise BadRequest(
            f"{name}={value!r} must be an id, {target}/<id> or a URL ending in {target}/<id>",
            expression=[name],
        )
    return value.rsplit("/", 1)[-1]


def _reference_id(name: str, value: str) -> str:
    return _referenced_id(name, value, "Patient")


def _site(name: str, value: str) -> str:
    """`S01`, `Organization/S01` or a URL ending in it: the site's code."""
    return _referenced_id(name, value, "Organization")


def _token(name: str, value: str) -> filters.TokenMatch:
    parts = [_unescape(part) for part in _split(value, "|", maxsplit=1)]
    if len(parts) == 1:
        return filters.TokenMatch(name, None, parts[0])
    system, code = parts
    return filters.TokenMatch(name, system, code or None)


def _string(name: str, modifier: str, value: str) -> filters.StringMatch:
    if modifier == "exact":
        return filters.StringMatch(name, "exact", value)
    return filters.StringMatch(name, modifier or "start", normalise_text(value))


def _date_match(name: str, value: str) -> filters.DateMatch:
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
    return filters.DateMatch(prefix, *bounds)


def _number(parameter: SearchParameter, value: str) -> filters.NumberMatch:
    text = value
    prefix = "eq"
    if value[:2] in _NUMBER_PREFIXES:
        prefix, value = value[:2], value[2:]
    parts = [_unescape(part) for part in _split(value, "|")]
    shape = "[prefix]number" + ("|system|code" if parameter.type == "quantity" else "")
    if len(parts) not in ((1, 3) if parameter.type == "quantity" else (1,)):
        raise BadRequest(f"{parameter.name}={text!r} is not {shape}")
    try:
        number = Decimal(parts[0])
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise BadRequest(f"{parameter.name}={text!r} is not {shape}: {parts[0]!r} is no number")
    system, code = (parts[1] or None, parts[2] or None) if len(parts) == 3 else (None, None)
    if prefix == "ap":  # FHIR leaves "approximately" to the server: within 10%
        margin = abs(number) / 10
    else:  # eq/ne: the precision given, e.g. 25 is [24.5, 25.5) and 25.0 is [24.95, 25.05)
        exponent = number.as_tuple().exponent
        margin = Decimal(5).scaleb(int(exponent) - 1)
    factor = _count_factor(system, code) if code is not None else None
    scale = factor if factor is not None else 1.0
    return filters.NumberMatch(
        parameter.name,
        prefix,
        float(number) * scale,
        float(number - margin) * scale,
        float(number + margin) * scale,
        system,
        code,
        normalised=factor is not None,
    )


def _count_factor(system: str | None, code: str) -> float | None:
    """The factor to 10^9/L of a query's unit, when it is a count per volume the server
    knows: a UCUM code, or without a system a UCUM code or a lab's spelling (K/uL)."""
    if system is None:
        return codes.platelet_factor(None, code, code)
    if system == codes.UCUM:
        return codes.platelet_factor(system, code, None)
    return None


# Cursors are opaque to clients: the last row's keyset values, base64url JSON.
_CURSOR_FORM = re.compile(r"[A-Za-z0-9_-]+")


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
        for item, expected in zip(values, shape, strict=True):
            if expected is datetime:
                decoded.append(datetime.fromisoformat(item) if item is not None else None)
            elif isinstance(item, expected) and not isinstance(item, bool):
                if isinstance(item, str) and "\x00" in item:
                    raise ValueError  # no id holds NUL, and PostgreSQL cannot compare one
                decoded.append(item)
            else:
                raise ValueError
        return tuple(decoded)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise BadRequest("_cursor is not a cursor this server issued") from None


def search_request(
    parsed: ParsedSearch, pairs: Sequence[tuple[str, str]], include_limit: int
) -> SearchRequest:
    """The search service's request for a parsed search; `pairs` are the query as the
    client wrote it (for the audit record)."""
    return SearchRequest(
        parsed.criteria,
        sort=parsed.sort,
        after=parsed.after,
        count=parsed.count,
        total=parsed.total,
        count_only=parsed.count_only,
        includes=parsed.includes,
        revincludes=parsed.revincludes,
        include_limit=include_limit,
        query=urlencode(pairs) or None,
    )


def criteria_key(criteria: filters.SearchFilter) -> str:
    """A canonical text of criteria, so equal conditional creates share one lock."""
    return orjson.dumps(criteria).decode()
