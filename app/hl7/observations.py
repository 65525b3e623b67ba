"""One OBX of an ORU^R01 as the trial's platelet-count Observation (fhir-profile.md).

Pure: no database. Everything a lab can get wrong in a result is found here, before the
message's transaction writes anything, and answered AE with the field that is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any
from urllib.parse import quote

from app.hl7.hl7v2 import Header, Location, Rejected, Result, parse_timestamp
from app.kit import codes
from app.kit.limits import InputLimits, platelet_problem

# HL7 table 0396: the coding system name of LOINC.
LOINC_NAME = "LN"
UCUM_NAME = "UCUM"
PLATELET_DISPLAY = {
    "777-3": "Platelets [#/volume] in Blood by Automated count",
    "26515-7": "Platelets [#/volume] in Blood",
}
# OBX-11 (HL7 table 0085) onto Observation.status. The statuses that carry no result (I
# pending, O order detail only, X cannot be obtained, N not asked) have nothing to store.
RESULT_STATUS = {"F": "final", "C": "corrected", "P": "preliminary"}
NO_RESULT_STATUSES = frozenset({"I", "O", "X", "N"})
FILLER_TYPE = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
            "code": "FILL",
            "display": "Filler Identifier",
        }
    ]
}
LABORATORY = [
    {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "laboratory",
                "display": "Laboratory",
            }
        ]
    }
]
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_COMPARATORS = {"": None, "=": None, "<": "<", ">": ">", "<=": "<=", ">=": ">="}


def platelet_loinc(result: Result, local_codes: Mapping[str, str]) -> str | None:
    """The platelet LOINC code OBX-3 stands for, directly or through a configured local
    code (`APP_HL7_LOCAL_CODES`); None when the OBX is not a platelet count."""
    codings = result.code.codings()
    for system, identifier, _ in codings:
        if system == LOINC_NAME and identifier in codes.PLATELET_CODES:
            return identifier
    for system, identifier, _ in codings:
        mapped = local_codes.get(f"{system}|{identifier}")
        if mapped is not None:
            return mapped
    return None


def identifier_systems(result: Result, code_systems: codes.CodeSystems) -> tuple[str, str]:
    """The systems of the filler order number and of the result (order and OBX set id),
    one pair per lab: the order number's namespace, else the sending facility."""
    authority = quote(result.order.filler_authority, safe="")
    return (
        f"{code_systems.base}/sid/lab-order/{authority}",
        f"{code_systems.base}/sid/lab-result/{authority}",
    )


def result_key(result: Result, code_systems: codes.CodeSystems) -> tuple[str, str]:
    """(system, value) of the identifier that names this result across messages."""
    _, system = identifier_systems(result, code_systems)
    return system, f"{result.order.filler_number}-{result.set_id}"


def check_keys(result: Result) -> None:
    """What the result's identifiers are made of must be there."""
    if not result.set_id:
        raise Rejected.one(
            "AE",
            "101",
            "OBX-1 (set id) is required for a platelet count: with the filler order number "
            "it names the result, so a correction can find it",
            result.location.at(1),
        )
    if not result.order.filler_number:
        raise Rejected.one(
            "AE",
            "101",
            "The filler order number (OBR-3, or ORC-3) is required for a platelet count",
            result.order.location.at(3),
        )
    if not result.order.filler_authority:
        raise Rejected.one(
            "AE",
            "101",
            "MSH-4 (or MSH-3) must name the lab: it qualifies the filler order number",
            Location("MSH", 1, 4),
        )


@dataclass(frozen=True)
class MessageContext:
    """What every OBX of one message is mapped with: the message's header, whose MSH-7
    zone a time without an offset is in (else the trial's zone), and the server's code
    systems and input limits."""

    header: Header
    trial_zone: tzinfo
    code_systems: codes.CodeSystems
    limits: InputLimits


def observation(
    result: Result, context: MessageContext, *, patient_id: str, loinc: str, status: str
) -> dict[str, Any]:
    """The Observation this OBX becomes, for the Patient `patient_id`, coded `loinc`, with
    `status` (final, preliminary, corrected)."""
    order_system, result_system = identifier_systems(result, context.code_systems)
    code: dict[str, Any] = {
        "coding": [{"system": codes.LOINC, "code": loinc, "display": PLATELET_DISPLAY[loinc]}]
    }
    lab_text = next((text for _, _, text in result.code.codings() if text), "")
    if lab_text:
        code["text"] = lab_text
    document: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [
            {"type": FILLER_TYPE, "system": order_system, "value": result.order.filler_number},
            {"system": result_system, "value": f"{result.order.filler_number}-{result.set_id}"},
        ],
        "status": status,
        "category": LABORATORY,
        "code": code,
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": clinical_time(result, context.header.zone or context.trial_zone),
        "valueQuantity": quantity(result, context.limits),
    }
    if result.reference_range:
        document["referenceRange"] = [{"text": result.reference_range}]
    if result.notes:
        document["note"] = [{"text": note} for note in result.notes]
    return document


