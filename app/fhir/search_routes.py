"""The search interactions of the four trial resources: `GET /fhir/Type?...` and
`POST /fhir/Type/_search` (form-encoded, for clients that keep criteria out of URLs), both
answered with a keyset-paged searchset Bundle.

The parameters are documented in the OpenAPI file from `SEARCH_PARAMETERS`, each with a
schema no wider than what the parser accepts (the date pattern leaves out 29 February and
later days, which not every year has), so a generated client or a fuzzer that follows the
document is not refused; only `_cursor` must come from a next link.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request, Response

from app.auth.deps import Require
from app.auth.permissions import Action
from app.fhir import bundles
from app.fhir.deps import RESOURCE_TYPES, Call, SettingsDep, call_of, fhir_base
from app.fhir.elements import subset
from app.fhir.http import FhirResponse, media_type, negotiate, prefer_strict, pretty
from app.fhir.openapi_docs import ERRORS, bundle_doc, outcome_doc
from app.fhir.search_schema import NO_NUL, value_schema
from app.kit.errors import BadRequest, Issue, UnsupportedMediaType
from app.services import search as service
from app.services.search_params import (
    INCLUDES,
    REVINCLUDES,
    SEARCH_PARAMETERS,
    SORT_KEYS,
    SUMMARY_MODES,
    TOTAL_MODES,
    ParsedSearch,
    encode_cursor,
    parse_search,
    search_request,
)
from app.settings import Settings

FORM = "application/x-www-form-urlencoded"
# A form can carry at most this many fields: more is no search anyone means.
MAX_FORM_FIELDS = 1000

router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)])


async def _run_search(
    call: Call, settings: Settings, resource_type: str, params: Sequence[tuple[str, str]]
) -> Response:
    request = call.request
    parsed = parse_search(
        resource_type,
        params,
        default_count=settings.default_page_size,
        max_count=settings.max_page_size,
        strict=prefer_strict(request),
    )
    result = await service.search(
        call.ctx, search_request(parsed, params, settings.max_page_size), call.principal
    )
    text = render_searchset(fhir_base(request), parsed, params, result, settings.max_page_size)
    return pretty(request, text)


def render_searchset(
    base: str,
    parsed: ParsedSearch,
    params: Sequence[tuple[str, str]],
    result: service.SearchResult,
    max_page_size: int,
) -> str:
    """The searchset Bundle of one page (also an entry of a Bundle's response), of the
    search `params` asked for, as parsed."""
    resource_type = parsed.criteria.resource_type
    next_params = None
    if result.more and result.hits:
        next_params = [*parsed.applied, ("_cursor", encode_cursor(*result.hits[-1].key))]
        if "_count" not in dict(parsed.applied):
            next_params.insert(-1, ("_count", str(parsed.count)))
    warnings = list(parsed.warnings)
    if result.included_truncated:
        warnings.append(
            Issue(
                "too-costly",
                f"More than {max_page_size} resources were to be included; only the "
                f"first {max_page_size} are: ask for smaller pages (_count)",
                severity="warning",
            )
        )
    page = [
        replace(
            hit.stored,
            content=subset(
                hit.stored.content or "",
                resource_type,
                elements=parsed.elements,
                summary=parsed.summary,
            ),
        )
        for hit in result.hits
    ]
    contents = bundles.SearchPage(page, result.included, warnings, result.total)
    return bundles.searchset(
        base, resource_type, contents, self_params=params, next_params=next_params
    )


async def _form_parameters(request: Request) -> list[tuple[str, str]]:
    body = await request.body()
    content_type = request.headers.get("content-type")
    if content_type is None and not body:
        return []
    if media_type(content_type) != FORM:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not supported for _search; send {FORM}"
        )
    try:
        return parse_qsl(
            body.decode(),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError as exc:  # not UTF-8 (raw or percent-encoded), or too many fields
        raise BadRequest(f"The form body is not a valid {FORM} search: {exc}") from None


# --- OpenAPI documentation ------------------------------------------------------------

_NUL_FREE = {"pattern": NO_NUL["pattern"]}
# A form field as any value a client library turns into form text (a number as its digits,
# a list as repeated fields, a mapping as its keys, null as "null"): no `type`, only no NUL
# wherever one reaches the wire. Nested lists and mappings reach it as their items and keys;
# one level further down, they are written as their repr, which escapes a NUL.
_ANY_TEXT_WITHOUT_NUL: dict[str, Any] = {
    **_NUL_FREE,
    "propertyNames": _NUL_FREE,
    "items": {**_NUL_FREE, "propertyNames": _NUL_FREE, "items": _NUL_FREE},
}
# What becomes no field at all (an empty list or mapping; null is sent as the text "null"):
# the only value a field whose name holds a NUL can have, since the server refuses a NUL in
# a name it receives.
_SENDS_NOTHING: dict[str, Any] = {
    "anyOf": [
        {"type": "array", "maxItems": 0},
        {"type": "object", "maxProperties": 0},
    ]
}


def _controls(resource_type: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The result parameters: name -> (description, schema). An empty _sort or _elements is
    ignored, as any empty search parameter, so their patterns admit it; the integer and the
    enumerations admit no empty value, and the server refuses one."""
    keys = "|".join(re.escape(key) for key in SORT_KEYS[resource_type])
    controls: dict[str, tuple[str, dict[str, Any]]] = {
        "_count": (
            "Page size; 0: only Bundle.total, as _summary=count. Once at most, as every "
            "result parameter but _include and _revinclude (a repeat is a 400)",
            {"type": "integer", "minimum": 0},
        ),
        "_cursor": (
            "Opaque paging cursor from a next link",
            {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
        ),
        "_sort": (
            "Sort keys, comma-separated, - for descending: "
            + ", ".join(SORT_KEYS[resource_type])
            + " (the date is the clinical time; for a Patient the birth date)",
            {"type": "string", "pattern": f"^(-?({keys})(,-?({keys}))*)?$"},
        ),
        "_total": (
            "accurate: Bundle.total counts every match (estimate is answered accurately); "
            "none (default): no total",
            {"type": "string", "enum": list(TOTAL_MODES)},
        ),
        "_summary": (
            "count: only Bundle.total; true, text, data: summary elements, text only, "
            "everything but text (marked SUBSETTED); false: everything",
            {"type": "string", "enum": list(SUMMARY_MODES)},
        ),
        "_elements": (
            "Only these top-level elements (and the mandatory ones), marked SUBSETTED",
            {"type": "string", "pattern": "^([A-Za-z][A-Za-z0-9]*(,[A-Za-z][A-Za-z0-9]*)*)?$"},
        ),
    }
    if INCLUDES[resource_type]:
        controls["_include"] = (
            "Also return the subject Patients (search.mode=include)",
            {"type": "array", "items": {"type": "string", "enum": list(INCLUDES[resource_type])}},
        )
    if REVINCLUDES.get(resource_type):
        controls["_revinclude"] = (
            "Also return the records of the matched Patients (search.mode=include)",
            {
                "type": "array",
                "items": {"type": "string", "enum": list(REVINCLUDES[resource_type])},
            },
        )
    return controls


_MODIFIERS_DOC = (
    " Modifiers: token :not :missing; string :exact :contains :missing; others :missing."
    " Comma-separated values are OR-ed, repeated parameters AND-ed."
)


def query_parameters(resource_type: str) -> list[dict[str, Any]]:
    parameters = [
        {
            "name": declared.name,
            "in": "query",
            "required": False,
            "description": declared.documentation,
            "schema": value_schema(resource_type, declared.name),
        }
        for declared in SEARCH_PARAMETERS[resource_type]
    ]
    for name, (description, schema) in _controls(resource_type).items():
        parameter = {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": schema,
        }
        if schema["type"] == "array":
            parameter.update(style="form", explode=True)
        parameters.append(parameter)
    return parameters


def form_body(resource_type: str) -> dict[str, Any]:
    properties = {
        declared.name: {
            **value_schema(resource_type, declared.name),
            "description": declared.documentation,
        }
        for declared in SEARCH_PARAMETERS[resource_type]
    }
    for name, (description, schema) in _controls(resource_type).items():
        properties[name] = {**schema, "description": description}
    encoding = {
        name: {"style": "form", "explode": True}
        for name, schema in properties.items()
        if schema["type"] == "array"
    }
    schema = {
        "type": "object",
        "properties": properties,
        # The server refuses a NUL anywhere in a field, its name included.
        "patternProperties": {"\\u0000": _SENDS_NOTHING},
        # Modifiers and chains (code:not, subject:Patient.identifier, ...) as more fields,
        # ignored with a warning when unknown; a form carries text only (see above).
        "additionalProperties": _ANY_TEXT_WITHOUT_NUL,
    }
    content: dict[str, Any] = {"schema": schema}
    if encoding:
        content["encoding"] = encoding
    return {"requestBody": {"required": False, "content": {FORM: content}}}


# --- routes -------------------------------------------------------------------------------


def _register(resource_type: str) -> None:
    tags: list[str | Any] = [resource_type]
    responses: dict[int | str, dict[str, Any]] = {
        200: bundle_doc("searchset Bundle"),
        **ERRORS,
    }
    summary = f"Search {resource_type} resources (keyset-paged searchset Bundle)"
    caller = Depends(call_of(Require(resource_type, Action.SEARCH)))

    @router.get(
        f"/{resource_type}",
        operation_id=f"search{resource_type}",
        summary=summary,
        description=_MODIFIERS_DOC.strip(),
        tags=tags,
        response_class=FhirResponse,
        openapi_extra={"parameters": query_parameters(resource_type)},
        responses=responses,
    )
    async def search(*, call: Call = caller, settings: SettingsDep) -> Response:
        params = call.request.query_params.multi_items()
        return await _run_search(call, settings, resource_type, params)

    @router.post(
        f"/{resource_type}/_search",
        operation_id=f"search{resource_type}Post",
        summary=summary + ", criteria in a form body",
        description="The parameters of the GET search, form-encoded (they may also be in "
        "the URL; both apply). Next links are GET URLs." + _MODIFIERS_DOC,
        tags=tags,
        response_class=FhirResponse,
        openapi_extra=form_body(resource_type),
        responses={**responses, 415: outcome_doc(f"The body is not {FORM}")},
    )
    async def search_post(*, call: Call = caller, settings: SettingsDep) -> Response:
        request = call.request
        params = [*request.query_params.multi_items(), *await _form_parameters(request)]
        return await _run_search(call, settings, resource_type, params)


for _resource_type in RESOURCE_TYPES:
    _register(_resource_type)
