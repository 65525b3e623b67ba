"""What the server accepts as a plausible value, whatever path a value arrives by (REST,
Bundle entries, patch results, HL7 v2): platelet counts, WHO bleeding grades, and the length
of every string the database indexes. Pure: no database, no settings read here.

The limits are the same on SQLite and PostgreSQL: a string PostgreSQL could not index
(`character varying(255)`) is refused on both, before anything is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

# ITP_PLATELET_MAX's default, in 10^9/L: five times the highest counts seen in reactive
# thrombocytosis; a value above it is a unit or typing error, never a count.
PLATELET_MAX_DEFAULT: Final = 5000.0
# Platelet counts are kept in 10^9/L to this many decimal places (1 platelet per litre is
# 1e-9): a non-zero count that rounds to 0 would be stored as a count of 0.
PLATELET_DECIMALS: Final = 6
# Identifier system and value, Coding system and code, a Quantity's unit, system and code,
# and the parts of a HumanName are indexed for search: at most this many characters each.
MAX_INDEXED_STRING: Final = 255
WHO_GRADES: Final = range(0, 5)


@dataclass(frozen=True)
class InputLimits:
    """The limits a deployment may set (`ITP_PLATELET_MAX`)."""

    platelet_max: float = PLATELET_MAX_DEFAULT


def platelet_problem(value: float, factor: float, unit: str, limits: InputLimits) -> str | None:
    """Why a count of `value` in `unit` (`factor` to 10^9/L) is not plausible; None if it is."""
    normalised = value * factor
    shown = f"{value:g} {unit}"
    if not math.isfinite(normalised):
        return f"A platelet count must be a finite number, not {shown}"
    if normalised < 0:
        return f"A platelet count cannot be negative ({shown})"
    if normalised_platelets(value, factor) > limits.platelet_max:  # as it would be stored
        return (
            f"{shown} is {normalised:g} x10^9/L, above the plausible maximum of "
            f"{limits.platelet_max:g} x10^9/L (ITP_PLATELET_MAX): check the value and its unit"
        )
    if value != 0 and round(normalised, PLATELET_DECIMALS) == 0:
        return (
            f"{shown} is below 1e-{PLATELET_DECIMALS} x10^9/L and would be stored as 0; "
            "send 0 for no platelets"
        )
    return None


def normalised_platelets(value: float, factor: float) -> float:
    """The count in 10^9/L as stored beside the resource (search and the response engine)."""
    return round(value * factor, PLATELET_DECIMALS)


def grade_problem(grade: object) -> str | None:
    """Why `grade` is not a WHO bleeding grade (an integer 0 to 4); None if it is."""
    if isinstance(grade, bool) or not isinstance(grade, int) or grade not in WHO_GRADES:
        return f"A WHO bleeding grade is an integer from 0 to 4, not {grade!r}"
    return None
