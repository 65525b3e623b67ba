"""Trial subject numbers: one subject, one patient.

A subject number is the Patient identifier of system `<base>/sid/subject` (codes.py). A
number is NFKC-normalised and trimmed (so `"S01-001 "` and the full-width `"S01-００１"`
are `S01-001`), must then match `SUBJECT_NUMBER_PATTERN`, and is unique in the trial among
live Patients (`resource.subject`, a unique index). Search and conditional criteria on the
subject system are compared the same way (invisible characters left out too), so a
look-alike finds the patient it looks like.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace
from typing import Any, Final

from app.kit.codes import CodeSystems
from app.kit.errors import Unprocessable
from app.store.criteria import SearchFilter, TokenMatch

# ASCII letters and digits, '-', '_' and '.', starting with a letter or digit: no spaces,
# controls or format characters (zero-width spaces, bidi controls). 64 at most: the column.
SUBJECT_NUMBER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SUBJECT_NUMBER = re.compile(SUBJECT_NUMBER_PATTERN)
# Characters a reader does not see: controls and format characters (zero-width spaces,
# bidi controls, the byte order mark; Unicode categories Cc and Cf).
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf"})


def normalise(value: str) -> str:
    """NFKC, then trimmed: the form a subject number is stored, indexed and looked up in."""
    return unicodedata.normalize("NFKC", value).strip()


def is_valid(number: str) -> bool:
    """Whether a normalised number has the documented form."""
    return _SUBJECT_NUMBER.fullmatch(number) is not None


def comparison_key(value: str) -> str:
    """The number as a reader sees it: NFKC, without invisible characters, trimmed. Equal
    to `normalise(value)` for every valid number. Lookups (search and conditional criteria,
    HL7 PID-3) use it, so `S01\u200b-001` finds `S01-001`; so does migration 0007, to find
    numbers stored before the rule that a reader could not tell apart."""
    visible = "".join(
        char
        for char in unicodedata.normalize("NFKC", value)
        if unicodedata.category(char) not in _INVISIBLE_CATEGORIES
    )
    return visible.strip()


def normalise_patient(
    raw: dict[str, Any], code_systems: CodeSystems
) -> tuple[dict[str, Any], str | None]:
    """The Patient with its subject number normalised, and the number (None: it has none).
    422 for a number that does not have the documented form, or two different numbers."""
    identifiers = raw.get("identifier")
    if not isinstance(identifiers, list):
        return raw, None
    numbers: dict[str, int] = {}
    rewritten = []
    for index, identifier in enumerate(identifiers):
        value = identifier.get("value") if isinstance(identifier, dict) else None
        if not isinstance(value, str) or not code_systems.is_subject(identifier.get("system")):
            rewritten.append(identifier)
            continue
        number = normalise(value)
        if not is_valid(number):
            raise Unprocessable(
                f"Subject number {value!r} is not one: after NFKC normalisation and trimming "
                "it must be 1-64 ASCII letters, digits, '-', '_' or '.', starting with a "
                "letter or digit (e.g. S01-001), with no spaces, control or invisible "
                "characters",
                expression=[f"Patient.identifier[{index}].value"],
            )
        numbers.setdefault(number, index)
        rewritten.append({**identifier, "value": number})
    if len(numbers) > 1:
        shown = ", ".join(sorted(numbers))
        raise Unprocessable(
            f"A Patient has one subject number, not several ({shown})",
            expression=[f"Patient.identifier[{max(numbers.values())}].value"],
        )
    if not numbers:
        return raw, None
    return {**raw, "identifier": rewritten}, next(iter(numbers))


def normalise_criteria(criteria: SearchFilter, code_systems: CodeSystems) -> SearchFilter:
    """SearchFilter whose subject numbers (Patient `identifier` on the subject system, also in
    chains) are compared as stored (`comparison_key`): `S01-001 ` finds `S01-001`."""
    chains = criteria.chains
    if chains:
        chains = [normalise_criteria(chain, code_systems) for chain in chains]
    if criteria.resource_type != "Patient":
        return replace(criteria, chains=chains) if chains is not criteria.chains else criteria
    return replace(
        criteria,
        tokens=_numbers(criteria.tokens, code_systems),
        tokens_not=_numbers(criteria.tokens_not, code_systems),
        chains=chains,
    )


def _numbers(
    groups: list[list[TokenMatch]] | None, code_systems: CodeSystems
) -> list[list[TokenMatch]] | None:
    if groups is None:
        return None
    return [
        [
            replace(match, value=comparison_key(match.value))
            if match.param == "identifier"
            and match.value is not None
            and code_systems.is_subject(match.system)
            else match
            for match in group
        ]
        for group in groups
    ]
