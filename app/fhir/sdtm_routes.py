"""`GET /sdtm/{domain}.{xpt|csv}`: a CDISC SDTM dataset of the caller's sites, for a
statistician (monitor or admin). The dataset is written to a temporary file, streamed, then
removed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from app.auth.deps import current_principal
from app.auth.principal import Principal
from app.fhir.deps import ServicesDep, SettingsDep
from app.fhir.openapi_docs import ERRORS, outcome_docs
from app.services import sdtm

router = APIRouter(prefix="/sdtm", tags=["SDTM"])
MEDIA_TYPES = {"xpt": "application/x-sas-xport", "csv": "text/csv; charset=utf-8"}
DomainCode = Literal["dm", "ex", "cm", "lb", "ae", "rs"]


@router.get(
    "/{domain}.{fmt}",
    operation_id="getSdtmDataset",
    summary="A CDISC SDTM dataset (SDTMIG 3.4) of the caller's sites: SAS transport v5 or CSV",
    description="DM, EX, CM, LB, AE or RS, one file; variables in SDTMIG order with their "
    "labels, rows sorted by USUBJID and --SEQ, dates ISO 8601 in the trial's time zone. "
    "Monitors and admins; audited.",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The dataset",
            "headers": {
                "X-Row-Count": {"description": "Rows in the dataset", "schema": {"type": "integer"}}
            },
            "content": {
                "application/x-sas-xport": {"schema": {"type": "string", "format": "binary"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **outcome_docs({**ERRORS, 404: {"description": "No such domain"}}),
    },
)
async def sdtm_dataset(
    ctx: ServicesDep,
    settings: SettingsDep,
    principal: Annotated[Principal, Depends(current_principal)],
    domain: Annotated[DomainCode, PathParam(description="dm, ex, cm, lb, ae or rs")],
    fmt: Annotated[Literal["xpt", "csv"], PathParam(description="xpt (SAS transport v5) or csv")],
) -> FileResponse:
    directory = Path(tempfile.mkdtemp(prefix="sdtm-"))
    try:
        file = sdtm.DatasetFile(domain, fmt, directory)
        path, count = await sdtm.dataset_file(ctx, principal, file, settings.study_id)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[fmt],
        filename=path.name,
        headers={"X-Row-Count": str(count)},
        background=BackgroundTask(shutil.rmtree, directory, ignore_errors=True),
    )
