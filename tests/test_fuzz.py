"""Schemathesis against a real uvicorn, on SQLite and on PostgreSQL (issue 7).

The fuzzer reads the committed openapi/openapi.json (test_schemas.py fails when it is stale,
so this is the app's own contract), runs every check it has on every operation, with a
bearer token and a change reason, and must find nothing: exit status 0.

The checks are not chosen on the command line: `--checks all` there overrides every
per-operation setting of the configuration file, including its one stated exception
(use_after_free on a resource's history, see tests/fuzz/schemathesis.toml). Every check is
on by default, and test_every_check_runs_but_the_stated_exception reads the configuration
as the command line does and fails if any other check is off for any operation or phase.
One enabled check does nothing here: object_level_authorization replays one identity's reads
as another, and needs two peer identities from a Web Fuzzing Commons auth file
(`[auth.wfc]`); the run has one admin token. Site isolation, which it would probe, is tested
directly (tests/test_security.py: another site's records answer 404).

Phases: examples, fuzzing and stateful. The coverage phase is left out because its time is
not bounded: it enumerates boundary values for every property of a FHIR body, and
--max-time stops it only between operations (createObservation alone ran past 300 s), which
would break the 5-minute CI budget. The examples and fuzzing phases still send schema-valid
and schema-invalid requests to every operation, and every check judges every response.

Each run is bounded by --max-examples per operation and --max-time, must have sent at
least MIN_REQUESTS requests (counted by the hooks, tests/fuzz/hooks.py), and must have tested
every operation of the file without skipping it (its JUnit report), so a run that generated
little or left operations out cannot pass.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import _BUILTIN_CHECK_NAMES

from tests.conftest import PROJECT_ROOT, token

# At least 1,000 requests in all, over the two databases.
MIN_REQUESTS = 500
# Per database; with the server start, both runs stay inside 5 minutes on 2 cores.
MAX_SECONDS = 120
MAX_EXAMPLES = 10
PHASES = ("examples", "fuzzing", "stateful")
CONFIG_FILE = "tests/fuzz/schemathesis.toml"
HISTORY_PATH = re.compile(r"^/fhir/[A-Za-z]+/\{resource_id\}/_history")


def test_every_check_runs_but_the_stated_exception() -> None:
    """The effective configuration, per operation and phase, switches off only what
    schemathesis.toml says: use_after_free on history reads (FHIR keeps a deleted
    resource's versions readable). max_response_time is off because it needs a limit, and
    this suite times nothing."""
    config = SchemathesisConfig.from_path(str(PROJECT_ROOT / CONFIG_FILE))
    schema = schemathesis.openapi.from_path(
        str(PROJECT_ROOT / "openapi" / "openapi.json"), config=config
    )
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        expected_off = {"max_response_time"}
        if operation.method == "get" and HISTORY_PATH.match(operation.path):
            expected_off.add("use_after_free")
        for phase in (None, *PHASES):
            checks = schema.config.checks_config_for(operation=operation, phase=phase)
            off = {
                name for name in _BUILTIN_CHECK_NAMES if not checks.get_by_name(name=name).enabled
            }
            assert off == expected_off, (operation.label, phase)
            checked += 1
    # Four resource types, a history and a vread each: the exception's whole extent.
    history_reads = [r.ok() for r in schema.get_all_operations() if HISTORY_PATH.match(r.ok().path)]
    assert len(history_reads) == 8, [op.label for op in history_reads]
    assert checked > 4 * 50


def test_schemathesis_finds_nothing(live_server: str, tmp_path: Path) -> None:
    count_file = tmp_path / "requests"
    count_file.touch()
    report = tmp_path / "junit.xml"
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [
        str(schemathesis),
        "--config-file",
        CONFIG_FILE,
        "run",
        "openapi/openapi.json",
        "--url",
        live_server,
        "--phases",
        ",".join(PHASES),
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
