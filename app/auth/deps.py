"""Authentication and authorisation as FastAPI dependencies (`Annotated` aliases)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.auth.permissions import Action, authorize
from app.auth.principal import Principal, principal_from_claims
from app.auth.tokens import KeySource
from app.kit.errors import Unauthorized

# Documents the bearer scheme in the OpenAPI file; the checks below give the FHIR answers.
bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="A JWT from the identity provider (or `python -m app token`)",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def current_principal(request: Request, credentials: Credentials) -> Principal:
    """The caller, from a bearer JWT; 401 with `WWW-Authenticate` otherwise."""
    if not request.headers.get("authorization"):
        raise Unauthorized.missing_token()
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'", error="invalid_request")
    token = credentials.credentials
    key_source: KeySource = request.app.state.key_source
    if key_source.scheme == "jwks":
        # A JWKS lookup may block on the identity provider: keep it off the event loop.
        claims = await run_in_threadpool(key_source.decode, token.strip())
    else:
        claims = key_source.decode(token.strip())
    principal = principal_from_claims(claims)
    request.state.principal = principal
    return principal


class Require:
    """`Depends(Require("Observation", Action.CREATE))`: the caller, if role and scopes allow."""

    def __init__(self, resource_type: str, action: Action) -> None:
        self.resource_type = resource_type
        self.action = action

    async def __call__(self, request: Request, credentials: Credentials) -> Principal:
        principal = await current_principal(request, credentials)
        authorize(principal, self.resource_type, self.action)
        return principal


class RequireAll:
    """`Depends(RequireAll(types, Action.SEARCH))`: the caller, if role and scopes allow the
    action on every one of the types (an operation that shows all of them)."""

    def __init__(self, resource_types: tuple[str, ...], action: Action) -> None:
        self.resource_types = resource_types
        self.action = action

    async def __call__(self, request: Request, credentials: Credentials) -> Principal:
        principal = await current_principal(request, credentials)
        for resource_type in self.resource_types:
            authorize(principal, resource_type, self.action)
        return principal
