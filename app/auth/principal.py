"""Who is calling: the `Principal` built from a checked token's claims.

The token says three things that decide what a caller may do: its `role` (what kind of work),
its `sites` (where), and its `scope` (SMART on FHIR scopes, which can only narrow what the
role allows). This module turns those claims into typed values and refuses tokens whose
claims are malformed, so that permission checks never have to second-guess their input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from app.kit.errors import BadRequest, Forbidden, Unauthorized

# `sub` is the agent of every audit record and of every stored HL7 message: at most the
# length of the columns that index it (the README's "Input limits").
MAX_SUBJECT_LENGTH = 255


class Role(StrEnum):
    LAB = "lab"
    INVESTIGATOR = "investigator"
    MONITOR = "monitor"
    ADMIN = "admin"


# SMART v2 permission letters, in the order the specification requires them to be written.
PERMISSION_LETTERS = "cruds"
# SMART v1 suffixes, mapped onto v2 letters (read = read + search, write = the rest).
V1_PERMISSIONS: dict[str, str] = {"read": "rs", "write": "cud", "*": "cruds"}

# The scopes a token gets when it carries no `scope` claim at all, and the ones the token
# command puts in by default. They match each role's rights, so they narrow nothing; a
# deployment that wants narrower tokens issues them with explicit scopes.
DEFAULT_SCOPES: dict[Role, str] = {
    Role.LAB: "user/Observation.crus user/Patient.rs",
    Role.INVESTIGATOR: (
        "user/Patient.cruds user/Observation.cruds "
        "user/MedicationAdministration.cruds user/AdverseEvent.cruds"
    ),
    Role.MONITOR: "user/*.rs",
    Role.ADMIN: "user/*.cruds",
}

_SCOPE = re.compile(
    r"(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]{0,63})"
    r"\.(?P<permissions>read|write|\*|[cruds]{1,5})"
)
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

ScopeContext = Literal["patient", "user", "system"]


@dataclass(frozen=True)
class Scope:
    """One SMART scope on resources, e.g. `user/Observation.rs`.

    The context (`patient`, `user`, `system`) is kept for the record but does not change
    what the scope allows: this API has no patient-launch context, so a `patient/` scope is
    treated like a `user/` one, and site rules apply to every context alike.
    """

    context: ScopeContext
    resource_type: str  # a FHIR resource type, or "*" for every type
    permissions: frozenset[str]  # letters from "cruds"
    text: str = field(default="", compare=False)  # as written in the token, for messages

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """The scope, or None when `text` is not a resource scope this API can enforce
        (`openid`, `launch`, `fhirUser`, a misspelt one, or a SMART v2 scope with search
        parameters such as `user/Observation.rs?category=laboratory`). Ignoring such a scope
        can only take rights away, never add them."""
        match = _SCOPE.fullmatch(text)
        if match is None:
            return None
        letters = V1_PERMISSIONS.get(match["permissions"], match["permissions"])
        if not _in_smart_order(letters):
            return None
        context: ScopeContext = match["context"]  # type: ignore[assignment]
        return cls(context, match["resource"], frozenset(letters), text)

    def allows(self, resource_type: str, letter: str) -> bool:
        return self.resource_type in ("*", resource_type) and letter in self.permissions

    def __str__(self) -> str:
        return self.text or (
            f"{self.context}/{self.resource_type}."
            + "".join(c for c in PERMISSION_LETTERS if c in self.permissions)
        )


def _in_smart_order(letters: str) -> bool:
    """True for a non-empty subsequence of "cruds" (SMART v2 forbids "sr", "cc", ...)."""
    position = 0
    for letter in letters:
        position = PERMISSION_LETTERS.find(letter, position)
        if position < 0:
            return False
        position += 1
    return bool(letters)


def parse_scopes(text: str) -> frozenset[Scope]:
    """The resource scopes in a space-separated `scope` claim; others are dropped."""
    return frozenset(s for s in map(Scope.parse, text.split()) if s is not None)


@dataclass(frozen=True)
class Principal:
    """The caller of one request, as far as permissions and the audit trail are concerned."""

    sub: str
    role: Role
    sites: frozenset[str]  # for an admin, what the token listed (possibly nothing): unused
    scopes: frozenset[Scope]
    token_id: str | None = None  # the token's jti, recorded in the audit trail

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The principal a checked token speaks for.

    Malformed or missing claims are `Unauthorized` (401, `invalid_token`): the token is not
    one this API can use. A well-formed token that grants no site at all is `Forbidden`
    (403): the token is fine, its holder just may not touch anything here.
    """
    if _holds_nul(claims):
        # PostgreSQL cannot store or compare text with NUL: refused on both databases alike.
        raise BadRequest("A token claim contains the NUL character (\\u0000)")
    sub = _subject(claims)
    role = _role(claims)
    token_id = claims.get("jti")
    if token_id is not None and not isinstance(token_id, str):
        raise Unauthorized("token id invalid")
    sites = _granted_sites(claims, role)
    scopes = _granted_scopes(claims, role)
    return Principal(sub=sub, role=role, sites=sites, scopes=scopes, token_id=token_id)


def _subject(claims: dict[str, Any]) -> str:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise Unauthorized("token lacks a subject")
    if len(sub) > MAX_SUBJECT_LENGTH:
        raise Unauthorized(f"token subject longer than {MAX_SUBJECT_LENGTH} characters")
    return sub


def _role(claims: dict[str, Any]) -> Role:
    role_claim = claims.get("role")
    if role_claim is None:
        raise Unauthorized("token lacks the role claim")
    if not isinstance(role_claim, str) or role_claim not in {r.value for r in Role}:
        raise Unauthorized("token role unknown")
    return Role(role_claim)


def _granted_sites(claims: dict[str, Any], role: Role) -> frozenset[str]:
    """The sites the token grants; an admin's token may list none (it needs none)."""
    sites_claim = claims.get("sites")
    if sites_claim is None and role is not Role.ADMIN:
        raise Unauthorized("token lacks the sites claim")
    sites = _parse_sites(sites_claim)
    if not sites and role is not Role.ADMIN:
        raise Forbidden(f"token of role {role} grants no site")
    return sites


def _granted_scopes(claims: dict[str, Any], role: Role) -> frozenset[Scope]:
    """The token's scopes; without a `scope` claim, the role's defaults (which narrow nothing)."""
    scope_claim = claims.get("scope")
    if scope_claim is None:
        return parse_scopes(DEFAULT_SCOPES[role])
    if isinstance(scope_claim, str):
        return parse_scopes(scope_claim)
    if isinstance(scope_claim, list) and all(isinstance(s, str) for s in scope_claim):
        return parse_scopes(" ".join(scope_claim))  # some providers send a list
    raise Unauthorized("token scope claim malformed")


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _parse_sites(claim: object) -> frozenset[str]:
    if claim is None:
        return frozenset()
    items: Iterable[object]
    if isinstance(claim, str):
        items = (part.strip() for part in claim.split(","))
    elif isinstance(claim, list):
        items = claim
    else:
        raise Unauthorized("token sites claim malformed")
    sites: set[str] = set()
    for item in items:
        if item == "" and isinstance(claim, str):
            continue  # "S01," or an empty string: nothing listed there
        if not isinstance(item, str) or not _SITE.fullmatch(item):
            raise Unauthorized("token sites claim malformed")
        sites.add(item)
    return frozenset(sites)
