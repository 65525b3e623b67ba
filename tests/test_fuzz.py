"""Schemathesis against a real uvicorn, on SQLite and on PostgreSQL (issue 7).

The fuzzer reads the committed openapi/openapi.json (test_project.py fails when it is stale,
so this is the app's own contract), runs every check it has on every operation, with
bearer tokens, and must find nothing: exit status 0. X-Provenance, the change reason, is
generated like every parameter (hooks rule 6 makes a positive case's string a Provenance).

The checks are not chosen on the command line: `--checks all` there overrides every
per-operation setting of the configuration file, including its one stated exception
(use_after_free on a resource's history, see tests/fuzz/schemathesis.toml, where a check
of ours, deleted_resource_history_kept, holds it to FHIR's rule instead). Every check is
on by default, and test_every_check_runs_but_the_stated_exception reads the configuration
as the command line does and fails if any other check is off for any operation or phase.
The fuzzer calls the API as the identities of a Web Fuzzing Commons document
(tests/fuzz/identities.py): investigators of two sites, peers for object_level_authorization,
which replays each one's successful reads as the other (site isolation), and an admin for
what only an admin may do. That the replays happened is checked in the audit trail.

Phases: examples, fuzzing and stateful. The coverage phase is left out because its time is
not bounded: it enumerates boundary values for every property of a FHIR body, and
--max-time stops it only between operations (createObservation alone ran past 300 s), which
would break the 5-minute CI budget. The examples and fuzzing phases still send schema-valid
and schema-invalid requests to every operation, and every check judges every response.

Each run is bounded by max-examples per operation and pass (schemathesis.toml) and by
--max-time, must have sent at least MIN_REQUESTS requests (counted by the hooks,
tests/fuzz/hooks.py), and must have tested every operation of the file without skipping it
(its JUnit report), so a run that generated little or left operations out cannot pass. The
FHIR use-after-free check must have judged each of the eight history reads after a delete.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import _BUILTIN_CHECK_NAMES

from app.fhir.deps import PROVENANCE_MAX_LENGTH, PROVENANCE_PATTERN
from app.services.provenance import require_reason
from tests.conftest import PROJECT_ROOT, bearer, token
from tests.fuzz import hooks
from tests.fuzz.identities import IDENTITIES, PEERS, write_document

# At least 1,000 requests in all, over the two databases.
MIN_REQUESTS = 500
# Per database; with the server start, both runs stay inside 5 minutes on 2 cores.
MAX_SECONDS = 120
PHASES = ("examples", "fuzzing", "stateful")
CONFIG_FILE = "tests/fuzz/schemathesis.toml"
HISTORY_PATH = re.compile(r"^/fhir/[A-Za-z]+/\{resource_id\}/_history")
HISTORY_OPERATIONS = {
    f"/fhir/{resource_type}/{{resource_id}}/_history{vread}"
    for resource_type in ("Patient", "Observation", "MedicationAdministration", "AdverseEvent")
    for vread in ("", "/{version_id}")
}


def _identities(directory: Path) -> Path:
    """The WFC document of the fuzzer's identities, tokens signed with the test key."""
    document = directory / "identities.json"
    write_document(document, lambda role, sites, sub: token(role, sites, sub=sub))
    return document


