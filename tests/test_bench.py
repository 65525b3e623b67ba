"""The benchmark harness runs, at a tiny scale, in seconds, on PostgreSQL (issue 8).

Nothing here judges a figure: tests never time anything. What is checked is that the
harness generates, serves, drives every scenario with valid requests and writes its
results, so it cannot rot between the runs that matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import IN_CI, POSTGRES_ADMIN_URL, PROJECT_ROOT, _postgres_reachable

pytestmark = pytest.mark.postgres


def test_the_harness_runs_at_a_tiny_scale(tmp_path) -> None:
    if not _postgres_reachable():
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable"
        if IN_CI:
            pytest.fail(message + " (CI=true: the PostgreSQL half of the suite must run)")
        pytest.skip(message)
    admin = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=False)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--patients=12",
            "--counts=300",
            "--workers=1",
            "--connections=2",
            "--duration=1",
            "--runs=1",
            "--bundle-entries=20",
            "--loadgen=python",  # nothing outside pyproject.toml
            f"--admin-dsn={admin}",
            f"--database=itp_bench_ci_{os.getpid()}",
            "--drop",
            "--regenerate",
            f"--out={tmp_path}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    [result] = tmp_path.glob("*.json")
    document = json.loads(result.read_text())
    assert {"cores", "python", "postgresql", "date", "loadgen"} <= set(document["machine"])
    scenarios = ("ceiling-create", "create", "hello", "ceiling-read", "read", "search")
    for scenario in (*scenarios, "response-status"):
        [run] = document["runs"][scenario]
        assert run["requests"] > 0, scenario
        assert set(run["statuses"]) <= {"200", "201"}, (scenario, run["statuses"])
    assert "ratio" in document["summary"]["create"]
    assert document["summary"]["read"]["ceiling"] == "ceiling-read"
    # Through PgBouncer: one instance of two workers, with and without HAProxy, and two
    # instances of one behind it, each with its ceilings and each worker's share counted.
    for topology in ("pgbouncer 1x2", "pgbouncer 1x2 haproxy", "pgbouncer 2x1 haproxy"):
        for scenario in ("create", "read", "ceiling-create", "ceiling-read"):
            [run] = document["runs"][f"{scenario} [{topology}]"]
            assert run["requests"] > 0, (scenario, topology)
            assert set(run["statuses"]) <= {"200", "201"}, (scenario, topology, run["statuses"])
        for scenario in ("create", "read"):
            [seen] = document["workers"][f"{scenario} [{topology}]"]
            assert len(seen["requests"]) == 2 and sum(seen["requests"].values()) > 0, seen
    [seen] = document["workers"]["read"]
    assert len(seen["requests"]) == 1 and sum(seen["requests"].values()) > 0  # --workers=1
    assert document["recompute"]["counts"] > 0
    bundle = document["bundle"]
    assert bundle["resources_per_s"] > 0 and set(bundle["statuses"]) == {200}, bundle
    bulk = document["export"]["bulk"]
    assert bulk["resources"] == bulk["lines_downloaded"] > 0, bulk
    assert {d["dataset"] for d in document["export"]["sdtm"]["datasets"]} >= {"lb.xpt", "rs.xpt"}
    assert [table for table in tmp_path.glob("*.md")]
