"""The OpenAPI documentation of the REST interactions of one resource type: for each route,
its operation id, summary, description, extra parameters and responses. Data only; the
handlers are in `app.fhir.routes`, which registers each with its documentation here."""

from __future__ import annotations

from typing import Any

from app.fhir import schemas
from app.fhir.http import FHIR_JSON, FhirResponse
from app.fhir.openapi_docs import (
    ERRORS,
    LOCATION_HEADER,
    VERSION_HEADERS,
    WRITE_ERRORS,
    body_doc,
    bundle_doc,
    links,
    outcome_doc,
    patch_doc,
)
from app.fhir.search_schema import criteria_parameters
from app.services.patching import JSON_PATCH, MERGE_PATCH

_CREATE = (
    "Conditional create: criteria in If-None-Exist, or as query parameters (as fhirpy's "
    "create and get_or_create send them), not both. No match: created (201); one: returned "
    "as it is (200); several: 412."
)
_CONDITIONAL_UPDATE = (
    "No match: the body is created (201; with an id in the body that names no resource yet, "
    "at that id). One match: it is updated (200; a body id must be its id, else 400). "
    "Several: 412. Either way the X-Provenance reason is required, as for any update, and "
    "stored with the version written. At least one criterion is required (400 without). "
    "Race-free: identical conditional requests are serialised on their criteria."
)
_CONDITIONAL_DELETE = (
    "One match: deleted. None: nothing to do (204). Several: 412, nothing deleted (single "
    "conditional delete). The X-Provenance reason is required whichever happens, as for any "
    "delete. At least one criterion is required: without, 400 (never a delete of every "
    "resource)."
)
_PATCH = (
    "A patch is an update: the patched resource is validated as one, needs the X-Provenance "
    "reason, honours If-Match and is audited as an update. A failed JSON Patch test, or a "
    "path that does not exist, is a 422."
)
_SEVERAL = "The criteria match several resources, or If-Match is stale"


