"""FHIR patch (http.html#patch) as a pure function: a patch document and the current version
in, the patched resource out. The result is then an update like any other (validated,
versioned, audited, with its reason).

Two formats:
- JSON Patch (RFC 6902, `application/json-patch+json`): a list of operations, applied by the
  `jsonpatch` library; a failed `test`, a path that does not exist, or a result that is not
  a valid resource of the same type and id is a 422 (RFC 5789 2.2: the document is
  understood but cannot be applied to this version), a malformed document a 400.
- JSON Merge Patch (RFC 7386, `application/merge-patch+json`): an object merged into the
  resource, `null` deleting an element. A JSON object sent as `application/json` or
  `application/fhir+json` is read as one too: that is how fhirpy and others patch.

FHIRPath Patch (a Parameters resource) is not supported: 400 saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jsonpatch
import jsonpointer
import orjson

from app.kit.errors import BadRequest, Unprocessable, UnsupportedMediaType
from app.services.validation import load_json

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
_PLAIN_JSON = frozenset({"application/json", "application/fhir+json", "application/json+fhir"})
PATCH_MEDIA_TYPES = (JSON_PATCH, MERGE_PATCH, *sorted(_PLAIN_JSON))
JSON_PATCH_OPERATIONS = ("add", "remove", "replace", "move", "copy", "test")
# An RFC 6901 JSON Pointer: "" (the whole document) or /-separated tokens, ~ escaped as ~0/~1;
# without NUL, which no text of a request may hold (400).
POINTER_PATTERN = r"^(/([^~/\u0000]|~[01])*)*$"
_POINTER = re.compile(POINTER_PATTERN)


@dataclass(frozen=True)
class Patch:
    media_type: str  # JSON_PATCH or MERGE_PATCH: how `document` is applied
    document: Any


def parse_patch(body: bytes, content_type: str | None) -> Patch:
    """The patch document of a request: its media type decides the format; plain JSON
    media types (and none) are read by shape, a list as JSON Patch, an object as Merge Patch."""
    media_type = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media_type not in PATCH_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not a patch format of this server: send "
            f"{JSON_PATCH} (RFC 6902) or {MERGE_PATCH} (RFC 7386)"
        )
    if not body.strip():
        raise BadRequest("The request body is empty; a patch document was expected")
    try:
        document = load_json(body, root="patch")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The patch document is not valid JSON: {exc}") from None
    if media_type == JSON_PATCH or (media_type in _PLAIN_JSON and isinstance(document, list)):
        _check_json_patch(document)
        return Patch(JSON_PATCH, document)
    if not isinstance(document, dict):
        raise BadRequest(f"A merge patch ({MERGE_PATCH}) is a JSON object")
    if document.get("resourceType") == "Parameters":
        raise BadRequest(
            "FHIRPath Patch (a Parameters resource) is not supported: send a JSON Patch "
            f"({JSON_PATCH}) or a JSON Merge Patch ({MERGE_PATCH})"
        )
    return Patch(MERGE_PATCH, document)


def _check_json_patch(document: Any) -> None:
    if not isinstance(document, list) or not document:
        raise BadRequest(f"A JSON Patch ({JSON_PATCH}) is a non-empty array of operations")
    for number, operation in enumerate(document):
        where = f"JSON Patch operation {number}"
        if not isinstance(operation, dict):
            raise BadRequest(f"{where} is not an object")
        op = operation.get("op")
        if op not in JSON_PATCH_OPERATIONS:
            raise BadRequest(f"{where}: op {op!r} is not one of {', '.join(JSON_PATCH_OPERATIONS)}")
        pointers = ["path", "from"] if op in ("move", "copy") else ["path"]
        for name in pointers:
            pointer = operation.get(name)
            if not isinstance(pointer, str) or not _POINTER.fullmatch(pointer):
                raise BadRequest(f"{where}: {name!r} must be a JSON Pointer such as /status")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise BadRequest(f"{where}: op {op!r} needs a value")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2, as written."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def apply_patch(
    patch: Patch, resource: dict[str, Any], resource_type: str, resource_id: str
) -> dict[str, Any]:
    """The patched resource. A patch may not change what identifies the resource."""
    if patch.media_type == MERGE_PATCH:
        result = merge_patch(resource, patch.document)
    else:
        try:
            result = jsonpatch.JsonPatch(patch.document).apply(resource, in_place=False)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise Unprocessable(f"The JSON Patch test failed: {exc}") from None
        except jsonpatch.InvalidJsonPatch as exc:
            raise BadRequest(f"The JSON Patch is malformed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise Unprocessable(f"The JSON Patch cannot be applied: {exc}") from None
    if not isinstance(result, dict):
        raise Unprocessable("The patch does not leave a resource (a JSON object)")
    # A well-formed patch whose result is not an acceptable resource: 422 (RFC 5789 2.2).
    if result.get("resourceType") != resource_type:
        raise Unprocessable(
            f"A patch cannot change the resourceType of {resource_type}/{resource_id}",
            expression=[f"{resource_type}.resourceType"],
        )
    if result.get("id") != resource_id:
        raise Unprocessable(
            f"A patch cannot change or remove the id of {resource_type}/{resource_id}",
            expression=[f"{resource_type}.id"],
        )
    return result
