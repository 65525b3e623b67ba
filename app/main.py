"""Builds the FastAPI app: routers, middleware, exception handlers, lifespan."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from app import metrics
from app.audit.chain import ChainSequencer
from app.audit.trail import AuditQueue
from app.auth.settings import AuthSettings, load_key_source
from app.auth.tokens import KeySource
from app.engine import Criteria
from app.fhir import (
    audit_routes,
    bundle_routes,
    codesystems,
    export_routes,
    operations,
    outcome,
    report_routes,
    routes,
    schemas,
    sdtm_routes,
    search_routes,
)
from app.fhir.capability import capability_statement
from app.fhir.deps import fhir_base
from app.fhir.http import FHIR_JSON, FhirResponse, negotiate, pretty
from app.fhir.openapi_docs import (
    PROVENANCE_HEADER_SCHEMA,
    PROVENANCE_HEADER_SCHEMA_NAME,
    outcome_docs,
)
from app.ingest import routes as hl7_routes
from app.kit.asgi import HttpMiddleware
from app.kit.dates import format_instant, utc_now
from app.kit.errors import Issue
from app.kit.failures import is_transient
from app.kit.limits import InputLimits
from app.middleware import (
    BodyLimitMiddleware,
    NulRefusalMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
    WriteLimitMiddleware,
)
from app.services.bulk_export import ExportRunner
from app.services.context import ServiceContext
from app.settings import Settings, get_criteria_settings, get_settings
from app.startup import check_database_now, explain
from app.store.db import Database
from app.store.migrations import current_revision, head_revision
from app.web import report_page

log = logging.getLogger("app")

try:
    SOFTWARE_VERSION = version("itp-trial-api")
except PackageNotFoundError:  # running from a checkout that was not pip-installed
    SOFTWARE_VERSION = "0+unknown"


def create_app(
    settings: Settings | None = None,
    criteria: Criteria | None = None,
    key_source: KeySource | None = None,
    limits: InputLimits | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    # Read at build time, so a bad ITP_* setting or a missing token key stops the server
    # before it serves anything.
    criteria = criteria or get_criteria_settings().to_criteria()
    limits = limits or get_criteria_settings().input_limits()
    key_source = key_source or load_key_source(
        AuthSettings(environment=settings.environment), log=log
    )
    # FastAPIOffline serves Swagger UI and ReDoc from files in the package: /docs and /redoc
    # work on a network without a CDN.
    app = FastAPIOffline(
        static_url="/static/docs",
        title="ITP trial data API",
        version=SOFTWARE_VERSION,
        description=_DESCRIPTION,
        lifespan=_lifespan(settings, criteria, limits),
        default_response_class=FhirResponse,
    )
    app.state.settings = settings
    app.state.key_source = key_source
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    outcome.install(app)
    _add_middleware(app, settings)
    for router in _ROUTERS:
        app.include_router(router)
    return app


_DESCRIPTION = (
    "FHIR R4B (4.3.0) API of the NCT06776510 trial: NAD+ and NMN in refractory primary "
    "immune thrombocytopenia. Resources: Patient, MedicationAdministration, "
    "Observation (platelet counts, WHO bleeding grade), AdverseEvent. Every error is "
    "an OperationOutcome."
)


def _lifespan(
    settings: Settings, criteria: Criteria, limits: InputLimits
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """What each worker starts before it serves and stops after: the database, the audit
    queue, the audit chain's sequencer and the export runner."""
    code_systems = settings.code_systems()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.from_url(
            settings.database_url,
            settings.db_pool_size,
            settings.db_max_overflow,
            settings.db_pool_timeout,
        )
        audit = AuditQueue(
            db, max_records=settings.audit_queue_max, spill_dir=settings.audit_spill_dir
        )
        # What an earlier run could not write (an outage at its shutdown) goes first.
        await audit.replay()
        app.state.services = ServiceContext(db, criteria, code_systems, audit, limits)
        app.state.head_revision = head_revision()
        # Every worker runs export jobs; any of them may take a job another one queued.
        exports = ExportRunner(app.state.services, export_routes.export_settings(settings))
        app.state.exports = exports
        chain = ChainSequencer(db, settings.audit_chain_delay_ms)
        audit.start()
        chain.start()
        exports.start()
        if settings.freezes_gc:
            gc.collect()  # what startup left as garbage is freed, not kept forever
            gc.freeze()
        try:
            yield
        finally:
            await exports.stop()  # a running job is handed back for another worker to resume
            # The last reads' records are written (or spilled) before the pool closes.
            await audit.stop()
            await chain.stop()  # and every record committed so far is chained
            await db.dispose()

    return lifespan


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """Each one added wraps those added before it: the last one added runs first."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "If-Match",
                "If-None-Exist",
                "Prefer",
                "X-Provenance",
                "X-Request-Id",
            ],
            expose_headers=["ETag", "Location", "Last-Modified", "X-Request-Id"],
        )
    if settings.max_concurrent_writes:
        app.add_middleware(WriteLimitMiddleware, limit=settings.max_concurrent_writes)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        path_limits={path: settings.max_bundle_bytes for path in ("/fhir", "/fhir/")},
    )
    for middleware in _OUTER_MIDDLEWARE:
        app.add_middleware(middleware)


# Innermost first. Every exception a handler did not take ends in ErrorMiddleware (503, 499
# or 500), so none reaches uvicorn, which would close the connection; its answer still gets
# the request id, the security headers and its metrics from the middleware outside it.
# MetricsMiddleware last, so outermost: every answer is counted and timed, a 413 from the
# limit too, and every answer gets the security headers.
_OUTER_MIDDLEWARE: tuple[type[HttpMiddleware], ...] = (
    outcome.ErrorMiddleware,
    NulRefusalMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
    metrics.MetricsMiddleware,
)

# The server's own routes: the CapabilityStatement; health, readiness and metrics.
_server = APIRouter()
_health = APIRouter(tags=["Health"], default_response_class=JSONResponse)


@_server.get(
    "/fhir/metadata",
    operation_id="capabilities",
    summary="The CapabilityStatement: exactly what this server implements",
    tags=["Server"],
    response_class=FhirResponse,
    responses={
        200: {
            "model": schemas.CapabilityStatement,
            "content": {FHIR_JSON: {}},
            "description": "CapabilityStatement",
        },
        **outcome_docs(
            {
                406: {"description": "Only JSON can be produced"},
                500: {"description": "Unexpected error; the outcome carries a correlation id"},
            }
        ),
    },
)
async def metadata(request: Request) -> FhirResponse:
    await negotiate(request)
    statement = capability_statement(
        fhir_base(request), SOFTWARE_VERSION, format_instant(utc_now())
    )
    return pretty(request, orjson.dumps(statement))


@_health.get("/healthz", operation_id="healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@_health.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics: requests, latency, recompute time, database pool",
    description="Text exposition format. Labels are route templates, never paths or ids: "
    "no patient data, so no token is needed; scrape it from inside the deployment.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@_health.get(
    "/readyz",
    operation_id="readyz",
    summary="The database answers and its schema is at the migrations' head",
    responses=outcome_docs({503: {"description": "Not ready"}}),
)
async def readyz(request: Request) -> Any:
    db: Database = request.app.state.services.db
    head = request.app.state.head_revision
    try:
        current = await current_revision(db)
    except Exception as error:  # any failure means "not ready"; the cause: the log only
        if is_transient(error):  # an outage, probed every few seconds: one line each
            log.warning("not ready: the database is unavailable (%s)", type(error).__name__)
        else:
            log.exception("readiness check failed")
        return _not_ready("The database is unreachable or has no migrations applied")
    if current != head:
        return _not_ready(
            f"The database schema is at {current}, the code expects {head}; "
            "run `alembic upgrade head`"
        )
    return {"status": "ready", "database": db.dialect, "revision": current}


def _not_ready(diagnostics: str) -> FhirResponse:
    return outcome.outcome_response(503, [Issue("transient", diagnostics)])


# In the order their routes are matched and documented.
_ROUTERS: tuple[APIRouter, ...] = (
    routes.router,
    bundle_routes.router,
    search_routes.router,
    operations.router,
    report_routes.router,
    report_page.router,
    audit_routes.router,
    export_routes.router,
    sdtm_routes.router,
    codesystems.router,
    hl7_routes.router,
    _server,
    _health,
)


def _drop_null(parameter: dict[str, Any]) -> None:
    """An optional parameter is absent, never null: HTTP has no null header or query value,
    so `anyOf: [X, null]` (FastAPI's rendering of `X | None`) only invites a literal "null"."""
    schema = parameter.get("schema", {})
    variants = [v for v in schema.get("anyOf", ()) if v.get("type") != "null"]
    if "anyOf" in schema and len(variants) == 1:
        del schema["anyOf"]
        schema.update(variants[0])


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, minus what this app never answers: request-validation errors
    here are 400 OperationOutcomes (documented per route), never FastAPI's 422 body."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for path in document["paths"].values():
            for operation in path.values():
                for parameter in operation.get("parameters", []):
                    _drop_null(parameter)
                response = operation.get("responses", {}).get("422", {})
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema == {"$ref": "#/components/schemas/HTTPValidationError"}:
                    del operation["responses"]["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(unused, None)
        # X-Provenance's contentSchema names it; no route's body or response does.
        document["components"]["schemas"][PROVENANCE_HEADER_SCHEMA_NAME] = PROVENANCE_HEADER_SCHEMA
        app.openapi_schema = document
    return app.openapi_schema


# uvicorn's exit status for a worker that failed before serving: its supervisor then stops
# the server rather than restart, for ever, a worker that would fail the same way.
STARTUP_FAILURE = 3


def _start() -> FastAPI:
    """The server's start: settings, token key, database (reachable, migrated to the head).
    A problem is logged as one line naming the cause and the fix (the traceback too under
    `--log-level debug`), and the process exits with STARTUP_FAILURE."""
    try:
        application = create_app()
        check_database_now(application.state.settings.database_url)
    except Exception as error:
        line = explain(error)
        if line is None:
            raise
        debug = logging.getLogger("uvicorn.error").isEnabledFor(logging.DEBUG)
        log.error("cannot start: %s", line, exc_info=error if debug else None)
        raise SystemExit(STARTUP_FAILURE) from None
    return application


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.main:app` builds the app on first access, not on import: importing this
    module (tests, tools) must not read the environment or create a development key."""
    if name == "app":
        application = _start()
        globals()["app"] = application
        return application
    raise AttributeError(name)
