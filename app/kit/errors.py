"""Domain errors. Each carries its HTTP status and FHIR issue code; one exception handler in
`app.fhir.outcome` turns every one of them into an OperationOutcome."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from app.kit.codes import FORBIDDEN_STRING_CHARACTERS

_FORBIDDEN = re.compile(f"[{FORBIDDEN_STRING_CHARACTERS}]")


def fhir_string(text: str) -> str:
    """`text` as a valid FHIR string (codes.STRING_PATTERN): the white space the grammar
    forbids (vertical tab, form feed, U+0085, no-break spaces, ...) written as `\\uXXXX`, and
    never empty. Diagnostics often quote what the client sent (a path, a parameter), and an
    OperationOutcome or AuditEvent that echoed it raw would break its own documented schema."""
    escaped = _FORBIDDEN.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return escaped or "(no details)"


@dataclass
class Issue:
    code: str  # FHIR issue-type code: invalid, not-found, conflict, ...
    diagnostics: str
    expression: list[str] = field(default_factory=list)
    severity: str = "error"

    def __post_init__(self) -> None:
        self.diagnostics = fhir_string(self.diagnostics)
        # An expression is a path into what the client sent, so it quotes the client's keys.
        self.expression = [fhir_string(path) for path in self.expression]


# The FHIR issue type (IssueType) each HTTP status is answered with: a FhirError's by
# default, and one Starlette raises itself (an unknown route, a method the route lacks).
STATUS_ISSUE_CODES = {
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
    500: "processing",
    503: "transient",
}


class FhirError(Exception):
    """An error answered to the client. A subclass that states a `status_code` answers with
    that status's issue code in STATUS_ISSUE_CODES, unless it states its own `issue_code`."""

    status_code = 400
    issue_code = "invalid"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "status_code" in cls.__dict__ and "issue_code" not in cls.__dict__:
            cls.issue_code = STATUS_ISSUE_CODES[cls.status_code]

    def __init__(
        self,
        diagnostics: str,
        *,
        expression: list[str] | None = None,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
        audit_site: str | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.diagnostics = fhir_string(diagnostics)
        self.issues = issues or [Issue(self.issue_code, diagnostics, expression or [])]
        self.headers = headers or {}
        # The site of an existing resource the refusal is about, for the audit record only:
        # that site's monitor sees the attempt, while the caller is answered as if the
        # resource did not exist.
        self.audit_site = audit_site


# The realm of the bearer challenge a 401 answers with (RFC 6750).
REALM = "itp-trial"


class Unauthorized(FhirError):
    """401: no token, or one the server cannot accept.

    Carries the RFC 6750 challenge. A request that sent no token at all gets the bare
    challenge (`error=None`), as RFC 6750 §3.1 asks; a bad token gets `invalid_token`.
    """

    status_code = 401

    def __init__(self, description: str, *, error: str | None = "invalid_token") -> None:
        challenge = f'Bearer realm="{REALM}"'
        if error is not None:
            challenge += f', error="{error}", error_description="{_header_safe(description)}"'
        super().__init__(description, headers={"WWW-Authenticate": challenge})

    @classmethod
    def missing_token(cls) -> Unauthorized:
        """The error for a request without `Authorization: Bearer ...`."""
        return cls("a bearer token is required", error=None)


def _header_safe(text: str) -> str:
    # error_description is a quoted-string limited to printable ASCII without `"` and `\`.
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in '"\\')


class BadRequest(FhirError):
    """A request the server cannot read: bad JSON, an unknown search parameter, a malformed
    header or value."""

    status_code = 400


class Unprocessable(FhirError):
    """Well-formed JSON that is not an acceptable resource of this profile."""

    status_code = 422


class NotFound(FhirError):
    """No such resource or version; also what a caller is told of one at a site it may not
    see, so that the answer does not reveal that it exists."""

    status_code = 404


class Gone(FhirError):
    """A deleted resource, or a deletion version, asked for."""

    status_code = 410


class Conflict(FhirError):
    """A write that contradicts what is stored: a subject number enrolled twice, a Patient
    deleted while records still point to it, a conditional update onto another id."""

    status_code = 409


class PreconditionFailed(FhirError):
    """`If-Match` names a version that is no longer the current one."""

    status_code = 412


class Forbidden(FhirError):
    """A role, scope or site that does not allow what was asked."""

    status_code = 403


class NotAcceptable(FhirError):
    """`Accept` (or `_format`) asks for a format the server does not produce."""

    status_code = 406


class UnsupportedMediaType(FhirError):
    """A body in a content type the interaction does not take."""

    status_code = 415


class PayloadTooLarge(FhirError):
    """A request body over `APP_MAX_BODY_BYTES`."""

    status_code = 413


# Seconds a client is asked to wait before retrying a request the database could not serve.
RETRY_AFTER_SECONDS = 5


class ServiceUnavailable(FhirError):
    """The database (or the audit trail's queue) cannot serve the request now; the same
    request is worth retrying after `Retry-After` seconds."""

    status_code = 503

    def __init__(self, diagnostics: str) -> None:
        super().__init__(diagnostics, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def database_unavailable(method: str) -> ServiceUnavailable:
    """The answer to a request the database could not serve now. A write may have been
    committed when the connection died during COMMIT: the client cannot know, so it is told
    how to retry without applying the write twice."""
    if method in _WRITES:
        return ServiceUnavailable(
            "The database is unavailable; this change may or may not have been applied. "
            f"Retry after {RETRY_AFTER_SECONDS} s in a form that cannot apply it twice: a "
            "create with If-None-Exist on your own identifier, or a conditional update "
            "(PUT Type?identifier=system|value)"
        )
    return ServiceUnavailable(
        f"The database is unavailable; retry after {RETRY_AFTER_SECONDS} s (Retry-After)"
    )


class ExportFailed(FhirError):
    """A Bulk Data export job that failed: its status URL answers with this (IG: 5XX)."""

    status_code = 500


class ConfigurationError(RuntimeError):
    """A setting the server cannot start with; raised at start-up, never to a client."""
