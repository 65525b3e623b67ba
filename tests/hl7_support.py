"""Helpers of the HL7 v2 tests: the corpus's messages, sending them, reading ACKs (with
python-hl7, as a lab's interface engine would), and what the database holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import httpx
import orjson
from sqlalchemy import text

from tests import builders
from tests.conftest import bearer

CORPUS = Path(__file__).parent / "hl7"
ER7 = "x-application/hl7-v2+er7"
LAB = {"role": "lab", "sites": ("S01",), "sub": "central-lab-interface"}


def message(name: str, line_endings: str = "cr") -> bytes:
    """A corpus message as it goes on the wire. The files keep one segment per line."""
    lines = (CORPUS / "messages" / name).read_text().splitlines()
    if line_endings == "lf":
        return ("\n".join(lines) + "\n").encode()
    if line_endings == "crlf":
        return ("\r\n".join(lines) + "\r\n").encode()
    body = ("\r".join(lines) + "\r").encode()
    if line_endings == "mllp":  # start block, message, end block, carriage return
        return b"\x0b" + body + b"\x1c\r"
    assert line_endings == "cr", line_endings
    return body


def lab_headers(**overrides: Any) -> dict[str, str]:
    who = {**LAB, **overrides}
    return {**bearer(who["role"], who["sites"], sub=who["sub"]), "Content-Type": ER7}


async def send(
    client: httpx.AsyncClient, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post("/hl7/v2", content=body, headers=headers or lab_headers())


async def enrol(client: httpx.AsyncClient, *subjects: str) -> dict[str, str]:
    """Patient ids by subject number; `S02-001@S02` enrols at site S02 (default S01)."""
    ids = {}
    for entry in subjects:
        subject, _, site = entry.partition("@")
        response = await client.post(
            "/fhir/Patient",
            json=builders.patient(subject, site or "S01"),
            headers={"Content-Type": "application/fhir+json"},
        )
        assert response.status_code == 201, response.text
        ids[subject] = response.json()["id"]
    return ids


def _component(segment: Any, field: int, component: int, subcomponent: int = 1) -> str:
    try:
        return str(segment.extract_field(1, field, 1, component, subcomponent))
    except IndexError:  # python-hl7: the field is empty or has fewer levels
        return ""


@dataclass
class Ack:
    text: str
    code: str  # MSA-1
    acknowledged: str  # MSA-2
    msh: Any
    errors: list[tuple[str, str, str]]  # (table 0357 code, SEGMENT^SEQUENCE^FIELD, text)


def read_ack(response: httpx.Response) -> Ack:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(ER7)
    parsed = hl7.parse(response.text)
    segments = {str(segment[0]): segment for segment in parsed}
    assert list(segments)[:2] == ["MSH", "MSA"], response.text
    msh, msa = segments["MSH"], segments["MSA"]
    modern = msh.extract_field(1, 12) not in ("2.3", "2.3.1", "2.4")
    errors = []
    for segment in parsed:
        if str(segment[0]) != "ERR":
            continue
        if modern:  # ERR-2 location, ERR-3 code, ERR-8 text
            where = [_component(segment, 2, c) for c in (1, 2, 3)]
            code, detail = _component(segment, 3, 1), _component(segment, 8, 1)
        else:  # ERR-1: segment^sequence^field^code&text
            where = [_component(segment, 1, c) for c in (1, 2, 3)]
            code, detail = _component(segment, 1, 4, 1), _component(segment, 1, 4, 2)
        errors.append((code, "^".join(where).strip("^"), detail))
    return Ack(response.text, msa.extract_field(1, 1), msa.extract_field(1, 2), msh, errors)


def assert_answers(ack: Ack, sent: bytes) -> None:
    """The ACK is about `sent`: sender and receiver swapped, MSA-2 its MSH-10, same version."""
    original = hl7.parse(
        sent.strip(b"\x0b\x1c\r\n").decode().replace("\r\n", "\r").replace("\n", "\r")
    )
    msh = original.segment("MSH")
    assert ack.acknowledged == msh.extract_field(1, 10)
    assert str(ack.msh(5)) == str(msh(3)) and str(ack.msh(6)) == str(msh(4))
    assert str(ack.msh(3)) == (str(msh(5)) or "ITP-TRIAL-API")
    assert ack.msh.extract_field(1, 9, 1, 1) == "ACK"
    assert ack.msh.extract_field(1, 12) == msh.extract_field(1, 12)
    assert ack.msh.extract_field(1, 10) != msh.extract_field(1, 10)


async def rows(app: Any, query: str, **params: Any) -> list[Any]:
    async with app.state.services.db.read() as conn:
        return list((await conn.execute(text(query), params)).all())


async def platelet_counts(app: Any) -> dict[str, dict[str, Any]]:
    """Every live platelet Observation by its result identifier's value, with its stored
    resource, normalised value and version."""
    found = {}
    for content, value_norm, version in await rows(
        app,
        "SELECT content, value_norm, version_id FROM resource "
        "WHERE resource_type = 'Observation' AND kind = 'platelet-count' AND NOT deleted",
    ):
        resource = orjson.loads(content)
        key = next(i["value"] for i in resource["identifier"] if "/sid/lab-result/" in i["system"])
        assert key not in found, f"two Observations carry result identifier {key}"
        found[key] = {"resource": resource, "normalised": value_norm, "version": version}
    return found


async def stored_state(app: Any) -> dict[str, int]:
    """Row counts of everything a message may write (the audit trail aside)."""
    state = {}
    for table in (
        "resource",
        "resource_version",
        "search_token",
        "provenance",
        "hl7_message",
        "response_assessment",
    ):
        state[table] = (await rows(app, f"SELECT count(*) FROM {table}"))[0][0]
    return state
