"""The trial report's operations: the report, the response listing (JSON or CSV), a
patient's platelet chart and the swimmer plot (SVG).

Every one covers the caller's sites, narrowed by `site=`; each needs the right to search
all four clinical types, since it shows all of them (a lab, which may not browse the
trial's patients, is refused). Errors are OperationOutcomes, whatever was asked for.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import StringConstraints

from app.auth.deps import RequireAll
from app.auth.permissions import Action
from app.auth.principal import Principal
from app.fhir.deps import IdPath, ServicesDep
from app.fhir.http import (
    FHIR_JSON,
    choose_media_type,
    negotiate,
    pretty,
    refuse_unknown_parameters,
)
from app.fhir.openapi_docs import NO_404_ERRORS, PATIENT_JSON_ERRORS, outcome_docs
from app.fhir.report_schemas import ResponseListing, TrialReport
from app.kit.codes import CLINICAL_RESOURCE_TYPES, SITE_CODE_PATTERN
from app.services import report

router = APIRouter(prefix="/fhir", tags=["Report"])

SVG = "image/svg+xml"
CSV = "text/csv"
JSON = "application/json"
_SITE = SITE_CODE_PATTERN.strip("^$")
# A site code, or several separated by commas; the parameter may also repeat.
SITES_PATTERN = f"^{_SITE}(,{_SITE})*$"
Sites = Annotated[
    list[Annotated[str, StringConstraints(pattern=SITES_PATTERN)]] | None,
    Query(
        alias="site",
        description="Only these sites (codes, comma-separated or repeated); each must be one "
        "the token grants (403 otherwise). Absent: every site of the caller.",
    ),
]
Reader = Annotated[Principal, Depends(RequireAll(CLINICAL_RESOURCE_TYPES, Action.SEARCH))]
_JSON_PARAMETERS = frozenset({"site", "_format", "_pretty"})
_LISTING_FORMATS = {
    "json": JSON,
    JSON: JSON,
    FHIR_JSON: JSON,
    "application/json+fhir": JSON,
    "csv": CSV,
    CSV: CSV,
}
_NO_404 = outcome_docs(NO_404_ERRORS)


def requested_sites(values: list[str] | None) -> frozenset[str]:
    return frozenset(site for value in values or () for site in value.split(",") if site)


def _json(request: Request, document: Any) -> Response:
    return pretty(request, orjson.dumps(document), media_type=JSON)


@router.get(
    "/$trial-report",
    operation_id="getTrialReport",
    summary="The trial at a glance: response rates with exact intervals, time to and "
    "duration of response (Kaplan-Meier), platelets, adverse events, per site",
    response_class=JSONResponse,
    dependencies=[Depends(negotiate)],
    responses={200: {"model": TrialReport, "description": "The report"}, **_NO_404},
)
async def trial_report(
    request: Request, ctx: ServicesDep, principal: Reader, site: Sites = None
) -> Response:
    refuse_unknown_parameters(request, _JSON_PARAMETERS)
    document = await report.trial_report(
        ctx, principal, requested_sites(site), request.url.query or None
    )
    return _json(request, document)


@router.get(
    "/$response-listing",
    operation_id="getResponseListing",
    summary="One row per patient: treatment start, baseline, status, best response, "
    "times to response, duration, peak count, rescues, adverse events",
    description="JSON by default; CSV (a header row of the same names, empty cells for "
    "nulls) with `Accept: text/csv` or `_format=csv`.",
    response_class=JSONResponse,
    responses={
        200: {
            "model": ResponseListing,
            "description": "The listing",
            "content": {CSV: {"schema": {"type": "string"}}},
        },
        **_NO_404,
    },
)
async def response_listing(
    request: Request, ctx: ServicesDep, principal: Reader, site: Sites = None
) -> Response:
    refuse_unknown_parameters(request, _JSON_PARAMETERS)
    chosen = choose_media_type(request, (JSON, CSV), _LISTING_FORMATS)
    listing = await report.response_listing(
        ctx, principal, requested_sites(site), request.url.query or None
    )
    if chosen == CSV:
        return Response(report.listing_csv(listing["rows"]), media_type=f"{CSV}; charset=utf-8")
    return _json(request, listing)


def _svg_response(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {SVG: {"schema": {"type": "string"}}}}}


@router.get(
    "/Patient/{resource_id}/$platelet-chart",
    operation_id="getPlateletChart",
    summary="The patient's platelet counts against study day (SVG)",
    description="Log scale, lines at the response and complete-response thresholds, the "
    "baseline, each study-drug dose as a tick, rescue windows shaded, bleeding marked, "
    "status changes annotated. Each count's marker is an element whose `id` is its "
    "Observation id.",
    response_class=Response,
    responses={
        **_svg_response("The chart"),
        **PATIENT_JSON_ERRORS,
    },
)
async def platelet_chart(
    request: Request, ctx: ServicesDep, principal: Reader, resource_id: IdPath
) -> Response:
    refuse_unknown_parameters(request, frozenset())
    choose_media_type(request, (SVG,), {})
    return Response(await report.platelet_chart(ctx, principal, resource_id), media_type=SVG)


@router.get(
    "/$swimmer-plot",
    operation_id="getSwimmerPlot",
    summary="One lane per treated patient, coloured by response status over time (SVG)",
    description="Lanes sorted by follow-up, the longest on top; each lane is an element "
    "whose `id` is `lane-<patient id>`; triangles mark rescues, crosses losses of response.",
    response_class=Response,
    responses={**_svg_response("The plot"), **_NO_404},
)
async def swimmer_plot(
    request: Request, ctx: ServicesDep, principal: Reader, site: Sites = None
) -> Response:
    refuse_unknown_parameters(request, frozenset({"site"}))
    choose_media_type(request, (SVG,), {})
    svg = await report.swimmer_plot(ctx, principal, requested_sites(site), request.url.query)
    return Response(svg, media_type=SVG)
