"""Reason for change: every update (a PUT that creates too), patch and delete of clinical
data, and a Bundle with such an entry, carries an `X-Provenance` header holding a
Provenance whose `reason` says why (21 CFR 11.10(e), ICH E6). The server completes
it (target = the new version, recorded, the signer from the token) and stores it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.auth.principal import Principal
from app.errors import BadRequest, FhirError, Issue
from app.services.dates import format_instant
from app.services.validation import load_json, validate
from app.store.tables import provenance_table as P


class ReasonRequired(FhirError):
    status_code = 400
    issue_code = "required"


def _parse(header: str | None) -> dict[str, Any]:
    if header is None or not header.strip():
        raise ReasonRequired(
            "An update or delete of clinical data needs a reason: send an X-Provenance header "
            'holding a Provenance with a reason, e.g. {"resourceType":"Provenance",'
            '"reason":[{"text":"transcription error"}]}',
            expression=["X-Provenance"],
        )
    try:
        provenance = load_json(header, root="X-Provenance")
    except orjson.JSONDecodeError:
        raise BadRequest("X-Provenance is not JSON", expression=["X-Provenance"]) from None
    if not isinstance(provenance, dict) or provenance.get("resourceType") != "Provenance":
        raise BadRequest(
            "X-Provenance must hold a Provenance resource", expression=["X-Provenance"]
        )
    return provenance


def require_reason(header: str | None) -> str:
    """The reason's text (or codes) from the header; refuses a Provenance without one."""
    provenance = _parse(header)
    reasons = provenance.get("reason")
    texts: list[str] = []
    if isinstance(reasons, list):
        for reason in reasons:
            if not isinstance(reason, dict):
                continue
            if isinstance(reason.get("text"), str) and reason["text"].strip():
                texts.append(reason["text"].strip())
            for coding in reason.get("coding") or ():
                if isinstance(coding, dict) and coding.get("code"):
                    texts.append(str(coding.get("display") or coding["code"]))
    if not texts:
        raise ReasonRequired(
            "The X-Provenance has no reason (Provenance.reason with a text or a coding)",
            issues=[
                Issue(
                    "required", "Provenance.reason is required for a change", ["Provenance.reason"]
                )
            ],
        )
    return "; ".join(texts)


async def store_provenance(
    conn: AsyncConnection,
    header: str,
    principal: Principal,
    resource_type: str,
    resource_id: str,
    version: int,
    now: datetime,
) -> None:
    provenance = _parse(header)
    provenance_id = str(uuid.uuid4())
    completed = {
        **{k: v for k, v in provenance.items() if k not in ("id", "meta", "target", "recorded")},
        "resourceType": "Provenance",
        "id": provenance_id,
        "target": [{"reference": f"{resource_type}/{resource_id}/_history/{version}"}],
        "recorded": format_instant(now),
        "agent": [
            *(provenance.get("agent") or []),
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": {"identifier": {"value": principal.sub}},
            },
        ],
    }
    validate(completed, "Provenance")
    await conn.execute(
        insert(P).values(
            id=provenance_id,
            target_type=resource_type,
            target_id=resource_id,
            target_version=version,
            recorded=now,
            content=orjson.dumps(completed).decode(),
        )
    )
