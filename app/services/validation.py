"""Parse once, validate once: from request bytes to an accepted R4B resource.

fhir.resources (R4B) checks structure and types, but it is more lenient than FHIR (measured
with the pinned version, and found again by the fuzzing): it lets through codes outside
required value sets, a missing `resourceType`, explicit nulls, empty values, numbers where
dates belong, calendar-impossible dates, strings for booleans. `_check` walks the raw JSON
beside the R4B model classes and refuses each of those, so what we store is FHIR, not merely
parseable.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B.adverseevent import AdverseEvent
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance
from fhir_core import types as fhir_types
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from app.kit import codes
from app.kit.dates import date_problem
from app.kit.errors import BadRequest, Issue, Unprocessable
from app.kit.limits import MAX_INDEXED_STRING

RESOURCE_CLASSES: dict[str, type[FHIRAbstractModel]] = {
    "Patient": Patient,
    "Observation": Observation,
    "MedicationAdministration": MedicationAdministration,
    "AdverseEvent": AdverseEvent,
    "Provenance": Provenance,  # checked when it arrives in X-Provenance, not served as such
}

_QUANTITY_COMPARATORS = frozenset({"<", "<=", ">=", ">"})
# Quantity and the R4B types derived from it (fhir.resources names each class on its own).
_QUANTITY_TYPES = (
    "Quantity",
    "Age",
    "Count",
    "Distance",
    "Duration",
    "SimpleQuantity",
    "MoneyQuantity",
)
# Required bindings whose full code list fhir.resources does not carry (it truncates with
# '+', or omits it); taken from the R4B value sets.
_REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Observation", "status"): frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    **{(quantity, "comparator"): _QUANTITY_COMPARATORS for quantity in _QUANTITY_TYPES},
}

# The strings stored in search indexes (limits.py): the same limit on both databases.
_QUANTITY_STRINGS = frozenset({"unit", "system", "code"})
_INDEXED_STRINGS: dict[str, frozenset[str]] = {
    "Identifier": frozenset({"system", "value"}),
    "Coding": frozenset({"system", "code"}),
    "HumanName": frozenset({"text", "family", "given", "prefix", "suffix"}),
    **{quantity: _QUANTITY_STRINGS for quantity in _QUANTITY_TYPES},
}

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CODE_RE = re.compile(codes.CODE_PATTERN)
_STRING_RE = re.compile(codes.STRING_PATTERN)


@dataclass(frozen=True)
class _FieldSpec:
    name: str  # python attribute name, for pydantic error paths
    is_list: bool
    model: type[FHIRAbstractModel] | None  # complex datatype / backbone element
    primitive: str | None  # FHIR primitive type name
    codes: frozenset[str] | None  # required value set, when known completely


@dataclass(frozen=True)
class Accepted:
    """A resource that passed every check: the raw dict (what we store) and the model."""

    raw: dict[str, Any]
    model: FHIRAbstractModel


def parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise BadRequest("The request body is empty; a FHIR resource in JSON was expected")
    try:
        data = load_json(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object (a FHIR resource)")
    return data


# --- JSON from clients: what orjson reads, minus what no database can store -------------
# NUL (U+0000) cannot be stored in PostgreSQL text, so it is refused (400) wherever a
# client's JSON carries it, on both databases alike. A number literal beyond a double (1e400)
# or so small it would be read as 0 (1e-400) is refused (422) where it is, instead of being
# stored as something the client did not send. Both are rare, so the common path costs two
# byte searches; the exact work runs only when one of them finds something.
_NUL_ESCAPE = b"\\u0000"
# A number literal (right after `:`, `[` or `,`) that could be read as 0 though it is not:
# a negative exponent of two digits or more, or 250 zeros after the point (0.000...1 with
# an exponent of one digit needs over 310 to reach 0).
_SUSPECT_NUMBER = re.compile(rb"[:\[,]\s*-?(?:0\.0{250}|[0-9.]+[eE]-0*[1-9][0-9])")
_OUT_OF_RANGE = "number is infinity"


class _Unrepresentable:
    """Stands for a number literal that has no double (`json` hooks below)."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def load_json(data: bytes | str, root: str = "$") -> Any:
    """`orjson.loads`, then: a NUL anywhere (a key or a string) is a 400, and a number
    literal that does not fit a double (1e400, or a non-zero 1e-400 read as 0) a 422, each
    with the `expression` of where it is (from the document's `resourceType`, else `root`).
    Raises orjson.JSONDecodeError for what is not JSON."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if _OUT_OF_RANGE not in str(exc):
            raise
        value = _unrepresentable_numbers(raw, root)
        if value is None:
            raise
    if _NUL_ESCAPE in raw:
        for path, text in _strings(value, _root(value, root)):
            if "\x00" in text:
                raise BadRequest(
                    "Text cannot contain the NUL character (\\u0000); remove it",
                    expression=[path],
                )
    if _SUSPECT_NUMBER.search(raw):
        _unrepresentable_numbers(raw, root)
    return value


def _root(value: Any, root: str) -> str:
    resource_type = value.get("resourceType") if isinstance(value, dict) else None
    if isinstance(resource_type, str) and resource_type.isidentifier():
        return resource_type
    return root


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every key and string of a parsed JSON value, with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}"
            yield here, key
            yield from _strings(item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def _number(literal: str) -> float | _Unrepresentable:
    number = float(literal)
    mantissa = literal.lower().partition("e")[0]
    if math.isinf(number) or (number == 0 and mantissa.strip("-+.0")):
        return _Unrepresentable(literal)
    return number


def _integer(literal: str) -> int | _Unrepresentable:
    # orjson reads a long integer as a double; past a double's range it has none (and past
    # 4,300 digits Python refuses to read it at all).
    if len(literal) > 400:
        return _Unrepresentable(literal)
    number = int(literal)
    return number if abs(number) <= sys.float_info.max else _Unrepresentable(literal)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unrepresentable_numbers(raw: bytes, root: str) -> Any:
    """Read `raw` again with the standard library, whose hooks see each number literal as
    written; raise a 422 at the first one that has no double. Returns the value (None when
    the standard library cannot read it either)."""
    try:
        value = json.loads(
            raw,
            parse_float=_number,
            parse_int=_integer,
            parse_constant=_reject_constant,
        )
    except ValueError:
        return None
    found = _first_unrepresentable(value, _root(value, root))
    if found is not None:
        path, literal = found
        shown = literal if len(literal) <= 40 else literal[:37] + "..."
        raise Unprocessable(
            f"The number {shown} cannot be stored: it is beyond the range of a double "
            "(about 1e-308 to 1e308 in size, or 0)",
            issues=[Issue("value", f"The number {shown} is out of range", [path])],
        )
    return value


def _first_unrepresentable(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, _Unrepresentable):
        return path, value.literal
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    for here, item in items:
        found = _first_unrepresentable(item, here)
        if found is not None:
            return found
    return None


def check_resource_type(raw: dict[str, Any], expected: str) -> None:
    actual = raw.get("resourceType")
    if actual is None:
        raise BadRequest(
            f"The resource has no resourceType; expected {expected!r}",
            expression=[f"{expected}.resourceType"],
        )
    if actual != expected:
        raise BadRequest(
            f"resourceType {actual!r} does not match the endpoint's type {expected!r}",
            expression=[f"{expected}.resourceType"],
        )


def validate(raw: dict[str, Any], resource_type: str) -> Accepted:
    """Validate a parsed body as an R4B resource of `resource_type` or raise 400/422."""
    check_resource_type(raw, resource_type)
    model_class = RESOURCE_CLASSES[resource_type]
    issues: list[Issue] = []
    if "contained" in raw:
        # The trial profile takes no contained resources (README, "What is refused"): each
        # record is stored, searched, audited and referenced on its own, which a contained
        # one is not.
        issues.append(
            Issue(
                "not-supported",
                "Contained resources are not accepted by the trial profile: store the "
                "resource on its own and reference it",
                [f"{resource_type}.contained"],
            )
        )
    _check(raw, model_class, resource_type, issues, top=True)
    try:
        model = model_class.model_validate(raw)
    except ValidationError as exc:
        # Where this module has said what is wrong, fhir.resources' own words about the same
        # element ("DateTime value string does not match spec regex") only blur it.
        said = {path for issue in issues for path in issue.expression}
        issues.extend(
            issue
            for issue in _pydantic_issues(exc, resource_type)
            if not said.intersection(issue.expression)
        )
        model = None
    if issues or model is None:
        raise Unprocessable(_summary(issues), issues=_dedupe(issues))
    return Accepted(raw=raw, model=model)


def _summary(issues: list[Issue]) -> str:
    first = issues[0]
    where = f" at {first.expression[0]}" if first.expression else ""
    more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
    return f"Invalid resource: {first.diagnostics}{where}{more}"


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen: set[tuple[str, tuple[str, ...]]] = set()
    unique = []
    for issue in issues:
        key = (issue.diagnostics, tuple(issue.expression))
        if key not in seen:
            seen.add(key)
            unique.append(issue)
    return unique


def _pydantic_issues(exc: ValidationError, resource_type: str) -> list[Issue]:
    issues = []
    for error in exc.errors(include_url=False):
        path = resource_type
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part != "__root__":
                name = str(part)
                if name.endswith("__ext"):
                    name = "_" + name[: -len("__ext")]
                path += f".{name}"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "Unknown element (not part of this R4B resource)"
        issues.append(
            Issue("structure" if error["type"] == "extra_forbidden" else "value", message, [path])
        )
    return issues


# --- the walk over raw JSON -------------------------------------------------------------


def _check(
    node: dict[str, Any],
    model: type[FHIRAbstractModel],
    path: str,
    issues: list[Issue],
    *,
    top: bool = False,
) -> None:
    specs = _field_specs(model)
    if not node and not top:
        issues.append(Issue("required", "An element must have a value or children", [path]))
    for key, value in node.items():
        if top and key == "resourceType":
            continue
        here = f"{path}.{key}"
        if value is None:
            issues.append(Issue("required", "null is not allowed in FHIR JSON", [here]))
            continue
        spec = specs.get(key)
        if spec is None:
            continue  # fhir.resources reports unknown elements
        if key.startswith("_"):
            _check_primitive_extension(value, here, issues)
            continue
        if isinstance(value, list):
            if not spec.is_list:
                continue  # fhir.resources reports the cardinality error
            _check_items(value, spec, model, here, issues)
        else:
            node[key] = value = _integral(value, spec)
            _check_value(value, spec, model, here, issues)


def _check_items(
    items: list[Any],
    spec: _FieldSpec,
    model: type[FHIRAbstractModel],
    path: str,
    issues: list[Issue],
) -> None:
    """The items of an array element, each checked as `path[index]`."""
    if not items:
        issues.append(Issue("required", "An array must not be empty", [path]))
    for index, item in enumerate(items):
        item_path = f"{path}[{index}]"
        if item is None:
            issues.append(Issue("required", "null is not allowed in FHIR JSON", [item_path]))
        else:
            items[index] = item = _integral(item, spec)
            _check_value(item, spec, model, item_path, issues)


_INTEGER_PRIMITIVES = frozenset({"integer", "positiveInt", "unsignedInt", "integer64"})


def _integral(value: Any, spec: _FieldSpec) -> Any:
    """A whole number written with a fraction (`2.0`) where FHIR wants an integer, as the
    integer it is, stored and answered so. JSON Schema's `integer` (the OpenAPI file's)
    takes it, and a client that serialises numbers as doubles sends it; any other fraction
    is still refused."""
    if spec.primitive in _INTEGER_PRIMITIVES and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_primitive_extension(value: Any, path: str, issues: list[Issue]) -> None:
    # `_given: [null, {...}]` is the one place FHIR JSON allows null (aligned arrays).
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict) and not item:
            issues.append(Issue("required", "An element must have a value or children", [path]))


def _check_value(
    value: Any, spec: _FieldSpec, owner: type[FHIRAbstractModel], path: str, issues: list[Issue]
) -> None:
    if spec.model is not None:
        if isinstance(value, dict):
            _check(value, spec.model, path, issues)
        return
    problem = _primitive_problem(value, spec)
    if problem is not None:
        issues.append(Issue("value", problem, [path]))
        return
    if (
        isinstance(value, str)
        and len(value) > MAX_INDEXED_STRING
        and spec.name in _INDEXED_STRINGS.get(owner.__name__, ())
    ):
        issues.append(
            Issue(
                "too-long",
                f"At most {MAX_INDEXED_STRING} characters (a value the server indexes for "
                f"search), not {len(value)}",
                [path],
            )
        )
        return
    codes = _REQUIRED_CODES.get((owner.__name__, spec.name), spec.codes)
    if codes is not None and isinstance(value, str) and value not in codes:
        allowed = ", ".join(sorted(codes))
        issues.append(
            Issue("code-invalid", f"{value!r} is not in the required value set ({allowed})", [path])
        )


def _primitive_problem(value: Any, spec: _FieldSpec) -> str | None:
    primitive = spec.primitive
    if primitive is None:
        return None
    if primitive == "boolean":
        return None if isinstance(value, bool) else "A boolean must be JSON true or false"
    if primitive in _INTEGER_PRIMITIVES:
        return _integer_problem(value, primitive)
    if primitive == "decimal":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return None if number else "A decimal must be a JSON number"
    if not isinstance(value, str):
        return f"A FHIR {primitive} must be a JSON string"
    if value == "":
        return "An empty string is not a FHIR value"
    return _string_problem(value, primitive)


def _integer_problem(value: Any, primitive: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"A FHIR {primitive} must be a JSON integer"
    if primitive == "positiveInt" and value < 1:
        return "A positiveInt must be 1 or more"
    if primitive == "unsignedInt" and value < 0:
        return "An unsignedInt must be 0 or more"
    return None


_DATE_PRIMITIVES = frozenset({"date", "dateTime", "instant"})
_URI_PRIMITIVES = frozenset({"uri", "url", "canonical", "oid", "uuid"})


def _string_problem(value: str, primitive: str) -> str | None:
    """What makes a non-empty string no value of the string-based `primitive`."""
    if primitive in _DATE_PRIMITIVES:
        return date_problem(value, primitive)
    if primitive in _URI_PRIMITIVES and any(c.isspace() for c in value):
        return f"A FHIR {primitive} must not contain white space"
    if primitive in ("string", "markdown") and not _STRING_RE.fullmatch(value):
        return f"A FHIR {primitive} has no white space but space, CR, LF and tab"
    if primitive == "code" and not _CODE_RE.fullmatch(value):
        return "A code must not have leading, trailing or repeated white space"
    if primitive == "id" and not _ID_RE.fullmatch(value):
        return "An id is 1-64 of A-Z, a-z, 0-9, '-' and '.'"
    return None


# --- field specifications derived from the fhir.resources classes -----------------------

_PRIMITIVE_MARKERS: tuple[tuple[type, str], ...] = (
    (fhir_types.Instant, "instant"),
    (fhir_types.DateTime, "dateTime"),
    (fhir_types.Date, "date"),
    (fhir_types.Time, "time"),
    (fhir_types.Code, "code"),
    (fhir_types.Id, "id"),
    (fhir_types.Canonical, "canonical"),
    (fhir_types.Url, "url"),
    (fhir_types.Oid, "oid"),
    (fhir_types.Uuid, "uuid"),
    (fhir_types.Uri, "uri"),
    (fhir_types.Markdown, "markdown"),
    (fhir_types.Base64Binary, "base64Binary"),
    (fhir_types.PositiveInt, "positiveInt"),
    (fhir_types.UnsignedInt, "unsignedInt"),
    (fhir_types.Integer64, "integer64"),
    (fhir_types.Integer, "integer"),
    (fhir_types.Decimal, "decimal"),
    (fhir_types.String, "string"),
)


@cache
def _field_specs(model: type[FHIRAbstractModel]) -> dict[str, _FieldSpec]:
    specs: dict[str, _FieldSpec] = {}
    for name, info in model.model_fields.items():
        if name == "fhir_comments" or info.alias is None:
            continue
        annotation, is_list = _unwrap(info.annotation)
        element_model = None
        primitive = None
        if hasattr(annotation, "get_model_klass"):
            klass = annotation.get_model_klass()
            # `contained` holds any resource; its own resourceType decides what it is.
            if klass.__name__ != "Resource":
                element_model = klass
        elif typing.get_origin(annotation) is typing.Annotated:
            base, *metadata = typing.get_args(annotation)
            primitive = _primitive_name(metadata, base)
        elif annotation is bool:
            primitive = "boolean"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        enum = extra.get("enum_values")
        codes = None
        if isinstance(enum, list) and "+" not in enum and "etc." not in enum:
            codes = frozenset(str(code) for code in enum)
        specs[info.alias] = _FieldSpec(name, is_list, element_model, primitive, codes)
    return specs


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        elif origin in (list, typing.List):  # noqa: UP006
            is_list = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, is_list


def _primitive_name(metadata: list[Any], base: Any) -> str | None:
    for marker in metadata:
        for marker_type, name in _PRIMITIVE_MARKERS:
            if isinstance(marker, marker_type):
                return name
    if base is bool:
        return "boolean"
    return None
