"""`POST /fhir`: transaction and batch Bundles (FHIR http.html#transaction).

The route reads the Bundle, turns each entry into an `EntryRequest` (its interaction, target,
criteria, conditional references, patch document), lets `app.services.transactions` run them,
and answers a `transaction-response` or `batch-response` Bundle: per entry `response.status`,
`location`, `etag`, `lastModified`, and the resource as `Prefer: return=` asks
(representation by default; minimal: none; OperationOutcome: `response.outcome`).

`POST /fhir/` is the same (fhirpy and fhirclient post their Bundles to the base URL with a
trailing slash); only `POST /fhir` is in the OpenAPI file.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Response

from app.auth.deps import current_principal
from app.fhir import schemas
from app.fhir.deps import (
    ID_PATTERN,
    RESOURCE_TYPES,
    Call,
    OptionalXProvenance,
    Prefer,
    SettingsDep,
    call_of,
    fhir_base,
)
from app.fhir.http import (
    FHIR_JSON,
    FhirResponse,
    negotiate,
    prefer_return,
    prefer_strict,
    require_json_body,
)
from app.fhir.openapi_docs import ERRORS, outcome_doc
from app.fhir.outcome import operation_outcome
from app.fhir.search_routes import render_searchset
from app.kit.dates import format_instant, utc_now
from app.kit.errors import BadRequest, FhirError, Issue, PayloadTooLarge
from app.services import conditional, transactions
from app.services.patching import parse_patch
from app.services.resources import parse_if_match
from app.services.search_params import ParsedSearch, parse_search, search_request
from app.services.transactions import EntryRequest, EntryResult
from app.services.validation import parse_json
from app.settings import Settings

router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)])
# Any authenticated caller: each entry is authorised on its own (services.transactions).
_CallerDep = Annotated[Call, Depends(call_of(current_principal))]

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_ID = re.compile(ID_PATTERN)
_CONDITIONAL_REFERENCE = re.compile(rf"({'|'.join(RESOURCE_TYPES)})\?(.+)")

_DESCRIPTION = (
    "A transaction (all or nothing, in one database transaction) or a batch (each entry on "
    "its own) of Patient, Observation, MedicationAdministration and AdverseEvent "
    "interactions: GET (read, vread, search), POST (create; conditional with "
    "request.ifNoneExist or Type?criteria), PUT (update; conditional with Type?criteria), "
    "PATCH (a Binary holding a JSON Patch or JSON Merge Patch) and DELETE (conditional with "
    "Type?criteria). A transaction processes DELETE, then POST, then PUT/PATCH, then GET; "
    "references to another entry's fullUrl (urn:uuid:...) become the Type/id it is given, and "
    "conditional references (Patient?identifier=system|value) the one resource they match "
    "(none: 400, several: 412). Each patient's response is recomputed once. Any entry "
    "failing fails the transaction: nothing is stored and the answer is that entry's "
    "OperationOutcome and status. The X-Provenance reason applies to every PUT, PATCH and "
    "DELETE entry, and is required when there is one. Criteria are the token and patient "
    "parameters of conditional create. Nested Bundles and other Bundle types are 400; more "
    "entries than the server's limit (APP_MAX_BUNDLE_ENTRIES, 10,000) or a larger body "
    "(APP_MAX_BUNDLE_BYTES, 16 MiB) 413."
)


def _process_doc() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                FHIR_JSON: {
                    "schema": {
                        "$ref": "#/components/schemas/Bundle",
                        # Only these two types are processed (other types: 400). Beside the
                        # $ref, so a generated client keeps the one Bundle model.
                        "properties": {"type": {"enum": ["transaction", "batch"]}},
                    }
                }
            },
        }
    }


@router.post(
    "",
    operation_id="processBundle",
    summary="Process a transaction or batch Bundle",
    description=_DESCRIPTION,
    tags=["Bundle"],
    response_class=FhirResponse,
    openapi_extra=_process_doc(),
    responses={
        200: {
            "model": schemas.Bundle,
            "content": {FHIR_JSON: {}},
            "description": "transaction-response or batch-response Bundle",
        },
        **ERRORS,
        409: outcome_doc("A transaction entry conflicts with the current state"),
        410: outcome_doc("A transaction entry reads or patches a deleted resource"),
        412: outcome_doc("A transaction entry's If-Match is stale, or its criteria match several"),
        413: outcome_doc("More entries, or a larger body, than the server accepts"),
        415: outcome_doc("Body is not application/fhir+json or application/json"),
        422: outcome_doc("A transaction entry is not an acceptable resource of this profile"),
    },
)
async def process_bundle(
    *,
    call: _CallerDep,
    settings: SettingsDep,
    prefer: Prefer = None,
    provenance: OptionalXProvenance = None,
) -> Response:
    request, ctx, principal = call.request, call.ctx, call.principal
    require_json_body(request)
    bundle_type, entries = _bundle_entries(parse_json(await request.body()), settings)
    bundle = _Processing(
        bundle_type, fhir_base(request), settings, prefer_strict(request), prefer_return(request)
    )
    parsed = _entries(entries, bundle)
    if bundle_type == "transaction":
        requests = [entry for entry in parsed if isinstance(entry, EntryRequest)]
        results = await transactions.transaction(ctx, requests, principal, provenance)
    else:
        results = await transactions.batch(ctx, parsed, principal, provenance)
    methods = [entry.method if isinstance(entry, EntryRequest) else None for entry in parsed]
    return FhirResponse(_response_bundle(results, methods, bundle))


# The same handler at the base URL with a trailing slash, left out of the OpenAPI file.
router.add_api_route("/", process_bundle, methods=["POST"], include_in_schema=False)


@dataclass(frozen=True)
class _Processing:
    """A Bundle being processed, as the wire sees it: its type (transaction or batch), the
    base URL its entries and the answer's links are relative to, the settings, Prefer's
    handling (strict) and return (the answer's shape), and the search of each GET entry
    that is one (by entry), as parsed and as asked, which its response entry renders."""

    type: str
    base: str
    settings: Settings
    strict: bool
    prefer: str
    searches: dict[int, tuple[ParsedSearch, list[tuple[str, str]]]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Url:
    """An entry's request.url, relative to the base: as written, its path's segments (a
    resource type, then an id, ...), and its query's name=value pairs."""

    text: str
    parts: list[str]
    pairs: list[tuple[str, str]]


def _bundle_entries(bundle: dict[str, Any], settings: Settings) -> tuple[str, list[Any]]:
    """The type of a Bundle to process (transaction or batch) and its entries."""
    if bundle.get("resourceType") != "Bundle":
        raise BadRequest(
            "POST /fhir takes a Bundle (transaction or batch)", expression=["Bundle.resourceType"]
        )
    bundle_type = bundle.get("type")
    if bundle_type not in ("transaction", "batch"):
        raise BadRequest(
            f"Bundle.type {bundle_type!r} is not processed here: send a transaction or a batch",
            expression=["Bundle.type"],
        )
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array", expression=["Bundle.entry"])
    if len(entries) > settings.max_bundle_entries:
        raise PayloadTooLarge(
            f"The Bundle has {len(entries)} entries; this server takes at most "
            f"{settings.max_bundle_entries} per Bundle: split it"
        )
    return bundle_type, entries


def _entries(entries: list[Any], bundle: _Processing) -> list[EntryRequest | FhirError]:
    """Each entry's request; in a batch, an entry that cannot be parsed is its own error,
    while in a transaction it fails the whole Bundle."""
    parsed: list[EntryRequest | FhirError] = []
    for index, entry in enumerate(entries):
        try:
            parsed.append(_entry(index, entry, bundle))
        except FhirError as error:
            if bundle.type == "transaction":
                raise transactions.located(error, index) from None
            parsed.append(transactions.located(error, index))
    return parsed


def _entry(index: int, entry: Any, bundle: _Processing) -> EntryRequest:
    if not isinstance(entry, dict):
        raise BadRequest("An entry must be an object")
    request = entry.get("request")
    if not isinstance(request, dict):
        raise BadRequest("An entry of a transaction or batch needs a request")
    method, text = _method_and_url(request, bundle.base)
    path, _, query = text.partition("?")
    url = _Url(text, _path_parts(path, text), parse_qsl(query, keep_blank_values=True))
    full_url = entry.get("fullUrl")
    result = EntryRequest(
        index,
        method,
        url.parts[0],
        full_url=full_url if isinstance(full_url, str) and full_url else None,
        if_match=_if_match(request.get("ifMatch")),
    )
    if method == "GET":
        _get(result, url, bundle)
    else:
        _write(result, entry, request, url)
    return result


def _method_and_url(request: dict[str, Any], base: str) -> tuple[str, str]:
    """request.method, and request.url relative to the base (`Type...`)."""
    method, url = request.get("method"), request.get("url")
    if method not in _METHODS:
        raise BadRequest(f"request.method {method!r}: use one of {', '.join(_METHODS)}")
    if not isinstance(url, str) or not url:
        raise BadRequest("request.url is required")
    for prefix in (base + "/", "/"):
        url = url.removeprefix(prefix)
    return method, url


def _path_parts(path: str, url: str) -> list[str]:
    """The segments of request.url's path: a resource type of the trial, then an id."""
    parts = path.split("/")
    if parts[0] not in RESOURCE_TYPES:
        raise BadRequest(
            f"request.url {url!r}: entries are about {', '.join(RESOURCE_TYPES)} "
            "(nested Bundles and other types are not processed)"
        )
    if len(parts) > 1 and not _ID.fullmatch(parts[1]):
        raise BadRequest(f"request.url {url!r}: {parts[1]!r} is not a resource id")
    return parts


def _write(result: EntryRequest, entry: dict[str, Any], request: dict[str, Any], url: _Url) -> None:
    """A POST, PUT, PATCH or DELETE entry: its target, criteria, and resource or patch."""
    method, parts, pairs = result.method, url.parts, url.pairs
    bare = len(parts) == 1 and not pairs
    if (
        len(parts) > 2
        or (len(parts) == 2 and (pairs or method == "POST"))
        or (method != "POST" and bare)
    ):
        raise BadRequest(
            f"request.url {url.text!r}: {method} takes "
            + ("Type" if method == "POST" else "Type/id or Type?criteria")
        )
    if len(parts) == 2:
        result.resource_id = parts[1]
    _write_criteria(result, request.get("ifNoneExist"), pairs)
    if method == "PATCH":
        result.patch = _patch(entry.get("resource"))
    elif method != "DELETE":
        result.resource = _entry_resource(result, entry.get("resource"))
        result.references = _conditional_references(result.resource)


def _write_criteria(result: EntryRequest, if_none_exist: Any, pairs: list[tuple[str, str]]) -> None:
    """A conditional create's (ifNoneExist or the url's), update's or delete's criteria."""
    resource_type = result.resource_type
    if result.method == "POST" and if_none_exist is not None:
        if pairs:
            raise BadRequest("Conditional create criteria go in ifNoneExist or the url, not both")
        if not isinstance(if_none_exist, str):
            raise BadRequest("request.ifNoneExist must be a string")
        result.condition = conditional.from_header(resource_type, if_none_exist)
    elif pairs:
        if result.method == "PATCH":
            raise BadRequest("Conditional patch is not supported: PATCH Type/id")
        result.condition = conditional.condition(resource_type, pairs, "request.url")


def _entry_resource(result: EntryRequest, resource: Any) -> dict[str, Any]:
    """The resource of a POST or PUT entry, of the type its url names (and id, for a PUT)."""
    if not isinstance(resource, dict):
        raise BadRequest(f"A {result.method} entry needs a resource")
    if resource.get("resourceType") != result.resource_type:
        raise BadRequest(
            f"The entry's resource is a {resource.get('resourceType')!r}, its request.url is "
            f"about {result.resource_type}"
        )
    if result.method == "PUT" and result.resource_id is not None:
        body_id = resource.get("id")
        if body_id is not None and body_id != result.resource_id:
            raise BadRequest(
                f"The resource's id {body_id!r} does not match request.url's {result.resource_id!r}"
            )
    return resource


def _if_match(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest('request.ifMatch must be a string such as W/"3"')
    return parse_if_match(value)


def _get(result: EntryRequest, url: _Url, bundle: _Processing) -> None:
    parts, pairs, settings = url.parts, url.pairs, bundle.settings
    if len(parts) == 1:
        parsed = parse_search(
            result.resource_type,
            pairs,
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
            strict=bundle.strict,
        )
        result.search = search_request(parsed, pairs, settings.max_page_size)
        bundle.searches[result.index] = (parsed, pairs)
        return
    if pairs:
        raise BadRequest(f"request.url {url.text!r}: a read takes no parameters")
    result.resource_id = parts[1]
    if len(parts) == 2:
        return
    if len(parts) == 4 and parts[2] == "_history" and parts[3].isascii() and parts[3].isdigit():
        result.version_id = int(parts[3])
        if 1 <= result.version_id <= 2_147_483_647:
            return
    raise BadRequest(f"request.url {url.text!r}: GET takes Type, Type/id or Type/id/_history/n")


def _patch(resource: Any) -> Any:
    """A transaction's PATCH carries its document in a Binary (FHIR http.html#patch)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        raise BadRequest(
            "A PATCH entry's resource is a Binary whose contentType is "
            "application/json-patch+json or application/merge-patch+json and whose data is "
            "the patch, base64-encoded (FHIRPath Patch is not supported)"
        )
    content_type, data = resource.get("contentType"), resource.get("data")
    if not isinstance(content_type, str) or not isinstance(data, str):
        raise BadRequest("The PATCH entry's Binary needs contentType and data")
    try:
        document = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("The PATCH entry's Binary.data is not base64") from None
    return parse_patch(document, content_type)


def _conditional_references(resource: dict[str, Any]) -> dict[str, Any]:
    """Each `reference` of the form Type?criteria, with its parsed criteria."""
    found: dict[str, Any] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "reference" and isinstance(item, str):
                    match = _CONDITIONAL_REFERENCE.fullmatch(item)
                    if match and item not in found:
                        pairs = parse_qsl(match.group(2), keep_blank_values=True)
                        found[item] = conditional.condition(
                            match.group(1), pairs, f"The conditional reference {item!r}"
                        ).filter
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(resource)
    return found


def _status(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _response_bundle(
    results: list[EntryResult], methods: list[str | None], bundle: _Processing
) -> bytes:
    """The transaction-response or batch-response: each entry's status, and what it wrote
    or read, as Prefer: return= asks."""
    entries = []
    for index, (result, method) in enumerate(zip(results, methods, strict=True)):
        response: dict[str, Any] = {"status": _status(result.status)}
        entry: dict[str, Any] = {}
        if result.error is not None:
            response["outcome"] = operation_outcome(result.error.issues)
        elif result.stored is not None:
            _stored_entry(entry, response, result, method, bundle)
        elif result.search is not None:
            parsed, params = bundle.searches[index]
            max_page_size = bundle.settings.max_page_size
            text = render_searchset(bundle.base, parsed, params, result.search, max_page_size)
            entry["resource"] = orjson.Fragment(text)
        if result.note is not None:
            response["outcome"] = operation_outcome([_information(result.note)])
        entry["response"] = response
        entries.append(entry)
    answer: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": f"{bundle.type}-response",
        "timestamp": format_instant(utc_now()),
    }
    if entries:
        answer["entry"] = entries
    return orjson.dumps(answer)


def _stored_entry(
    entry: dict[str, Any],
    response: dict[str, Any],
    result: EntryResult,
    method: str | None,
    bundle: _Processing,
) -> None:
    """The entry of a version written or read: where it is, its version, and the resource
    or an outcome as Prefer: return= asks."""
    stored = result.stored
    assert stored is not None
    reference = f"{stored.resource_type}/{stored.id}"
    if stored.content is not None:
        entry["fullUrl"] = f"{bundle.base}/{reference}"
        if method != "GET":
            response["location"] = f"{reference}/_history/{stored.version_id}"
    response["etag"] = stored.etag
    response["lastModified"] = format_instant(stored.last_updated)
    if stored.content is not None and bundle.prefer == "representation":
        entry["resource"] = orjson.Fragment(stored.content)
    if bundle.prefer == "OperationOutcome" and result.note is None:
        done = f"{_status(result.status)}: {reference} version {stored.version_id}"
        response["outcome"] = operation_outcome([_information(done)])


def _information(message: str) -> Issue:
    return Issue("informational", message, severity="information")
