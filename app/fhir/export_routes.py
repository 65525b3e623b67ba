"""FHIR Bulk Data export (Bulk Data Access IG 2.0): kick-off, status, cancel, files.

    GET    /fhir/$export, /fhir/Patient/$export      Prefer: respond-async -> 202 + Content-Location
    GET    /fhir/$export-status/{job}                202 (X-Progress, Retry-After) | 200 manifest
    DELETE /fhir/$export-status/{job}                202; the job and its files are gone (404)
    GET    /fhir/$export-files/{job}/{Type-n.ndjson} application/fhir+ndjson, streamed

The handlers parse, call `app.services.bulk_export` and shape the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth.deps import current_principal
from app.auth.principal import Principal
from app.fhir.deps import ExportsDep, ServicesDep, SettingsDep, fhir_base
from app.fhir.http import FHIR_JSON, FhirResponse, http_date, media_type, negotiate
from app.fhir.openapi_docs import ERRORS, outcome_doc, outcome_docs
from app.fhir.outcome import information
from app.fhir.response_schemas import ExportManifest
from app.kit.dates import INSTANT_PATTERN, fhir_range
from app.kit.errors import BadRequest, NotAcceptable
from app.services import bulk_export as service
from app.services.export_progress import progress
from app.settings import Settings

router = APIRouter(prefix="/fhir", tags=["Bulk Data"])
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
JOB_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
FILE_PATTERN = r"^[A-Za-z]{1,40}-[0-9]{1,9}\.ndjson$"
JobId = Annotated[str, Path(pattern=JOB_PATTERN, description="The export job's id")]
# Parameters of the IG this server does not implement: refused, so a client never takes a
# partial export for the one it asked for (IG: "SHOULD return an error").
_UNSUPPORTED = ("_elements", "patient", "_typeFilter", "includeAssociatedData")
_INSTANT = re.compile(INSTANT_PATTERN)
_FILE_ACCEPT = frozenset({"", "*/*", "application/*", service.NDJSON, "application/ndjson"})


def export_settings(settings: Settings) -> service.ExportSettings:
    return service.ExportSettings(
        retention=timedelta(hours=settings.export_retention_hours),
        file_resources=settings.export_file_resources,
        lease=timedelta(seconds=settings.export_lease_seconds),
    )


def _values(params: Sequence[tuple[str, str]], name: str) -> list[str]:
    """A parameter's values; a repeated one counts as one comma-separated list (IG)."""
    return [v.strip() for key, value in params if key == name for v in value.split(",")]


def parse_kick_off(request: Request) -> service.ExportRequest:
    """The IG's kick-off checks: Prefer: respond-async, `_outputFormat`, `_type`, `_since`."""
    prefer = [p.strip().lower() for p in request.headers.get("prefer", "").split(",")]
    if "respond-async" not in prefer:
        raise BadRequest("A Bulk Data kick-off needs the header Prefer: respond-async")
    params = request.query_params.multi_items()
    lenient = "handling=lenient" in prefer
    for name in _UNSUPPORTED:
        if any(key == name for key, _ in params) and not lenient:
            raise BadRequest(f"{name} is not supported by this server; resend without it")
    _check_output_format(params)
    types = _export_types(params)
    since = _since(params)
    return service.ExportRequest(url=str(request.url), types=types, since=since)


def _check_output_format(params: Sequence[tuple[str, str]]) -> None:
    for value in _values(params, "_outputFormat"):
        if value not in service.OUTPUT_FORMATS:
            raise BadRequest(
                f"_outputFormat {value!r} is not supported: this server writes "
                "application/fhir+ndjson (also named application/ndjson or ndjson)",
                expression=["_outputFormat"],
            )


def _export_types(params: Sequence[tuple[str, str]]) -> tuple[str, ...] | None:
    """The `_type`s asked for, each once in the order given; None without `_type`."""
    if not any(key == "_type" for key, _ in params):
        return None
    requested = [t for t in _values(params, "_type") if t]
    unknown = sorted(set(requested) - set(service.EXPORT_TYPES))
    if unknown or not requested:
        raise BadRequest(
            f"_type {', '.join(unknown) or '(empty)'} cannot be exported; this server "
            f"exports {', '.join(service.EXPORT_TYPES)}",
            expression=["_type"],
        )
    return tuple(dict.fromkeys(requested))


def _since(params: Sequence[tuple[str, str]]) -> datetime | None:
    values = [value for key, value in params if key == "_since"]
    if len(values) > 1:
        raise BadRequest("_since may be given once", expression=["_since"])
    if not values:
        return None
    bounds = fhir_range(values[0]) if _INSTANT.fullmatch(values[0]) else None
    if bounds is None:
        raise BadRequest(
            f"_since {values[0]!r} is not a FHIR instant (e.g. 2025-03-10T08:00:00Z)",
            expression=["_since"],
        )
    return bounds[0]


def _kick_off_doc(scope: str) -> dict[str, Any]:
    parameters = [
        {
            "name": "_type",
            "in": "query",
            "required": False,
            "description": "Comma-separated types to export (default: every type the caller "
            "may export); may repeat",
            "schema": {
                "type": "string",
                "pattern": "^(Patient|Observation|MedicationAdministration|AdverseEvent)"
                "(,(Patient|Observation|MedicationAdministration|AdverseEvent))*$",
            },
        },
        {
            "name": "_since",
            "in": "query",
            "required": False,
            "description": "Only resources last updated after this FHIR instant",
            "schema": {"type": "string", "pattern": f"^{INSTANT_PATTERN}$"},
        },
        {
            "name": "_outputFormat",
            "in": "query",
            "required": False,
            "description": "application/fhir+ndjson (default), application/ndjson or ndjson",
            "schema": {"type": "string", "enum": sorted(service.OUTPUT_FORMATS)},
        },
        {
            "name": "Prefer",
            "in": "header",
            "required": True,
            "description": "respond-async (required by the asynchronous pattern)",
            "schema": {"type": "string", "enum": ["respond-async"]},
        },
    ]
    return {
        "parameters": parameters,
        "description": f"Starts a Bulk Data export of {scope} at the caller's sites (FHIR Bulk "
        "Data Access IG 2.0). Poll the Content-Location URL; files last "
        "APP_EXPORT_RETENTION_HOURS.",
    }


