"""The FHIR REST routes of the four trial resources, registered one set per type so each
operation has a stable operation id, a tag and typed documentation in the OpenAPI file.

Handlers stay thin: negotiate, call one service function, shape the HTTP answer. Bodies are
read raw and validated once by the service (a pydantic body parameter would validate twice
and cost ~2x on the hot path); the schemas in `app.fhir.schemas` only document them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from app.auth.deps import Require
from app.auth.permissions import Action, authorize
from app.auth.principal import Principal
from app.errors import BadRequest
from app.fhir import bundles, conditional, schemas
from app.fhir.examples import RESOURCE_EXAMPLES
from app.fhir.http import (
    FHIR_JSON,
    FhirResponse,
    negotiate,
    prefer_return,
    pretty,
    require_json_body,
    version_headers,
)
from app.fhir.outcome import information
from app.services import resources as service
from app.services.context import ServiceContext
from app.services.dates import DATE_TIME_PATTERN, fhir_range
from app.services.patching import (
    JSON_PATCH,
    MERGE_PATCH,
    POINTER_PATTERN,
    parse_patch,
)
from app.services.resources import Stored
from app.settings import Settings

RESOURCE_TYPES = ("Patient", "Observation", "MedicationAdministration", "AdverseEvent")
ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"


# `async` though they never await: they read app.state only, and FastAPI runs a sync
# dependency in its thread pool (two thread hops per request, bench/README.md).
async def get_services(request: Request) -> ServiceContext:
    services: ServiceContext = request.app.state.services
    return services


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServicesDep = Annotated[ServiceContext, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
IdPath = Annotated[str, Path(pattern=ID_PATTERN, description="Logical id")]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='Version the change applies to, e.g. W/"3"',
        pattern=r'^(W/)?"?[0-9]{1,9}"?$',
    ),
]
# What the server accepts, documented so a generated client and a fuzzer know it.
# A FHIR date or dateTime; the year as FHIR writes it (0001-9999: there is no year 0000).
Since = Annotated[
    str | None,
    Query(
        alias="_since",
        description="Only versions written at or after this FHIR instant or date",
        pattern=f"^{DATE_TIME_PATTERN}$",
    ),
]
# A history cursor is the position of the last version shown: its lastUpdated (microseconds
# since 1970, UTC), id and version, which every page is ordered by. Every string that matches
# the pattern is a position, so none is refused: the next page starts after it.
HISTORY_CURSOR_PATTERN = r"^[0-9]{1,17}~[A-Za-z0-9\-.]{1,64}~[0-9]{1,9}$"
HistoryCursor = Annotated[
    str | None,
    Query(
        alias="_cursor",
        description="Paging position from a next link: lastUpdated (µs since 1970)~id~version",
        pattern=HISTORY_CURSOR_PATTERN,
    ),
]
# X-Provenance carries a Provenance resource as JSON (FHIR http.html#provenance). A header is
# a string: the pattern and length say which strings the server takes (printable ASCII with
# something visible, at most PROVENANCE_MAX_LENGTH), and contentMediaType/contentSchema
# (JSON Schema 2020-12, OpenAPI 3.1) what that string must decode to. Anything else is a 400.
PROVENANCE_MAX_LENGTH = 8000
PROVENANCE_PATTERN = r"^[ -~]*[!-~][ -~]*$"
_PROVENANCE_DESCRIPTION = (
    "Reason for change: a Provenance resource in JSON whose reason (a text or a coding) says "
    'why, e.g. {"resourceType":"Provenance","reason":[{"text":"transcription error"}]}; '
    "characters outside ASCII as JSON \\u escapes. The server completes it (target = the "
    "version written, recorded, the signer) and stores it."
)
# What an X-Provenance must decode to, in components (a model for generated clients).
PROVENANCE_HEADER_SCHEMA_NAME = "ProvenanceHeader"
PROVENANCE_HEADER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "reason"],
    "properties": {
        "resourceType": {"const": "Provenance"},
        "reason": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "pattern": "\\S"},
                    "coding": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "system": {"type": "string"},
                                "code": {"type": "string", "minLength": 1},
                                "display": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
    "description": "At least one reason has a text with a visible character or a "
    "coding with a code. Other elements of an R4B Provenance are kept as sent, except "
    "id, meta, target and recorded, which the server sets.",
}
_PROVENANCE_CONTENT: dict[str, Any] = {
    "contentMediaType": "application/json",
    "contentSchema": {"$ref": f"#/components/schemas/{PROVENANCE_HEADER_SCHEMA_NAME}"},
}


def _provenance_header(description: str) -> Any:
    return Header(
        alias="X-Provenance",
        description=description,
        pattern=PROVENANCE_PATTERN,
        max_length=PROVENANCE_MAX_LENGTH,
        json_schema_extra=_PROVENANCE_CONTENT,
    )


# Every update, patch and delete needs it, whatever it finds: required on those operations.
XProvenance = Annotated[str, _provenance_header(_PROVENANCE_DESCRIPTION)]
# A Bundle needs it only when an entry is a PUT, PATCH or DELETE.
OptionalXProvenance = Annotated[
    str | None,
    _provenance_header(
        "Required when an entry is a PUT, PATCH or DELETE (the reason applies to each). "
        + _PROVENANCE_DESCRIPTION
    ),
]
Prefer = Annotated[
    str | None,
    Header(
        alias="Prefer",
        description="return=minimal | return=representation | return=OperationOutcome; "
        "other preferences are ignored (RFC 7240)",
        pattern=r"^[\t -~]*$",
    ),
]


class _FhirIdConvertor(Convertor[str]):
    """Only a FHIR id matches a resource's path, so `/Patient/_history` or `/Patient/_search`
    never reach read/update/delete as an id: an unsupported method there is a 405."""

    regex = ID_PATTERN.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fhirid", _FhirIdConvertor())
router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)])


def fhir_base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _bundle_doc(description: str) -> dict[str, Any]:
    return {"model": schemas.Bundle, "content": {FHIR_JSON: {}}, "description": description}


def _outcome_doc(description: str) -> dict[str, Any]:
    """An error's documentation on a route whose response class is FhirResponse: FastAPI
    puts the model under that class's media type, application/fhir+json."""
    return {
        "model": schemas.OperationOutcome,
        "description": description,
        "content": {FHIR_JSON: {}},
    }