def clinical_time(result: Result, zone: tzinfo) -> str:
    """OBX-14, else OBR-7, as a FHIR dateTime of the same precision. A time without an
    offset is in the message's zone (MSH-7's offset, else the trial's)."""
    if result.observed_at:
        value, where = result.observed_at, result.location.at(14)
    elif result.order.observed_at:
        value, where = result.order.observed_at, result.order.location.at(7)
    else:
        raise Rejected.one(
            "AE",
            "101",
            "A platelet count needs its clinical time: OBX-14, or OBR-7 for the whole order",
            result.location.at(14),
        )
    try:
        moment, digits, own_zone = parse_timestamp(value)
    except ValueError:
        raise Rejected.one(
            "AE", "102", f"{where} {value!r} is not an HL7 timestamp (YYYYMMDDHHMM[SS])", where
        ) from None
    if digits <= 8:  # a date, or a month or a year: FHIR keeps the precision
        return moment.date().isoformat()[: {4: 4, 6: 7, 8: 10}[digits]]
    if own_zone is None:
        moment = moment.replace(tzinfo=zone)
    return moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")


def quantity(result: Result, limits: InputLimits) -> dict[str, Any]:
    """OBX-5 and OBX-6 as a Quantity. The unit stays as the lab wrote it; a UCUM code is
    added when OBX-6 is UCUM. Unknown units and implausible counts are refused here, as the
    FHIR API refuses them."""
    comparator, number = _value(result)
    units = result.units
    unit = units.identifier or units.text
    if not unit:
        raise Rejected.one(
            "AE", "101", "OBX-6 (units) is required for a platelet count", result.location.at(6)
        )
    value: dict[str, Any] = {"value": number}
    if comparator:
        value["comparator"] = comparator
    is_ucum = units.system.upper() == UCUM_NAME or (
        not units.system and units.identifier in codes.UCUM_PLATELET_FACTORS
    )
    if is_ucum and units.identifier:
        value.update(unit=units.text or units.identifier, system=codes.UCUM, code=units.identifier)
    else:
        value["unit"] = unit
    factor = codes.platelet_factor(value.get("system"), value.get("code"), value["unit"])
    if factor is None:
        accepted = ", ".join(codes.UCUM_PLATELET_FACTORS)
        raise Rejected.one(
            "AE",
            "103",
            f"Unknown platelet count unit {unit!r} (OBX-6); accepted: UCUM {accepted}, and "
            "lab spellings such as K/uL, x10^9/L, 10^9/L, x10E3/uL",
            result.location.at(6),
        )
    problem = platelet_problem(float(number), factor, unit, limits)
    if problem is not None:
        raise Rejected.one("AE", "102", f"OBX-5: {problem}", result.location.at(5))
    return value


def _value(result: Result) -> tuple[str | None, int | float]:
    """(comparator, number) from OBX-5: NM, SN (`<^5`), or a plain number sent as ST."""
    first, second, separator, third = result.value
    where = result.location.at(5)
    if result.value_type == "SN":
        if first not in _COMPARATORS or separator or third:
            raise Rejected.one(
                "AE",
                "102",
                f"OBX-5 {'^'.join(result.value).rstrip('^')!r}: a platelet count is one "
                "number, optionally with <, >, <= or >=",
                where,
            )
        comparator, text = _COMPARATORS[first], second
    else:
        # Components in an NM are not a number either: keep them, so the message says so.
        comparator = None
        text = "^".join(result.value).rstrip("^") if second or separator or third else first
    if not _NUMBER.fullmatch(text):
        shown = text or "(empty)"
        raise Rejected.one(
            "AE", "102", f"OBX-5 {shown!r} is not a number (OBX-2 {result.value_type})", where
        )
    if text.startswith("-"):
        raise Rejected.one("AE", "102", f"OBX-5 {text!r}: a count cannot be negative", where)
    number = float(text)  # inf for a number beyond a double: refused as not finite
    if number == 0 and text.strip("+-.0"):
        raise Rejected.one(
            "AE", "102", f"OBX-5 {text[:40]!r} is too small to be stored as a number", where
        )
    # An integer stays one (the Observation shows what the lab sent), within a double's
    # exact range: a longer one would not survive JSON as written.
    exact = "." not in text and number.is_integer() and abs(number) < 2**53
    return comparator, (int(text) if exact else number)
