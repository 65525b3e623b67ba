"""The FHIR REST routes of the four trial resources, registered one set per type so each
operation has a stable operation id, a tag and typed documentation in the OpenAPI file.

Handlers stay thin: negotiate, call one service function, shape the HTTP answer. Bodies are
read raw and validated once by the service (a pydantic body parameter would validate twice
and cost ~2x on the hot path); the schemas in `app.fhir.schemas` only document them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from app.auth.deps import Require
from app.auth.permissions import Action
from app.fhir import bundles
from app.fhir.deps import (
    ID_PATTERN,
    RESOURCE_TYPES,
    Call,
    HistoryCursor,
    IdPath,
    IfMatch,
    Prefer,
    SettingsDep,
    Since,
    XProvenance,
    call_of,
    fhir_base,
)
from app.fhir.http import (
    FhirResponse,
    negotiate,
    prefer_return,
    pretty,
    require_json_body,
    version_headers,
)
from app.fhir.outcome import information
from app.fhir.resource_docs import TypeDocs
from app.kit.dates import fhir_range
from app.kit.errors import BadRequest
from app.services import conditional
from app.services import resources as service
from app.services.patching import parse_patch
from app.services.resources import Stored, WriteResult


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


async def _json_body(request: Request) -> bytes:
    require_json_body(request)
    return await request.body()


def _written(request: Request, result: WriteResult) -> Response:
    """A write's answer: 201 with its Location when it created the resource, else 200."""
    if result.created:
        return _resource_response(request, result.stored, 201, _location(result.stored))
    return _resource_response(request, result.stored)


def _deleted(request: Request, deletion: Stored | None, done: str, nothing: str) -> Response:
    """A delete's answer: 204, or with Prefer: return=OperationOutcome what was done (`done`
    when a version was deleted, else `nothing`)."""
    headers = {"ETag": deletion.etag} if deletion else {}
    if prefer_return(request) == "OperationOutcome":
        return FhirResponse(information(done if deletion else nothing), headers=headers)
    return Response(status_code=204, headers=headers)


_Handler = Callable[..., Awaitable[Response]]


async def _change(
    if_match: IfMatch = None, prefer: Prefer = None, *, provenance: XProvenance
) -> service.ChangeTerms:
    """What an update, patch or delete states beside its body: the version it applies to
    and the reason (Prefer is read where the answer is shaped)."""
    return service.ChangeTerms(if_match, provenance)


ChangeDep = Annotated[service.ChangeTerms, Depends(_change)]
VersionPath = Annotated[int, Path(ge=1, le=2_147_483_647)]


@dataclass(frozen=True)
class _HistoryPage:
    """A page of history as asked: its size within the server's limits, `_since`, and the
    `_cursor` it starts after."""

    limit: int
    since: str | None
    cursor: str | None


async def _history_page(
    settings: SettingsDep,
    count: Annotated[int | None, Query(alias="_count", ge=1)] = None,
    since: Since = None,
    cursor: HistoryCursor = None,
) -> _HistoryPage:
    limit = min(count or settings.default_page_size, settings.max_page_size)
    return _HistoryPage(limit, since, cursor)


HistoryPageDep = Annotated[_HistoryPage, Depends(_history_page)]


def _create(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.CREATE)))

    async def create(
        *,
        call: Call = caller,
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
        body = await _json_body(call.request)
        query = call.request.query_params.multi_items()
        condition = conditional.create_condition(
            resource_type, query, if_none_exist, call.principal
        )
        result = await service.create(call.ctx, resource_type, body, call.principal, condition)
        return _written(call.request, result)

    return create


def _conditional_request(
    call: Call, resource_type: str, change: service.ChangeTerms
) -> service.ConditionalChangeRequest:
    """A conditional update's or delete's target: the criteria in the query, which are a
    search the caller must be allowed."""
    query = call.request.query_params.multi_items()
    condition = conditional.query_condition(resource_type, query, call.principal)
    return service.ConditionalChangeRequest(resource_type, condition, change)


def _conditional_update(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.UPDATE)))

    async def conditional_update(*, call: Call = caller, change: ChangeDep) -> Response:
        body = await _json_body(call.request)
        request = _conditional_request(call, resource_type, change)
        result = await service.conditional_update(call.ctx, request, body, call.principal)
        return _written(call.request, result)

    return conditional_update


def _conditional_delete(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.DELETE)))

    async def conditional_delete(*, call: Call = caller, change: ChangeDep) -> Response:
        request = _conditional_request(call, resource_type, change)
        deletion = await service.conditional_delete(call.ctx, request, call.principal)
        done = f"Deleted {resource_type}/{deletion.id}" if deletion else ""
        nothing = f"No {resource_type} matched the criteria; nothing was deleted"
        return _deleted(call.request, deletion, done, nothing)

    return conditional_delete


def _type_history(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.HISTORY)))

    async def type_history(*, call: Call = caller, page: HistoryPageDep) -> Response:
        return await _history(call, resource_type, None, page)

    return type_history


