"""The README's examples that post to the API, run as they are written (both databases).

A lab copies them: an example that does not work is a defect (one did not: a lab's Bundle
described as "the same Bundle without the Patient entry" kept a reference to that entry).
The examples are read out of README.md, so a change to the text is what gets tested: each
`curl ... -XPOST localhost:8000/fhir` with its heredoc Bundle, and the `printf` HL7 message,
with a token of the role and sites its `python -m app token` line asks for.
"""

from __future__ import annotations

import re
import shlex

import orjson

from tests import builders
from tests.conftest import PROJECT_ROOT, bearer
from tests.test_crud import create

SHELL_BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
TOKEN_LINE = re.compile(r"python -m app token (?P<args>[^)]*)\)")
HEREDOC = re.compile(r"<<'JSON'\n(?P<json>.*?)\nJSON\n", re.DOTALL)
RESULTS = "https://lab.example/results"


def _blocks(marker: str) -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    return [block for block in SHELL_BLOCK.findall(text) if marker in block]


def _caller(block: str) -> tuple[str, tuple[str, ...]]:
    """The role and sites of the block's token command."""
    match = TOKEN_LINE.search(block)
    assert match, block
    args = shlex.split(match["args"])
    return args[args.index("--role") + 1], tuple(args[args.index("--sites") + 1].split(","))


def _headers(block: str) -> dict[str, str]:
    """The `-H` headers of the block's curl command but Authorization (a token of the
    block's role is sent instead)."""
    command = block[block.index("curl ") : block.index("<<'JSON'")].replace("\\\n", " ")
    args = shlex.split(command)
    headers = dict(args[i + 1].split(": ", 1) for i, arg in enumerate(args[:-1]) if arg == "-H")
    headers.pop("Authorization")
    return headers


Example = tuple[tuple[str, tuple[str, ...]], dict[str, str], dict]


def _bundles() -> list[Example]:
    examples = []
    for block in _blocks("-XPOST localhost:8000/fhir "):
        body = HEREDOC.search(block)
        assert body, block
        examples.append((_caller(block), _headers(block), orjson.loads(body["json"])))
    return examples


def _hl7_message() -> tuple[tuple[str, tuple[str, ...]], bytes]:
    (block,) = _blocks("localhost:8000/hl7/v2")
    segments = re.findall(r"^  '(.*)' \\$", block, re.MULTILINE)
    assert segments and segments[0].startswith("MSH|"), block
    return _caller(block), "\r".join(segments).encode() + b"\r"


async def _counts(client, subject: str) -> list[dict]:
    found = await client.get(
        "/fhir/Observation",
        params={
            "subject:Patient.identifier": f"{builders.SUBJECT_SYSTEM}|{subject}",
            "code": "http://loinc.org|777-3",
        },
    )
    return [entry["resource"] for entry in found.json().get("entry", [])]


async def test_the_readme_bundles_work_as_written(client):
    # The enrolled patient the examples name by subject number.
    known = await create(client, builders.patient("S01-001"))
    assert known.status_code == 201
    examples = _bundles()
    assert [caller for caller, _, _ in examples] == [
        ("investigator", ("S01",)),
        ("lab", ("S01",)),
    ]
    for caller, headers, bundle in examples:
        # Each has a PUT entry, so each carries a reason, and that reason is a Provenance.
        assert orjson.loads(headers["X-Provenance"])["reason"]
        answer = await client.post("/fhir", json=bundle, headers={**headers, **bearer(*caller)})
        assert answer.status_code == 200, answer.text
        statuses = [entry["response"]["status"] for entry in answer.json()["entry"]]
        assert statuses == ["201 Created"] * len(bundle["entry"]), statuses
    # What the text says was stored: the investigator's Bundle enrolled S01-002 and gave
    # each patient a count; the lab's added one count per patient, in 10^9/L 51 and 64.
    first = await _counts(client, "S01-001")
    second = await _counts(client, "S01-002")
    assert sorted(o["effectiveDateTime"] for o in first) == [
        "2025-03-10T08:20:00+01:00",
        "2025-03-17T08:10:00+01:00",
    ]
    assert sorted(o["effectiveDateTime"] for o in second) == [
        "2025-03-10T08:15:00+01:00",
        "2025-03-17T08:12:00+01:00",
    ]
    # A resend of the lab's Bundle updates the same results (a new version each, with a
    # reason), never stores them twice.
    caller, headers, bundle = examples[1]
    again = await client.post("/fhir", json=bundle, headers={**headers, **bearer(*caller)})
    assert again.status_code == 200, again.text
    assert [e["response"]["status"] for e in again.json()["entry"]] == ["200 OK", "200 OK"]
    assert len(await _counts(client, "S01-001")) == 2
    assert len(await _counts(client, "S01-002")) == 2


async def test_the_readme_lab_bundle_needs_enrolled_patients(client):
    caller, headers, bundle = _bundles()[1]
    answer = await client.post("/fhir", json=bundle, headers={**headers, **bearer(*caller)})
    assert answer.status_code == 400, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    # Refused for the unknown subject (the README's headers are complete).
    assert "matches no Patient" in outcome["issue"][0]["diagnostics"], outcome
    assert (await client.get("/fhir/Observation")).json().get("entry", []) == []


async def test_the_readme_hl7_message_is_accepted(client):
    assert (await create(client, builders.patient("S01-001"))).status_code == 201
    caller, message = _hl7_message()
    answer = await client.post(
        "/hl7/v2",
        content=message,
        headers={**bearer(*caller), "Content-Type": "x-application/hl7-v2+er7"},
    )
    assert answer.status_code == 200, answer.text
    segments = answer.text.strip("\r").split("\r")
    assert segments[1] == "MSA|AA|CL2503100001", segments
    (count,) = await _counts(client, "S01-001")
    assert count["valueQuantity"]["value"] == 42
