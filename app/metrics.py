"""Prometheus metrics (prometheus-client), served at `GET /metrics`.

What is measured: requests by route template, method and status; request latency; the time
of the on-write response recompute; the database pool's connections in use. Labels are
route templates (`/fhir/Observation/{resource_id}`), never raw paths, ids or query strings:
the metrics expose no patient data, so `/metrics` needs no token (like `/healthz`) and is
meant to be scraped from inside the deployment; keep it off the public ingress.

Several uvicorn workers: set `PROMETHEUS_MULTIPROC_DIR` to an empty directory before the
workers start (see "Production start" in the README); every worker then writes its samples
there and any worker's `/metrics` answers for all of them. Without it a scrape sees the
one worker that answered.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import Message, Receive, Scope, Send

from app.kit.asgi import HttpMiddleware

_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Buckets around what the API answers in: sub-millisecond reads to second-long Bundles.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
_RECOMPUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25)

REQUESTS = Counter(
    "itp_http_requests_total",
    "HTTP requests answered, by route template, method and status code",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "itp_http_request_duration_seconds",
    "Time from the request's arrival in the app to the end of its answer",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
RECOMPUTE = Histogram(
    "itp_recompute_seconds",
    "On-write response recompute of one patient: read its facts, assess, compare",
    buckets=_RECOMPUTE_BUCKETS,
)
POOL = Gauge(
    "itp_db_pool_connections",
    "Database pool connections of the app's writer engine, by state",
    ["state"],
    multiprocess_mode="livesum",
)
UNMATCHED = "<unmatched>"
# One line per request (app/logging.json makes it JSON): route template, not the path, for
# the same reason as the labels; the request id leads to the AuditEvents with the details.
access_log = logging.getLogger("app.access")


def observe_recompute(seconds: float) -> None:
    RECOMPUTE.observe(seconds)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    # `path_format` is the template without convertors: /fhir/Observation/{resource_id}.
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def _pool(scope: Scope) -> Any:
    services = getattr(getattr(scope.get("app"), "state", None), "services", None)
    return getattr(getattr(getattr(services, "db", None), "writer", None), "pool", None)


def _record_pool(pool: Any) -> None:
    """Connections in use and held, where the pool can say (SQLite's pool differs)."""
    checked_out = getattr(pool, "checkedout", None)
    size = getattr(pool, "size", None)
    if callable(checked_out) and callable(size):
        POOL.labels("in_use").set(checked_out())
        POOL.labels("size").set(size())


class MetricsMiddleware(HttpMiddleware):
    """Counts and times every HTTP request."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500  # an exception that escapes the app is answered 500 by the server

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - started
            route, method = _route(scope), scope["method"]
            REQUESTS.labels(route, method, str(status)).inc()
            LATENCY.labels(route, method).observe(elapsed)
            _record_pool(_pool(scope))
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %s",
                    method,
                    route,
                    status,
                    extra={
                        "request_id": scope.get("state", {}).get("request_id"),
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of every worker in multiprocess mode."""
    if _MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
