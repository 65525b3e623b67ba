"""Schemathesis hooks: ten runtime rules that a JSON Schema cannot state, or that
schemathesis cannot generate, taught to the generator so that its schema-valid requests are
also valid for the server.

1. An update names its resource twice, in the URL and in the body's `id`, and the two must
   be equal (FHIR http.html#update). JSON Schema cannot relate a body to a path parameter.
2. Conditional create takes its criteria from If-None-Exist or from the query, not both;
   OpenAPI cannot make a header and query parameters exclusive, so a positive case with
   both keeps the header.
3. A trial record's `subject` is a Patient that exists (and is at a site the token may
   write). A schema can give the reference's form (`Patient/<id>`), not which Patients are
   stored.
4. A conditional update or delete (`PUT`/`DELETE /fhir/Type?criteria`) names at least one
   criterion; OpenAPI cannot require one of several optional query parameters, so a case
   without any gets `_id=fuzz-no-match`.
5. A Patient is at a site the caller may write: S01, the site of the investigator that
   schemathesis sends writes as (tests/fuzz/identities.py). Without it a Patient created at
   another site by the admin (to whom an investigator's refusal escalates the create) was
   then read by the S01 investigator: 404, by site isolation, which schemathesis reported as
   a created resource not found (ST302).
6. X-Provenance is a string that holds JSON: its schema gives the string's form (printable
   ASCII, something visible, a maximum length) and, through contentMediaType and
   contentSchema, the Provenance it must decode to. Schemathesis generates the string and
   does not read contentSchema, so a positive case's generated string becomes the reason
   text of a Provenance, cut to fit the maximum length once JSON-escaped: the generator
   still chooses the text (quotes, backslashes and all), the server gets a valid header.
7. A Bundle needs X-Provenance when an entry is a PUT, PATCH or DELETE; OpenAPI cannot make
   a header depend on the body, so a positive case with such an entry and no header gets
   one (rule 6's, with a fixed text).
8. No text of a request may hold NUL (400, README "Input limits"). The document says so of
   every string it types, JSON Pointers included, but a JSON Patch operation's `value` is
   free-form JSON: a schema stating "no string at any depth holds NUL" is recursive, and
   openapi-python-client drops an operation whose body names one. So a positive PATCH case
   has NUL removed from the strings (member names too) of its values; everything else the
   generator chose stays.
9. A history read is worth most about a resource that was deleted (FHIR keeps its history,
   and that is what deleted_resource_history_kept checks); a schema cannot name one, and
   the fuzzing phase judges each case on its own, so no DELETE it sends is tied to a later
   read (only the stateful phase chains them, and in measured runs it seldom got that far:
   most of its scenarios start with a DELETE of a random id, answered 404). So every other
   positive history read of the fuzzing phase (the first, the third... of each operation)
   names instead a resource of that type which these hooks stored and deleted before the
   run; every other parameter stays as generated, and the other reads keep their generated
   ids (schemathesis draws them from ids it has seen).

10. A date in a resource names a day its month has. A resource's date elements carry FHIR's
   published date grammar as their pattern, which allows any day up to 31 in any month, so
   2024-11-31 and 2023-02-29 are schema-valid there; the server refuses them (422:
   tests/test_schemas.py, test_validation.py). (The search parameters' own patterns know
   each month's length and leave out 29 February.) So a positive case's body has each such
   day replaced with its month's last day; the rest of the value (time, offset) stays as
   generated. A 120 s run found one (an AdverseEvent detected 5470-11-31) on a loaded
   machine.

It also adds one check, `deleted_resource_history_kept`: use_after_free as FHIR defines it
for a versioned resource. The built-in use_after_free expects every GET under a deleted
resource's URL to fail, and is off for the two history reads only (schemathesis.toml); FHIR
requires the opposite there (http.html#delete: "the delete interaction does not remove a
resource's version history"). This check runs on those reads instead and holds them to what
FHIR does require after a DELETE that answered 2xx with the deletion's version in its ETag:
the history is still served, and shows that version as a deletion; a version read of it
answers 410 Gone, and of an earlier version never 404.

Only schema-valid (positive) cases are adapted, and (but for rule 7's missing header) only
where the generated value already has the valid form, so every schema violation still
reaches the server as generated and the negative-data checks see it. Each adapted case is
one the server must accept, and the rejections these rules cause are tested directly in
tests/test_crud.py and test_validation.py.

Environment: FUZZ_BASE_URL (the server), FUZZ_TOKEN (a bearer token that may write) and
optionally FUZZ_COUNT_FILE (a file that gets one byte per request sent) and
FUZZ_JUDGED_FILE (one line per history read deleted_resource_history_kept judged: the
operation's path, then `stateful` when the stateful phase deleted the resource itself).
"""

