"""The grammar of search parameter values as JSON Schema, from the same patterns the parser
(`app.services.search_params`) applies, so the OpenAPI document refuses what the server
refuses. Used by the search routes and by the conditional interactions' query parameters."""

from __future__ import annotations

from typing import Any

from app.kit.dates import SEARCH_DATE_PATTERN
from app.services.conditional import conditional_parameters
from app.services.search_params import SEARCH_ID, reference_value_pattern, search_parameter

NO_NUL = {"type": "string", "pattern": "^[^\\u0000]*$"}
_NUMBER = "(eq|ne|lt|le|gt|ge|sa|eb|ap)?-?[0-9]{1,12}(\\.[0-9]{1,6})?"
_UNIT = "(\\|[^|,\\\\\\u0000]*\\|[^|,\\\\\\u0000]*)?"


def list_of(value: str) -> dict[str, Any]:
    """A string of comma-separated `value`s (OR-ed), or empty: FHIR ignores an empty value."""
    return {"type": "string", "pattern": f"^({value}(,{value})*)?$"}


def value_schema(resource_type: str, name: str) -> dict[str, Any]:
    parameter = search_parameter(resource_type, name)
    if parameter.type == "date":
        return list_of(SEARCH_DATE_PATTERN)
    if parameter.type == "number":
        return list_of(_NUMBER)
    if parameter.type == "quantity":
        return list_of(_NUMBER + _UNIT)
    if parameter.index == "id":
        return list_of(SEARCH_ID)
    if parameter.index == "patient":
        return list_of(reference_value_pattern("Patient"))
    if parameter.index == "site":
        return list_of(reference_value_pattern("Organization"))
    return NO_NUL


def criteria_parameters(resource_type: str, what: str) -> list[dict[str, Any]]:
    """A conditional interaction's criteria as optional query parameters, so a generated
    client can send them."""
    parameters = []
    for name in conditional_parameters(resource_type):
        parameter = search_parameter(resource_type, name)
        # The search grammar, not empty: an empty value is ignored, and criteria that are
        # all empty are no criteria (400).
        schema = {**value_schema(resource_type, name), "minLength": 1}
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": f"{what}: {parameter.documentation}",
                "schema": schema,
            }
        )
    return parameters
