"""What each role may do, as one table of data, and the checks routes call.

A request is allowed when all of these hold:
1. the caller's role allows the action on the resource type (`ROLE_MATRIX`);
2. at least one SMART scope in the token allows it too (scopes only ever narrow a role);
3. the resource's site is one of the caller's (`may_access_site`; admin: every site);
4. for a lab, the Observation is a platelet count (`authorize_observation_write`).

The audit trail is outside everyone's reach for changes: no role, admin included, has
create, update or delete on AuditEvent; the server writes AuditEvents itself, so one created
through the API would be a forgery indistinguishable from a real record.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from app.auth.principal import DEFAULT_SCOPES, Principal, Role
from app.kit.codes import (
    ADVERSE_EVENT,
    AUDIT_EVENT,
    KIND_PLATELET,
    MEDICATION_ADMINISTRATION,
    OBSERVATION,
    PATIENT,
    RESOURCE_TYPES,
)
from app.kit.errors import REALM, Forbidden, NotFound


class Action(StrEnum):
    CREATE = "create"
    READ = "read"
    UPDATE = "update"
    DELETE = "delete"
    SEARCH = "search"
    HISTORY = "history"  # reading older versions is reading: checked as READ
    CONDITIONAL_CREATE = "conditional_create"
    AUDIT_READ = "audit_read"
    INGEST_HL7 = "ingest_hl7"
    MOVE_SITE = "move_site"
    EXPORT = "export"  # Bulk Data $export and the SDTM datasets: every record of a type at once


_C, _R, _U, _D, _S = Action.CREATE, Action.READ, Action.UPDATE, Action.DELETE, Action.SEARCH
_CC, _AR, _HL7, _MOVE, _EX = (
    Action.CONDITIONAL_CREATE,
    Action.AUDIT_READ,
    Action.INGEST_HL7,
    Action.MOVE_SITE,
    Action.EXPORT,
)


def _actions(*actions: Action) -> frozenset[Action]:
    return frozenset(actions)


# role -> resource type -> allowed actions. A missing resource type means nothing is allowed.
# HISTORY is never listed: it is checked as READ. `ingest_hl7` belongs to Observation (HL7 v2
# results become Observations), `move_site` to Patient (other resources follow their
# subject's site), `audit_read` to AuditEvent. `export` (a Bulk Data export or an SDTM
# dataset: every record of a type at the caller's sites, for analysis) belongs to each
# clinical type, and is the monitor's and the admin's only.
ROLE_MATRIX: Mapping[Role, Mapping[str, frozenset[Action]]] = {
    Role.LAB: {
        PATIENT: _actions(_R, _S),
        OBSERVATION: _actions(_C, _R, _U, _S, _CC, _HL7),
    },
    Role.INVESTIGATOR: {
        PATIENT: _actions(_C, _R, _U, _D, _S, _CC),
        OBSERVATION: _actions(_C, _R, _U, _D, _S, _CC, _HL7),
        MEDICATION_ADMINISTRATION: _actions(_C, _R, _U, _D, _S, _CC),
        ADVERSE_EVENT: _actions(_C, _R, _U, _D, _S, _CC),
    },
    Role.MONITOR: {
        PATIENT: _actions(_R, _S, _EX),
        OBSERVATION: _actions(_R, _S, _EX),
        MEDICATION_ADMINISTRATION: _actions(_R, _S, _EX),
        ADVERSE_EVENT: _actions(_R, _S, _EX),
        AUDIT_EVENT: _actions(_R, _S, _AR),
    },
    Role.ADMIN: {
        PATIENT: _actions(_C, _R, _U, _D, _S, _CC, _MOVE, _EX),
        OBSERVATION: _actions(_C, _R, _U, _D, _S, _CC, _HL7, _EX),
        MEDICATION_ADMINISTRATION: _actions(_C, _R, _U, _D, _S, _CC, _EX),
        ADVERSE_EVENT: _actions(_C, _R, _U, _D, _S, _CC, _EX),
        AUDIT_EVENT: _actions(_R, _S, _AR),
    },
}

# The SMART permission letter an action needs from some scope on the resource type.
SCOPE_LETTER: Mapping[Action, str] = {
    Action.CREATE: "c",
    Action.CONDITIONAL_CREATE: "c",
    Action.INGEST_HL7: "c",  # it creates (or conditionally creates) Observations
    Action.READ: "r",
    Action.HISTORY: "r",
    Action.AUDIT_READ: "r",
    Action.UPDATE: "u",
    Action.MOVE_SITE: "u",  # a move is an update of the Patient
    Action.DELETE: "d",
    Action.SEARCH: "s",
    Action.EXPORT: "r",  # an export reads every record of the type (SMART: system/*.read)
}


def allowed_actions(role: Role, resource_type: str) -> frozenset[Action]:
    """What the role allows on the resource type, HISTORY included wherever READ is."""
    actions = ROLE_MATRIX[role].get(resource_type, frozenset())
    return (actions | {Action.HISTORY}) if Action.READ in actions else actions


def authorize(principal: Principal, resource_type: str, action: Action) -> None:
    """Raises `Forbidden` unless both the role and one of the token's scopes allow `action`
    on `resource_type`. Sites are checked separately (`may_access_site`), because the site
    is known only once the resource is."""
    if action not in allowed_actions(principal.role, resource_type):
        raise Forbidden(f"role {principal.role} may not {action} {resource_type}")
    letter = SCOPE_LETTER[action]
    if any(scope.allows(resource_type, letter) for scope in principal.scopes):
        return
    relevant = sorted(str(s) for s in principal.scopes if s.resource_type in ("*", resource_type))
    if len(relevant) == 1:
        message = f"scope {relevant[0]} does not allow {action} on {resource_type}"
    elif relevant:
        message = f"scopes {' '.join(relevant)} do not allow {action} on {resource_type}"
    else:
        message = f"no scope in the token covers {resource_type}"
    needed = f"user/{resource_type}.{letter}"
    # RFC 6750 §3.1: tell the client which scope would do.
    challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{needed}"'
    raise Forbidden(message, headers={"WWW-Authenticate": challenge})


def lab_may_write_observation(kind: str | None) -> bool:
    """A lab reports platelet counts and nothing else; bleeding scores, response
    assessments and the rest are the investigator's to record."""
    return kind == KIND_PLATELET