from __future__ import annotations

import calendar
import json
import os
import re
import threading
from collections import Counter
from functools import cache
from typing import Any

import httpx
import schemathesis

from app.fhir.deps import PROVENANCE_MAX_LENGTH
from app.fhir.examples import EXAMPLE_PATIENT_ID, RESOURCE_EXAMPLES

FUZZ_PATIENT = "fuzz-subject"
FUZZ_SITE = "S01"
# The instance history and the version read of every resource type.
HISTORY_OPERATION = re.compile(
    r"^/fhir/(?P<type>[A-Za-z]+)/\{resource_id\}/_history(?P<vread>/\{version_id\})?$"
)
_WEAK_VERSION = re.compile(r'W/"(?P<version>[0-9]+)"')
_PATIENT_REFERENCE = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}(/_history/[0-9]{1,9})?")
_SUBJECT_TYPES = ("Observation", "MedicationAdministration", "AdverseEvent")


# The fixture Patient's id now: a new one after the fuzzer deletes it (after_call), so a
# deleted id is never stored again behind schemathesis's back (its use_after_free check
# would see the deleted resource come back, and rightly fail).
_fuzz_patients = [FUZZ_PATIENT]


def _fuzz_patient() -> str:
    """The Patient every generated record belongs to (stored once per id)."""
    return _enrolled(_fuzz_patients[-1])


