"""The FHIR REST routes of the four trial resources, registered one set per type so each
operation has a stable operation id, a tag and typed documentation in the OpenAPI file.

Handlers stay thin: negotiate, call one service function, shape the HTTP answer. Bodies are
read raw and validated once by the service (a pydantic body parameter would validate twice
and cost ~2x on the hot path); the schemas in `app.fhir.schemas` only document them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from app.auth.deps import Require
from app.auth.permissions import Action
from app.auth.principal import Principal
from app.fhir import bundles, schemas
from app.fhir.deps import (
    ID_PATTERN,
    RESOURCE_TYPES,
    HistoryCursor,
    IdPath,
    IfMatch,
    Prefer,
    ServicesDep,
    SettingsDep,
    Since,
    XProvenance,
    fhir_base,
)
from app.fhir.http import (
    FHIR_JSON,
    FhirResponse,
    negotiate,
    prefer_return,
    pretty,
    require_json_body,
    version_headers,
)
from app.fhir.openapi_docs import (
    ERRORS,
    LOCATION_HEADER,
    VERSION_HEADERS,
    WRITE_ERRORS,
    body_doc,
    bundle_doc,
    links,
    outcome_doc,
    patch_doc,
)
from app.fhir.outcome import information
from app.fhir.search_schema import criteria_parameters
from app.kit.dates import fhir_range
from app.kit.errors import BadRequest
from app.services import conditional
from app.services import resources as service
from app.services.context import ServiceContext
from app.services.patching import (
    JSON_PATCH,
    MERGE_PATCH,
    parse_patch,
)
from app.services.resources import Stored
from app.settings import Settings


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


@dataclass(frozen=True)
class _TypeDocs:
    """What the routes of one resource type share in their OpenAPI documentation."""

    tags: list[str | Any]
    ok_resource: dict[str, Any]
    # OpenAPI links: what a client (and the fuzzer's stateful phase) can do next with the
    # resource a response names. After a delete its read answers 410 and its history, which
    # FHIR keeps, shows the deletion.
    created_links: dict[str, Any]
    deleted_links: dict[str, Any]

    @classmethod
    def of(cls, resource_type: str) -> _TypeDocs:
        model = schemas.RESOURCE_MODELS[resource_type]
        return cls(
            tags=[resource_type],
            ok_resource={"model": model, "content": {FHIR_JSON: {}}, "headers": VERSION_HEADERS},
            created_links=links(resource_type, "Created", "$response.body#/id", ("read", "delete")),
            deleted_links=links(resource_type, "Deleted", "$request.path.resource_id", ("read",)),
        )


def _register_create(resource_type: str, docs: _TypeDocs) -> None:
    @router.post(
        f"/{resource_type}",
        operation_id=f"create{resource_type}",
        summary=f"Create a {resource_type}",
        tags=docs.tags,
        description="Conditional create: criteria in If-None-Exist, or as query parameters "
        "(as fhirpy's create and get_or_create send them), not both. No match: created "
        "(201); one: returned as it is (200); several: 412.",
        status_code=201,
        response_class=FhirResponse,
        openapi_extra={
            **body_doc(resource_type, example=True),
            "parameters": criteria_parameters(resource_type, "Conditional create criterion"),
        },
        responses={
            201: {
                **docs.ok_resource,
                "description": "Created",
                "headers": {**VERSION_HEADERS, **LOCATION_HEADER},
                "links": docs.created_links,
            },
            200: {**docs.ok_resource, "description": "The criteria matched an existing resource"},
            **WRITE_ERRORS,
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
        if_none_exist: str | None = Header(
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
        criteria, key = conditional.create_criteria(
            resource_type, request.query_params.multi_items(), if_none_exist, principal
        )
        result = await service.create(
            ctx, resource_type, body, principal, if_none_exist=criteria, if_none_exist_key=key
        )
        if not result.created:
            return _resource_response(request, result.stored, 200)
        return _resource_response(request, result.stored, 201, _location(result.stored))


def _register_conditional_update(resource_type: str, docs: _TypeDocs) -> None:
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
        tags=docs.tags,
        response_class=FhirResponse,
        openapi_extra={
            **body_doc(resource_type),
            "parameters": criteria_parameters(resource_type, "Criterion"),
        },
        responses={
            200: {**docs.ok_resource, "description": "The match was updated"},
            201: {
                **docs.ok_resource,
                "description": "No match: created",
                "headers": {**VERSION_HEADERS, **LOCATION_HEADER},
            },
            **WRITE_ERRORS,
            409: outcome_doc(
                "No match, and the body's id names another resource; or a Patient's subject "
                "number is enrolled already"
            ),
            412: outcome_doc("The criteria match several resources, or If-Match is stale"),
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
        criteria, key = conditional.query_criteria(
            resource_type, request.query_params.multi_items(), principal
        )
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


def _register_conditional_delete(resource_type: str, docs: _TypeDocs) -> None:
    @router.delete(
        f"/{resource_type}",
        operation_id=f"conditionalDelete{resource_type}",
        summary=f"Conditional delete of the one {resource_type} the criteria match",
        description="One match: deleted. None: nothing to do (204). Several: 412, nothing "
        "deleted (single conditional delete). The X-Provenance reason is required whichever "
        "happens, as for any delete. At least one criterion is required: without, 400 (never "
        "a delete of every resource).",
        tags=docs.tags,
        status_code=204,
        # For the documentation: the 200 (Prefer: return=OperationOutcome) and every error
        # are application/fhir+json; a 204 has no body.
        response_class=FhirResponse,
        openapi_extra={
            "parameters": criteria_parameters(resource_type, "Criterion"),
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
            **WRITE_ERRORS,
            412: outcome_doc("The criteria match several resources, or If-Match is stale"),
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
        criteria, key = conditional.query_criteria(
            resource_type, request.query_params.multi_items(), principal
        )
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


def _register_type_history(resource_type: str, docs: _TypeDocs) -> None:
    @router.get(
        f"/{resource_type}/_history",
        operation_id=f"history{resource_type}Type",
        summary=f"All versions of every {resource_type}, newest first",
        tags=docs.tags,
        response_class=FhirResponse,
        responses={
            200: bundle_doc("history Bundle"),
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


def _register_read(resource_type: str, docs: _TypeDocs) -> None:
    @router.get(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"read{resource_type}",
        summary=f"Read the current version of a {resource_type}",
        tags=docs.tags,
        response_class=FhirResponse,
        responses={
            200: {**docs.ok_resource, "description": "The current version"},
            410: outcome_doc("Deleted; the history stays readable"),
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


def _register_vread(resource_type: str, docs: _TypeDocs) -> None:
    @router.get(
        f"/{resource_type}/{{resource_id:fhirid}}/_history/{{version_id}}",
        operation_id=f"vread{resource_type}",
        summary=f"Read one version of a {resource_type}",
        tags=docs.tags,
        response_class=FhirResponse,
        responses={
            200: {**docs.ok_resource, "description": "That version"},
            410: outcome_doc("That version is a deletion"),
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


def _register_update(resource_type: str, docs: _TypeDocs) -> None:
    @router.put(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"update{resource_type}",
        summary=f"Update a {resource_type} (creates it when the id is new)",
        tags=docs.tags,
        response_class=FhirResponse,
        openapi_extra=body_doc(resource_type, update=True),
        responses={
            200: {**docs.ok_resource, "description": "Updated"},
            201: {
                **docs.ok_resource,
                "description": "Created (update as create)",
                "headers": {**VERSION_HEADERS, **LOCATION_HEADER},
            },
            **WRITE_ERRORS,
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


def _register_patch(resource_type: str, docs: _TypeDocs) -> None:
    @router.patch(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"patch{resource_type}",
        summary=f"Patch a {resource_type} (JSON Patch or JSON Merge Patch)",
        description="A patch is an update: the patched resource is validated as one, needs "
        "the X-Provenance reason, honours If-Match and is audited as an update. A failed "
        "JSON Patch test, or a path that does not exist, is a 422.",
        tags=docs.tags,
        response_class=FhirResponse,
        openapi_extra=patch_doc(resource_type),
        responses={
            200: {**docs.ok_resource, "description": "Patched"},
            410: outcome_doc("Deleted; there is nothing to patch"),
            **WRITE_ERRORS,
            415: outcome_doc(f"Body is not {JSON_PATCH}, {MERGE_PATCH} or JSON"),
            422: outcome_doc(
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


def _register_delete(resource_type: str, docs: _TypeDocs) -> None:
    @router.delete(
        f"/{resource_type}/{{resource_id:fhirid}}",
        operation_id=f"delete{resource_type}",
        summary=f"Delete a {resource_type} (its history stays readable)",
        tags=docs.tags,
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
                "links": docs.deleted_links,
            },
            200: {
                "model": schemas.OperationOutcome,
                "content": {FHIR_JSON: {}},
                "description": "Deleted, with Prefer: return=OperationOutcome",
            },
            **WRITE_ERRORS,
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


def _register_instance_history(resource_type: str, docs: _TypeDocs) -> None:
    @router.get(
        f"/{resource_type}/{{resource_id:fhirid}}/_history",
        operation_id=f"history{resource_type}Instance",
        summary=f"All versions of one {resource_type}, newest first",
        tags=docs.tags,
        response_class=FhirResponse,
        responses={
            200: bundle_doc("history Bundle"),
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


def _register(resource_type: str) -> None:
    """The interactions of one resource type, in the order the OpenAPI document lists them."""
    docs = _TypeDocs.of(resource_type)
    for register in (
        _register_create,
        _register_conditional_update,
        _register_conditional_delete,
        _register_type_history,
        _register_read,
        _register_vread,
        _register_update,
        _register_patch,
        _register_delete,
        _register_instance_history,
    ):
        register(resource_type, docs)


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
