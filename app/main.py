"""Builds the FastAPI app: routers, middleware, exception handlers, lifespan."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.settings import AuthSettings, load_key_source
from app.auth.tokens import KeySource
from app.codes import CodeSystems
from app.engine import Criteria
from app.errors import Issue
from app.fhir import operations, outcome, routes, schemas
from app.fhir.capability import capability_statement
from app.fhir.http import FHIR_JSON, FhirResponse, negotiate, pretty
from app.services.context import ServiceContext
from app.services.dates import format_instant, utc_now
from app.settings import Settings, get_criteria_settings, get_settings
from app.store.db import Database
from app.store.migrations import current_revision, head_revision

log = logging.getLogger("app")

try:
    SOFTWARE_VERSION = version("itp-trial-api")
except PackageNotFoundError:  # running from a checkout that was not pip-installed
    SOFTWARE_VERSION = "0+unknown"


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-Id if it sent a sane one) and
    returns it, so a client's report and the server log can be matched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if 0 < len(candidate) <= 64 and candidate.replace("-", "").isalnum():
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(
    settings: Settings | None = None,
    criteria: Criteria | None = None,
    key_source: KeySource | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    # Read at build time, so a bad ITP_* setting or a missing token key stops the server
    # before it serves anything.
    criteria = criteria or get_criteria_settings().to_criteria()
    key_source = key_source or load_key_source(
        AuthSettings(environment=settings.environment), log=log
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.from_url(
            settings.database_url, settings.db_pool_size, settings.db_max_overflow
        )
        app.state.services = ServiceContext(db, criteria, CodeSystems(settings.code_system_base))
        app.state.head_revision = head_revision()
        try:
            yield
        finally:
            await db.dispose()

    app = FastAPI(
        title="ITP trial data API",
        version=SOFTWARE_VERSION,
        description=(
            "FHIR R4B (4.3.0) API of the NCT06776510 trial: NAD+ and NMN in refractory primary "
            "immune thrombocytopenia. Resources: Patient, MedicationAdministration, "
            "Observation (platelet counts, WHO bleeding grade), AdverseEvent. Every error is "
            "an OperationOutcome."
        ),
        lifespan=lifespan,
        default_response_class=FhirResponse,
    )
    app.state.settings = settings
    app.state.key_source = key_source
    outcome.install(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(routes.router)
    app.include_router(operations.router)

    @app.get(
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
            }
        },
    )
    async def metadata(request: Request) -> FhirResponse:
        negotiate(request)
        statement = capability_statement(
            routes.fhir_base(request), SOFTWARE_VERSION, format_instant(utc_now())
        )
        return pretty(request, orjson.dumps(statement))

    @app.get(
        "/healthz",
        operation_id="healthz",
        summary="The process is up",
        tags=["Health"],
        response_class=JSONResponse,
    )
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        operation_id="readyz",
        summary="The database answers and its schema is at the migrations' head",
        tags=["Health"],
        response_class=JSONResponse,
        responses={503: {"description": "Not ready", "model": schemas.OperationOutcome}},
    )
    async def readyz(request: Request) -> Any:
        db: Database = request.app.state.services.db
        head = request.app.state.head_revision
        try:
            current = await current_revision(db)
        except Exception:  # any failure means "not ready"; the cause goes to the log only
            log.exception("readiness check failed")
            return outcome.outcome_response(
                503,
                [Issue("transient", "The database is unreachable or has no migrations applied")],
            )
        if current != head:
            return outcome.outcome_response(
                503,
                [
                    Issue(
                        "transient",
                        f"The database schema is at {current}, the code expects {head}; "
                        "run `alembic upgrade head`",
                    )
                ],
            )
        return {"status": "ready", "database": db.dialect, "revision": current}

    return app


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.main:app` builds the app on first access, not on import: importing this
    module (tests, tools) must not read the environment or create a development key."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