def outcome_docs(docs: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """The same errors for a route whose success is another media type (application/json):
    there FastAPI would document the model as application/json, which errors never are;
    they are application/fhir+json, named here by reference (the component exists: the
    FhirResponse routes' `model` registers it)."""
    outcome = {"$ref": "#/components/schemas/OperationOutcome"}
    return {
        code: {"description": doc["description"], "content": {FHIR_JSON: {"schema": outcome}}}
        for code, doc in docs.items()
    }


UNAVAILABLE = (
    "The database is unavailable (down, starting, out of connections; issue code `transient`): "
    "retry after `Retry-After` seconds. A write may or may not have been applied: retry it "
    "as a conditional create (If-None-Exist) or a conditional update"
)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: _outcome_doc("Malformed request (bad JSON, type or id mismatch, bad parameter)"),
    401: _outcome_doc("No valid bearer token (see WWW-Authenticate)"),
    403: _outcome_doc("The caller's role, scopes or sites do not allow this"),
    404: _outcome_doc("No such resource"),
    406: _outcome_doc("Only JSON can be produced"),
    500: _outcome_doc("Unexpected error; the outcome carries a correlation id"),
    503: _outcome_doc(UNAVAILABLE),
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: _outcome_doc(
        "Conflict with the current state, e.g. a Patient's subject number is enrolled "
        "already (the outcome names that Patient)"
    ),
    412: _outcome_doc("If-Match is stale, or a conditional create matched several"),
    415: _outcome_doc("Body is not application/fhir+json or application/json"),
    422: _outcome_doc(
        "Not an acceptable resource of this profile, or a value out of its limits (a platelet "
        "count, a WHO grade, a subject number, a string the server indexes); `expression` "
        "names the element"
    ),
}
_VERSION_HEADERS = {
    "ETag": {"description": 'Version, e.g. W/"1"', "schema": {"type": "string"}},
    "Last-Modified": {"description": "HTTP date of the version", "schema": {"type": "string"}},
}
_LOCATION_HEADER = {
    "Location": {"description": "/fhir/Type/id/_history/version", "schema": {"type": "string"}},
}


