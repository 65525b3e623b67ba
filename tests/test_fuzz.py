"""Schemathesis against a real uvicorn, with the app's own OpenAPI file and every check.

The run is bounded (examples per operation and a time cap) so that both databases together
stay within a few minutes; the seed is fixed so that a failure reproduces. What the hooks in
tests/fuzz/hooks.py adapt, and why, is written there; the expected statuses are in
tests/fuzz/schemathesis.toml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import PROJECT_ROOT, REASON, token

FUZZ_DIR = PROJECT_ROOT / "tests" / "fuzz"
# Enough for >1,000 requests on each database in well under two minutes on 2 cores.
MAX_EXAMPLES = "4"
MAX_SECONDS = "100"


def test_schemathesis_finds_nothing(live_server: str, database_url: str) -> None:
    database = database_url.split(":", 1)[0]
    admin = token("admin", ("S01",), sub="fuzzer")
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(FUZZ_DIR / "schemathesis.toml"),
        "run",
        f"{live_server}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--max-time",
        MAX_SECONDS,
        "-H",
        f"Authorization: Bearer {admin}",
        "-H",
        f"X-Provenance: {REASON}",
        "--no-color",
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
        "FUZZ_BASE_URL": live_server,
        "FUZZ_TOKEN": admin,
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    run = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis on {database} failed:\n{output[-20000:]}"
    generated = re.search(r"(\d+) generated", output)
    assert generated is not None, output[-5000:]
    # The floor: at least 1,000 generated requests in all (here: per database).
    assert int(generated.group(1)) >= 1000, output[-5000:]
