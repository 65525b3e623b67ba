"""What the FHIR and HL7 routes share: the services and settings built at start-up (the
only place a handler reads `app.state`), the `Call` a handler serves, and the path, query
and header parameters several routes declare alike."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request

from app.auth.principal import Principal
from app.fhir.openapi_docs import PROVENANCE_HEADER_SCHEMA_NAME
from app.kit.codes import CLINICAL_RESOURCE_TYPES
from app.kit.dates import DATE_TIME_PATTERN
from app.services.bulk_export import ExportRunner
from app.services.context import ServiceContext
from app.settings import Settings

RESOURCE_TYPES = CLINICAL_RESOURCE_TYPES
ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"


# `async` though they never await: they read app.state only, and FastAPI runs a sync
# dependency in its thread pool (two thread hops per request, bench/README.md).
async def request_services(request: Request) -> ServiceContext:
    services: ServiceContext = request.app.state.services
    return services


async def request_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def request_exports(request: Request) -> ExportRunner:
    exports: ExportRunner = request.app.state.exports
    return exports


ServicesDep = Annotated[ServiceContext, Depends(request_services)]
SettingsDep = Annotated[Settings, Depends(request_settings)]
# The export runner of this worker, told when a job is queued.
ExportsDep = Annotated[ExportRunner, Depends(request_exports)]


@dataclass(frozen=True)
class Call:
    """One request, the services, and the caller, whose role and scopes allow what it
    asks."""

    request: Request
    ctx: ServiceContext
    principal: Principal


def call_of(caller: Callable[..., Awaitable[Principal]]) -> Callable[..., Awaitable[Call]]:
    """The dependency giving a handler its `Call`; `caller` is the dependency that finds
    the caller and checks what it may do (`Require(...)`, or `current_principal`)."""

    async def call(
        request: Request, ctx: ServicesDep, principal: Principal = Depends(caller)
    ) -> Call:
        return Call(request, ctx, principal)

    return call


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
PROVENANCE_DESCRIPTION = (
    "Reason for change: a Provenance resource in JSON whose reason (a text or a coding) says "
    'why, e.g. {"resourceType":"Provenance","reason":[{"text":"transcription error"}]}; '
    "characters outside ASCII as JSON \\u escapes. The server completes it (target = the "
    "version written, recorded, the signer) and stores it."
)
PROVENANCE_CONTENT: dict[str, Any] = {
    "contentMediaType": "application/json",
    "contentSchema": {"$ref": f"#/components/schemas/{PROVENANCE_HEADER_SCHEMA_NAME}"},
}


def provenance_header(description: str) -> Any:
    return Header(
        alias="X-Provenance",
        description=description,
        pattern=PROVENANCE_PATTERN,
        max_length=PROVENANCE_MAX_LENGTH,
        json_schema_extra=PROVENANCE_CONTENT,
    )


# Every update, patch and delete needs it, whatever it finds: required on those operations.
XProvenance = Annotated[str, provenance_header(PROVENANCE_DESCRIPTION)]
# A Bundle needs it only when an entry is a PUT, PATCH or DELETE.
OptionalXProvenance = Annotated[
    str | None,
    provenance_header(
        "Required when an entry is a PUT, PATCH or DELETE (the reason applies to each). "
        + PROVENANCE_DESCRIPTION
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


def fhir_base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"