def _resource_response(
    request: Request,
    stored: Stored,
    status_code: int = 200,
    extra_headers: dict[str, str] | None = None,
) -> Response:
    headers = version_headers(stored.version_id, stored.last_updated)
    headers.update(extra_headers or {})
    choice = prefer_return(request)
    if choice == "minimal" and request.method in _WRITE_METHODS:
        return Response(status_code=status_code, headers=headers)
    if choice == "OperationOutcome" and request.method in _WRITE_METHODS:
        verb = "Created" if status_code == 201 else "Stored"
        message = f"{verb} {stored.resource_type}/{stored.id} version {stored.version_id}"
        return FhirResponse(information(message), status_code=status_code, headers=headers)
    assert stored.content is not None
    return pretty(request, stored.content, headers, status_code)


_WRITE_METHODS = ("POST", "PUT", "PATCH")


def _location(stored: Stored) -> dict[str, str]:
    return {"Location": f"/fhir/{stored.resource_type}/{stored.id}/_history/{stored.version_id}"}


def _body_doc(resource_type: str, *, update: bool = False, example: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{resource_type}"}
    body: dict[str, Any] = {"schema": schema}
    if update:
        # An update names its resource twice, in the URL and in the body (FHIR http.html#update).
        body["schema"] = {**schema, "required": ["id"]}
    if example:
        body["examples"] = {
            resource_type: {
                "summary": f"A {resource_type} as the trial writes it",
                "value": RESOURCE_EXAMPLES[resource_type],
            }
        }
    return {"requestBody": {"required": True, "content": {FHIR_JSON: body}}}


def _links(
    resource_type: str, state: str, resource_id: str, operations: tuple[str, ...]
) -> dict[str, Any]:
    """OpenAPI links from a response naming one resource (its id at `resource_id`, a runtime
    expression) to `operations` on it and to its history."""
    targets = [(operation, "") for operation in operations] + [("history", "Instance")]
    return {
        f"{operation.title()}{state}": {
            "operationId": f"{operation}{resource_type}{suffix}",
            "parameters": {"resource_id": resource_id},
        }
        for operation, suffix in targets
    }


def _json_patch_operation(ops: tuple[str, ...], required: list[str]) -> dict[str, Any]:
    """RFC 6902 operations that take the same members: `from` for move and copy, `value` for
    add, replace and test; the server refuses an operation without them (400)."""
    properties: dict[str, Any] = {
        "op": {"type": "string", "enum": list(ops)},
        "path": {"type": "string", "pattern": POINTER_PATTERN, "description": "JSON Pointer"},
    }
    if "from" in required:
        properties["from"] = {
            "type": "string",
            "pattern": POINTER_PATTERN,
            "description": "JSON Pointer",
        }
    if "value" in required:
        # Free-form, so no string in it can be declared NUL-free here: a schema saying so is
        # recursive, and generated clients drop an operation whose body names one.
        properties["value"] = {"description": "Any JSON value; no string in it may hold NUL"}
    return {
        "type": "object",
        "title": f"JsonPatch{''.join(op.title() for op in ops)}",
        "required": ["op", "path", *required],
        "properties": properties,
        "additionalProperties": False,
    }


_JSON_PATCH_OPERATION = {
    "description": "One RFC 6902 operation",
    "oneOf": [
        _json_patch_operation(("add", "replace", "test"), ["value"]),
        _json_patch_operation(("move", "copy"), ["from"]),
        _json_patch_operation(("remove",), []),
    ],
}


def _patch_doc(resource_type: str) -> dict[str, Any]:
    # One documented media type: with two, openapi-python-client 0.29 generates an
    # isinstance() check on list[...] that fails at run time. Merge Patch is in the text.
    return {
        "requestBody": {
            "required": True,
            "description": f"JSON Patch (RFC 6902, {JSON_PATCH}). Also accepted: JSON Merge "
            f"Patch (RFC 7386, {MERGE_PATCH}, or a JSON object sent as application/json or "
            "application/fhir+json, as fhirpy sends it; null removes an element). The result "
            f"must be a valid {resource_type} with the same id and resourceType.",
            "content": {
                JSON_PATCH: {
                    "schema": {"type": "array", "minItems": 1, "items": _JSON_PATCH_OPERATION}
                },
            },
        }
    }


def _register(resource_type: str) -> None:  # noqa: PLR0915 - one closure per interaction
    model = schemas.RESOURCE_MODELS[resource_type]

    tags: list[str | Any] = [resource_type]
    ok_resource = {"model": model, "content": {FHIR_JSON: {}}, "headers": _VERSION_HEADERS}
    # OpenAPI links: what a client (and the fuzzer's stateful phase) can do next with the
    # resource a response names. After a delete its read answers 410 and its history, which
    # FHIR keeps, shows the deletion.
    created_links = _links(resource_type, "Created", "$response.body#/id", ("read", "delete"))
    deleted_links = _links(resource_type, "Deleted", "$request.path.resource_id", ("read",))

    @router.post(
        f"/{resource_type}",
        operation_id=f"create{resource_type}",
        summary=f"Create a {resource_type}",
        tags=tags,
        description="Conditional create: criteria in If-None-Exist, or as query parameters "
        "(as fhirpy's create and get_or_create send them), not both. No match: created "
        "(201); one: returned as it is (200); several: 412.",
        status_code=201,
        response_class=FhirResponse,
        openapi_extra={
            **_body_doc(resource_type, example=True),
            "parameters": conditional.query_documentation(
                resource_type, "Conditional create criterion"
            ),
        },
        responses={
            201: {
                **ok_resource,
                "description": "Created",
                "headers": {**_VERSION_HEADERS, **_LOCATION_HEADER},
                "links": created_links,
            },
            200: {**ok_resource, "description": "The criteria matched an existing resource"},
            **_WRITE_ERRORS,
        },
    )
    async def create(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.CREATE)),
        # Header() as the default, not in Annotated: the text depends on resource_type,
        # which a postponed annotation cannot see. The pattern is documented only:
        # conditional.from_header applies it, with a message that names the parameters.
        if_none_exist: str | None = Header(  # noqa: B008 - FastAPI's parameter declaration
            None,
            alias="If-None-Exist",
            min_length=1,
            json_schema_extra={"pattern": conditional.header_pattern(resource_type)},
            description="Conditional create: token or patient criteria joined by &, e.g. "
            "identifier=sys|val; parameters: "
            + ", ".join(conditional.conditional_parameters(resource_type))
            + "; values in printable ASCII without space, %, +, & or , inside a value "
            "(commas separate OR-ed values); criteria needing other characters go in the "
            "query form",
        ),
        prefer: Prefer = None,
    ) -> Response:
        require_json_body(request)
        body = await request.body()
        criteria = key = None
        in_query = conditional.from_query(request.query_params.multi_items())
        if if_none_exist is not None or in_query:
            authorize(principal, resource_type, Action.CONDITIONAL_CREATE)
            # A match is answered with the resource: the criteria are a search.
            authorize(principal, resource_type, Action.SEARCH)
            if if_none_exist is not None and in_query:
                raise BadRequest(
                    "Conditional create criteria go in If-None-Exist or in the query, not both"
                )
            if if_none_exist is not None:
                criteria, key = conditional.from_header(resource_type, if_none_exist)
            else:
                criteria, key = conditional.criteria(resource_type, in_query, "The query")
        result = await service.create(
            ctx, resource_type, body, principal, if_none_exist=criteria, if_none_exist_key=key
        )
        if not result.created:
            return _resource_response(request, result.stored, 200)
        return _resource_response(request, result.stored, 201, _location(result.stored))

    @router.put(
        f"/{resource_type}",
        operation_id=f"conditionalUpdate{resource_type}",
        summary=f"Conditional update of a {resource_type}: the resource the criteria match",
        description="No match: the body is created (201; with an id in the body that names no "
        "resource yet, at that id). One match: it is updated (200; a body id must be its id, "
        "else 400). Several: 412. Either way the X-Provenance reason is required, as for any "
        "update, and stored with the version written. At least one "
        "criterion is required (400 without). Race-free: identical conditional requests are "
        "serialised on their criteria.",
        tags=tags,
        response_class=FhirResponse,
        openapi_extra={
            **_body_doc(resource_type),
            "parameters": conditional.query_documentation(resource_type, "Criterion"),
        },
        responses={
            200: {**ok_resource, "description": "The match was updated"},
            201: {
                **ok_resource,
                "description": "No match: created",
                "headers": {**_VERSION_HEADERS, **_LOCATION_HEADER},
            },
            **_WRITE_ERRORS,
            409: _outcome_doc(
                "No match, and the body's id names another resource; or a Patient's subject "
                "number is enrolled already"
            ),
            412: _outcome_doc("The criteria match several resources, or If-Match is stale"),
        },
    )
    async def conditional_update(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.UPDATE)),
        if_match: IfMatch = None,
        prefer: Prefer = None,
        provenance: XProvenance,
    ) -> Response:
        require_json_body(request)
        criteria, key = _criteria_in_query(request, resource_type, principal)
        result = await service.conditional_update(
            ctx,
            resource_type,
            criteria,
            key,
            await request.body(),
            principal,
            if_match=if_match,
            provenance=provenance,
        )
        if result.created:
            return _resource_response(request, result.stored, 201, _location(result.stored))
        return _resource_response(request, result.stored)

    @router.delete(
        f"/{resource_type}",
        operation_id=f"conditionalDelete{resource_type}",
        summary=f"Conditional delete of the one {resource_type} the criteria match",
        description="One match: deleted. None: nothing to do (204). Several: 412, nothing "
        "deleted (single conditional delete). The X-Provenance reason is required whichever "
        "happens, as for any delete. At least one criterion is required: without, 400 (never "
        "a delete of every resource).",
        tags=tags,
        status_code=204,
        # For the documentation: the 200 (Prefer: return=OperationOutcome) and every error
        # are application/fhir+json; a 204 has no body.
        response_class=FhirResponse,
        openapi_extra={
            "parameters": conditional.query_documentation(resource_type, "Criterion"),
        },
        responses={
            204: {
                "description": "Deleted, or nothing matched",
                "headers": {
                    "ETag": {
                        "description": "Version of the deletion (when one was deleted)",
                        "schema": {"type": "string"},
                    },
                },
            },
            200: {
                "model": schemas.OperationOutcome,
                "content": {FHIR_JSON: {}},
                "description": "With Prefer: return=OperationOutcome, what was done",
            },
            **_WRITE_ERRORS,
            412: _outcome_doc("The criteria match several resources, or If-Match is stale"),
        },
    )
    async def conditional_delete(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.DELETE)),
        if_match: IfMatch = None,
        prefer: Prefer = None,
        provenance: XProvenance,
    ) -> Response:
        criteria, key = _criteria_in_query(request, resource_type, principal)
        deletion = await service.conditional_delete(
            ctx, resource_type, criteria, key, principal, if_match=if_match, provenance=provenance
        )
        headers = {"ETag": deletion.etag} if deletion else {}
        if prefer_return(request) == "OperationOutcome":
            message = (
                f"Deleted {resource_type}/{deletion.id}"
                if deletion
                else f"No {resource_type} matched the criteria; nothing was deleted"
            )
            return FhirResponse(information(message), headers=headers)
        return Response(status_code=204, headers=headers)

    @router.get(
        f"/{resource_type}/_history",
        operation_id=f"history{resource_type}Type",
        summary=f"All versions of every {resource_type}, newest first",
        tags=tags,
        response_class=FhirResponse,
        responses={
            200: _bundle_doc("history Bundle"),
            **ERRORS,
        },
    )
    async def type_history(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.HISTORY)),
        settings: SettingsDep,
        count: Annotated[int | None, Query(alias="_count", ge=1)] = None,
        since: Since = None,
        cursor: HistoryCursor = None,
    ) -> Response:
        return await _history(
            request, ctx, principal, settings, resource_type, None, count, since, cursor
        )

    @router.get(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"read{resource_type}",
        summary=f"Read the current version of a {resource_type}",
        tags=tags,
        response_class=FhirResponse,
        responses={
            200: {**ok_resource, "description": "The current version"},
            410: _outcome_doc("Deleted; the history stays readable"),
            **ERRORS,
        },
    )
    async def read(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.READ)),
        resource_id: IdPath,
    ) -> Response:
        stored = await service.read(ctx, resource_type, resource_id, principal)
        return _resource_response(request, stored)

    @router.get(
        f"/{resource_type}/{{resource_id:fhirid}}/_history/{{version_id}}",
        operation_id=f"vread{resource_type}",
        summary=f"Read one version of a {resource_type}",
        tags=tags,
        response_class=FhirResponse,
        responses={
            200: {**ok_resource, "description": "That version"},
            410: _outcome_doc("That version is a deletion"),
            **ERRORS,
        },
    )
    async def vread(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.HISTORY)),
        resource_id: IdPath,
        version_id: Annotated[int, Path(ge=1, le=2_147_483_647)],
    ) -> Response:
        stored = await service.vread(ctx, resource_type, resource_id, version_id, principal)
        return _resource_response(request, stored)

    @router.put(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"update{resource_type}",
        summary=f"Update a {resource_type} (creates it when the id is new)",
        tags=tags,
        response_class=FhirResponse,
        openapi_extra=_body_doc(resource_type, update=True),
        responses={
            200: {**ok_resource, "description": "Updated"},
            201: {
                **ok_resource,
                "description": "Created (update as create)",
                "headers": {**_VERSION_HEADERS, **_LOCATION_HEADER},
            },
            **_WRITE_ERRORS,
        },
    )
    async def update(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.UPDATE)),
        resource_id: IdPath,
        if_match: IfMatch = None,
        prefer: Prefer = None,
        provenance: XProvenance,
    ) -> Response:
        require_json_body(request)
        result = await service.update(
            ctx,
            resource_type,
            resource_id,
            await request.body(),
            principal,
            if_match=if_match,
            provenance=provenance,
        )
        if result.created:
            return _resource_response(request, result.stored, 201, _location(result.stored))
        return _resource_response(request, result.stored)

    @router.patch(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"patch{resource_type}",
        summary=f"Patch a {resource_type} (JSON Patch or JSON Merge Patch)",
        description="A patch is an update: the patched resource is validated as one, needs "
        "the X-Provenance reason, honours If-Match and is audited as an update. A failed "
        "JSON Patch test, or a path that does not exist, is a 422.",
        tags=tags,
        response_class=FhirResponse,
        openapi_extra=_patch_doc(resource_type),
        responses={
            200: {**ok_resource, "description": "Patched"},
            410: _outcome_doc("Deleted; there is nothing to patch"),
            **_WRITE_ERRORS,
            415: _outcome_doc(f"Body is not {JSON_PATCH}, {MERGE_PATCH} or JSON"),
            422: _outcome_doc(
                "The patch cannot be applied (a failed test, a missing path), or its result "
                "is not an acceptable resource; `expression` names the element"
            ),
        },
    )
    async def patch(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.UPDATE)),
        resource_id: IdPath,
        if_match: IfMatch = None,
        prefer: Prefer = None,
        provenance: XProvenance,
    ) -> Response:
        document = parse_patch(await request.body(), request.headers.get("content-type"))
        result = await service.patch(
            ctx,
            resource_type,
            resource_id,
            document,
            principal,
            if_match=if_match,
            provenance=provenance,
        )
        return _resource_response(request, result.stored)

    @router.delete(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"delete{resource_type}",
        summary=f"Delete a {resource_type} (its history stays readable)",
        tags=tags,
        status_code=204,
        # For the documentation: the 200 (Prefer: return=OperationOutcome) and every error
        # are application/fhir+json; a 204 has no body.
        response_class=FhirResponse,
        responses={
            204: {
                "description": "Deleted (or already deleted)",
                "headers": {
                    "ETag": {
                        "description": "Version of the deletion",
                        "schema": {"type": "string"},
                    },
                },
                "links": deleted_links,
            },
            200: {
                "model": schemas.OperationOutcome,
                "content": {FHIR_JSON: {}},
                "description": "Deleted, with Prefer: return=OperationOutcome",
            },
            **_WRITE_ERRORS,
        },
    )
    async def delete(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.DELETE)),
        resource_id: IdPath,
        if_match: IfMatch = None,
        prefer: Prefer = None,
        provenance: XProvenance,
    ) -> Response:
        deletion = await service.delete(
            ctx, resource_type, resource_id, principal, if_match=if_match, provenance=provenance
        )
        headers = {"ETag": deletion.etag} if deletion else {}
        if prefer_return(request) == "OperationOutcome":
            message = (
                f"Deleted {resource_type}/{resource_id}"
                if deletion
                else f"{resource_type}/{resource_id} was already deleted"
            )
            return FhirResponse(information(message), headers=headers)
        return Response(status_code=204, headers=headers)

    @router.get(
        f"/{resource_type}/{{resource_id:fhirid}}/_history",
        operation_id=f"history{resource_type}Instance",
        summary=f"All versions of one {resource_type}, newest first",
        tags=tags,
        response_class=FhirResponse,
        responses={
            200: _bundle_doc("history Bundle"),
            **ERRORS,
        },
    )
    async def instance_history(
        *,
        request: Request,
        ctx: ServicesDep,
        principal: Principal = Depends(Require(resource_type, Action.HISTORY)),
        settings: SettingsDep,
        resource_id: IdPath,
        count: Annotated[int | None, Query(alias="_count", ge=1)] = None,
        since: Since = None,
        cursor: HistoryCursor = None,
    ) -> Response:
        return await _history(
            request, ctx, principal, settings, resource_type, resource_id, count, since, cursor
        )


