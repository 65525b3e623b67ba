"""`_elements` and `_summary`: a resource cut down to some of its elements, marked SUBSETTED.

Which elements are summary, mandatory or a choice (`value[x]`) comes from the R4B models of
fhir.resources, the same definitions the server validates with. Mandatory elements are
always kept (FHIR: servers SHOULD return them), so a subsetted resource still parses.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel

from app.fhir import schemas

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Subsetted",
}
_ALWAYS = frozenset({"resourceType", "id", "meta"})


@cache
def documented_required(resource_type: str) -> frozenset[str]:
    """The elements the OpenAPI schema of `resource_type` requires: R4B's mandatory ones and
    the trial profile's (fhir-profile.md: a Patient's site, a record's subject). A subsetted
    resource keeps them, so it still matches its schema."""
    model = getattr(schemas, resource_type)
    return frozenset(
        info.alias or name for name, info in model.model_fields.items() if info.is_required()
    )


@dataclass(frozen=True)
class _Element:
    summary: bool
    required: bool
    choice: str | None  # `value` for valueQuantity, valueInteger, ...
    model: type[FHIRAbstractModel] | None  # a complex element's own definition


@cache
def _elements(model: type[FHIRAbstractModel]) -> dict[str, _Element]:
    """JSON key -> what the definition says of it."""
    elements = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        key = info.alias or name
        if key.startswith("_") or key == "fhir_comments":
            continue  # a primitive's extensions travel with the primitive (see `_base`)
        elements[key] = _Element(
            summary=bool(extra.get("summary_element_property")),
            required=info.is_required()
            or bool(extra.get("element_required"))
            or bool(extra.get("one_of_many_required")),
            choice=typing.cast(str | None, extra.get("one_of_many")),
            model=_complex_model(info.annotation),
        )
    return elements


def _complex_model(annotation: Any) -> type[FHIRAbstractModel] | None:
    """The model of a complex element (through Optional and List), or None for primitives."""
    if hasattr(annotation, "get_model_klass"):
        klass: type[FHIRAbstractModel] = annotation.get_model_klass()
        return klass
    for argument in typing.get_args(annotation):
        found = _complex_model(argument)
        if found is not None:
            return found
    return None


def _base(key: str) -> str:
    return key[1:] if key.startswith("_") else key


def _summary(value: Any, model: type[FHIRAbstractModel]) -> Any:
    """Only the summary and mandatory elements, at every level."""
    if isinstance(value, list):
        return [_summary(item, model) for item in value]
    if not isinstance(value, dict):
        return value
    elements = _elements(model)
    kept = {}
    for key, item in value.items():
        element = elements.get(_base(key))
        if key == "resourceType":
            kept[key] = item
        elif element is not None and (element.summary or element.required):
            kept[key] = _summary(item, element.model) if element.model else item
    return kept


def _top_level(
    document: dict[str, Any], model: type[FHIRAbstractModel], wanted: frozenset[str]
) -> dict[str, Any]:
    """The elements named in `wanted` (a choice by its name: `value`), and the mandatory."""
    elements = _elements(model)
    kept = {}
    for key, item in document.items():
        element = elements.get(_base(key))
        if (
            key in _ALWAYS
            or _base(key) in wanted
            or (element is not None and (element.required or element.choice in wanted))
        ):
            kept[key] = item
    return kept


def subset(
    content: str, resource_type: str, *, elements: tuple[str, ...] | None, summary: str | None
) -> str:
    """The resource as `_elements` or `_summary` (true, text, data) asks for it."""
    if elements is None and summary not in ("true", "text", "data"):
        return content
    original = orjson.loads(content)
    model = get_fhir_model_class(resource_type)
    if elements is not None:
        document = _top_level(original, model, frozenset(elements))
    elif summary == "true":
        document = _summary(original, model)
    elif summary == "text":
        document = _top_level(original, model, frozenset({"text"}))
    else:  # data
        document = {key: item for key, item in original.items() if key != "text"}
    for key in documented_required(resource_type):
        if key in original and key not in document:
            document[key] = original[key]
    meta = document.setdefault("meta", {})
    meta["tag"] = [*meta.get("tag", ()), SUBSETTED]
    return orjson.dumps(document).decode()
