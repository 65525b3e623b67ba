"""Upgrading stored assessments to response rules version 2, on both databases.

Assessments stored under version 1 (criteria without the version-2 keys, no classifications,
no result fingerprint) are served as version 1's, and `python -m app recompute` reassesses
every patient: each changed result gets a new status version with a Provenance giving the
reason ("response rules version 2" by default) and an audit record saying from what it
changed; an unchanged result gets no new version."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import subprocess
import sys
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from app.engine import VERSION_1_CRITERIA, Criteria
from app.main import create_app
from app.services import response
from app.services.context import ServiceContext
from app.settings import Settings
from tests import builders
from tests.conftest import KEY, PROJECT_ROOT, REASON, bearer
from tests.test_audit import _details, _events, provenance_rows
from tests.test_crud import create, new_patient
from tests.test_response_api import enrol_and_treat, post_count, status_of


@pytest.fixture
def services(app) -> ServiceContext:
    return app.state.services


async def _trial(client) -> dict[str, str]:
    """Four patients whose stories version 2 reads differently, or not."""
    same = await enrol_and_treat(client, (12, "10*9/L"))  # example 2: R either way
    await post_count(client, same, "03-10", 35)
    await post_count(client, same, "03-17", 48)
    weekly = await enrol_and_treat(client, (12, "10*9/L"))  # example 11: 6 d 22 h apart
    await create(client, builders.platelet_count(weekly, "2025-03-10T10:00:00Z", 40))
    await create(client, builders.platelet_count(weekly, "2025-03-17T08:00:00Z", 45))
    untreated = await new_patient(client, "S01-777")  # NE, under another wording
    bled = await enrol_and_treat(client, (10, "10*9/L"))  # example 14: a bleed, no count
    for day, value in (("03-10", 40), ("03-17", 45), ("04-07", 50), ("04-14", 55)):
        await post_count(client, bled, day, value)
    await create(client, builders.bleeding_grade(bled, "2025-04-01T11:00:00Z", 2))
    return {"same": same, "weekly": weekly, "untreated": untreated, "bled": bled}


async def _stored_by_version_1(services: ServiceContext) -> None:
    """Assess everyone under version 1, then store each assessment as version 1 wrote it:
    criteria without the version-2 keys, no classifications, no result fingerprint, and a
    fingerprint of the whole document (nor any of what came later: a fold state, rows of
    classifications)."""
    version_1 = dataclasses.replace(services, criteria=Criteria.from_stored({}))
    await response.recompute_all(version_1, reason="test: back to version 1")
    async with services.db.write() as conn:
        await conn.execute(text("DELETE FROM response_classification"))
        rows = await conn.execute(text("SELECT patient_id, content FROM response_assessment"))
        for patient_id, content in rows.all():
            document = orjson.loads(content)
            document.pop("classifications", None)
            document["criteria"] = {
                k: v for k, v in document["criteria"].items() if k not in VERSION_1_CRITERIA
            }
            whole = {k: v for k, v in document.items() if k not in ("computed_at", "observation")}
            fingerprint = hashlib.sha256(orjson.dumps(whole, option=orjson.OPT_SORT_KEYS))
            await conn.execute(
                text(
                    "UPDATE response_assessment SET content = :content, "
                    "fingerprint = :fingerprint, decision_fingerprint = NULL, "
                    "fold_state = NULL, classification_count = NULL, "
                    "classification_digest = NULL WHERE patient_id = :patient_id"
                ),
                {
                    "content": orjson.dumps(document).decode(),
                    "fingerprint": fingerprint.hexdigest(),
                    "patient_id": patient_id,
                },
            )


async def _versions(client, patients: dict[str, str]) -> dict[str, int]:
    return {
        name: int(
            (await client.get(f"/fhir/Observation/{response.response_observation_id(p)}")).json()[
                "meta"
            ]["versionId"]
        )
        for name, p in patients.items()
    }


async def test_an_assessment_stored_under_version_1_says_so(client, services):
    patients = await _trial(client)
    await _stored_by_version_1(services)
    served = await status_of(client, patients["same"])
    assert served["criteria"] == {
        **Criteria().as_dict(),
        **VERSION_1_CRITERIA,
    }
    assert served["classifications"] is None
    assert served["status"] == "R"
    untreated = await status_of(client, patients["untreated"])
    assert (untreated["status_reason"], untreated["best_response"]) == (
        "no study-drug administration",
        None,
    )
    weekly = await status_of(client, patients["weekly"])
    assert (weekly["status"], weekly["pending_confirmation"]) == ("NR", True)


async def test_the_upgrade_versions_changed_results_only_with_their_reason(client, app, services):
    patients = await _trial(client)
    await _stored_by_version_1(services)
    before = await _versions(client, patients)

    progress: list[tuple[int, int, int]] = []
    report = await response.recompute_all(services, lambda *done: progress.append(done))

    assert report.patients == 4
    # After each patient: how many are done, of how many, and how many changed so far.
    assert [(done, total) for done, total, _ in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert progress[-1][2] == 3
    assert report.changed == [
        (patients["weekly"], "NR", "R"),
        (patients["untreated"], "NE", "NE"),
        (patients["bled"], "R", "R"),  # the same status, other episodes: a changed result
    ]
    assert report.refreshed == 1  # 'same': its stored assessment now says version 2
    after = await _versions(client, patients)
    assert after == {
        "same": before["same"],
        "weekly": before["weekly"] + 1,
        "untreated": before["untreated"] + 1,
        "bled": before["bled"] + 1,
    }
    same = await status_of(client, patients["same"])
    assert same["criteria"] == Criteria().as_dict()
    assert [c["classification"] for c in same["classifications"]] == [
        "baseline-candidate",
        "qualifying-r",
        "qualifying-r",
    ]
    bled = await status_of(client, patients["bled"])
    assert [(e["start"], e["end"]) for e in bled["episodes"]] == [
        ("2025-03-10", "2025-04-01"),
        ("2025-04-07", None),
    ]
    untreated = await status_of(client, patients["untreated"])
    assert (untreated["status_reason"], untreated["best_response"]) == ("no treatment start", "NE")

    # Each new version has its Provenance: the reason, the version it revises, the change.
    provenances = {
        (target, version): orjson.loads(content)
        for target, version, content in await provenance_rows(app, "Observation")
        if "response rules version 2" in content
    }
    transitions = {"weekly": "NR -> R", "untreated": "NE -> NE", "bled": "R -> R"}
    expected = {
        (response.response_observation_id(patients[name]), after[name]): transition
        for name, transition in transitions.items()
    }
    assert set(provenances) == set(expected)
    for (target, version), provenance in provenances.items():
        assert provenance["reason"] == [{"text": "response rules version 2"}]
        assert provenance["target"] == [{"reference": f"Observation/{target}/_history/{version}"}]
        assert provenance["entity"] == [
            {
                "role": "revision",
                "what": {"reference": f"Observation/{target}/_history/{version - 1}"},
            }
        ]
        assert provenance["agent"][-1]["who"] == {"identifier": {"value": "system/recompute"}}
        assert provenance["activity"]["coding"] == [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "UPDATE"}
        ]
        assert provenance["activity"]["text"].startswith(
            f"response status {expected[(target, version)]}"
        )

    # And its audit record, which a monitor searches by the status Observation.
    weekly_status = response.response_observation_id(patients["weekly"])
    [event] = [
        e
        for e in await _events(client, app, entity=f"Observation/{weekly_status}")
        if _details(e).get("reason") == "response rules version 2"
    ]
    criteria = ", ".join(f"{k}={v}" for k, v in Criteria().as_dict().items())
    assert event["outcomeDesc"] == (
        f"response status NR -> R (python -m app recompute under criteria {criteria})"
    )
    assert criteria.startswith("r_threshold=30.0, cr_threshold=100.0, ")
    assert (event["action"], event["subtype"][0]["code"]) == ("U", "update")
    assert event["agent"][0]["role"] == [{"text": "system"}]
    details = _details(event)
    assert details["version-after"] == str(after["weekly"])
    assert details["version-before"] == str(after["weekly"] - 1)
    assert details["site"] == "S01"
    by_agent = await _events(client, app, agent="system/recompute")
    upgraded = [e for e in by_agent if _details(e).get("reason") == "response rules version 2"]
    assert len(upgraded) == 3
    history = (await client.get(f"/fhir/Observation/{weekly_status}/_history")).json()
    codes = [e["resource"]["valueCodeableConcept"]["coding"][0]["code"] for e in history["entry"]]
    assert codes[:2] == ["R", "NR"]  # newest first: from NR to R

    # Run again: nothing left to change.
    assert await response.recompute_all(services) == response.RecomputeReport(4, [], 0)


def _with_app(database_url: str, criteria: Criteria, work: Any) -> Any:
    """Run `work(app, client)` against an app over `database_url` assessing under `criteria`."""
    settings = Settings(database_url=database_url, environment="test")
    application = create_app(settings, key_source=KEY, criteria=criteria)

    async def run() -> Any:
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            headers = {**bearer(), "X-Provenance": REASON}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", headers=headers
            ) as http:
                return await work(application, http)

    return asyncio.run(run())


def test_the_recompute_command_takes_a_reason(database_url):
    """`python -m app recompute --reason ...` on the database, as an operator runs it."""

    async def enrol(_app: Any, http: httpx.AsyncClient) -> str:
        patient_id = await enrol_and_treat(http, (12, "10*9/L"))
        await create(http, builders.platelet_count(patient_id, "2025-03-10T10:00:00Z", 40))
        await create(http, builders.platelet_count(patient_id, "2025-03-17T08:00:00Z", 45))
        assert (await status_of(http, patient_id))["status"] == "NR"  # 6 d 22 h as instants
        return patient_id

    patient_id = _with_app(database_url, Criteria.from_stored({}), enrol)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ITP_")},
        "DATABASE_URL": database_url,
        "APP_ENVIRONMENT": "test",
    }
    command = [sys.executable, "-m", "app", "recompute", "--reason", "protocol amendment 3"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Patient/{patient_id}: NR -> R" in result.stdout.splitlines()
    assert "1 changed" in result.stdout and "'protocol amendment 3'" in result.stdout

    async def check(app: Any, http: httpx.AsyncClient) -> None:
        status_id = response.response_observation_id(patient_id)
        [(version, content)] = [
            (version, content)
            for target, version, content in await provenance_rows(app, "Observation")
            if target == status_id
        ]
        assert orjson.loads(content)["reason"] == [{"text": "protocol amendment 3"}]
        assessment = await status_of(http, patient_id)
        assert (assessment["status"], assessment["criteria"]["confirm_clock"]) == ("R", "calendar")
        current = (await http.get(f"/fhir/Observation/{status_id}")).json()
        assert current["meta"]["versionId"] == str(version)

    _with_app(database_url, Criteria(), check)
    blank = subprocess.run(
        [*command[:-1], " "], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert blank.returncode == 2 and "--reason" in blank.stderr