def test_every_check_runs_but_the_stated_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The effective configuration, per operation and phase, switches off only what
    schemathesis.toml says: use_after_free on history reads (FHIR keeps a deleted
    resource's versions readable). max_response_time is off because it needs a limit, and
    this suite times nothing. object_level_authorization has its two peers."""
    monkeypatch.setenv("FUZZ_WFC_FILE", str(_identities(tmp_path)))
    config = SchemathesisConfig.from_path(str(PROJECT_ROOT / CONFIG_FILE))
    schema = schemathesis.openapi.from_path(
        str(PROJECT_ROOT / "openapi" / "openapi.json"), config=config
    )
    wfc = config.projects.get_default().auth.wfc
    assert wfc is not None and wfc.path == str(tmp_path / "identities.json")
    assert tuple(wfc.peers or ()) == PEERS and set(PEERS) <= set(IDENTITIES)
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
        # ...and the FHIR form of use_after_free (tests/fuzz/hooks.py) runs in its place.
        for phase in (None, *PHASES):
            checks = schema.config.checks_config_for(operation=operation, phase=phase)
            assert checks.get_by_name(name="deleted_resource_history_kept").enabled
    # Four resource types, a history and a vread each: the exception's whole extent.
    history_reads = [r.ok() for r in schema.get_all_operations() if HISTORY_PATH.match(r.ok().path)]
    assert {op.path for op in history_reads} == HISTORY_OPERATIONS, [
        op.label for op in history_reads
    ]
    assert checked > 4 * 50


def test_schemathesis_finds_nothing(live_server: str, tmp_path: Path) -> None:
    count_file = tmp_path / "requests"
    count_file.touch()
    judged_file = tmp_path / "judged"
    judged_file.touch()
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
        "--max-time",
        str(MAX_SECONDS),
        "--workers",
        "2",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    env = {
        **os.environ,
        "FUZZ_BASE_URL": live_server,
        "FUZZ_TOKEN": token("admin", ("S01",), sub="fuzz-fixture"),
        "FUZZ_COUNT_FILE": str(count_file),
        "FUZZ_JUDGED_FILE": str(judged_file),
        "FUZZ_WFC_FILE": str(_identities(tmp_path)),
        "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
        "NO_COLOR": "1",
    }
    result = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS + 60,  # --max-time stops between operations: a minute's slack
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
    # object_level_authorization ran: the S02 investigator was refused reads of resources
    # the S01 investigator had read (schemathesis sends an operation as S02 otherwise only
    # when S01 may not call it, and then S01 read nothing).
    owner, peer = PEERS
    replayed = _reads(live_server, owner, "0") & _reads(live_server, peer, "4")
    assert replayed, f"{peer} never replayed a read of {owner}"
    # deleted_resource_history_kept had work on every history read of the file (the two of
    # each resource type), so a run in which FHIR's use after free went unchecked for one of
    # them fails. Hooks rule 9 sees to it; the stateful phase's own DELETE-then-history chains
    # add to it when they happen (seldom: its roots are mostly random DELETEs answering 404).
    judged = {line.split("\t")[0] for line in judged_file.read_text().splitlines()}
    assert judged == HISTORY_OPERATIONS, (
        f"history reads never judged after a delete: {sorted(HISTORY_OPERATIONS - judged)}\n"
        f"{output[-5000:]}"
    )
    # X-Provenance was generated, not fixed: changes were accepted with the fuzzer's reasons.
    reasons = _change_reasons(live_server) - {"fuzz fixture"}
    assert len(reasons) >= 5, reasons


def _change_reasons(base_url: str) -> set[str]:
    """The reasons of the successful updates and deletes in the audit trail (written with
    the change, so complete once the run is over)."""
    found: set[str] = set()
    for action in ("U", "D"):
        trail = httpx.get(
            f"{base_url}/fhir/AuditEvent",
            params={"action": action, "_count": "1000"},
            headers=bearer("admin"),
            timeout=30,
        ).json()
        found |= {
            detail["valueString"]
            for entry in trail.get("entry", [])
            if entry["resource"]["outcome"] == "0"
            for entity in entry["resource"].get("entity", [])
            for detail in entity.get("detail", [])
            if detail["type"] == "reason"
        }
    return found


def _reads(base_url: str, agent: str, outcome: str) -> set[str]:
    """The resources `agent` read (outcome 0) or was refused a read of (4), from the audit
    trail (written in batches at least once a second, so polled for a few seconds)."""
    found: set[str] = set()
    for _ in range(10):
        trail = httpx.get(
            f"{base_url}/fhir/AuditEvent",
            params={"agent": agent, "action": "R", "_count": "1000"},
            headers=bearer("admin"),
            timeout=30,
        ).json()
        # A reference is Type/id, with /_history/n when a version was read: keep Type/id.
        found = {
            "/".join(reference.split("/")[:2])
            for entry in trail.get("entry", [])
            if entry["resource"]["outcome"] == outcome
            for entity in entry["resource"].get("entity", [])
            if "/" in (reference := entity.get("what", {}).get("reference", ""))
        }
        if found:
            break
        time.sleep(0.5)
    return found


# deleted_resource_history_kept (tests/fuzz/hooks.py) judged on recorded scenarios: the
# fuzzer meets a DELETE followed by a history read only when its stateful phase chains them,
# so what the check accepts and refuses is pinned here.


class _Operation:
    def __init__(self, path: str) -> None:
        self.path = path


class _Case:
    def __init__(self, case_id: str, method: str, path: str, **path_parameters: str) -> None:
        self.id = case_id
        self.method = method
        self.operation = _Operation(path)
        self.path_parameters = path_parameters


class _Response:
    def __init__(self, status_code: int, body: object = None, etag: str | None = None) -> None:
        self.status_code = status_code
        self.headers = {"etag": [etag]} if etag else {}
        self._body = body

    def json(self) -> object:
        return self._body


class _Internals:
    def __init__(self, recorded: list[tuple[_Case, _Response]]) -> None:
        self.recorded = recorded

    def find_related(self, *, case_id: str) -> list[_Case]:
        return [case for case, _ in self.recorded if case.id != case_id]

    def find_response(self, *, case_id: str) -> _Response | None:
        return next((r for case, r in self.recorded if case.id == case_id), None)


class _Context:
    def __init__(self, recorded: list[tuple[_Case, _Response]]) -> None:
        self.internals = _Internals(recorded)


def _entry(version: int, method: str, resource: bool) -> dict[str, object]:
    entry: dict[str, object] = {
        "request": {"method": method},
        "response": {"etag": f'W/"{version}"'},
    }
    if resource:
        entry["resource"] = {"resourceType": "Observation"}
    return entry


def _judge(
    deletion: _Response, case: _Case, response: _Response, deleted_type: str = "Observation"
) -> None:
    delete = _Case("d", "DELETE", f"/fhir/{deleted_type}/{{resource_id}}", resource_id="o1")
    context = _Context([(delete, deletion), (case, response)])
    hooks.deleted_resource_history_kept(context, response, case)


HISTORY = _Case("h", "GET", "/fhir/Observation/{resource_id}/_history", resource_id="o1")
DELETED_AT_2 = _Response(204, etag='W/"2"')
HISTORY_AFTER_DELETE = {"entry": [_entry(2, "DELETE", False), _entry(1, "POST", True)]}


def _vread(version: str) -> _Case:
    path = "/fhir/Observation/{resource_id}/_history/{version_id}"
    return _Case("v", "GET", path, resource_id="o1", version_id=version)


def test_history_check_accepts_what_fhir_requires_after_a_delete() -> None:
    _judge(DELETED_AT_2, HISTORY, _Response(200, HISTORY_AFTER_DELETE))
    _judge(DELETED_AT_2, _vread("2"), _Response(410))
    _judge(DELETED_AT_2, _vread("1"), _Response(200))
    # Recreated by an update after the deletion: the deletion stays in the history.
    recreated = {"entry": [_entry(3, "PUT", True), *HISTORY_AFTER_DELETE["entry"]]}
    _judge(DELETED_AT_2, HISTORY, _Response(200, recreated))
    # A page that does not reach the deletion (_since, _count) says nothing about it.
    _judge(DELETED_AT_2, HISTORY, _Response(200, {"entry": [_entry(5, "PUT", True)]}))
    # A refused query, and a version that never existed.
    _judge(DELETED_AT_2, HISTORY, _Response(400))
    _judge(DELETED_AT_2, _vread("9"), _Response(404))


@pytest.mark.parametrize(
    ("case", "response"),
    [
        (HISTORY, _Response(404)),
        (HISTORY, _Response(410)),
        (HISTORY, _Response(200, {"entry": [_entry(2, "PUT", True), _entry(1, "POST", True)]})),
        (HISTORY, _Response(200, {"entry": [_entry(3, "PUT", True), _entry(1, "POST", True)]})),
        (_vread("2"), _Response(200)),
        (_vread("2"), _Response(404)),
        (_vread("1"), _Response(404)),
    ],
    ids=[
        "history-404",
        "history-410",
        "deletion-as-update",
        "deletion-missing",
        "vread-200",
        "vread-404",
        "older-404",
    ],
)
def test_history_check_refuses_a_lost_or_hidden_deletion(case: _Case, response: _Response) -> None:
    with pytest.raises(AssertionError):
        _judge(DELETED_AT_2, case, response)


def test_history_check_judges_reads_of_the_deleted_fixture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rule 9's resource, deleted by the hooks before the run at version 2, is held to the
    same rule as one the scenario deleted itself."""
    monkeypatch.setitem(hooks._deleted, "Observation/o1", 2)
    context = _Context([(HISTORY, _Response(404))])
    with pytest.raises(AssertionError):
        hooks.deleted_resource_history_kept(context, _Response(404), HISTORY)
    hooks.deleted_resource_history_kept(context, _Response(200, HISTORY_AFTER_DELETE), HISTORY)
    with pytest.raises(AssertionError):
        hooks.deleted_resource_history_kept(context, _Response(200), _vread("2"))


def test_history_check_ignores_what_deleted_nothing() -> None:
    lost = _Response(404)
    # A repeated DELETE answers 204 without an ETag: it deleted nothing.
    _judge(_Response(204), HISTORY, lost)
    # A refused DELETE, and a DELETE of another type's resource with the same id.
    _judge(_Response(412), HISTORY, lost)
    _judge(DELETED_AT_2, HISTORY, lost, deleted_type="Patient")


@given(st.from_regex(PROVENANCE_PATTERN, fullmatch=True))
def test_every_generated_provenance_header_is_a_reason_the_server_takes(text: str) -> None:
    """Rule 6 of the hooks: whatever string the fuzzer draws for X-Provenance (its schema's
    pattern, as here) becomes a header of the documented form, within the maximum length,
    that the server reads as a reason, and the text chosen is the text sent, or its start."""
    header = hooks.provenance_header(text)
    assert re.fullmatch(PROVENANCE_PATTERN, header) and len(header) <= PROVENANCE_MAX_LENGTH
    sent = json.loads(header)["reason"][0]["text"]
    assert sent and text.strip().startswith(sent)
    assert require_reason(header) == sent


def test_a_long_reason_is_cut_to_the_header_limit() -> None:
    header = hooks.provenance_header(" " * PROVENANCE_MAX_LENGTH + '"\\' * PROVENANCE_MAX_LENGTH)
    assert len(header) <= PROVENANCE_MAX_LENGTH
    assert require_reason(header)
