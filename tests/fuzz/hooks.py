"""Schemathesis hooks: four runtime rules that a JSON Schema cannot state, or that
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

Only schema-valid (positive) cases are adapted, and only where the generated value already
has the valid form, so every schema violation still reaches the server as generated and the
negative-data checks see it. Each adapted case is one the server must accept, and the
rejections these rules cause are tested directly in tests/test_crud.py and test_validation.py.

Environment: FUZZ_BASE_URL (the server), FUZZ_TOKEN (a bearer token that may write) and
optionally FUZZ_COUNT_FILE (a file that gets one byte per request sent).
"""

from __future__ import annotations

import os
import re
from functools import cache
from typing import Any

import httpx
import schemathesis

FUZZ_PATIENT = "fuzz-subject"
_PATIENT_REFERENCE = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}(/_history/[0-9]{1,9})?")
_SUBJECT_TYPES = ("Observation", "MedicationAdministration", "AdverseEvent")


@cache
def _fuzz_patient() -> str:
    """Store the Patient every generated record will belong to, once per run."""
    base = os.environ["FUZZ_BASE_URL"]
    headers = {
        "Authorization": f"Bearer {os.environ['FUZZ_TOKEN']}",
        "Content-Type": "application/fhir+json",
        "X-Provenance": '{"resourceType":"Provenance","reason":[{"text":"fuzz fixture"}]}',
    }
    patient = {
        "resourceType": "Patient",
        "id": FUZZ_PATIENT,
        "managingOrganization": {
            "identifier": {"system": "https://itp-trial.example/fhir/sid/site", "value": "S01"}
        },
    }
    response = httpx.put(
        f"{base}/fhir/Patient/{FUZZ_PATIENT}", json=patient, headers=headers, timeout=30
    )
    response.raise_for_status()
    return f"Patient/{FUZZ_PATIENT}"


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
    if not isinstance(case.body, dict):
        return case
    if method == "POST" and (case.headers or {}).get("If-None-Exist") and case.query:
        # Conditional create takes its criteria from If-None-Exist or from the query, not
        # both (400); OpenAPI cannot make a header and query parameters exclusive.
        case.query = {}
    path_id = (case.path_parameters or {}).get("resource_id")
    if method == "PUT" and path_id is not None and isinstance(case.body.get("id"), str):
        case.body["id"] = path_id
    if method in ("POST", "PUT") and _resource_type(case) in _SUBJECT_TYPES:
        subject = case.body.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        if isinstance(reference, str) and _PATIENT_REFERENCE.fullmatch(reference):
            subject["reference"] = _fuzz_patient()
    return case


def _count_request() -> None:
    """One byte per request sent, for tests/test_fuzz.py to count (O_APPEND writes of one
    byte from several worker threads never interleave)."""
    path = os.environ.get("FUZZ_COUNT_FILE")
    if path:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(descriptor, b".")
        finally:
            os.close(descriptor)


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    _count_request()
    # The fuzzer may delete or rewrite the fixture Patient (it learns ids from responses):
    # store it again so that later subjects keep pointing at a Patient that exists.
    path_id = (case.path_parameters or {}).get("resource_id")
    if path_id == FUZZ_PATIENT and case.method.upper() in ("DELETE", "PUT"):
        _fuzz_patient.cache_clear()


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
