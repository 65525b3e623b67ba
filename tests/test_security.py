"""Authentication, roles, scopes and site isolation through the API (both databases).

The expected outcomes are written out here, not derived from the implementation's role
table, so a change to the table that breaks the issue's rules fails these tests."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest

from tests import builders
from tests.conftest import KEY, REASON, bearer
from tests.test_crud import create

TYPES = ("Patient", "Observation", "MedicationAdministration", "AdverseEvent")

# role -> resource type -> the interactions it may perform at its own site
ALLOWED: dict[str, dict[str, set[str]]] = {
    # A lab searches Patients by identifier only (tested below), never browses them.
    "lab": {"Patient": {"read"}, "Observation": {"read", "search", "create", "update"}},
    "investigator": {t: {"read", "search", "create", "update", "delete"} for t in TYPES},
    "monitor": {t: {"read", "search"} for t in TYPES},
}


# A new subject number for every Patient a case creates: one subject, one patient.
_NEW_SUBJECTS = itertools.count(1)


def _body(kind: str, patient_id: str, site: str) -> dict[str, Any]:
    return {
        "Patient": builders.patient(f"{site}-new-{next(_NEW_SUBJECTS)}", site=site),
        "Observation": builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42),
        "MedicationAdministration": builders.administration(patient_id, "2025-03-03T08:00:00Z"),
        "AdverseEvent": builders.adverse_event(patient_id, "2025-03-05"),
    }[kind]


async def _versions(admin: httpx.AsyncClient, kind: str, resource_id: str) -> int:
    return len((await admin.get(f"/fhir/{kind}/{resource_id}/_history")).json().get("entry", []))


async def _count(admin: httpx.AsyncClient, kind: str) -> int:
    bundle = (await admin.get(f"/fhir/{kind}/_history?_count=1000")).json()
    return len(bundle.get("entry", []))


@pytest.mark.parametrize("role", sorted(ALLOWED))
async def test_role_by_resource_by_action_by_site(client, anonymous, role):
    admin = client
    patients = {
        site: (await create(admin, builders.patient(f"{site}-001", site=site))).json()["id"]
        for site in ("S01", "S02")
    }
    caller = {**bearer(role, ("S01",)), "X-Provenance": REASON}
    for kind in TYPES:
        for site, patient_id in patients.items():
            own = site == "S01"
            allowed = ALLOWED[role].get(kind, set())

            def expect(
                action: str,
                success: int,
                *,
                elsewhere: int = 404,
                allowed: set[str] = allowed,
                own: bool = own,
            ) -> int:
                if action not in allowed:
                    return 403  # the role decides before the site is looked at
                return success if own else elsewhere

            # Fresh targets for each case, made by the admin.
            target_patient = (
                await create(admin, builders.patient(f"{site}-t-{kind}", site=site))
            ).json()["id"]
            target = (await create(admin, _body(kind, target_patient, site))).json()
            where = f"/fhir/{kind}/{target['id']}"
            label = (role, kind, site)

            response = await anonymous.get(where, headers=caller)
            assert response.status_code == expect("read", 200), (*label, "read", response.text)

            response = await anonymous.get(
                f"/fhir/{kind}", headers=caller, params={"_count": "1000"}
            )
            if "search" in allowed:
                found = {
                    e["resource"]["id"]
                    for e in response.json().get("entry", [])
                    if e["search"]["mode"] == "match"
                }
                assert (target["id"] in found) == own, (*label, "search")
            else:
                assert response.status_code == 403, (*label, "search")

            before = await _count(admin, kind)
            response = await anonymous.post(
                f"/fhir/{kind}", headers=caller, json=_body(kind, patient_id, site)
            )
            created = expect("create", 201, elsewhere=403 if kind == "Patient" else 422)
            assert response.status_code == created, (*label, "create", response.text)
            if created != 201:
                assert await _count(admin, kind) == before, (*label, "create wrote")

            versions = await _versions(admin, kind, target["id"])
            response = await anonymous.put(where, headers=caller, json=target)
            assert response.status_code == expect("update", 200), (*label, "update")
            if response.status_code != 200:
                assert await _versions(admin, kind, target["id"]) == versions

            if kind == "Patient":
                # A Patient with records cannot be deleted; use one without.
                empty = (await create(admin, builders.patient(f"{site}-e", site=site))).json()
                where = f"/fhir/Patient/{empty['id']}"
            response = await anonymous.delete(where, headers=caller)
            assert response.status_code == expect("delete", 204), (*label, "delete")
            if response.status_code != 204:
                assert (await admin.get(where)).status_code == 200, (*label, "delete wrote")


async def test_requests_without_a_valid_token_are_401_outcomes(anonymous):
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not.a.jwt"},
    ):
        response = await anonymous.get("/fhir/Patient", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["resourceType"] == "OperationOutcome"
    expired = KEY.sign(
        {
            "iss": "itp-trial-api",
            "aud": "itp-trial-api",
            "sub": "x",
            "role": "admin",
            "exp": 1_000_000_000,
        }
    )
    response = await anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "invalid_token" in response.headers["www-authenticate"]


async def test_open_endpoints_need_no_token(anonymous):
    assert (await anonymous.get("/fhir/metadata")).status_code == 200
    assert (await anonymous.get("/healthz")).status_code == 200
    assert (await anonymous.get("/readyz")).status_code == 200


async def test_scopes_narrow_the_role(client, anonymous):
    patient_id = (await create(client, builders.patient())).json()["id"]
    read_only = bearer("investigator", ("S01",), scope="user/Observation.rs user/Patient.rs")
    body = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42)
    response = await anonymous.post("/fhir/Observation", json=body, headers=read_only)
    assert response.status_code == 403
    assert "scope" in response.json()["issue"][0]["diagnostics"]
    search = await anonymous.get("/fhir/Observation", headers=read_only)
    assert search.status_code == 200


async def test_lab_writes_platelet_counts_only(client, anonymous):
    patient_id = (await create(client, builders.patient())).json()["id"]
    lab = bearer("lab", ("S01",))
    count = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42)
    assert (await anonymous.post("/fhir/Observation", json=count, headers=lab)).status_code == 201
    grade = builders.bleeding_grade(patient_id, "2025-03-10T09:00:00Z", 1)
    assert (await anonymous.post("/fhir/Observation", json=grade, headers=lab)).status_code == 403
    criterion = {"If-None-Exist": f"patient={patient_id}&code=777-3"}
    browse = await anonymous.get("/fhir/Patient", headers=lab)
    assert browse.status_code == 403
    lookup = await anonymous.get("/fhir/Patient", headers=lab, params={"identifier": "S01-001"})
    assert [e["resource"]["id"] for e in lookup.json().get("entry", [])] == [patient_id]
    conditional = await anonymous.post(
        "/fhir/Observation", json=count, headers={**lab, **criterion}
    )
    assert conditional.status_code == 200  # the count posted above matches
    grade_again = await anonymous.post(
        "/fhir/Observation", json=grade, headers={**lab, **criterion}
    )
    assert grade_again.status_code == 403  # a match never excuses a body it may not write
    create_only = bearer("lab", ("S01",), scope="user/Observation.c")
    blind = await anonymous.post(
        "/fhir/Observation", json=count, headers={**create_only, **criterion}
    )
    assert blind.status_code == 403  # criteria are a search: no search, no answer


async def test_only_an_admin_moves_a_patient_between_sites(client, anonymous):
    patient = (await create(client, builders.patient(site="S01"))).json()
    count = (
        await create(client, builders.platelet_count(patient["id"], "2025-03-10T09:00:00Z", 42))
    ).json()
    moved = {
        **patient,
        "managingOrganization": {"identifier": {"system": builders.SITE_SYSTEM, "value": "S02"}},
    }
    both_sites = {**bearer("investigator", ("S01", "S02")), "X-Provenance": REASON}
    refused = await anonymous.put(f"/fhir/Patient/{patient['id']}", json=moved, headers=both_sites)
    assert refused.status_code == 403
    assert (await client.put(f"/fhir/Patient/{patient['id']}", json=moved)).status_code == 200
    s01 = bearer("investigator", ("S01",))
    # The patient's records moved with it.
    gone = await anonymous.get(f"/fhir/Observation/{count['id']}", headers=s01)
    assert gone.status_code == 404
    s02 = bearer("investigator", ("S02",))
    assert (await anonymous.get(f"/fhir/Observation/{count['id']}", headers=s02)).status_code == 200


async def test_response_operations_respect_sites(client, anonymous):
    ids = {
        site: (await create(client, builders.patient(f"{site}-1", site=site))).json()["id"]
        for site in ("S01", "S02")
    }
    s01 = bearer("monitor", ("S01",))
    own = await anonymous.get(f"/fhir/Patient/{ids['S01']}/$response-status", headers=s01)
    assert own.status_code == 200
    other = await anonymous.get(f"/fhir/Patient/{ids['S02']}/$response-status", headers=s01)
    assert other.status_code == 404
    summary = (await anonymous.get("/fhir/$response-summary", headers=s01)).json()
    assert summary["patients"] == 1
    assert summary["sites"] == ["S01"]
    assert (await client.get("/fhir/$response-summary")).json()["patients"] == 2


async def test_history_of_another_site_is_invisible(client, anonymous):
    other = (await create(client, builders.patient("S02-1", site="S02"))).json()
    s01 = bearer("investigator", ("S01",))
    assert (
        await anonymous.get(f"/fhir/Patient/{other['id']}/_history", headers=s01)
    ).status_code == 404
    assert (
        await anonymous.get(f"/fhir/Patient/{other['id']}/_history/1", headers=s01)
    ).status_code == 404
    bundle = (await anonymous.get("/fhir/Patient/_history", headers=s01)).json()
    assert other["id"] not in {
        e.get("fullUrl", "").rsplit("/", 1)[-1] for e in bundle.get("entry", [])
    }
