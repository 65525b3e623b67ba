"""HTTP guards that wrap every request, as plain ASGI middleware (no per-request objects):
the request id, the body limit, NUL in the request line and headers, and the security
headers."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.audit.trail import AuditRecord
from app.fhir.http import (
    API_CSP,
    DOCS_CSP,
    REPORT_CSP,
    SECURITY_HEADERS,
    call_catching,
)
from app.fhir.outcome import operation_outcome, resource_type_of
from app.kit.asgi import HttpMiddleware, adding_headers
from app.kit.errors import BadRequest, FhirError, PayloadTooLarge
from app.kit.request_context import RequestContext, current_request


class RequestIdMiddleware(HttpMiddleware):
    """Gives every request an id (the client's X-Request-Id if it sent a sane one) and
    returns it, so a client's report and the server log can be matched."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if 0 < len(candidate) <= 64 and candidate.replace("-", "").isalnum():
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        current_request.set(
            RequestContext(
                request_id, client[0] if client else None, scope["method"], scope["path"]
            )
        )
        header = (b"x-request-id", request_id.encode())
        await self.app(scope, receive, adding_headers(send, [header]))


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware(HttpMiddleware):
    """Refuses bodies over the limit with 413 before they are read into memory: by the
    declared Content-Length, and by counting what actually arrives (chunked uploads).
    `path_limits` gives some paths their own limit (the Bundle endpoint)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None
    ) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self._refuse(scope, send, limit)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        error, started = await call_catching(self.app, scope, counting_receive, send, BodyTooLarge)
        if error is not None and not started:
            await self._refuse(scope, send, limit)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        await refuse(
            scope,
            send,
            PayloadTooLarge(f"The request body is larger than {limit} bytes"),
            "create" if scope["method"] == "POST" else "update",
        )


async def refuse(scope: Scope, send: Send, error: FhirError, interaction: str) -> None:
    """Answer `error`'s OperationOutcome before the app runs, audited as a refused attempt
    like any other (who: not yet known)."""
    services = getattr(getattr(scope.get("app"), "state", None), "services", None)
    if services is not None:
        services.audit.add(
            AuditRecord(
                interaction,
                outcome="4",
                description=f"{error.status_code}: {error.diagnostics}",
                entity_type=resource_type_of(scope["path"]),
            )
        )
    body = orjson.dumps(operation_outcome(error.issues))
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/fhir+json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_INTERACTIONS = {"GET": "read", "POST": "create", "PUT": "update", "PATCH": "update"}


class NulRefusalMiddleware(HttpMiddleware):
    """Refuses NUL (U+0000) in the path, the query string or a header value with 400.

    PostgreSQL stores no NUL in text and cannot compare a value holding one: without this a
    search or a token subject with NUL failed there (500) and worked on SQLite. Bodies are
    checked where they are parsed (`services.validation.load_json`, the HL7 reader)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        where = _nul_in(scope)
        if where is None:
            await self.app(scope, receive, send)
            return
        await refuse(
            scope,
            send,
            BadRequest(f"NUL (U+0000, %00) is not allowed in {where}; remove it"),
            _INTERACTIONS.get(scope["method"], "delete"),
        )


def _nul_in(scope: Scope) -> str | None:
    """Where the request line or a header holds a NUL, in words; None if nowhere."""
    if "\x00" in scope["path"]:
        return "the path"
    if b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]:
        return "the query string"
    for name, value in scope["headers"]:
        if b"\x00" in value:
            return f"the {name.decode('latin-1')} header"
    return None


class SecurityHeadersMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in ("/docs", "/redoc") or path.startswith("/static"):
            policy = DOCS_CSP
        elif path == "/report" or path.startswith("/report/"):
            policy = REPORT_CSP
        else:
            policy = API_CSP
        await self.app(scope, receive, adding_headers(send, [*SECURITY_HEADERS, policy]))


_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class WriteLimitMiddleware(HttpMiddleware):
    """At most `limit` write requests of this worker run at once; the others wait their turn
    (in arrival order) before anything of theirs starts.

    It was made when every write transaction ended by taking the audit chain's lock and
    held it until its commit: with 16 writes in flight per worker the chain stayed locked
    ~10x longer than its three statements take (bench/README.md), and a few writes per
    worker kept the lock short. The chain is now built after commit (`app.audit.chain`);
    what a limit buys since is to be measured again (issue 20). Writes of one patient still
    wait on its row lock. Reads and searches (also `POST .../_search`) are not limited.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        super().__init__(app)
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in _WRITE_METHODS or scope["path"].endswith("/_search"):
            await self.app(scope, receive, send)
            return
        if self._slots is None:  # created in the worker's own event loop
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            await self.app(scope, receive, send)
