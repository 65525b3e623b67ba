"""The trial's own operations: a patient's response status and the trial's summary."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.auth.deps import Require
from app.auth.permissions import Action
from app.auth.principal import Principal
from app.fhir.deps import IdPath, ServicesDep
from app.fhir.http import negotiate, pretty, refuse_unknown_parameters
from app.fhir.openapi_docs import NO_404_ERRORS, PATIENT_JSON_ERRORS, outcome_docs
from app.fhir.report_routes import Sites, requested_sites
from app.fhir.response_schemas import ResponseAssessment, ResponseSummary
from app.services import response

router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)], tags=["Response"])
_ASSESSMENT = {"model": ResponseAssessment, "description": "The stored assessment"}
_SUMMARY = {"model": ResponseSummary, "description": "The trial's summary"}


@router.get(
    "/Patient/{resource_id}/$response-status",
    operation_id="getResponseStatus",
    summary="The patient's current ITP response assessment: evidence, the classification of "
    "every count and bleed, criteria",
    response_class=JSONResponse,
    responses={200: _ASSESSMENT, **PATIENT_JSON_ERRORS},
)
async def response_status(
    request: Request,
    ctx: ServicesDep,
    principal: Annotated[Principal, Depends(Require("Patient", Action.READ))],
    resource_id: IdPath,
) -> Response:
    text = await response.response_status(ctx, resource_id, principal)
    return pretty(request, text, media_type="application/json")


@router.get(
    "/$response-summary",
    operation_id="getResponseSummary",
    summary="Patients by current status and best response; overall response rate",
    response_class=JSONResponse,
    responses={200: _SUMMARY, **outcome_docs(NO_404_ERRORS)},
)
async def response_summary(
    request: Request,
    ctx: ServicesDep,
    principal: Annotated[Principal, Depends(Require("Patient", Action.SEARCH))],
    site: Sites = None,
) -> Response:
    refuse_unknown_parameters(request, frozenset({"site", "_format", "_pretty"}))
    summary = await response.response_summary(ctx, principal, requested_sites(site))
    return pretty(request, orjson.dumps(summary), media_type="application/json")
