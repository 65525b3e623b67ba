"""`/fhir/AuditEvent`: read-only, for monitors and admins. No route changes or deletes one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response

from app.audit import queries
from app.auth.deps import Require
from app.auth.permissions import Action
from app.auth.principal import Principal
from app.fhir import bundles, schemas
from app.fhir.deps import ID_PATTERN, ServicesDep, SettingsDep, fhir_base
from app.fhir.http import FHIR_JSON, FhirResponse, negotiate, pretty
from app.fhir.openapi_docs import ERRORS, NO_404_ERRORS, bundle_doc
from app.fhir.search_schema import NO_NUL
from app.kit.dates import DATE_TIME_PATTERN
from app.kit.errors import BadRequest
from app.settings import Settings

router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)], tags=["AuditEvent"])
_SEARCH_DOC: dict[str, Any] = {
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
        for name, schema, text in (
            (
                "entity",
                NO_NUL,
                "The resource the event is about, or one a search returned: Type/id",
            ),
            ("agent", NO_NUL, "Who acted: the token's sub"),
            (
                "date",
                {"type": "string", "pattern": f"^((eq|lt|le|gt|ge)?{DATE_TIME_PATTERN})?$"},
                "When it was recorded; prefixes eq lt le gt ge",
            ),
            ("action", {"type": "string", "pattern": "^([CRUDE](,[CRUDE])*)?$"}, "C, R, U, D or E"),
            ("_count", {"type": "integer", "minimum": 0}, "Page size"),
            # The trail's order is its public chain sequence, so any sequence number is a
            # position: the next page starts after it.
            (
                "_cursor",
                {"type": "string", "pattern": "^[0-9]{1,18}$"},
                "Chain sequence to page after",
            ),
        )
    ]
}


@router.get(
    "/AuditEvent",
    operation_id="searchAuditEvent",
    summary="Search the audit trail (oldest first, in chain order)",
    response_class=FhirResponse,
    openapi_extra=_SEARCH_DOC,
    responses={200: bundle_doc("searchset Bundle of AuditEvents"), **NO_404_ERRORS},
)
async def search_audit(
    request: Request,
    ctx: ServicesDep,
    settings: SettingsDep,
    principal: Annotated[Principal, Depends(Require("AuditEvent", Action.AUDIT_READ))],
) -> Response:
    params = request.query_params.multi_items()
    count, cursor = _page(params, settings)
    hits = await queries.search(ctx.db, principal, params, after=cursor, limit=count + 1)
    page = hits[:count]
    next_params = None
    if len(hits) > count and page:
        criteria = [(name, value) for name, value in params if name not in ("_cursor", "_count")]
        next_params = [*criteria, ("_count", str(count)), ("_cursor", str(page[-1].seq))]
    entries = [bundles.Unversioned("AuditEvent", hit.id, hit.content) for hit in page]
    text = bundles.searchset(
        fhir_base(request),
        "AuditEvent",
        bundles.SearchPage(entries),
        self_params=params,
        next_params=next_params,
    )
    return pretty(request, text)


def _page(params: list[tuple[str, str]], settings: Settings) -> tuple[int, int | None]:
    """The page size (`_count`) and the chain sequence a page starts after (`_cursor`)."""
    count = settings.default_page_size
    cursor = None
    for name, value in params:
        if name == "_count":
            if not (value.isascii() and value.isdigit()):
                raise BadRequest(f"_count={value!r} is not a whole number")
            count = min(int(value), settings.max_page_size)
        elif name == "_cursor":
            if not (value.isascii() and value.isdigit() and len(value) <= 18):
                raise BadRequest(f"_cursor={value!r} is not a chain sequence number")
            cursor = int(value)
    return count, cursor


@router.get(
    "/AuditEvent/{audit_id}",
    operation_id="readAuditEvent",
    summary="Read one AuditEvent",
    response_class=FhirResponse,
    responses={
        200: {
            "model": schemas.AuditEvent,
            "description": "The AuditEvent",
            "content": {FHIR_JSON: {}},
        },
        **ERRORS,
    },
)
async def read_audit(
    request: Request,
    ctx: ServicesDep,
    principal: Annotated[Principal, Depends(Require("AuditEvent", Action.AUDIT_READ))],
    audit_id: Annotated[str, Path(pattern=ID_PATTERN)],
) -> Response:
    hit = await queries.read(ctx.db, principal, audit_id)
    return pretty(request, hit.content)
