"""OperationOutcome: every error (and some informational answers) leaves the server as one.

The handlers here are the only place an exception becomes an HTTP response. A database
that cannot serve now (down, starting, out of connections: `kit.failures`) answers 503
`transient` with `Retry-After`; a client that went away is logged as 499; any other
unexpected error answers 500 with a correlation id, its traceback in the log, never sent.
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
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from app.audit.trail import AuditRecord
from app.fhir.http import FhirResponse, api_security_headers, call_catching
from app.kit.asgi import HttpMiddleware
from app.kit.errors import STATUS_ISSUE_CODES, FhirError, Issue, database_unavailable
from app.kit.failures import is_transient
from app.services.provenance import header_problem

log = logging.getLogger("app.errors")


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


def resource_type_of(path: str) -> str | None:
    """The resource type a FHIR path is about (`/fhir/Observation/1`: Observation)."""
    parts = [part for part in path.split("/") if part]
    return parts[1] if len(parts) > 1 and parts[0] == "fhir" else None


def _audit_refusal(
    request: Request, status_code: int, diagnostics: str, site: str | None = None
) -> None:
    """Every refused attempt (and every login failure) leaves an AuditEvent; `site` is the
    site of the existing resource it was about, which the answer itself does not reveal."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        return
    principal = getattr(request.state, "principal", None)
    parts = [p for p in request.url.path.split("/") if p]
    entity_id = parts[2] if len(parts) > 2 and not parts[2].startswith(("_", "$")) else None
    services.audit.add(
        AuditRecord(
            "login" if status_code == 401 else _METHOD_INTERACTION.get(request.method, "operation"),
            outcome="4" if status_code < 500 else "8",
            description=f"{status_code}: {diagnostics}"[:1000],
            agent=principal.sub if principal else None,
            role=principal.role if principal else None,
            site=site,
            entity_type=resource_type_of(request.url.path),
            entity_id=entity_id,
            query=request.url.query or None,
        )
    )


async def _fhir_error(request: Request, exc: Exception) -> FhirResponse:
    assert isinstance(exc, FhirError)
    _audit_refusal(request, exc.status_code, exc.diagnostics, exc.audit_site)
    return outcome_response(exc.status_code, exc.issues, exc.headers)


def _api_routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router
            yield from _api_routes(route.original_router.routes)


async def _http_error(request: Request, exc: Exception) -> FhirResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = STATUS_ISSUE_CODES.get(exc.status_code, "processing")
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


async def _answer(request: Request, exc: Exception) -> Response:
    """The answer to an exception no handler took: 503, 499 or 500."""
    route = getattr(request.scope.get("route"), "path_format", None) or "<unmatched>"
    if isinstance(exc, ClientDisconnect):
        # The client is gone, nothing of its request was done: no error, no one to answer.
        log.info(
            "client disconnected before sending its whole request: %s %s 499",
            request.method,
            route,
            extra={"status": 499},
        )
        return Response(status_code=499)
    if is_transient(exc):
        log.warning(
            "database unavailable, answered 503: %s %s (%s: %s)",
            request.method,
            route,
            type(exc).__name__,
            (str(exc).strip().splitlines() or [""])[0],
        )
        return await _fhir_error(request, database_unavailable(request.method))
    correlation_id = getattr(request.state, "request_id", None) or str(uuid.uuid4())
    _audit_refusal(request, 500, f"unexpected error, correlation id {correlation_id}")
    log.exception(
        "unexpected error %s on %s %s",
        correlation_id,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return outcome_response(
        500,
        [Issue("exception", f"Internal server error; correlation id {correlation_id}")],
        {"X-Correlation-Id": correlation_id},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    """What escaped even `ErrorMiddleware` (an error in an outer middleware). This answer
    leaves through Starlette's outermost error middleware, past ours: it carries the
    request id and the security headers itself."""
    response = await _answer(request, exc)
    request_id = getattr(request.state, "request_id", None)
    for name, value in api_security_headers():
        response.headers[name.decode()] = value.decode()
    response.headers["X-Request-Id"] = request_id or response.headers.get("X-Correlation-Id", "")
    return response


class ErrorMiddleware(HttpMiddleware):
    """Answers every exception the route handlers did not, and does not let it escape.

    Starlette's outermost error middleware answers an exception and then re-raises it, and
    uvicorn closes the connection of a request whose app raised: a client's next request on
    that keep-alive connection got no answer at all. Here the exception ends: the answer
    (503 for an outage, 500 otherwise) goes out through the request id, security headers
    and metrics middleware like any other, and the connection stays open. Installed inside
    those and outside the body limit (whose own exception it must not see)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        error, started = await call_catching(self.app, scope, receive, send, Exception)
        if error is None:
            return
        if started:  # half an answer is out: nothing can be said on this connection
            raise error
        response = await _answer(Request(scope, receive), error)
        await response(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_exception_handler(FhirError, _fhir_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
