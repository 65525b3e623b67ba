"""The operator's commands: demo and recompute."""

from __future__ import annotations

import dataclasses

import pytest

from app.engine import Criteria
from app.services import demo, response
from app.services.context import ServiceContext


@pytest.fixture
def services(app) -> ServiceContext:
    return app.state.services


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_demo_trial_shows_every_status_and_loads_once(services):
    await demo.load(services, progress=lambda _line: None)
    summary = await response.response_summary(services, demo.LOADER)
    assert summary["patients"] == 20
    assert all(summary["by_status"][code] >= 1 for code in ("CR", "R", "NR", "LOR", "NE")), summary
    assert summary["by_status"] == {"CR": 5, "R": 5, "NR": 4, "LOR": 3, "NE": 3}
    with pytest.raises(demo.DemoAlreadyLoaded):
        await demo.load(services, progress=lambda _line: None)


async def test_recompute_writes_only_what_changed(client, services):
    from tests.test_response_api import enrol_and_treat, post_count, status_of

    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    await post_count(client, patient_id, "03-10", 35)
    await post_count(client, patient_id, "03-17", 48)
    assert (await status_of(client, patient_id))["status"] == "R"
    # Same criteria: nothing written.
    assert await response.recompute_all(services) == response.RecomputeReport(1, [], 0)
    stricter = dataclasses.replace(services, criteria=Criteria(r_threshold=50))
    report = await response.recompute_all(stricter)
    assert report == response.RecomputeReport(1, [(patient_id, "R", "NR")], 0)
    assessment = await status_of(client, patient_id)
    assert assessment["status"] == "NR"
    assert assessment["criteria"]["r_threshold"] == 50
    history = (await client.get(f"/fhir/{assessment['observation']}/_history")).json()
    assert (
        history.get("entry", [])[0]["resource"]["valueCodeableConcept"]["coding"][0]["code"] == "NR"
    )


def test_token_command_prints_a_token_the_server_accepts(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import KEY, PROJECT_ROOT, TEST_SECRET

    env = {**os.environ, "APP_AUTH_JWT_SECRET": TEST_SECRET, "APP_ENVIRONMENT": "test"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "token",
            "--role",
            "investigator",
            "--sites",
            "S01,S02",
            "--sub",
            "dr-a",
            "--minutes",
            "5",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    claims = KEY.decode(result.stdout.strip())
    assert claims["role"] == "investigator" and claims["sites"] == ["S01", "S02"]
    assert claims["sub"] == "dr-a" and claims["exp"] - claims["iat"] == 300
    assert "user/Observation.cruds" in claims["scope"]
    refused = subprocess.run(
        [sys.executable, "-m", "app", "token", "--role", "lab"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "site" in refused.stderr
