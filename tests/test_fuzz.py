"""Schemathesis against a real uvicorn, on SQLite and on PostgreSQL (issue 7).

The fuzzer reads the committed openapi/openapi.json (test_schemas.py fails when it is stale,
so this is the app's own contract), runs every check it has (`--checks all`) on every
operation, with a bearer token and a change reason, and must find nothing: exit status 0.

Phases: examples, fuzzing and stateful. The coverage phase is left out because its time is
not bounded: it enumerates boundary values for every property of a FHIR body and ignores
--max-time (createObservation alone ran past 300 s), which would break the 5-minute CI
budget. The examples and fuzzing phases still send schema-valid and schema-invalid requests
to every operation, and every check judges every response.

Each run is bounded by --max-examples per operation and --max-time, must have sent at
least MIN_REQUESTS requests (counted by the hooks, tests/fuzz/hooks.py), and must have tested
every operation of the file without skipping it (its JUnit report), so a run that generated
little or left operations out cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import PROJECT_ROOT, token

# At least 1,000 requests in all, over the two databases.
MIN_REQUESTS = 500
# Per database; with the server start, both runs stay inside 5 minutes on 2 cores.
MAX_SECONDS = 120
MAX_EXAMPLES = 10


def test_schemathesis_finds_nothing(live_server: str, tmp_path: Path) -> None:
    count_file = tmp_path / "requests"
    count_file.touch()
    report = tmp_path / "junit.xml"
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [
        str(schemathesis),
        "--config-file",
        "tests/fuzz/schemathesis.toml",
        "run",
        "openapi/openapi.json",
        "--url",
        live_server,
        "--checks",
        "all",
        "--phases",
        "examples,fuzzing,stateful",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_SECONDS),
        "--workers",
        "2",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        "-H",
        f"Authorization: Bearer {token('admin', ('S01',), sub='fuzzer')}",
        "-H",
        'X-Provenance: {"resourceType":"Provenance","reason":[{"text":"fuzz"}]}',
    ]
    env = {
        **os.environ,
        "FUZZ_BASE_URL": live_server,
        "FUZZ_TOKEN": token("admin", ("S01",), sub="fuzz-fixture"),
        "FUZZ_COUNT_FILE": str(count_file),
        "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
        "NO_COLOR": "1",
    }
    result = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS * 3,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    sent = count_file.stat().st_size
    assert sent >= MIN_REQUESTS, f"only {sent} requests sent\n{output[-5000:]}"
    tested = {
        case.get("name")
        for case in ET.parse(report).getroot().iter("testcase")
        if not list(case)  # no <skipped>, <failure> or <error> inside
    }
    document = json.loads((PROJECT_ROOT / "openapi" / "openapi.json").read_text())
    operations = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }
    assert operations <= tested, f"not tested: {sorted(operations - tested)}\n{output[-5000:]}"
