"""`python -m bench.history` runs at a tiny scale, on SQLite and PostgreSQL (issue 20, part 4).

As for the harness (tests/test_bench.py), no figure is judged: the script must keep working
between the runs that matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import IN_CI, POSTGRES_ADMIN_URL, PROJECT_ROOT, _postgres_reachable


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_the_history_cost_runs_at_a_tiny_scale(database) -> None:
    """`python -m bench.history`: creates for short and long histories, both timed, the
    recompute of each seen in the app's histogram."""
    arguments = ["--short=3", "--long=30", "--patients=1", "--creates=2"]
    if database == "sqlite":
        arguments.append("--sqlite")
    else:
        if not _postgres_reachable():
            message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable"
            if IN_CI:
                pytest.fail(message + " (CI=true: the PostgreSQL half of the suite must run)")
            pytest.skip(message)
        admin = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=False)
        arguments += [
            f"--admin-dsn={admin}",
            f"--database=itp_bench_history_ci_{os.getpid()}",
            "--drop",
        ]
    completed = subprocess.run(
        [sys.executable, "-m", "bench.history", *arguments],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["database"] == database
    assert result["creates_each"] == 2
    assert set(result["create_ms"]) == set(result["recompute_ms"]) == {"short", "long"}
    assert result["ratio_long_short"] > 0
