"""Reason for change: every update (a PUT that creates too), patch and delete of clinical
data, and a Bundle with such an entry, carries an `X-Provenance` header holding a
Provenance whose `reason` says why (21 CFR 11.10(e), ICH E6). The server completes
it (target = the new version, recorded, the signer from the token) and stores it."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from sqlalchemy import insert

from app.kit.dates import format_instant
from app.kit.errors import BadRequest, FhirError, Issue
from app.services.context import WriteTransaction
from app.services.validation import load_json, validate
from app.store.tables import provenance_table


class ReasonRequired(FhirError):
    status_code = 400
    issue_code = "required"


# What every message about the header shows: what it holds, and one that works.
EXAMPLE = '{"resourceType":"Provenance","reason":[{"text":"transcription error"}]}'
EXPECTED = (
    "X-Provenance holds a Provenance resource in JSON whose reason has a text or a coding, "
    f"in printable ASCII (other characters as JSON \\u escapes), e.g. X-Provenance: {EXAMPLE}"
)
MISSING = (
    "An update, patch or delete of clinical data (a PUT that creates too) needs a reason "
    f"for the change, and the X-Provenance header is missing. {EXPECTED}"
)


def header_problem(error_type: str, context: dict[str, Any]) -> str | None:
    """The message for a header FastAPI refused before the route ran (pydantic's error
    `type`), saying what the header must hold; None for an error not about the header's form."""
    if error_type == "missing":
        return MISSING
    if error_type == "string_too_long":
        return f"X-Provenance is longer than {context.get('max_length')} characters. {EXPECTED}"
    if error_type == "string_pattern_mismatch":
        return f"X-Provenance has no visible character or one outside printable ASCII. {EXPECTED}"
    return None


def _parse(header: str | None) -> dict[str, Any]:
    if header is None or not header.strip():
        raise ReasonRequired(MISSING, expression=["X-Provenance"])
    try:
        provenance = load_json(header, root="X-Provenance")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"X-Provenance is not JSON ({exc}). {EXPECTED}", expression=["X-Provenance"]
        ) from None
    if not isinstance(provenance, dict) or provenance.get("resourceType") != "Provenance":
        raise BadRequest(
            f"X-Provenance does not hold a Provenance resource. {EXPECTED}",
            expression=["X-Provenance"],
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
        message = (
            "The X-Provenance has no reason: Provenance.reason needs a text or a coding "
            f"saying why. {EXPECTED}"
        )
        raise ReasonRequired(message, issues=[Issue("required", message, ["Provenance.reason"])])
    return "; ".join(texts)


async def store_provenance(
    tx: WriteTransaction, header: str, resource_type: str, resource_id: str, version: int
) -> None:
    provenance = _parse(header)
    provenance_id = str(uuid.uuid4())
    completed = {
        **{k: v for k, v in provenance.items() if k not in ("id", "meta", "target", "recorded")},
        "resourceType": "Provenance",
        "id": provenance_id,
        "target": [{"reference": f"{resource_type}/{resource_id}/_history/{version}"}],
        "recorded": format_instant(tx.now),
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
                "who": {"identifier": {"value": tx.principal.sub}},
            },
        ],
    }
    validate(completed, "Provenance")
    await tx.conn.execute(
        insert(provenance_table).values(
            id=provenance_id,
            target_type=resource_type,
            target_id=resource_id,
            target_version=version,
            recorded=tx.now,
            content=orjson.dumps(completed).decode(),
        )
    )
