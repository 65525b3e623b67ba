"""The HL7 v2 corpus (tests/hl7/corpus.yaml): each lab message gets its expected ACK and
leaves exactly the expected Observations, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import yaml

from app.engine import Criteria
from app.main import create_app
from app.settings import Settings
from tests.conftest import KEY, assert_every_write_is_audited
from tests.hl7_support import (
    CORPUS,
    assert_answers,
    enrol,
    message,
    platelet_counts,
    read_ack,
    rows,
    send,
    stored_state,
)

CASES = yaml.safe_load((CORPUS / "corpus.yaml").read_text())
TRIAL_ZONE = "Europe/Paris"
LOCAL_CODES = {"L|PLT": "777-3"}
SUBJECT_SYSTEM = "https://itp-trial.example/fhir/sid/subject"


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, environment="test", hl7_local_codes=LOCAL_CODES)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings, criteria=Criteria(trial_timezone=TRIAL_ZONE), key_source=KEY)
    async with application.router.lifespan_context(application):
        yield application
        await assert_every_write_is_audited(application)


def test_the_corpus_covers_what_labs_send():
    versions, acks, files = set(), set(), set()
    for case in CASES:
        for sent in case["messages"]:
            files.add(sent["file"])
            acks.add(sent["ack"])
            head = message(sent["file"]).split(b"\r", 1)[0].decode()
            versions.add(head.split("|")[11])
    assert {"2.3", "2.3.1", "2.4", "2.5", "2.5.1"} <= versions
    assert acks == {"AA", "AE", "AR"}
    assert files == {path.name for path in (CORPUS / "messages").iterdir()}, "unused files"


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
async def test_corpus_message(client: httpx.AsyncClient, app: Any, case: dict[str, Any]):
    patients = await enrol(client, *case["patients"])
    acks = []
    for sent in case["messages"]:
        body = message(sent["file"], sent.get("line_endings", "cr"))
        before = await stored_state(app)
        ack = read_ack(await send(client, body))
        acks.append(ack)
        assert_answers(ack, body)
        assert ack.code == sent["ack"], (sent["file"], ack.text)
        expected_errors = sent.get("errors", [])
        assert len(ack.errors) == len(expected_errors), ack.text
        for (code, where, detail), expected in zip(ack.errors, expected_errors, strict=True):
            assert (code, where) == (expected["code"], expected["where"]), ack.text
            pieces = expected["text"] if isinstance(expected["text"], list) else [expected["text"]]
            assert re.search(".*".join(map(re.escape, pieces)), detail), ack.text
        if "same_ack_as" in sent:
            assert ack.text == acks[sent["same_ack_as"] - 1].text  # byte for byte
        if ack.code != "AA" or "same_ack_as" in sent:
            assert await stored_state(app) == before, f"{sent['file']} stored something"

    stored = await platelet_counts(app)
    expected_results = case.get("stored") or {}
    assert set(stored) == set(expected_results)
    for key, expected in expected_results.items():
        await _check_observation(client, app, stored[key], expected, patients)


async def _check_observation(
    client: httpx.AsyncClient,
    app: Any,
    stored: dict[str, Any],
    expected: dict[str, Any],
    patients: dict[str, str],
) -> None:
    resource = stored["resource"]
    base = "https://itp-trial.example/fhir/sid"
    assert resource["subject"] == {"reference": f"Patient/{patients[expected['patient']]}"}
    assert resource["status"] == expected["status"]
    assert stored["version"] == expected["version"]
    order_id, result_id = resource["identifier"]
    assert order_id["system"] == f"{base}/lab-order/{expected['lab']}"
    assert order_id["value"] == expected["order"]
    assert order_id["type"]["coding"][0]["code"] == "FILL"
    assert result_id["system"] == f"{base}/lab-result/{expected['lab']}"
    assert resource["code"]["coding"] == [
        {
            "system": "http://loinc.org",
            "code": expected["loinc"],
            "display": resource["code"]["coding"][0]["display"],
        }
    ]
    if "text" in expected:
        assert resource["code"]["text"] == expected["text"]
    assert resource["category"][0]["coding"][0]["code"] == "laboratory"
    assert resource["effectiveDateTime"] == expected["effective"]
    quantity = resource["valueQuantity"]
    assert quantity["value"] == expected["value"]
    assert quantity.get("comparator") == expected.get("comparator")
    assert quantity["unit"] == expected["unit"]
    if expected["ucum"] is None:
        assert "code" not in quantity and "system" not in quantity
    else:
        assert quantity["code"] == expected["ucum"]
        assert quantity["system"] == "http://unitsofmeasure.org"
    assert stored["normalised"] == pytest.approx(expected["normalised"])
    if "reference_range" in expected:
        assert resource["referenceRange"] == [{"text": expected["reference_range"]}]
    assert [note["text"] for note in resource.get("note", [])] == expected.get("notes", [])

    # The stored resource is the one the FHIR API serves, with every earlier version.
    read = await client.get(f"/fhir/Observation/{resource['id']}")
    assert read.status_code == 200 and read.json() == resource
    history = await client.get(f"/fhir/Observation/{resource['id']}/_history")
    versions = [entry["resource"] for entry in reversed(history.json()["entry"])]
    assert [(v["status"], v["valueQuantity"]["value"]) for v in versions[:-1]] == [
        (earlier["status"], earlier["value"]) for earlier in expected.get("history", [])
    ]
    provenance = await rows(
        app,
        "SELECT content FROM provenance WHERE target_id = :id AND target_version = :version",
        id=resource["id"],
        version=stored["version"],
    )
    if "reason" in expected:
        (content,) = provenance[0]
        assert orjson.loads(content)["reason"] == [{"text": expected["reason"]}]
    else:
        assert provenance == []
