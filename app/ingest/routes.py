"""`POST /hl7/v2`: one HL7 v2 ORU^R01 message in, its ACK out, both in ER7.

HTTP status: 200 whenever the body is an HL7 message, whatever MSA-1 says (AA, AE or AR):
the ACK is the application's answer, and an interface engine reads MSA-1; a 4xx would make
it treat an application error as a transport failure and retry. A body with no MSH to
answer is 400; authentication, authorisation, media type and size are refused before the
message is read, as for FHIR writes; all of these are OperationOutcomes. An unexpected
failure is a 500 OperationOutcome, a database that cannot serve now a 503 with Retry-After:
the engine retries either, and a retry is safe.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from app.auth.deps import Require
from app.auth.permissions import Action
from app.auth.principal import Principal
from app.fhir.deps import ServicesDep, SettingsDep
from app.hl7.hl7v2 import LEADING_NOISE
from app.kit.errors import UnsupportedMediaType
from app.services.hl7_ingest import receive

HL7_ER7 = "x-application/hl7-v2+er7"
ACCEPTED_TYPES = (HL7_ER7, "text/plain")

router = APIRouter(prefix="/hl7", tags=["HL7"])


def _outcome(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/OperationOutcome"}
    return {"description": description, "content": {"application/fhir+json": {"schema": schema}}}


# ER7 text is documented as bytes: client generators then send and return it as it is (no
# JSON quoting), and the charset stays the sender's (UTF-8 unless Content-Type says).
_ER7_SCHEMA = {"type": "string", "format": "binary"}
# A message starts with its MSH segment (after what hl7v2.LEADING_NOISE allows): without
# one there is nothing to acknowledge (400); with one there is an ACK, AR when the MSH is
# unreadable. Documented as a string with that pattern, not as `binary`: schemathesis keeps
# to a pattern only on a string.
_ER7_MESSAGE_SCHEMA = {
    "type": "string",
    "pattern": "^[" + "".join(f"\\u{ord(c):04x}" for c in LEADING_NOISE) + "]*MSH",
}
_EXAMPLE = (
    "MSH|^~\\&|LIS|CENTRAL LAB|ITP-TRIAL-API|TRIAL|20250310093000+0100||ORU^R01^ORU_R01|"
    "LAB000123|P|2.5.1\r"
    "PID|1||S01-001^^^ITP-TRIAL^RI\r"
    "OBR|1||FIL-77001^CENTRAL LAB|58410-2^CBC panel^LN|||20250310081500\r"
    "OBX|1|NM|777-3^Platelets^LN||42|10*9/L^10*9/L^UCUM|150-400|L|||F\r"
)


@router.post(
    "/v2",
    operation_id="receiveLabResults",
    summary="Receive one HL7 v2 ORU^R01 message of lab results; answers its ACK",
    description=(
        "One ER7 message (versions 2.3 to 2.5.1), sent as `x-application/hl7-v2+er7` or "
        "`text/plain`. Platelet counts (OBX-3 LOINC 777-3 or 26515-7, or a configured local "
        "code) become Observations of the patient named in PID-3; the ACK's MSA-1 is AA "
        "(stored), AE (nothing stored: ERR says why) or AR (rejected). A redelivery of the "
        "same MSH-10 answers the first ACK and stores nothing again."
    ),
    response_class=Response,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {HL7_ER7: {"schema": _ER7_MESSAGE_SCHEMA, "example": _EXAMPLE}},
        }
    },
    responses={
        200: {
            "description": "The ACK (MSA-1 AA, AE or AR; ERR segments for AE and AR)",
            "content": {HL7_ER7: {"schema": _ER7_SCHEMA}},
        },
        400: _outcome("The body does not start with an MSH segment: nothing to acknowledge"),
        401: _outcome("No valid bearer token (see WWW-Authenticate)"),
        403: _outcome("The caller's role or scopes do not allow HL7 result ingestion"),
        413: _outcome("The body is larger than the server accepts"),
        415: _outcome("Content-Type is not x-application/hl7-v2+er7 or text/plain"),
        500: _outcome("Unexpected error; the outcome carries a correlation id"),
        503: _outcome("The database is unavailable: retry after Retry-After seconds"),
    },
)
async def receive_message(
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    principal: Principal = Depends(Require("Observation", Action.INGEST_HL7)),
) -> Response:
    content_type = request.headers.get("content-type", "")
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not supported; send one ER7 message as "
            f"{HL7_ER7} or text/plain"
        )
    reply = await receive(
        services,
        await request.body(),
        principal,
        charset=_charset(parameters),
        local_codes=settings.hl7_local_codes,
    )
    return Response(reply.ack.encode(), media_type=f"{HL7_ER7}; charset=utf-8")


def _charset(parameters: str) -> str | None:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return None