def _read(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.READ)))

    async def read(*, call: Call = caller, resource_id: IdPath) -> Response:
        stored = await service.read(call.ctx, resource_type, resource_id, call.principal)
        return _resource_response(call.request, stored)

    return read


def _vread(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.HISTORY)))

    async def vread(
        *, call: Call = caller, resource_id: IdPath, version_id: VersionPath
    ) -> Response:
        stored = await service.vread(
            call.ctx, resource_type, resource_id, version_id, call.principal
        )
        return _resource_response(call.request, stored)

    return vread


def _update(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.UPDATE)))

    async def update(*, call: Call = caller, resource_id: IdPath, change: ChangeDep) -> Response:
        body = await _json_body(call.request)
        request = service.ChangeRequest(resource_type, resource_id, change)
        result = await service.update(call.ctx, request, body, call.principal)
        return _written(call.request, result)

    return update


def _patch(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.UPDATE)))

    async def patch(*, call: Call = caller, resource_id: IdPath, change: ChangeDep) -> Response:
        http = call.request
        document = parse_patch(await http.body(), http.headers.get("content-type"))
        request = service.ChangeRequest(resource_type, resource_id, change)
        result = await service.patch(call.ctx, request, document, call.principal)
        return _resource_response(http, result.stored)

    return patch


def _delete(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.DELETE)))

    async def delete(*, call: Call = caller, resource_id: IdPath, change: ChangeDep) -> Response:
        request = service.ChangeRequest(resource_type, resource_id, change)
        deletion = await service.delete(call.ctx, request, call.principal)
        done = f"Deleted {resource_type}/{resource_id}"
        nothing = f"{resource_type}/{resource_id} was already deleted"
        return _deleted(call.request, deletion, done, nothing)

    return delete


def _instance_history(resource_type: str) -> _Handler:
    caller = Depends(call_of(Require(resource_type, Action.HISTORY)))

    async def instance_history(
        *, call: Call = caller, resource_id: IdPath, page: HistoryPageDep
    ) -> Response:
        return await _history(call, resource_type, resource_id, page)

    return instance_history


def _register(resource_type: str) -> None:
    """The interactions of one resource type, in the order the OpenAPI document lists them."""
    docs = TypeDocs(resource_type)
    type_path = f"/{resource_type}"
    instance_path = f"/{resource_type}/{{resource_id:fhirid}}"
    for method, path, handler, documentation in (
        ("POST", type_path, _create, docs.create),
        ("PUT", type_path, _conditional_update, docs.conditional_update),
        ("DELETE", type_path, _conditional_delete, docs.conditional_delete),
        ("GET", f"{type_path}/_history", _type_history, docs.type_history),
        ("GET", instance_path, _read, docs.read),
        ("GET", f"{instance_path}/_history/{{version_id}}", _vread, docs.vread),
        ("PUT", instance_path, _update, docs.update),
        ("PATCH", instance_path, _patch, docs.patch),
        ("DELETE", instance_path, _delete, docs.delete),
        ("GET", f"{instance_path}/_history", _instance_history, docs.instance_history),
    ):
        router.add_api_route(path, handler(resource_type), methods=[method], **documentation())


async def _history(
    call: Call, resource_type: str, resource_id: str | None, page: _HistoryPage
) -> Response:
    request = call.request
    limit = page.limit
    asked = service.HistoryRequest(
        resource_type,
        resource_id,
        since=_since(page.since),
        after=_decode_history_cursor(page.cursor) if page.cursor else None,
        limit=limit + 1,
    )
    versions = await service.history(call.ctx, asked, call.principal)
    shown = versions[:limit]
    base = fhir_base(request)
    path = f"{base}/{resource_type}" + (f"/{resource_id}" if resource_id else "") + "/_history"
    params = [("_count", str(limit))] + ([("_since", page.since)] if page.since else [])
    next_url = None
    if len(versions) > limit:
        last = shown[-1]
        cursor = _history_cursor(last.last_updated, last.id, last.version_id)
        next_url = bundles.page_url(path, [*params, ("_cursor", cursor)])
    self_url = bundles.page_url(path, request.query_params.multi_items())
    return pretty(
        request, bundles.history(base, resource_type, shown, self_url=self_url, next_url=next_url)
    )


def _since(since: str | None) -> datetime | None:
    if since is None:
        return None
    bounds = fhir_range(since)
    if bounds is None:
        raise BadRequest(f"_since={since!r} is not a FHIR instant")
    return bounds[0]


_EPOCH = datetime(1970, 1, 1)


def _history_cursor(last_updated: datetime, resource_id: str, version_id: int) -> str:
    micros = (last_updated.replace(tzinfo=None) - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}~{resource_id}~{version_id}"


def _decode_history_cursor(cursor: str) -> tuple[datetime, str, int]:
    micros, resource_id, version_id = cursor.split("~")
    return _EPOCH + timedelta(microseconds=int(micros)), resource_id, int(version_id)


for _resource_type in RESOURCE_TYPES:
    _register(_resource_type)
