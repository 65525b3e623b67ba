"""The project's own code systems, served as CodeSystem resources (fhir-profile.md), so a
client can look up what `itp-response#LOR` or `medication-role#rescue` means."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response

from app.auth.deps import current_principal
from app.fhir import bundles
from app.fhir.deps import ServicesDep, fhir_base
from app.fhir.http import FHIR_JSON, FhirResponse, negotiate, pretty
from app.fhir.openapi_docs import ERRORS
from app.kit import codes
from app.kit.codes import CodeSystems
from app.kit.errors import NotFound

router = APIRouter(
    prefix="/fhir",
    dependencies=[Depends(negotiate), Depends(current_principal)],
    tags=["CodeSystem"],
)

_CONCEPTS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    # id: (path, title, [(code, display)])
    "trial-codes": (
        codes.TRIAL_CODES_PATH,
        "ITP trial observation codes",
        [
            (codes.WHO_BLEEDING_GRADE, "WHO bleeding grade (0-4)"),
            (codes.ITP_RESPONSE_STATUS, "ITP treatment response status"),
            (codes.BASELINE_COMPONENT, "Baseline platelet count"),
            (codes.TIME_TO_RESPONSE_COMPONENT, "Time to response"),
            (codes.BEST_RESPONSE_COMPONENT, "Best response"),
        ],
    ),
    "medication-role": (
        codes.MEDICATION_ROLE_PATH,
        "Role of an administration in the trial",
        [
            ("study-drug", "Study drug (NAD+ infusion, oral NMN)"),
            ("rescue", "Rescue treatment (IVIg, platelet transfusion, high-dose steroids, ...)"),
            ("concomitant", "Concomitant ITP medication"),
        ],
    ),
    "itp-response": (
        codes.ITP_RESPONSE_PATH,
        "ITP treatment response (IWG criteria)",
        sorted(codes.RESPONSE_DISPLAY.items()),
    ),
}


def code_system(code_systems: CodeSystems, system_id: str) -> dict[str, Any]:
    path, title, concepts = _CONCEPTS[system_id]
    return {
        "resourceType": "CodeSystem",
        "id": system_id,
        "url": code_systems.base + path,
        "name": system_id.replace("-", "_"),
        "title": title,
        "status": "active",
        "content": "complete",
        "caseSensitive": True,
        "count": len(concepts),
        "concept": [{"code": code, "display": display} for code, display in concepts],
    }


@router.get(
    "/CodeSystem",
    operation_id="searchCodeSystem",
    summary="The project's code systems (optionally the one with a given url)",
    response_class=FhirResponse,
    openapi_extra={
        "parameters": [
            {
                "name": "url",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "Canonical URL of the code system",
            }
        ]
    },
    responses={
        200: {"description": "searchset Bundle of CodeSystems", "content": {FHIR_JSON: {}}},
        **ERRORS,
    },
)
async def search_code_systems(request: Request, ctx: ServicesDep) -> Response:
    code_systems = ctx.codes
    url = request.query_params.get("url")
    found = [code_system(code_systems, system_id) for system_id in _CONCEPTS]
    found = [system for system in found if url is None or system["url"] == url]
    entries = [
        bundles.Unversioned("CodeSystem", system["id"], orjson.dumps(system).decode())
        for system in found
    ]
    self_params = request.query_params.multi_items()
    page = bundles.SearchPage(entries)
    text = bundles.searchset(fhir_base(request), "CodeSystem", page, self_params=self_params)
    return pretty(request, text)


@router.get(
    "/CodeSystem/{system_id}",
    operation_id="readCodeSystem",
    summary="One of the project's code systems",
    response_class=FhirResponse,
    responses={200: {"description": "The CodeSystem", "content": {FHIR_JSON: {}}}, **ERRORS},
)
async def read_code_system(
    request: Request,
    ctx: ServicesDep,
    system_id: Annotated[
        str,
        # The code systems are fixed: the enum lists them for clients (and for the fuzzer,
        # which otherwise finds no id to read); any other id is a 404, as a FHIR read.
        Path(pattern=r"^[a-z-]{1,64}$", json_schema_extra={"enum": list(_CONCEPTS)}),
    ],
) -> Response:
    if system_id not in _CONCEPTS:
        raise NotFound(f"CodeSystem/{system_id} does not exist")
    return pretty(request, orjson.dumps(code_system(ctx.codes, system_id)))
