"""The criteria of the conditional interactions: conditional create (`If-None-Exist`, or the
criteria in the query), conditional update and delete (`PUT`/`DELETE /Type?criteria`), and a
Bundle's conditional entries and references (`Patient?identifier=...`).

They match on tokens (identifiers, ids, codes, status) and on the patient: exact values whose
match a client can predict, never a date range or a partial string. Anything else is a 400
that names what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl

from app.auth.permissions import Action
from app.auth.policy import access_policy
from app.auth.principal import Principal
from app.kit.errors import BadRequest
from app.services.resources import Condition
from app.services.search_params import (
    SEARCH_ID,
    SEARCH_PARAMETERS,
    criteria_key,
    parse_search,
    reference_value_pattern,
    search_parameter,
)

# Parameters that shape the answer, not the match: allowed beside the criteria in a URL.
FORMAT_PARAMETERS = frozenset({"_format", "_pretty"})


def conditional_parameters(resource_type: str) -> list[str]:
    return [
        parameter.name
        for parameter in SEARCH_PARAMETERS[resource_type]
        if parameter.type in ("token", "reference")
    ]


# A value in If-None-Exist: printable ASCII without the pair separator `&`, the OR separator
# `,`, and `%` and `+`, which a query string decodes (so a header value means what it says).
_HEADER_TOKEN = r"[!-$'-*\--~]+"
_HEADER_URL_PREFIX = r"(https?://[!-$'-*\--~]+/)?"


def _header_value(resource_type: str, name: str) -> str:
    """The grammar of one criterion's value list, as the search parser reads it."""
    parameter = search_parameter(resource_type, name)
    if parameter.index == "id":
        value = SEARCH_ID
    elif parameter.type == "reference":
        target = "Organization" if parameter.index == "site" else "Patient"
        value = reference_value_pattern(target, _HEADER_URL_PREFIX)
    else:
        value = _HEADER_TOKEN
    return f"{value}(,{value})*"


def header_pattern(resource_type: str) -> str:
    """If-None-Exist: one or more name=value pairs joined by `&`. Stated in the OpenAPI
    document and applied by `from_header`, so both refuse the same headers."""
    pairs = "|".join(
        f"{re.escape(name)}={_header_value(resource_type, name)}"
        for name in conditional_parameters(resource_type)
    )
    return f"^({pairs})(&({pairs}))*$"


def condition(resource_type: str, pairs: Sequence[tuple[str, str]], source: str) -> Condition:
    """The criteria of name=value pairs, and the key that makes equal criteria share a lock:
    one key for every conditional form (create, update, delete) of the same criteria, so
    they serialise one another."""
    allowed = conditional_parameters(resource_type)
    for name, value in pairs:
        if name not in allowed:
            raise BadRequest(
                f"{source}: {name!r} is not a criterion of a conditional {resource_type} "
                f"interaction; use token or patient parameters: {', '.join(allowed)}"
            )
        if not value:
            raise BadRequest(f"{source}: {name}= has no value")
    parsed = parse_search(resource_type, pairs, default_count=1, max_count=1, strict=True)
    if not parsed.has_criteria:
        raise BadRequest(
            f"{source} has no search criteria: a conditional {resource_type} interaction "
            f"needs at least one of {', '.join(allowed)}"
        )
    lock_key = f"conditional:{resource_type}:{criteria_key(parsed.criteria)}"
    return Condition(parsed.criteria, lock_key)


def from_header(resource_type: str, header: str) -> Condition:
    """If-None-Exist holds token or patient criteria: name=value pairs joined by &."""
    if not re.fullmatch(header_pattern(resource_type), header):
        raise BadRequest(
            f"If-None-Exist {header!r} is not token or patient criteria: name=value pairs "
            f"joined by &, names among {', '.join(conditional_parameters(resource_type))}",
            expression=["header.If-None-Exist"],
        )
    return condition(resource_type, parse_qsl(header, keep_blank_values=True), "If-None-Exist")


def from_query(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The criteria of a URL's query: every parameter but _format and _pretty."""
    return [(name, value) for name, value in pairs if name not in FORMAT_PARAMETERS]


def create_condition(
    resource_type: str,
    query: Sequence[tuple[str, str]],
    if_none_exist: str | None,
    principal: Principal,
) -> Condition | None:
    """A conditional create's condition, from If-None-Exist or the query (not both); None for
    a plain create."""
    in_query = from_query(query)
    if if_none_exist is None and not in_query:
        return None
    access_policy(principal).require(resource_type, Action.CONDITIONAL_CREATE)
    # A match is answered with the resource: the criteria are a search.
    access_policy(principal).require(resource_type, Action.SEARCH)
    if if_none_exist is not None and in_query:
        raise BadRequest(
            "Conditional create criteria go in If-None-Exist or in the query, not both"
        )
    if if_none_exist is not None:
        return from_header(resource_type, if_none_exist)
    return condition(resource_type, in_query, "The query")


def query_condition(
    resource_type: str, query: Sequence[tuple[str, str]], principal: Principal
) -> Condition:
    """The condition of a conditional update or delete, whose criteria are a search too."""
    access_policy(principal).require(resource_type, Action.SEARCH)
    return condition(resource_type, from_query(query), "The query")
