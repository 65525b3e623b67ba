"""The OpenAPI documentation of the FHIR routes: response and body descriptions, links,
and the error answers each kind of route documents. Data only; the handlers live in the
route modules."""

from __future__ import annotations

from typing import Any

from app.fhir import schemas
from app.fhir.examples import RESOURCE_EXAMPLES
from app.fhir.http import FHIR_JSON
from app.services.patching import JSON_PATCH, MERGE_PATCH, POINTER_PATTERN

# What an X-Provenance must decode to, in components (a model for generated clients).
PROVENANCE_HEADER_SCHEMA_NAME = "ProvenanceHeader"
PROVENANCE_HEADER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "reason"],
    "properties": {
        "resourceType": {"const": "Provenance"},
        "reason": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "pattern": "\\S"},
                    "coding": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "system": {"type": "string"},
                                "code": {"type": "string", "minLength": 1},
                                "display": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
    "description": "At least one reason has a text with a visible character or a "
    "coding with a code. Other elements of an R4B Provenance are kept as sent, except "
    "id, meta, target and recorded, which the server sets.",
}


def bundle_doc(description: str) -> dict[str, Any]:
    return {"model": schemas.Bundle, "content": {FHIR_JSON: {}}, "description": description}


def outcome_doc(description: str) -> dict[str, Any]:
    """An error's documentation on a route whose response class is FhirResponse: FastAPI
    puts the model under that class's media type, application/fhir+json."""
    return {
        "model": schemas.OperationOutcome,
        "description": description,
        "content": {FHIR_JSON: {}},
    }


def outcome_docs(
    docs: dict[int | str, dict[str, Any]], descriptions: dict[int | str, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The same errors for a route whose success is another media type (application/json):
    there FastAPI would document the model as application/json, which errors never are;
    they are application/fhir+json, named here by reference (the component exists: the
    FhirResponse routes' `model` registers it). `descriptions` add codes or reword them."""
    outcome = {"$ref": "#/components/schemas/OperationOutcome"}
    described = {code: doc["description"] for code, doc in docs.items()} | (descriptions or {})
    return {
        code: {"description": text, "content": {FHIR_JSON: {"schema": outcome}}}
        for code, text in described.items()
    }


UNAVAILABLE = (
    "The database is unavailable (down, starting, out of connections; issue code `transient`): "
    "retry after `Retry-After` seconds. A write may or may not have been applied: retry it "
    "as a conditional create (If-None-Exist) or a conditional update"
)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: outcome_doc("Malformed request (bad JSON, type or id mismatch, bad parameter)"),
    401: outcome_doc("No valid bearer token (see WWW-Authenticate)"),
    403: outcome_doc("The caller's role, scopes or sites do not allow this"),
    404: outcome_doc("No such resource"),
    406: outcome_doc("Only JSON can be produced"),
    500: outcome_doc("Unexpected error; the outcome carries a correlation id"),
    503: outcome_doc(UNAVAILABLE),
}
# A route that names no resource (a search, a summary) has no 404.
NO_404_ERRORS = {code: doc for code, doc in ERRORS.items() if code != 404}
# A JSON route about one patient.
PATIENT_JSON_ERRORS = outcome_docs(
    ERRORS,
    {404: "No such patient (or one at another site)", 410: "The patient was deleted"},
)
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: outcome_doc(
        "Conflict with the current state, e.g. a Patient's subject number is enrolled "
        "already (the outcome names that Patient)"
    ),
    412: outcome_doc("If-Match is stale, or a conditional create matched several"),
    415: outcome_doc("Body is not application/fhir+json or application/json"),
    422: outcome_doc(
        "Not an acceptable resource of this profile, or a value out of its limits (a platelet "
        "count, a WHO grade, a subject number, a string the server indexes); `expression` "
        "names the element"
    ),
}
VERSION_HEADERS = {
    "ETag": {"description": 'Version, e.g. W/"1"', "schema": {"type": "string"}},
    "Last-Modified": {"description": "HTTP date of the version", "schema": {"type": "string"}},
}
LOCATION_HEADER = {
    "Location": {"description": "/fhir/Type/id/_history/version", "schema": {"type": "string"}},
}


def body_doc(resource_type: str, *, update: bool = False, example: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{resource_type}"}
    body: dict[str, Any] = {"schema": schema}
    if update:
        # An update names its resource twice, in the URL and in the body (FHIR http.html#update).
        body["schema"] = {**schema, "required": ["id"]}
    if example:
        body["examples"] = {
            resource_type: {
                "summary": f"A {resource_type} as the trial writes it",
                "value": RESOURCE_EXAMPLES[resource_type],
            }
        }
    return {"requestBody": {"required": True, "content": {FHIR_JSON: body}}}


def links(
    resource_type: str, state: str, resource_id: str, operations: tuple[str, ...]
) -> dict[str, Any]:
    """OpenAPI links from a response naming one resource (its id at `resource_id`, a runtime
    expression) to `operations` on it and to its history."""
    targets = [(operation, "") for operation in operations] + [("history", "Instance")]
    return {
        f"{operation.title()}{state}": {
            "operationId": f"{operation}{resource_type}{suffix}",
            "parameters": {"resource_id": resource_id},
        }
        for operation, suffix in targets
    }


def json_patch_operation(ops: tuple[str, ...], required: list[str]) -> dict[str, Any]:
    """RFC 6902 operations that take the same members: `from` for move and copy, `value` for
    add, replace and test; the server refuses an operation without them (400)."""
    properties: dict[str, Any] = {
        "op": {"type": "string", "enum": list(ops)},
        "path": {"type": "string", "pattern": POINTER_PATTERN, "description": "JSON Pointer"},
    }
    if "from" in required:
        properties["from"] = {
            "type": "string",
            "pattern": POINTER_PATTERN,
            "description": "JSON Pointer",
        }
    if "value" in required:
        # Free-form, so no string in it can be declared NUL-free here: a schema saying so is
        # recursive, and generated clients drop an operation whose body names one.
        properties["value"] = {"description": "Any JSON value; no string in it may hold NUL"}
    return {
        "type": "object",
        "title": f"JsonPatch{''.join(op.title() for op in ops)}",
        "required": ["op", "path", *required],
        "properties": properties,
        "additionalProperties": False,
    }


JSON_PATCH_OPERATION = {
    "description": "One RFC 6902 operation",
    "oneOf": [
        json_patch_operation(("add", "replace", "test"), ["value"]),
        json_patch_operation(("move", "copy"), ["from"]),
        json_patch_operation(("remove",), []),
    ],
}


def patch_doc(resource_type: str) -> dict[str, Any]:
    # One documented media type: with two, openapi-python-client 0.29 generates an
    # isinstance() check on list[...] that fails at run time. Merge Patch is in the text.
    return {
        "requestBody": {
            "required": True,
            "description": f"JSON Patch (RFC 6902, {JSON_PATCH}). Also accepted: JSON Merge "
            f"Patch (RFC 7386, {MERGE_PATCH}, or a JSON object sent as application/json or "
            "application/fhir+json, as fhirpy sends it; null removes an element). The result "
            f"must be a valid {resource_type} with the same id and resourceType.",
            "content": {
                JSON_PATCH: {
                    "schema": {"type": "array", "minItems": 1, "items": JSON_PATCH_OPERATION}
                },
            },
        }
    }
