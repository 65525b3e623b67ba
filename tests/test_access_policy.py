"""One access policy: "which sites may this caller see" is defined once (`auth.policy`),
turned into SQL once (`store.criteria.site_condition`), and no query of clinical data can
be built without saying whose sites it may return."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any, cast

import pytest

from app.auth.permissions import Action
from app.auth.policy import SYSTEM_ACCESS, AccessPolicy, SiteAccess, access_policy
from app.auth.principal import Principal, Role, parse_scopes
from app.kit.errors import Forbidden
from app.store import exports, repository
from app.store.criteria import MissingSiteAccess, SearchFilter, site_condition
from app.store.tables import resource_table

APP = Path(__file__).resolve().parent.parent / "app"


def _principal(role: Role, sites: frozenset[str], scope: str = "user/*.cruds") -> Principal:
    return Principal(sub="someone", role=role, sites=sites, scopes=parse_scopes(scope))


def test_the_policy_says_which_sites_a_caller_sees() -> None:
    monitor = access_policy(_principal(Role.MONITOR, frozenset({"S01"}), "user/*.rs"))
    admin = access_policy(_principal(Role.ADMIN, frozenset()))
    assert monitor.sites.sites == frozenset({"S01"})
    assert monitor.sees_site("S01")
    assert not monitor.sees_site("S02")
    assert not monitor.sees_site(None)  # a record without a site is the admin's alone
    assert admin.sites.sites is None
    assert admin.sees_site(None)
    assert SYSTEM_ACCESS.sites is None


def test_the_policy_narrows_to_held_sites_and_refuses_others() -> None:
    monitor = access_policy(_principal(Role.MONITOR, frozenset({"S01", "S02"}), "user/*.rs"))
    assert monitor.narrowed(frozenset({"S02"})).sites == frozenset({"S02"})
    assert monitor.narrowed(frozenset()).sites == frozenset({"S01", "S02"})
    with pytest.raises(Forbidden):
        monitor.narrowed(frozenset({"S03"}))


def test_the_policy_checks_role_and_scopes() -> None:
    lab = access_policy(_principal(Role.LAB, frozenset({"S01"}), "user/Observation.cu"))
    lab.require("Observation", Action.CREATE)
    assert not lab.allows("Observation", Action.READ)  # the role allows it, the scope not
    assert not lab.allows("Patient", Action.CREATE)  # the role does not
    with pytest.raises(Forbidden):
        lab.require("Patient", Action.CREATE)


def test_site_condition_is_the_one_sql_filter() -> None:
    assert site_condition(resource_table.c.site, SYSTEM_ACCESS) == []
    (condition,) = site_condition(resource_table.c.site, SiteAccess(frozenset({"S01"}), "t"))
    assert "IN" in str(condition)
    with pytest.raises(MissingSiteAccess):
        site_condition(resource_table.c.site, None)


class _NoConnection:
    """Stands for a connection; a query that reached it would have run."""

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a query ran without a SiteAccess")

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a query ran without a SiteAccess")


@pytest.mark.parametrize("read", ["search", "count", "first_matches"])
async def test_a_search_without_site_access_is_refused_before_any_sql(read: str) -> None:
    conn = cast(Any, _NoConnection())
    unscoped = SearchFilter("Patient")
    call = {
        "search": lambda: repository.search(conn, unscoped, sort=[], after=None, limit=1),
        "count": lambda: repository.count(conn, unscoped),
        "first_matches": lambda: repository.first_matches(conn, unscoped, 1),
    }[read]
    with pytest.raises(MissingSiteAccess):
        await call()


# Reads by key: the write path reads the record it locked, or the service reads the one
# record asked for, then asks the policy (`sees_site`) and answers a record at another site
# exactly like a missing one. Every other read of clinical data takes a SiteAccess (or a
# SearchFilter, which cannot run without one).
_READS_BY_KEY = {
    "get_current",  # one record by type and id
    "get_version",  # one version by type, id and number
    "subject_holder",  # the Patient holding a subject number (uniqueness, then site check)
    "has_live_references",  # whether a Patient is referenced (delete), after its site check
    "patient_fact_rows",  # one visible patient's facts (the response engine)
    "stored_assessment",  # the server's own recomputation of responses
    "classification_contents",  # one visible patient's classifications
    "get_assessment",  # one visible patient's assessment
    "all_patient_ids",  # the CLI's recomputation of every response (the server's own work)
    "lock",
    "try_lock",  # an advisory lock, no data (the audit chain's sequencer)
}
# Writes take no access: the service checked it on the record before writing.
_WRITE_PREFIXES = ("insert_", "update_", "delete_", "save_", "move_")


def _reads(module: Any) -> list[str]:
    return [
        name
        for name, function in inspect.getmembers(module, inspect.iscoroutinefunction)
        if function.__module__ == module.__name__
        and not name.startswith("_")
        and not name.startswith(_WRITE_PREFIXES)
    ]


def test_every_clinical_read_of_the_repository_takes_site_access() -> None:
    missing = []
    for name in _reads(repository):
        if name in _READS_BY_KEY:
            continue
        annotations = [
            p.annotation for p in inspect.signature(getattr(repository, name)).parameters.values()
        ]
        if not any(a in ("SiteAccess", "SearchFilter") for a in annotations):
            missing.append(name)
    assert missing == []
    assert set(_reads(repository)) >= _READS_BY_KEY  # the list names nothing that is gone


def test_the_export_reads_of_resources_take_site_access() -> None:
    batch = inspect.signature(exports.resource_batch).parameters
    assert batch["access"].annotation == "SiteAccess"


def _site_filters(source: str) -> list[str]:
    """`<...>.site.in_(...)` calls: a site filter written by hand. A search's own
    `organization=` filter (`criteria.organizations`) is the client's question, not access."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if node.func.attr != "in_" or not (
            isinstance(target, ast.Attribute) and target.attr == "site"
        ):
            continue
        if node.args and ast.unparse(node.args[0]) == "criteria.organizations":
            continue
        found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_site_filter_is_written_outside_site_condition() -> None:
    assert _site_filters("query.where(R.c.site.in_(sites))") == ["1: R.c.site.in_(sites)"]
    written = [
        f"{path.relative_to(APP.parent)}:{found}"
        for path in APP.rglob("*.py")
        for found in _site_filters(path.read_text())
    ]
    assert written == []


_CHECKS = ("authorize", "may_access_site", "visible_sites", "is_admin", "narrowed_sites")


def test_no_permission_check_outside_auth() -> None:
    """Services, routes and the store ask the policy; the checks it is made of stay in auth."""
    calls = []
    for path in APP.rglob("*.py"):
        if path.parent.name == "auth":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            elif isinstance(node, ast.Attribute) and node.attr == "is_admin":
                name = "is_admin"
            if name in (
                "authorize",
                "may_access_site",
                "visible_sites",
                "is_admin",
                "narrowed_sites",
            ):
                calls.append(f"{path.relative_to(APP.parent)}:{node.lineno}: {name}")
    assert calls == []


def test_a_policy_is_built_once_per_principal() -> None:
    principal = _principal(Role.MONITOR, frozenset({"S01"}), "user/*.rs")
    assert access_policy(principal) is access_policy(principal)
    assert isinstance(access_policy(principal), AccessPolicy)