def _fixture_request(method: str, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """A request of the hooks' own (not the fuzzer's), as the fixture writer."""
    headers = {
        "Authorization": f"Bearer {os.environ['FUZZ_TOKEN']}",
        "Content-Type": "application/fhir+json",
        "X-Provenance": '{"resourceType":"Provenance","reason":[{"text":"fuzz fixture"}]}',
    }
    response = httpx.request(
        method, f"{os.environ['FUZZ_BASE_URL']}/fhir/{url}", json=body, headers=headers, timeout=30
    )
    response.raise_for_status()
    return response


def _fixture_patient(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "managingOrganization": {
            "identifier": {"system": "https://itp-trial.example/fhir/sid/site", "value": FUZZ_SITE}
        },
    }


@cache
def _enrolled(patient_id: str) -> str:
    """Store a fixture Patient at the fuzzer's site, once per id."""
    _fixture_request("PUT", f"Patient/{patient_id}", _fixture_patient(patient_id))
    return f"Patient/{patient_id}"


# Rule 9's resources, stored and deleted once (schemathesis runs its workers as threads),
# and how many positive history reads of each operation the fuzzing phase generated.
_deleted_lock = threading.Lock()
_deleted: dict[str, int] = {}
_history_reads: Counter[str] = Counter()


def _takes_turn(operation_path: str) -> bool:
    """Rule 9 takes the first, third, fifth... positive history read of each operation, so
    every one that is generated at all reads a deleted resource at least once."""
    with _deleted_lock:
        _history_reads[operation_path] += 1
        return _history_reads[operation_path] % 2 == 1


def _deleted_fixture(resource_type: str) -> str:
    """The id of a resource of `resource_type` at the fuzzer's site that was stored and then
    deleted; its deletion's version is in _deleted."""
    resource_id = f"fuzz-deleted-{resource_type.lower()}"
    with _deleted_lock:
        if f"{resource_type}/{resource_id}" not in _deleted:
            if resource_type == "Patient":
                body = _fixture_patient(resource_id)
            else:
                _enrolled(EXAMPLE_PATIENT_ID)  # the examples' subject
                body = {**RESOURCE_EXAMPLES[resource_type], "id": resource_id}
            _fixture_request("PUT", f"{resource_type}/{resource_id}", body)
            deletion = _fixture_request("DELETE", f"{resource_type}/{resource_id}")
            match = _WEAK_VERSION.fullmatch(deletion.headers.get("etag", ""))
            if match is None:
                raise RuntimeError(f"the fixture's DELETE gave no version: {deletion.headers}")
            _deleted[f"{resource_type}/{resource_id}"] = int(match["version"])
    return resource_id


def provenance_header(text: str) -> str:
    """The X-Provenance giving `text` (stripped, as the server reads it) as the reason,
    within the header's maximum length: JSON escapes at most double a printable ASCII
    character."""
    envelope = {"resourceType": "Provenance", "reason": [{"text": ""}]}
    room = (PROVENANCE_MAX_LENGTH - len(json.dumps(envelope))) // 2
    envelope["reason"] = [{"text": text.strip()[:room]}]
    return json.dumps(envelope, separators=(",", ":"))


def _changes_something(bundle: dict[str, Any]) -> bool:
    entries = bundle.get("entry")
    return isinstance(entries, list) and any(
        isinstance(entry, dict)
        and isinstance(entry.get("request"), dict)
        and entry["request"].get("method") in ("PUT", "PATCH", "DELETE")
        for entry in entries
    )


def _resource_type(case: Any) -> str:
    """`Observation` for /fhir/Observation/...; empty for /fhir itself (Bundles)."""
    parts = str(case.operation.path).split("/")
    return parts[2] if len(parts) > 2 else ""


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    method = case.method.upper()
    path = str(case.operation.path)
    if method in ("PUT", "DELETE") and path.count("/") == 2 and not case.query:
        # A conditional update or delete needs at least one criterion (without one it would
        # write every resource: 400). OpenAPI cannot require "one of these optional query
        # parameters", so a generated case without any gets a criterion that matches nothing.
        case.query = {"_id": "fuzz-no-match"}
    headers = case.headers if case.headers is not None else {}
    reason = headers.get("X-Provenance")
    if isinstance(reason, str) and reason.strip():
        headers["X-Provenance"] = provenance_header(reason)
    elif path == "/fhir" and isinstance(case.body, dict) and _changes_something(case.body):
        headers["X-Provenance"] = provenance_header("fuzz: a Bundle that changes resources")
    case.headers = headers
    if method == "PATCH" and isinstance(case.body, list):
        case.body = [_without_nul(operation) for operation in case.body]
    real = _real_days(case.body)
    if real != case.body:
        # Only then: a run that gave every positive case a copy of its body had schemathesis
        # judge an empty POST .../_search as negative data accepted (ST201), which the same
        # run with the body left alone did not.
        case.body = real
    history = HISTORY_OPERATION.match(path)
    if history is not None and meta.phase.name == "fuzzing" and _takes_turn(path):
        case.path_parameters["resource_id"] = _deleted_fixture(history["type"])
    if not isinstance(case.body, dict):
        return case
    if method == "POST" and (case.headers or {}).get("If-None-Exist") and case.query:
        # Conditional create takes its criteria from If-None-Exist or from the query, not
        # both (400); OpenAPI cannot make a header and query parameters exclusive.
        case.query = {}
    path_id = (case.path_parameters or {}).get("resource_id")
    if method == "PUT" and path_id is not None and isinstance(case.body.get("id"), str):
        case.body["id"] = path_id
    if method in ("POST", "PUT", "PATCH") and _resource_type(case) == "Patient":
        site = case.body.get("managingOrganization")
        identifier = site.get("identifier") if isinstance(site, dict) else None
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
            identifier["value"] = FUZZ_SITE
    if method in ("POST", "PUT") and _resource_type(case) in _SUBJECT_TYPES:
        subject = case.body.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        if isinstance(reference, str) and _PATIENT_REFERENCE.fullmatch(reference):
            subject["reference"] = _fuzz_patient()
    return case


# A date's year, month and a day that some months lack (rule 10), not inside a longer number.
_LATE_DAY = re.compile(r"(?<![0-9])([0-9]{4})-(0[1-9]|1[0-2])-(29|30|31)(?![0-9])")


def _real_day(match: re.Match[str]) -> str:
    year, month, day = int(match[1]), int(match[2]), int(match[3])
    last = calendar.monthrange(year, month)[1]
    return f"{match[1]}-{match[2]}-{min(day, last):02d}"


def _real_days(value: Any) -> Any:
    """`value` with every impossible day of a date in its strings made its month's last day
    (rule 10); lists and objects walked, member names kept."""
    if isinstance(value, str):
        return _LATE_DAY.sub(_real_day, value)
    if isinstance(value, list):
        return [_real_days(item) for item in value]
    if isinstance(value, dict):
        return {key: _real_days(item) for key, item in value.items()}
    return value


def _without_nul(value: Any) -> Any:
    """`value` with every NUL removed from its strings and member names (rule 8)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def _append(variable: str, data: bytes) -> None:
    """Append `data` to the file the environment variable names, for tests/test_fuzz.py to
    read (a single O_APPEND write from one of several worker threads never interleaves)."""
    path = os.environ.get(variable)
    if path:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)


def _count_request() -> None:
    """One byte per request sent."""
    _append("FUZZ_COUNT_FILE", b".")


def _record_judgement(operation_path: str, deleted_by: str) -> None:
    """One line per history read judged after a deletion: the operation and who deleted the
    resource (`stateful`: the fuzzer's own scenario; `fixture`: rule 9's resource)."""
    _append("FUZZ_JUDGED_FILE", f"{operation_path}\t{deleted_by}\n".encode())


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    # The OpenAPI file's example records name the Patient `example-patient`
    # (app/fhir/examples.py): it is enrolled, as in a trial, before the examples are sent.
    _enrolled(EXAMPLE_PATIENT_ID)


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    _count_request()
    # The fuzzer may delete the fixture Patient (it learns ids from responses): later
    # subjects point at a new one. (A PUT of it keeps it at the fuzzer's site: rule 5.)
    # example-patient is only needed by the examples phase, which runs first and once.
    path_id = (case.path_parameters or {}).get("resource_id")
    deleted = case.method.upper() == "DELETE" and 200 <= response.status_code < 300
    if deleted and _resource_type(case) == "Patient" and path_id == _fuzz_patients[-1]:
        _fuzz_patients.append(f"{FUZZ_PATIENT}-{len(_fuzz_patients)}")


def er7_bytes(value: Any) -> bytes:
    """An ER7 message travels as its bytes (the schema's string, binary format), in UTF-8:
    what the server reads a body without a charset as. (Latin-1 with errors="replace" turned
    characters such as the BOM the schema allows before MSH into "?", so a schema-valid
    message reached the server corrupted.)"""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


@schemathesis.serializer("x-application/hl7-v2+er7")
def er7(context: Any, value: Any) -> bytes:
    return er7_bytes(value)


def _deletion_versions(ctx: Any, case: Any, resource: str) -> set[int]:
    """The versions at which the scenario so far deleted `resource` (`Patient/x`): each
    DELETE of that URL that answered 2xx with the deletion's version in its ETag. A DELETE of
    a resource already deleted answers 204 without an ETag; it deleted nothing new."""
    versions = set()
    for related in ctx.internals.find_related(case_id=case.id):
        if related.method.upper() != "DELETE":
            continue
        path_id = (related.path_parameters or {}).get("resource_id")
        if path_id is None or f"{_resource_type(related)}/{path_id}" != resource:
            continue
        response = ctx.internals.find_response(case_id=related.id)
        if response is None or not 200 <= response.status_code < 300:
            continue
        for etag in response.headers.get("etag", []):
            match = _WEAK_VERSION.fullmatch(etag)
            if match:
                versions.add(int(match["version"]))
    return versions


@schemathesis.check
def deleted_resource_history_kept(ctx: Any, response: Any, case: Any) -> bool | None:
    """After a DELETE, FHIR keeps the resource's history (module docstring); see that it does."""
    operation = HISTORY_OPERATION.match(str(case.operation.path))
    path_id = (case.path_parameters or {}).get("resource_id")
    if case.method.upper() != "GET" or operation is None or path_id is None:
        return None
    resource = f"{operation['type']}/{path_id}"
    deleted = _deletion_versions(ctx, case, resource)
    fixture = _deleted.get(resource)
    if not deleted and fixture is None:
        return None
    _record_judgement(str(case.operation.path), "stateful" if deleted else "fixture")
    if fixture is not None:
        deleted.add(fixture)
    if response.status_code in (404, 410) and operation["vread"] is None:
        raise AssertionError(
            f"The history of {resource}, deleted at version {max(deleted)}, answered "
            f"{response.status_code}: FHIR keeps a deleted resource's history readable"
        )
    if operation["vread"] is not None:
        version = str((case.path_parameters or {}).get("version_id", ""))
        if not version.isascii() or not version.isdigit():
            return None
        if int(version) in deleted and response.status_code != 410:
            raise AssertionError(
                f"{resource} version {version} is its deletion: a version read answers "
                f"410 Gone, got {response.status_code}"
            )
        if 1 <= int(version) < max(deleted) and response.status_code == 404:
            raise AssertionError(
                f"{resource} version {version}, older than its deletion at version "
                f"{max(deleted)}, answered 404: FHIR keeps the versions of a deleted resource"
            )
        return None
    if response.status_code != 200:
        return None  # a refused query (400, 406): about the request, not the history
    entries = response.json().get("entry", [])
    shown = {}
    for entry in entries:
        match = _WEAK_VERSION.fullmatch(entry.get("response", {}).get("etag", ""))
        if match:
            shown[int(match["version"])] = entry
    if not shown:
        return None  # an empty page (_since later than every version): nothing to see
    for version in deleted:
        # Versions are numbered 1, 2, 3...: a page whose versions span the deletion's shows it.
        if not min(shown) <= version <= max(shown):
            continue
        entry = shown.get(version)
        if (
            entry is None
            or entry.get("request", {}).get("method") != "DELETE"
            or "resource" in entry
        ):
            raise AssertionError(
                f"The history of {resource} does not show version {version} as its deletion: "
                f"{entry!r}"
            )
    return None
