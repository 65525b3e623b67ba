"""Roles, SMART scopes, sites and claims.

The expected role matrix below is written out by hand from the issue, in plain strings,
and deliberately not derived from `ROLE_MATRIX`: a change to the implementation's table
must show up here as a failing case.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.auth import (
    Action,
    Principal,
    Role,
    Scope,
    Unauthorized,
    authorize,
    authorize_observation_write,
    default_scopes,
    lab_may_write_observation,
    matrix_markdown,
    may_access_site,
    parse_scopes,
    principal_from_claims,
)
from app.kit.errors import Forbidden

ROLES = ["lab", "investigator", "monitor", "admin"]
RESOURCES = [
    "Patient",
    "Observation",
    "MedicationAdministration",
    "AdverseEvent",
    "AuditEvent",
    "Provenance",  # not a type any role has rights on
]
ACTIONS = [
    "create",
    "read",
    "update",
    "delete",
    "search",
    "history",
    "conditional_create",
    "audit_read",
    "ingest_hl7",
    "move_site",
    "export",
]

READ = {"read", "search", "history"}
WRITE = {"create", "update", "delete", "conditional_create"}
EXPECTED: dict[str, dict[str, set[str]]] = {
    "lab": {
        "Patient": {"read", "search", "history"},
        "Observation": {
            "create",
            "read",
            "update",
            "search",
            "history",
            "conditional_create",
            "ingest_hl7",
        },
    },
    "investigator": {
        "Patient": READ | WRITE,
        "Observation": READ | WRITE | {"ingest_hl7"},
        "MedicationAdministration": READ | WRITE,
        "AdverseEvent": READ | WRITE,
    },
    "monitor": {
        "Patient": READ | {"export"},
        "Observation": READ | {"export"},
        "MedicationAdministration": READ | {"export"},
        "AdverseEvent": READ | {"export"},
        "AuditEvent": READ | {"audit_read"},
    },
    "admin": {
        "Patient": READ | WRITE | {"move_site", "export"},
        "Observation": READ | WRITE | {"ingest_hl7", "export"},
        "MedicationAdministration": READ | WRITE | {"export"},
        "AdverseEvent": READ | WRITE | {"export"},
        "AuditEvent": READ | {"audit_read"},
    },
}


def principal(
    role: str, scope: str = "user/*.cruds", sites: tuple[str, ...] = ("S01",)
) -> Principal:
    return Principal(
        sub="someone",
        role=Role(role),
        sites=frozenset(sites),
        scopes=parse_scopes(scope),
    )


def is_allowed(who: Principal, resource_type: str, action: str) -> bool:
    try:
        authorize(who, resource_type, Action(action))
    except Forbidden:
        return False
    return True


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("resource_type", RESOURCES)
@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(role: str, resource_type: str, action: str) -> None:
    expected = action in EXPECTED[role].get(resource_type, set())
    # Wildcard scopes: only the role decides here.
    assert is_allowed(principal(role), resource_type, action) is expected


@pytest.mark.parametrize("role", ROLES)
def test_default_scopes_do_not_narrow_the_role(role: str) -> None:
    who = principal_from_claims({"sub": "x", "role": role, "sites": ["S01"]})
    for resource_type in RESOURCES:
        for action in ACTIONS:
            expected = action in EXPECTED[role].get(resource_type, set())
            assert is_allowed(who, resource_type, action) is expected, (resource_type, action)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", ["create", "update", "delete", "conditional_create"])
def test_nobody_changes_the_audit_trail(role: str, action: str) -> None:
    assert not is_allowed(principal(role, "system/*.cruds"), "AuditEvent", action)


def test_role_denial_says_which_role_and_action() -> None:
    with pytest.raises(Forbidden) as caught:
        authorize(principal("lab"), "Observation", Action.DELETE)
    assert caught.value.diagnostics == "role lab may not delete Observation"
    assert caught.value.status_code == 403
    assert caught.value.issue_code == "forbidden"


# --- scopes ----------------------------------------------------------------------------------


def test_read_search_scope_cannot_create() -> None:
    who = principal("investigator", "user/Observation.rs")
    assert is_allowed(who, "Observation", "read")
    assert is_allowed(who, "Observation", "search")
    assert is_allowed(who, "Observation", "history")
    for action in ["create", "conditional_create", "update", "delete", "ingest_hl7"]:
        assert not is_allowed(who, "Observation", action), action
    with pytest.raises(Forbidden) as caught:
        authorize(who, "Observation", Action.CREATE)
    assert "scope user/Observation.rs does not allow create" in caught.value.diagnostics
    assert caught.value.headers["WWW-Authenticate"] == (
        'Bearer realm="itp-trial", error="insufficient_scope", scope="user/Observation.c"'
    )


def test_scope_for_another_type_covers_nothing_here() -> None:
    who = principal("investigator", "user/Observation.cruds")
    with pytest.raises(Forbidden) as caught:
        authorize(who, "Patient", Action.READ)
    assert caught.value.diagnostics == "no scope in the token covers Patient"


@pytest.mark.parametrize(
    ("letters", "allowed"),
    [
        ("c", {"create", "conditional_create"}),
        ("r", {"read", "history"}),
        ("u", {"update"}),
        ("d", {"delete"}),
        ("s", {"search"}),
        ("cu", {"create", "conditional_create", "update"}),
    ],
)
def test_each_letter_allows_its_actions(letters: str, allowed: set[str]) -> None:
    who = principal("investigator", f"user/AdverseEvent.{letters}")
    granted = {
        a for a in EXPECTED["investigator"]["AdverseEvent"] if is_allowed(who, "AdverseEvent", a)
    }
    assert granted == allowed


def test_wildcard_resource_scope() -> None:
    who = principal("investigator", "user/*.r")
    assert is_allowed(who, "AdverseEvent", "read")
    assert is_allowed(who, "MedicationAdministration", "read")
    assert not is_allowed(who, "AdverseEvent", "search")


def test_scopes_add_up_but_never_beyond_the_role() -> None:
    who = principal("monitor", "user/Observation.r user/Observation.s user/*.cruds")
    assert is_allowed(who, "Observation", "search")
    assert not is_allowed(who, "Observation", "create")  # the role still says no


def test_special_actions_need_their_letters() -> None:
    assert not is_allowed(principal("monitor", "user/AuditEvent.s"), "AuditEvent", "audit_read")
    assert is_allowed(principal("monitor", "user/AuditEvent.r"), "AuditEvent", "audit_read")
    assert not is_allowed(principal("admin", "user/Patient.rs"), "Patient", "move_site")
    assert is_allowed(principal("admin", "user/Patient.u"), "Patient", "move_site")
    assert not is_allowed(principal("lab", "user/Observation.rs"), "Observation", "ingest_hl7")
    assert is_allowed(principal("lab", "user/Observation.c"), "Observation", "ingest_hl7")


@pytest.mark.parametrize("context", ["user", "system", "patient"])
def test_every_context_counts_alike(context: str) -> None:
    who = principal("investigator", f"{context}/Observation.c")
    assert is_allowed(who, "Observation", "create")
    assert not is_allowed(who, "Observation", "read")


@pytest.mark.parametrize(
    ("text", "letters"),
    [
        ("user/Observation.read", "rs"),
        ("user/Observation.write", "cud"),
        ("user/Observation.*", "cruds"),
        ("patient/*.read", "rs"),
        ("system/Patient.cruds", "cruds"),
        ("user/Patient.rs", "rs"),
    ],
)
def test_scope_parsing(text: str, letters: str) -> None:
    scope = Scope.parse(text)
    assert scope is not None
    assert scope.permissions == frozenset(letters)
    assert str(scope) == text


def test_v1_write_cannot_read() -> None:
    who = principal("investigator", "user/Observation.write")
    assert is_allowed(who, "Observation", "update")
    assert not is_allowed(who, "Observation", "read")


@pytest.mark.parametrize(
    "text",
    [
        "openid",
        "fhirUser",
        "launch/patient",
        "user/Observation",
        "user/Observation.sr",  # v2 letters must be in cruds order
        "user/Observation.rr",
        "user/Observation.x",
        "user/observation.rs",
        "admin/Observation.rs",
        "user/Observation.rs?category=laboratory",  # cannot be enforced: grants nothing
    ],
)
def test_scopes_this_api_cannot_enforce_are_dropped(text: str) -> None:
    assert Scope.parse(text) is None
    assert not is_allowed(principal("investigator", text), "Observation", "read")


# --- claims ----------------------------------------------------------------------------------


def test_principal_from_claims() -> None:
    who = principal_from_claims(
        {
            "sub": "dr-who",
            "role": "investigator",
            "sites": "S01, S02,",
            "scope": "openid user/Observation.rs",
            "jti": "abc",
        }
    )
    assert who.sub == "dr-who"
    assert who.role is Role.INVESTIGATOR and who.role.value == "investigator"
    assert who.sites == frozenset({"S01", "S02"})
    assert who.scopes == frozenset({Scope("user", "Observation", frozenset("rs"))})
    assert who.token_id == "abc"


def test_scope_claim_as_list() -> None:
    who = principal_from_claims(
        {"sub": "x", "role": "lab", "sites": ["S01"], "scope": ["user/Observation.c"]}
    )
    assert is_allowed(who, "Observation", "create")
    assert not is_allowed(who, "Observation", "read")


def test_missing_scope_claim_gets_role_defaults_but_empty_one_gets_nothing() -> None:
    defaulted = principal_from_claims({"sub": "x", "role": "lab", "sites": ["S01"]})
    assert defaulted.scopes == parse_scopes("user/Observation.crus user/Patient.rs")
    assert is_allowed(defaulted, "Observation", "create")
    empty = principal_from_claims({"sub": "x", "role": "lab", "sites": ["S01"], "scope": ""})
    assert empty.scopes == frozenset()
    assert not is_allowed(empty, "Observation", "read")


def test_admin_needs_no_sites() -> None:
    who = principal_from_claims({"sub": "root", "role": "admin"})
    assert who.is_admin and who.sites == frozenset()


@pytest.mark.parametrize(
    "changes",
    [
        {"role": None},
        {"role": "superuser"},
        {"role": ["admin"]},
        {"sub": None},
        {"sub": ""},
        {"sites": None},
        {"sites": 1},
        {"sites": ["S01", 2]},
        {"sites": ["S 01"]},
        {"sites": [""]},
        {"scope": 42},
        {"scope": ["user/Observation.rs", 1]},
        {"jti": 7},
    ],
)
def test_malformed_claims_are_unauthorized(changes: dict[str, Any]) -> None:
    claims: dict[str, Any] = {"sub": "x", "role": "lab", "sites": ["S01"]}
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    with pytest.raises(Unauthorized) as caught:
        principal_from_claims(claims)
    assert caught.value.status_code == 401


@pytest.mark.parametrize("sites", [[], ""])
def test_token_with_no_site_is_forbidden(sites: Any) -> None:
    with pytest.raises(Forbidden) as caught:
        principal_from_claims({"sub": "x", "role": "monitor", "sites": sites})
    assert caught.value.status_code == 403


def test_default_scopes() -> None:
    assert default_scopes("lab") == "user/Observation.crus user/Patient.rs"
    assert default_scopes(Role.MONITOR) == "user/*.rs"
    with pytest.raises(ValueError):
        default_scopes("superuser")


# --- lab observations and sites --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "allowed"),
    [("platelet-count", True), ("bleeding-score", False), ("", False), (None, False)],
)
def test_lab_writes_platelet_counts_only(kind: str | None, allowed: bool) -> None:
    assert lab_may_write_observation(kind) is allowed
    if allowed:
        authorize_observation_write(principal("lab"), kind)
    else:
        with pytest.raises(Forbidden):
            authorize_observation_write(principal("lab"), kind)
    authorize_observation_write(principal("investigator"), kind)  # others: any kind


@pytest.mark.parametrize(
    ("role", "sites", "site", "allowed"),
    [
        ("lab", ("S01",), "S01", True),
        ("lab", ("S01",), "S02", False),
        ("investigator", ("S01", "S02"), "S02", True),
        ("monitor", ("S01",), "s01", False),  # site codes are exact
        ("monitor", ("S01",), None, False),
        ("admin", (), "S09", True),
        ("admin", (), None, True),
    ],
)
def test_site_access(role: str, sites: tuple[str, ...], site: str | None, allowed: bool) -> None:
    assert may_access_site(principal(role, sites=sites), site) is allowed


def test_matrix_markdown_has_a_row_per_role() -> None:
    lines = matrix_markdown().splitlines()
    assert lines[0].startswith("| role | Patient | Observation |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ROLES
    assert "move_site" in lines[5] and "move_site" not in "".join(lines[2:5])