_KICK_OFF_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "Accepted: poll the status URL",
        "headers": {
            "Content-Location": {
                "description": "Absolute URL of the job's status",
                "schema": {"type": "string"},
            }
        },
        "content": {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}},
    },
    **ERRORS,
}


async def kick_off(
    request: Request,
    ctx: ServicesDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    exports: ExportsDep,
) -> Response:
    parsed = parse_kick_off(request)
    job_id = await service.kick_off(ctx, export_settings(settings), principal, parsed)
    exports.notify()
    location = f"{fhir_base(request)}/$export-status/{job_id}"
    return FhirResponse(
        information(f"Export {job_id} accepted; poll {location}"),
        status_code=202,
        headers={"Content-Location": location},
    )


# The two kick-offs differ only in what they document: every record has a Patient subject,
# so a patient-level export is the whole trial too.
for _path, _operation_id, _summary, _scope in (
    ("/$export", "exportSystem", "Bulk Data export of the whole trial", "every resource"),
    (
        "/Patient/$export",
        "exportPatients",
        "Bulk Data export of every patient's compartment",
        "every patient and their records (the same set: every record has a Patient subject)",
    ),
):
    router.add_api_route(
        _path,
        kick_off,
        methods=["GET"],
        operation_id=_operation_id,
        summary=f"{_summary} (kick-off)",
        status_code=202,
        response_class=FhirResponse,
        openapi_extra=_kick_off_doc(_scope),
        responses=_KICK_OFF_RESPONSES,
        dependencies=[Depends(negotiate)],
    )


def manifest(base: str, view: service.JobView) -> dict[str, Any]:
    job = view.job
    return {
        "transactionTime": job.transaction_time.isoformat(timespec="microseconds") + "Z",
        "request": job.request,
        "requiresAccessToken": True,
        "output": [
            {
                "type": file.resource_type,
                "url": f"{base}/$export-files/{job.id}/{service.file_name(file)}",
                "count": file.count,
            }
            for file in view.files
        ],
        "error": [],
    }


@router.get(
    "/$export-status/{job_id}",
    operation_id="exportStatus",
    summary="Status of a Bulk Data export: in progress (202) or its manifest (200)",
    response_class=JSONResponse,
    responses={
        200: {"model": ExportManifest, "description": "Complete: the files to download"},
        202: {
            "description": "In progress: ask again after Retry-After seconds",
            "headers": {
                "X-Progress": {"description": "How far it got", "schema": {"type": "string"}},
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}},
            },
        },
        **outcome_docs(
            ERRORS,
            {
                404: "No such job of the caller's (or cancelled, or expired)",
                500: "The export failed, or an unexpected error",
            },
        ),
    },
    dependencies=[Depends(negotiate)],
)
async def export_status(
    request: Request, ctx: ServicesDep, principal: CurrentPrincipal, job_id: JobId
) -> Response:
    view = await service.status(ctx, principal, job_id)
    how_far = progress(view.job)
    if how_far is not None:
        return Response(
            status_code=202,
            headers={"X-Progress": how_far, "Retry-After": str(service.RETRY_AFTER_SECONDS)},
        )
    return Response(
        orjson.dumps(manifest(fhir_base(request), view)),
        media_type="application/json",
        headers={"Expires": http_date(view.job.expires)},
    )


@router.delete(
    "/$export-status/{job_id}",
    operation_id="exportCancel",
    summary="Cancel a Bulk Data export, or delete its files once downloaded",
    status_code=202,
    response_class=FhirResponse,
    responses={
        202: {
            "description": "Cancelled: the job and its files are gone (its status URL is 404)",
            "content": {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}},
        },
        **{**ERRORS, 404: outcome_doc("No such job of the caller's")},
    },
    dependencies=[Depends(negotiate)],
)
async def export_cancel(ctx: ServicesDep, principal: CurrentPrincipal, job_id: JobId) -> Response:
    await service.cancel(ctx, principal, job_id)
    return FhirResponse(information(f"Export {job_id} cancelled; its files are deleted"), 202)


def _accepts_ndjson(request: Request) -> None:
    accept = request.headers.get("accept")
    if accept is None or any(media_type(part) in _FILE_ACCEPT for part in accept.split(",")):
        return
    raise NotAcceptable(f"Accept {accept!r}: an export file is {service.NDJSON}")


@router.get(
    "/$export-files/{job_id}/{file_name}",
    operation_id="exportFile",
    summary="One NDJSON file of a completed Bulk Data export (streamed)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One current resource per line",
            "content": {service.NDJSON: {"schema": {"type": "string", "format": "binary"}}},
        },
        **outcome_docs(ERRORS, {404: "No such file of the caller's jobs"}),
    },
)
async def export_file(
    request: Request,
    ctx: ServicesDep,
    principal: CurrentPrincipal,
    job_id: JobId,
    file_name: Annotated[str, Path(pattern=FILE_PATTERN, description="Type-n.ndjson")],
) -> Response:
    _accepts_ndjson(request)
    found, chunks = await service.download(ctx, principal, job_id, file_name)
    return StreamingResponse(
        chunks, media_type=service.NDJSON, headers={"X-Resource-Count": str(found.count)}
    )
