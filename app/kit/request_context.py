"""Who is asking, for the audit trail: set once per request by the middleware, read where a
record is written, so services do not thread HTTP details through every signature."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    client_address: str | None
    method: str
    path: str


current_request: ContextVar[RequestContext | None] = ContextVar("current_request", default=None)
