"""OperationOutcome: every error (and some informational answers) leaves the server as one.

The handlers here are the only place an exception becomes an HTTP response. An unexpected
error answers 500 with a correlation id; its traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.audit.trail import AuditRecord
from app.errors import FhirError, Issue
from app.fhir.http import FhirResponse
from app.middleware import api_security_headers
from app.services.provenance import header_problem

log = logging.getLogger("app.errors")

_STATUS_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
}


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    rendered = []
    for issue in issues:
        entry: dict[str, Any] = {
            "severity": issue.severity,
            "code": issue.code,
            "diagnostics": issue.diagnostics,
        }
        if issue.expression:
            entry["expression"] = list(issue.expression)
        rendered.append(entry)
    return {"resourceType": "OperationOutcome", "issue": rendered}


def outcome_response(
    status_code: int, issues: Sequence[Issue], headers: dict[str, str] | None = None
) -> FhirResponse:
    return FhirResponse(operation_outcome(issues), status_code=status_code, headers=headers)


def information(message: str) -> dict[str, Any]:
    return operation_outcome([Issue("informational", message, severity="information")])


_METHOD_INTERACTION = {
    "GET": "read",
    "POST": "create",
    "PUT": "update",
    "DELETE": "delete",
    "PATCH": "patch",
}


def _audit_refusal(request: Request, status_code: int, diagnostics: str) -> None:
    """Every refused attempt (and every login failure) leaves an AuditEvent."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        return
    principal = getattr(request.state, "principal", None)
    parts = [p for p in request.url.path.split("/") if p]
    entity_type = parts[1] if len(parts) > 1 and parts[0] == "fhir" else None
    entity_id = parts[2] if len(parts) > 2 and not parts[2].startswith(("_", "$")) else None
    services.audit.add(
        AuditRecord(
            "login" if status_code == 401 else _METHOD_INTERACTION.get(request.method, "operation"),
            outcome="4" if status_code < 500 else "8",
            description=f"{status_code}: {diagnostics}"[:1000],
            agent=principal.sub if principal else None,
            role=principal.role if principal else None,
            entity_type=entity_type,
            entity_id=entity_id,
            query=request.url.query or None,
        )
    )


async def _fhir_error(request: Request, exc: Exception) -> FhirResponse:
    assert isinstance(exc, FhirError)
    _audit_refusal(request, exc.status_code, exc.diagnostics)
    return outcome_response(exc.status_code, exc.issues, exc.headers)


def _api_routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router
            yield from _api_routes(route.original_router.routes)


async def _http_error(request: Request, exc: Exception) -> FhirResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_ISSUE_CODES.get(exc.status_code, "processing")
    if exc.status_code == 404:
        message = f"No such resource type or route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not supported on {request.url.path}"
        # Starlette names the methods of the first route matching the path only; a path
        # served by several routes (read, update, delete) allows all of theirs.
        allowed = sorted(
            {
                method
                for route in _api_routes(request.app.routes)
                if route.matches(request.scope)[0] != Match.NONE
                for method in route.methods or ()
            }
        )
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    else:
        message = str(exc.detail)
    _audit_refusal(request, exc.status_code, message)
    return outcome_response(exc.status_code, [Issue(code, message)], dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> FhirResponse:
    assert isinstance(exc, RequestValidationError)
    issues = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid value"))
        if location == ["header", "X-Provenance"]:
            # pydantic would say "Field required": say what the header must hold instead.
            message = header_problem(error["type"], error.get("ctx") or {}) or message
        issues.append(
            Issue(
                # FHIR's issue type for a missing element (e.g. the X-Provenance header).
                "required" if error.get("type") == "missing" else "invalid",
                message,
                [".".join(location)] if location else [],
            )
        )
    _audit_refusal(request, 400, "; ".join(i.diagnostics for i in issues) or "invalid request")
    return outcome_response(400, issues or [Issue("invalid", "Invalid request")])


async def _unexpected(request: Request, exc: Exception) -> FhirResponse:
    correlation_id = getattr(request.state, "request_id", None) or str(uuid.uuid4())
    _audit_refusal(request, 500, f"unexpected error, correlation id {correlation_id}")
    log.exception(
        "unexpected error %s on %s %s",
        correlation_id,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    # This answer leaves through Starlette's outermost error middleware, past ours: it
    # carries the request id and the security headers itself.
    headers = {name.decode(): value.decode() for name, value in api_security_headers()}
    headers |= {"X-Correlation-Id": correlation_id, "X-Request-Id": correlation_id}
    return outcome_response(
        500,
        [Issue("exception", f"Internal server error; correlation id {correlation_id}")],
        headers,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(FhirError, _fhir_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