class TypeDocs:
    """The documentation of each route of one resource type, as keyword arguments of
    `APIRouter.add_api_route`."""

    def __init__(self, resource_type: str) -> None:
        self.resource_type = resource_type
        model = schemas.RESOURCE_MODELS[resource_type]
        self._resource = {"model": model, "content": {FHIR_JSON: {}}, "headers": VERSION_HEADERS}

    def _route(self, operation_id: str, summary: str, **documentation: Any) -> dict[str, Any]:
        return {
            "operation_id": operation_id,
            "summary": summary,
            "tags": [self.resource_type],
            "response_class": FhirResponse,
            **documentation,
        }

    def _ok(self, description: str) -> dict[str, Any]:
        return {**self._resource, "description": description}

    def _created(self, description: str, **more: Any) -> dict[str, Any]:
        headers = {**VERSION_HEADERS, **LOCATION_HEADER}
        return {**self._resource, "description": description, "headers": headers, **more}

    def _updated(self, updated: str, created: str) -> dict[int | str, Any]:
        """An update's answers: 200 when it updated a resource, 201 when it created one."""
        return {200: self._ok(updated), 201: self._created(created)}

    def _links(self, state: str, resource_id: str, operations: tuple[str, ...]) -> Any:
        """OpenAPI links: what a client (and the fuzzer's stateful phase) can do next with
        the resource a response names. After a delete its read answers 410 and its history,
        which FHIR keeps, shows the deletion."""
        return links(self.resource_type, state, resource_id, operations)

    def create(self) -> dict[str, Any]:
        created_links = self._links("Created", "$response.body#/id", ("read", "delete"))
        return self._route(
            f"create{self.resource_type}",
            f"Create a {self.resource_type}",
            description=_CREATE,
            status_code=201,
            openapi_extra={
                **body_doc(self.resource_type, example=True),
                "parameters": criteria_parameters(
                    self.resource_type, "Conditional create criterion"
                ),
            },
            responses={
                201: self._created("Created", links=created_links),
                200: self._ok("The criteria matched an existing resource"),
                **WRITE_ERRORS,
            },
        )

    def conditional_update(self) -> dict[str, Any]:
        return self._route(
            f"conditionalUpdate{self.resource_type}",
            f"Conditional update of a {self.resource_type}: the resource the criteria match",
            description=_CONDITIONAL_UPDATE,
            openapi_extra={
                **body_doc(self.resource_type),
                "parameters": criteria_parameters(self.resource_type, "Criterion"),
            },
            responses={
                **self._updated("The match was updated", "No match: created"),
                **WRITE_ERRORS,
                409: outcome_doc(
                    "No match, and the body's id names another resource; or a Patient's "
                    "subject number is enrolled already"
                ),
                412: outcome_doc(_SEVERAL),
            },
        )

    def conditional_delete(self) -> dict[str, Any]:
        return self._route(
            f"conditionalDelete{self.resource_type}",
            f"Conditional delete of the one {self.resource_type} the criteria match",
            description=_CONDITIONAL_DELETE,
            status_code=204,
            openapi_extra={"parameters": criteria_parameters(self.resource_type, "Criterion")},
            responses={
                204: _deleted_doc(
                    "Deleted, or nothing matched", "Version of the deletion (when one was deleted)"
                ),
                200: _outcome_answer("With Prefer: return=OperationOutcome, what was done"),
                **WRITE_ERRORS,
                412: outcome_doc(_SEVERAL),
            },
        )

    def type_history(self) -> dict[str, Any]:
        return self._history("Type", f"All versions of every {self.resource_type}, newest first")

    def _history(self, scope: str, summary: str) -> dict[str, Any]:
        operation_id = f"history{self.resource_type}{scope}"
        return self._route(
            operation_id, summary, responses={200: bundle_doc("history Bundle"), **ERRORS}
        )

    def read(self) -> dict[str, Any]:
        summary = f"Read the current version of a {self.resource_type}"
        return self._read(
            "read", summary, "The current version", "Deleted; the history stays readable"
        )

    def vread(self) -> dict[str, Any]:
        summary = f"Read one version of a {self.resource_type}"
        return self._read("vread", summary, "That version", "That version is a deletion")

    def _read(self, operation: str, summary: str, found: str, deleted: str) -> dict[str, Any]:
        responses = {200: self._ok(found), 410: outcome_doc(deleted), **ERRORS}
        return self._route(f"{operation}{self.resource_type}", summary, responses=responses)

    def update(self) -> dict[str, Any]:
        return self._route(
            f"update{self.resource_type}",
            f"Update a {self.resource_type} (creates it when the id is new)",
            openapi_extra=body_doc(self.resource_type, update=True),
            responses={**self._updated("Updated", "Created (update as create)"), **WRITE_ERRORS},
        )

    def patch(self) -> dict[str, Any]:
        return self._route(
            f"patch{self.resource_type}",
            f"Patch a {self.resource_type} (JSON Patch or JSON Merge Patch)",
            description=_PATCH,
            openapi_extra=patch_doc(self.resource_type),
            responses={
                200: self._ok("Patched"),
                410: outcome_doc("Deleted; there is nothing to patch"),
                **WRITE_ERRORS,
                415: outcome_doc(f"Body is not {JSON_PATCH}, {MERGE_PATCH} or JSON"),
                422: outcome_doc(
                    "The patch cannot be applied (a failed test, a missing path), or its "
                    "result is not an acceptable resource; `expression` names the element"
                ),
            },
        )

    def delete(self) -> dict[str, Any]:
        deleted_links = self._links("Deleted", "$request.path.resource_id", ("read",))
        return self._route(
            f"delete{self.resource_type}",
            f"Delete a {self.resource_type} (its history stays readable)",
            status_code=204,
            responses={
                204: _deleted_doc(
                    "Deleted (or already deleted)", "Version of the deletion", links=deleted_links
                ),
                200: _outcome_answer("Deleted, with Prefer: return=OperationOutcome"),
                **WRITE_ERRORS,
            },
        )

    def instance_history(self) -> dict[str, Any]:
        return self._history("Instance", f"All versions of one {self.resource_type}, newest first")


def _deleted_doc(description: str, etag: str, **more: Any) -> dict[str, Any]:
    """A delete's 204. Its route's response class is still FhirResponse: the 200 (Prefer:
    return=OperationOutcome) and every error are application/fhir+json."""
    headers = {"ETag": {"description": etag, "schema": {"type": "string"}}}
    return {"description": description, "headers": headers, **more}


def _outcome_answer(description: str) -> dict[str, Any]:
    return {
        "model": schemas.OperationOutcome,
        "content": {FHIR_JSON: {}},
        "description": description,
    }
