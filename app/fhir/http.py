"""HTTP details of FHIR: media types, ETags, Prefer, Last-Modified, the JSON response class."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.errors import BadRequest, NotAcceptable, UnsupportedMediaType

FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
_ACCEPTABLE = JSON_TYPES | {"*/*", "application/*"}
_FORMAT_ALIASES = frozenset({"json", "application/json", FHIR_JSON, "application/json+fhir"})


class FhirResponse(JSONResponse):
    """`application/fhir+json` from bytes or str that are already JSON, or from a dict.

    It subclasses JSONResponse so FastAPI documents the route's response schema as JSON.
    """

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        if isinstance(content, str):
            return content.encode()
        return orjson.dumps(content)


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def require_json_body(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is not None and media_type(content_type) not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not supported; send {FHIR_JSON} or application/json"
        )


def _refused(media_range: str) -> bool:
    """Whether an Accept media range has weight 0: RFC 9110 12.4.2, "not acceptable"."""
    for parameter in media_range.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip()) == 0
            except ValueError:
                return False
    return False


async def negotiate(request: Request) -> None:
    """406 unless the client accepts JSON (`_format` overrides Accept, as FHIR says).

    `async` though it never awaits: it reads headers only, and FastAPI runs a sync dependency
    in its thread pool (two thread hops per request, bench/README.md)."""
    requested = request.query_params.get("_format")
    if requested is not None:
        if requested.strip().lower() not in _FORMAT_ALIASES:
            raise NotAcceptable(
                f"_format={requested!r} is not supported; this server speaks "
                "JSON only (_format=json)"
            )
        return
    accept = request.headers.get("accept")
    if not accept:
        return
    for part in accept.split(","):
        wanted = media_type(part)
        if _refused(part):
            continue
        if wanted in _ACCEPTABLE or wanted.endswith("+json") or not wanted:
            return
    raise NotAcceptable(
        f"Accept {accept!r} asks for a format this server does not produce; it answers {FHIR_JSON}"
    )


def prefer_return(request: Request) -> str:
    for part in request.headers.get("prefer", "").split(";"):
        for item in part.split(","):
            key, _, value = item.strip().partition("=")
            if key.strip().lower() == "return":
                choice = value.strip().strip('"')
                if choice in ("minimal", "representation", "OperationOutcome"):
                    return choice
    return "representation"


def prefer_strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "")


def http_date(moment: datetime) -> str:
    return format_datetime(moment.replace(tzinfo=UTC), usegmt=True)


def version_headers(version_id: int, last_updated: datetime) -> dict[str, str]:
    return {"ETag": f'W/"{version_id}"', "Last-Modified": http_date(last_updated)}


def pretty(
    request: Request,
    content: bytes | str,
    headers: Mapping[str, str] | None = None,
    status_code: int = 200,
    media_type: str = FHIR_JSON,
) -> FhirResponse:
    """A response that honours `_pretty=true` (indentation costs a parse, so only on demand)."""
    if request.query_params.get("_pretty") == "true":
        content = orjson.dumps(orjson.loads(content), option=orjson.OPT_INDENT_2)
    return FhirResponse(
        content, status_code=status_code, headers=dict(headers or {}), media_type=media_type
    )


def refuse_unknown_parameters(request: Request, allowed: frozenset[str]) -> None:
    """400 for a query parameter the operation does not take: a misspelt `site` must not
    quietly widen a report to every site."""
    unknown = sorted({name for name in request.query_params if name not in allowed})
    if unknown:
        raise BadRequest(
            f"Unknown parameter {', '.join(unknown)}; this operation takes "
            f"{', '.join(sorted(allowed))}"
        )


def _matches(media_range: str, offer: str) -> bool:
    if media_range in ("*/*", offer) or not media_range:
        return True
    if media_range.endswith("/*"):
        return offer.startswith(media_range[:-1])
    json_offer = offer in JSON_TYPES
    return json_offer and (media_range in JSON_TYPES or media_range.endswith("+json"))


def choose_media_type(request: Request, wanted: tuple[str, ...], formats: Mapping[str, str]) -> str:
    """Which of `wanted` to answer with: `_format` (a key of `formats`) if given, else the
    first media range of Accept, in the client's order, that one of them matches; no
    Accept, the first wanted. 406 when nothing matches."""
    requested = request.query_params.get("_format")
    if requested is not None:
        chosen = formats.get(requested.strip().lower())
        if chosen is None:
            raise NotAcceptable(
                f"_format={requested!r} is not supported here; use one of "
                f"{', '.join(sorted(formats))}"
            )
        return chosen
    accept = request.headers.get("accept")
    if not accept:
        return wanted[0]
    for part in accept.split(","):
        if _refused(part):
            continue
        for offer in wanted:
            if _matches(media_type(part), offer):
                return offer
    raise NotAcceptable(
        f"Accept {accept!r} asks for a format this operation does not produce; it answers "
        f"{' or '.join(wanted)}"
    )


async def call_catching(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    errors: type[Exception] | tuple[type[Exception], ...],
) -> tuple[Exception | None, bool]:
    """Call `app`; return the exception of `errors` it raised (None if it raised none) and
    whether its answer had started by then (once it has, no other answer can be sent)."""
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except errors as error:
        return error, started
    return None, started


# Health data: nothing cached, nothing framed, nothing sniffed. The interactive docs and
# the report page need their own scripts and styles, so they get policies that allow those.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"strict-transport-security", b"max-age=31536000; includeSubDomains"),
]
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
DOCS_CSP = (
    b"content-security-policy",
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
)


# The report page: its own script and style sheet only, and fetches to this origin only.
# Styles may also be inline: the page inserts the server's SVG pictures into itself (so it
# can find a lane or a count's marker by id), and matplotlib writes their styles as `style`
# attributes and a `<style>` element. Scripts stay strictly the page's own file.
REPORT_CSP = (
    b"content-security-policy",
    b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'",
)


def api_security_headers() -> list[tuple[bytes, bytes]]:
    return [*SECURITY_HEADERS, API_CSP]
