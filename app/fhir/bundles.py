"""searchset and history Bundles, assembled as text around the stored JSON of each entry
(the entries are never parsed or serialised again)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import urlencode

import orjson

from app.fhir.outcome import operation_outcome
from app.kit.dates import format_instant, utc_now
from app.kit.errors import Issue


class SearchEntry(Protocol):
    """What a searchset shows of one resource: a stored version, or an `Unversioned` one."""

    @property
    def resource_type(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def content(self) -> str | None: ...


@dataclass(frozen=True)
class Unversioned:
    """A resource kept outside the versioned store (an AuditEvent, a CodeSystem)."""

    resource_type: str
    id: str
    content: str


class HistoryVersion(SearchEntry, Protocol):
    """What a history entry shows of one version: the wire needs its shape, not its table."""

    @property
    def version_id(self) -> int: ...
    @property
    def last_updated(self) -> datetime: ...
    @property
    def method(self) -> str: ...  # create, update or delete


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def _bundle(
    bundle_type: str, links: list[dict[str, str]], entries: Sequence[str], total: int | None = None
) -> str:
    bundle: dict[str, object] = {
        "resourceType": "Bundle",
        "type": bundle_type,
        "timestamp": format_instant(utc_now()),
    }
    if total is not None:
        bundle["total"] = total
    head = _dumps({**bundle, "link": links})
    if not entries:
        return head  # FHIR has no empty arrays: no match, no `entry`
    return head[:-1] + ',"entry":[' + ",".join(entries) + "]}"


def page_url(base: str, params: Sequence[tuple[str, str]]) -> str:
    return f"{base}?{urlencode(params)}" if params else base


@dataclass(frozen=True)
class SearchPage:
    """What one page of a searchset holds: the matches, what `_include`/`_revinclude`
    added to them, the warnings about the search (an outcome entry), and the total when it
    was asked for."""

    matches: Sequence[SearchEntry]
    included: Sequence[SearchEntry] = ()
    warnings: Sequence[Issue] = ()
    total: int | None = None


def searchset(
    base_url: str,
    resource_type: str,
    page: SearchPage,
    *,
    self_params: Sequence[tuple[str, str]],
    next_params: Sequence[tuple[str, str]] | None = None,
) -> str:
    search_url = f"{base_url}/{resource_type}"
    links = [{"relation": "self", "url": page_url(search_url, self_params)}]
    if next_params is not None:
        links.append({"relation": "next", "url": page_url(search_url, next_params)})
    entries = [_search_entry(base_url, entry, "match") for entry in page.matches]
    entries += [_search_entry(base_url, entry, "include") for entry in page.included]
    if page.warnings:
        outcome = _dumps(operation_outcome(page.warnings))
        entries.append(f'{{"resource":{outcome},"search":{{"mode":"outcome"}}}}')
    return _bundle("searchset", links, entries, page.total)


def _search_entry(base_url: str, entry: SearchEntry, mode: str) -> str:
    full_url = _dumps(f"{base_url}/{entry.resource_type}/{entry.id}")
    return f'{{"fullUrl":{full_url},"resource":{entry.content},"search":{{"mode":"{mode}"}}}}'


def history(
    base_url: str,
    resource_type: str,
    versions: Sequence[HistoryVersion],
    *,
    self_url: str,
    next_url: str | None,
) -> str:
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    return _bundle("history", links, [_history_entry(base_url, version) for version in versions])


def _history_entry(base_url: str, version: HistoryVersion) -> str:
    full_url = f"{base_url}/{version.resource_type}/{version.id}"
    method = {"create": "POST", "update": "PUT", "delete": "DELETE"}[version.method]
    request_url = (
        version.resource_type if method == "POST" else f"{version.resource_type}/{version.id}"
    )
    status = {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}[method]
    if version.method == "update" and version.version_id == 1:
        status = "201 Created"  # an update-as-create
    meta = {
        "fullUrl": full_url,
        "request": {"method": method, "url": request_url},
        "response": {
            "status": status,
            "etag": f'W/"{version.version_id}"',
            "lastModified": format_instant(version.last_updated),
        },
    }
    text = _dumps(meta)
    if version.content is None:
        return text
    return text[:-1] + ',"resource":' + version.content + "}"