def authorize_observation_write(principal: Principal, kind: str | None) -> None:
    """Raises `Forbidden` when a lab would create or change an Observation that is not a
    platelet count. For an update, call it with the stored version's kind and with the new
    one's, so a lab can neither turn a platelet count into something else nor the reverse."""
    if principal.role is Role.LAB and not lab_may_write_observation(kind):
        raise Forbidden(
            f"role lab may only create or correct {KIND_PLATELET} Observations, "
            f"not {kind or 'unclassified'} ones"
        )


def may_access_site(principal: Principal, site: str | None) -> bool:
    """Whether the caller may touch data of this site. A resource without a site (it should
    not exist, but data is never perfect) is the admin's alone: nobody else can be shown to
    be entitled to it."""
    if principal.is_admin:
        return True
    return site is not None and site in principal.sites


def narrowed_sites(principal: Principal, requested: frozenset[str]) -> frozenset[str] | None:
    """The sites a request covers, as a query filter (None: every site, an admin's): the
    caller's, narrowed to the ones it names (`site=`). Naming a site the caller does not
    hold is refused, never silently dropped: a report that quietly left out the site asked
    for would mislead."""
    if not requested:
        return None if principal.is_admin else principal.sites
    foreign = sorted(site for site in requested if not may_access_site(principal, site))
    if foreign:
        raise Forbidden(f"the token does not grant site {', '.join(foreign)}")
    return requested


def default_scopes(role: Role | str) -> str:
    """The scopes a token of this role gets by default (the token command's `--scope`)."""
    return DEFAULT_SCOPES[Role(role)]


def matrix_markdown() -> str:
    """The role matrix as a Markdown table, for the README: one row per role, one column
    per resource type, the allowed actions in each cell."""
    header = "| role | " + " | ".join(RESOURCE_TYPES) + " |"
    rule = "| --- |" + " --- |" * len(RESOURCE_TYPES)
    rows = [header, rule]
    order = list(Action)
    for role in Role:
        cells = []
        for resource_type in RESOURCE_TYPES:
            actions = sorted(allowed_actions(role, resource_type), key=order.index)
            cells.append(", ".join(a.value for a in actions) or "-")
        rows.append(f"| {role} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def hidden(resource_type: str, resource_id: str, site: str | None) -> NotFound:
    """The 404 of a resource that is missing or at a site the caller does not hold: one
    answer for both (no existence leak). `site` is the site of one that exists: the
    refusal's audit record names it, so that site's monitor sees the attempt."""
    return NotFound(f"{resource_type}/{resource_id} does not exist", audit_site=site)