async def _history(
    request: Request,
    ctx: ServiceContext,
    principal: Principal,
    settings: Settings,
    resource_type: str,
    resource_id: str | None,
    count: int | None,
    since: str | None,
    cursor: str | None,
) -> Response:
    limit = min(count or settings.default_page_size, settings.max_page_size)
    since_at = None
    if since is not None:
        bounds = fhir_range(since)
        if bounds is None:
            raise BadRequest(f"_since={since!r} is not a FHIR instant")
        since_at = bounds[0]
    after = _decode_history_cursor(cursor) if cursor else None
    versions = await service.history(
        ctx, resource_type, resource_id, principal, since=since_at, after=after, limit=limit + 1
    )
    page = versions[:limit]
    base = fhir_base(request)
    path = f"{base}/{resource_type}" + (f"/{resource_id}" if resource_id else "") + "/_history"
    params = [("_count", str(limit))] + ([("_since", since)] if since else [])
    next_url = None
    if len(versions) > limit:
        last = page[-1]
        next_url = bundles.page_url(
            path,
            [*params, ("_cursor", _history_cursor(last.last_updated, last.id, last.version_id))],
        )
    self_url = bundles.page_url(path, request.query_params.multi_items())
    return pretty(
        request, bundles.history(base, resource_type, page, self_url=self_url, next_url=next_url)
    )


_EPOCH = datetime(1970, 1, 1)


def _history_cursor(last_updated: datetime, resource_id: str, version_id: int) -> str:
    micros = (last_updated.replace(tzinfo=None) - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}~{resource_id}~{version_id}"


def _decode_history_cursor(cursor: str) -> tuple[datetime, str, int]:
    micros, resource_id, version_id = cursor.split("~")
    return _EPOCH + timedelta(microseconds=int(micros)), resource_id, int(version_id)


for _resource_type in RESOURCE_TYPES:
    _register(_resource_type)


def _criteria_in_query(
    request: Request, resource_type: str, principal: Principal
) -> tuple[Any, str]:
    """The criteria of a conditional update or delete, which are a search too."""
    authorize(principal, resource_type, Action.SEARCH)
    pairs = conditional.from_query(request.query_params.multi_items())
    return conditional.criteria(resource_type, pairs, "The query")
