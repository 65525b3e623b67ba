"""Bearer tokens: checking them (PyJWT, never by hand) and, for development, issuing them.

A `KeySource` knows exactly one scheme of key and the algorithms that go with it: a shared
secret accepts HS256 only, an identity provider's JWKS accepts RS256/ES256 only. Pinning the
algorithm to the key is what defeats `alg: none` and the classic confusion attack, where a
token is HMAC-signed with the provider's *public* key (which anyone can download) and the
server, trusting the token's header, verifies it as HS256 with that public key.

Every failure becomes `Unauthorized` (401) with a short, fixed description: PyJWT's own
messages are not passed on, so nothing about keys or secrets can reach a client.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from app.auth.principal import DEFAULT_SCOPES, Role, principal_from_claims
from app.kit.errors import ConfigurationError, FhirError, Unauthorized

SYMMETRIC_ALGORITHMS: tuple[str, ...] = ("HS256",)
ASYMMETRIC_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256")
# A token without these is refused even if its signature is good: one without `exp` would be
# valid forever, one without `aud`/`iss` could have been meant for another service.
REQUIRED_CLAIMS: tuple[str, ...] = ("exp", "iss", "aud", "sub")
# Real tokens are a few hundred bytes; refusing huge ones early keeps parsing cheap.
MAX_TOKEN_LENGTH = 8192

log = logging.getLogger("app.auth")


# Most specific first: several of these subclass DecodeError or InvalidTokenError.
_FAILURES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token not meant for this API (audience)"),
    (jwt.InvalidIssuerError, "token from an unknown issuer"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (InvalidSubjectError, "token subject invalid"),
    (InvalidJTIError, "token id invalid"),
    (jwt.InvalidIssuedAtError, "token issue time invalid"),
    (jwt.PyJWKClientConnectionError, "signing keys unavailable"),
    (jwt.PyJWKClientError, "no signing key matches the token"),
    (jwt.InvalidKeyError, "no usable signing key"),
    (jwt.PyJWKError, "no usable signing key"),
    (jwt.PyJWKSetError, "no usable signing key"),
    (jwt.DecodeError, "token malformed"),
)


def _describe(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim} claim"
    for failure, description in _FAILURES:
        if isinstance(exc, failure):
            return description
    return "token invalid"


class KeySource(ABC):
    """One scheme of verification key plus the issuer, audience and clock leeway to check."""

    algorithms: tuple[str, ...]
    scheme: str  # "secret" or "jwks"

    def __init__(self, *, issuer: str, audience: str, leeway_seconds: int = 30) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds

    @abstractmethod
    def _verification_key(self, token: str) -> jwt.PyJWK | bytes:
        """The key to check this token's signature with."""

    def decode(self, token: str) -> dict[str, Any]:
        """The token's claims, once signature, `exp`, `nbf`, `iss` and `aud` are checked.

        A JWKS source may fetch the provider's keys here (blocking, cached): call it from a
        worker thread (a plain `def` FastAPI dependency does that), not on the event loop.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("token malformed")
        try:
            # Checked before any key is looked up, so a forged header costs no JWKS fetch.
            # PyJWT checks it again below: this is not the check that matters, just an early one.
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm not in self.algorithms:
                raise Unauthorized("token algorithm not allowed")
            key = self._verification_key(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                options={"require": list(REQUIRED_CLAIMS)},
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_seconds,
            )
        except jwt.PyJWKClientConnectionError as exc:
            # The provider, not the client, is at fault: say so in the server's log.
            log.error("could not fetch the identity provider's signing keys: %s", exc)
            raise Unauthorized(_describe(exc)) from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(_describe(exc)) from exc
        return claims

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A token with these claims, as they are (see `issue_token` for the usual ones).
        Only a shared-secret source can sign: the identity provider keeps its private key."""
        raise ConfigurationError(
            "tokens are issued by the identity provider (APP_AUTH_JWKS_URL is set); "
            "this server can only sign with a shared secret (APP_AUTH_JWT_SECRET)"
        )


class SecretKeySource(KeySource):
    """A shared secret, HS256 only: for development, tests and the token command."""

    algorithms = SYMMETRIC_ALGORITHMS
    scheme = "secret"

    def __init__(
        self, secret: str, *, issuer: str, audience: str, leeway_seconds: int = 30
    ) -> None:
        super().__init__(issuer=issuer, audience=audience, leeway_seconds=leeway_seconds)
        if not secret:
            raise ConfigurationError("the token secret is empty")
        self._secret = secret.encode()

    def _verification_key(self, token: str) -> bytes:
        return self._secret

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self._secret, algorithm=SYMMETRIC_ALGORITHMS[0])

    def __repr__(self) -> str:  # never the secret
        return f"SecretKeySource(algorithms={self.algorithms}, issuer={self.issuer!r})"


class JwksKeySource(KeySource):
    """An identity provider's public keys, fetched from its JWKS URL and cached; RS256 and
    ES256 only. The key is chosen by the token's `kid` and, being a `PyJWK`, carries its own
    algorithm, which PyJWT requires the token's `alg` to equal."""

    algorithms = ASYMMETRIC_ALGORITHMS
    scheme = "jwks"

    def __init__(
        self,
        url: str,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 30,
        timeout_seconds: float = 5.0,
    ) -> None:
        super().__init__(issuer=issuer, audience=audience, leeway_seconds=leeway_seconds)
        self.url = url
        self._client = jwt.PyJWKClient(url, cache_keys=True, timeout=timeout_seconds)

    def _verification_key(self, token: str) -> jwt.PyJWK:
        return self._client.get_signing_key_from_jwt(token)

    def __repr__(self) -> str:
        return f"JwksKeySource(url={self.url!r}, algorithms={self.algorithms})"


@dataclass(frozen=True)
class TokenGrant:
    """Whom a token is for and what it lets them do: its subject, role and sites, and its
    SMART scopes (None: the role's default scopes)."""

    sub: str
    role: str
    sites: Sequence[str]
    scope: str | None = None


def issue_token(key_source: KeySource, grant: TokenGrant, *, minutes: int = 60) -> str:
    """A signed token for `python -m app token` and tests, valid for `minutes`, with the
    key source's issuer and audience, `iat`, `nbf`, `exp` and a random `jti`.

    The claims go through the same checks as an incoming token's before signing, so the
    command never hands out a token the server would then refuse; a bad argument is a
    `ValueError` whose message says which.
    """
    role = grant.role
    if minutes < 1:
        raise ValueError("minutes must be at least 1")
    if role not in {r.value for r in Role}:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(r.value for r in Role)}")
    issued = datetime.now(UTC).replace(microsecond=0)
    claims: dict[str, Any] = {
        "iss": key_source.issuer,
        "aud": key_source.audience,
        "sub": grant.sub,
        "role": role,
        "sites": list(grant.sites),
        "scope": DEFAULT_SCOPES[Role(role)] if grant.scope is None else grant.scope,
        "iat": int(issued.timestamp()),
        "nbf": int(issued.timestamp()),
        "exp": int((issued + timedelta(minutes=minutes)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    try:
        principal_from_claims(claims)
    except FhirError as exc:
        raise ValueError(exc.diagnostics) from exc
    return key_source.sign(claims)
