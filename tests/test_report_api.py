"""The trial report's operations through the HTTP API, on both databases: the demo trial's
numbers against independent computations from each patient's `$response-status`, the site
rules, the parameters, the pictures' ids, the CSV, the audit trail."""

from __future__ import annotations

import csv
import io
import re
from statistics import median

import pytest

from app.report.statistics import Duration
from app.services import demo
from tests import builders
from tests.conftest import bearer
from tests.test_audit import _events, _shown
from tests.test_crud import create
from tests.test_report_statistics import _clopper_pearson, _reference_km
from tests.test_response_api import enrol_and_treat, post_count

CODES = ("CR", "R", "NR", "LOR", "NE")
RELATED_SYSTEM = "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess"


@pytest.fixture
async def demo_trial(app) -> None:
    await demo.load(app.state.services, progress=lambda _line: None)


async def _statuses(client) -> dict[str, dict]:
    """Each patient's stored assessment, as `$response-status` serves it (computed on write,
    not by the report's code)."""
    bundle = (await client.get("/fhir/Patient?_count=1000")).json()
    patients = [entry["resource"] for entry in bundle["entry"]]
    statuses = {}
    for patient in patients:
        response = await client.get(f"/fhir/Patient/{patient['id']}/$response-status")
        assert response.status_code == 200
        site = patient["managingOrganization"]["identifier"]["value"]
        statuses[patient["id"]] = {**response.json(), "site": site}
    return statuses


def _expected(statuses: dict[str, dict]) -> dict:
    treated = [s for s in statuses.values() if s["treatment_start"] is not None]
    responders = [s for s in treated if s["best_response"] in ("CR", "R")]
    complete = [s for s in treated if s["best_response"] == "CR"]
    first = [s["episodes"][0] for s in statuses.values() if s["episodes"]]
    ttr = [s["time_to_response_days"] for s in statuses.values() if s["time_to_response_days"]]
    return {
        "n_enrolled": len(statuses),
        "n_treated": len(treated),
        "n_evaluable": sum(1 for s in statuses.values() if s["status"] != "NE"),
        "status": {c: sum(1 for s in statuses.values() if s["status"] == c) for c in CODES},
        "best_response": {
            c: sum(1 for s in statuses.values() if (s["best_response"] or "NE") == c) for c in CODES
        },
        "orr": (len(responders), len(treated), *_clopper_pearson(len(responders), len(treated))),
        "cr_rate": (len(complete), len(treated), *_clopper_pearson(len(complete), len(treated))),
        "ttr": {"n": len(ttr), "median": median(ttr), "min": min(ttr), "max": max(ttr)},
        "dor": _reference_km(
            [Duration(e["duration_of_response_days"], e["end"] is not None) for e in first]
        ),
        "baseline_median": median(s["baseline"]["value"] for s in treated if s["baseline"]),
    }


def _proportion(p: dict) -> tuple:
    return (p["responders"], p["n"], p["ci95_low"], p["ci95_high"])


async def test_the_demo_trial_report_matches_each_patients_status(app, client, demo_trial):
    report = (await client.get("/fhir/$trial-report")).json()
    statuses = await _statuses(client)
    expected = _expected(statuses)
    # The demo's plan (app/services/demo.py): 20 patients, one never treated.
    assert report["n_enrolled"] == 20 and report["n_treated"] == 19
    assert report["status"] == {"CR": 5, "R": 5, "NR": 4, "LOR": 3, "NE": 3}
    assert report["sites"] == ["S01", "S02"]
    for key in ("n_enrolled", "n_treated", "n_evaluable", "status", "best_response"):
        assert report[key] == expected[key], key
    assert _proportion(report["orr"]) == pytest.approx(expected["orr"])
    assert report["orr"]["rate"] == pytest.approx(expected["orr"][0] / expected["orr"][1])
    assert report["orr"]["method"] == "Clopper-Pearson"
    assert _proportion(report["cr_rate"]) == pytest.approx(expected["cr_rate"])
    assert report["time_to_response_days"] == expected["ttr"]
    assert report["duration_of_response_days"] == expected["dor"]
    assert report["duration_of_response_days"]["events"] == 3  # the three LOR patients
    assert report["platelets"]["baseline_median"] == pytest.approx(expected["baseline_median"])
    assert report["criteria"] == next(iter(statuses.values()))["criteria"]
    # Safety: the demo's three grade-1, non-serious infusion reactions.
    assert report["adverse_events"] == {
        "events": 3,
        "patients": 3,
        "by_grade": {"1": 3, "2": 0, "3": 0, "4": 0, "5": 0},
        "serious": 0,
        "related": 0,
        "bleeding": 0,
    }
    # Per site: the same computation over each site's patients, and the sites add up.
    for entry in report["by_site"]:
        site = {k: v for k, v in statuses.items() if v["site"] == entry["site"]}
        site_expected = _expected(site)
        assert entry["n_enrolled"] == site_expected["n_enrolled"]
        assert entry["status"] == site_expected["status"]
        assert _proportion(entry["orr"]) == pytest.approx(site_expected["orr"])
    for code in CODES:
        assert sum(e["status"][code] for e in report["by_site"]) == report["status"][code]


async def test_the_listing_has_one_row_per_patient_as_json_and_csv(client, demo_trial):
    listing = (await client.get("/fhir/$response-listing")).json()
    statuses = await _statuses(client)
    rows = listing["rows"]
    assert [row["subject"] for row in rows] == [f"DEMO-{n:02d}" for n in range(1, 21)]
    for row in rows:
        stored = statuses[row["patient"]]
        assert row["site"] == stored["site"]
        for key in ("status", "best_response", "response_date", "time_to_response_days"):
            assert row[key] == stored[key], key
        last = stored["episodes"][-1]["duration_of_response_days"] if stored["episodes"] else None
        assert row["duration_of_response_days"] == last
        assert row["baseline"] == (stored["baseline"]["value"] if stored["baseline"] else None)
    assert sum(row["rescue_count"] for row in rows) == 1  # DEMO-12's IVIg
    assert sum(row["adverse_events"] for row in rows) == 3
    response = await client.get("/fhir/$response-listing", headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["patient"] for r in table] == [row["patient"] for row in rows]
    assert table[0]["status"] == rows[0]["status"]
    assert table[-1]["time_to_response_days"] == ""  # null is an empty cell
    same = await client.get("/fhir/$response-listing?_format=csv")
    assert same.text.splitlines()[1:] == response.text.splitlines()[1:]


async def test_pictures_carry_the_ids_a_page_links(client, demo_trial):
    listing = (await client.get("/fhir/$response-listing")).json()["rows"]
    swimmer = await client.get("/fhir/$swimmer-plot")
    assert swimmer.status_code == 200
    assert swimmer.headers["content-type"] == "image/svg+xml"
    lanes = set(re.findall(r'<g id="lane-([^"]+)"', swimmer.text))
    assert lanes == {row["patient"] for row in listing if row["treatment_start"]}
    assert len(lanes) == 19
    assert swimmer.text == (await client.get("/fhir/$swimmer-plot")).text  # reproducible
    chart = await client.get(f"/fhir/Patient/{listing[11]['patient']}/$platelet-chart")
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/svg+xml"
    counts = (
        await client.get(
            "/fhir/Observation",
            params={"subject": f"Patient/{listing[11]['patient']}", "code": "777-3"},
        )
    ).json()["entry"]
    for entry in counts:
        assert f'<g id="{entry["resource"]["id"]}"' in chart.text
    assert len(counts) == 13  # baseline and 12 weekly counts
    assert '<g id="baseline"' in chart.text
    assert chart.text.count('<g id="rescue-') == 1  # DEMO-12's rescue window


async def test_site_rules(app, client, demo_trial):
    listing = (await client.get("/fhir/$response-listing")).json()["rows"]
    at_s02 = next(row["patient"] for row in listing if row["site"] == "S02")
    monitor = bearer("monitor", ("S01",))
    report = (await client.get("/fhir/$trial-report", headers=monitor)).json()
    assert report["sites"] == ["S01"] and report["n_enrolled"] == 10
    assert [entry["site"] for entry in report["by_site"]] == ["S01"]
    mine = (await client.get("/fhir/$response-listing", headers=monitor)).json()["rows"]
    assert {row["site"] for row in mine} == {"S01"}
    swimmer = (await client.get("/fhir/$swimmer-plot", headers=monitor)).text
    assert f"lane-{at_s02}" not in swimmer
    # Another site's patient does not exist for this caller.
    chart = await client.get(f"/fhir/Patient/{at_s02}/$platelet-chart", headers=monitor)
    assert chart.status_code == 404
    assert chart.json()["issue"][0]["code"] == "not-found"
    # A site the token does not grant is refused, not silently dropped.
    for path in ("$trial-report", "$response-listing", "$swimmer-plot", "$response-summary"):
        refused = await client.get(f"/fhir/{path}?site=S01,S02", headers=monitor)
        assert refused.status_code == 403, path
        assert refused.headers["content-type"].startswith("application/fhir+json")
        assert refused.json()["issue"][0]["code"] == "forbidden"
    # site= narrows an admin's report and a monitor's of two sites alike.
    both = bearer("monitor", ("S01", "S02"))
    for headers in ({}, both):
        narrowed = (await client.get("/fhir/$trial-report?site=S02", headers=headers)).json()
        assert narrowed["sites"] == ["S02"] and narrowed["n_enrolled"] == 10
        repeated = await client.get("/fhir/$trial-report?site=S01&site=S02", headers=headers)
        assert repeated.json()["n_enrolled"] == 20
    summary = (await client.get("/fhir/$response-summary?site=S02", headers=both)).json()
    assert summary["sites"] == ["S02"] and summary["patients"] == 10
    # A lab may not browse the trial's patients.
    lab = bearer("lab", ("S01",))
    assert (await client.get("/fhir/$trial-report", headers=lab)).status_code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/$trial-report?sites=S01",
        "/fhir/$response-listing?status=CR",
        "/fhir/$swimmer-plot?_pretty=true",
        "/fhir/Patient/x/$platelet-chart?site=S01",
        "/fhir/$response-summary?site=S01&bogus=1",
        "/fhir/$trial-report?site=S%2001",
        "/fhir/$trial-report?site=",
    ],
)
async def test_a_parameter_the_operation_does_not_take_is_a_400(client, path):
    response = await client.get(path)
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_pictures_and_listing_negotiate_their_media_types(client):
    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    svg = await client.get(f"/fhir/Patient/{patient_id}/$platelet-chart", headers={"Accept": "*/*"})
    assert svg.status_code == 200
    refused = await client.get("/fhir/$swimmer-plot", headers={"Accept": "application/json"})
    assert refused.status_code == 406
    assert refused.json()["issue"][0]["code"] == "not-supported"
    assert (
        await client.get("/fhir/$trial-report", headers={"Accept": "text/csv"})
    ).status_code == 406
    enrolled_only = (await create(client, builders.patient("S01-untreated"))).json()["id"]
    assert (await client.delete(f"/fhir/Patient/{enrolled_only}")).status_code == 204
    gone = await client.get(f"/fhir/Patient/{enrolled_only}/$platelet-chart")
    assert gone.status_code == 410


async def test_every_operation_is_audited_with_what_it_showed(app, client):
    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    await client.get("/fhir/$trial-report?site=S01")
    await client.get("/fhir/$response-listing")
    await client.get("/fhir/$swimmer-plot")
    await client.get(f"/fhir/Patient/{patient_id}/$platelet-chart")
    await client.get("/fhir/$trial-report?site=S09", headers=bearer("monitor", ("S01",)))
    events = await _events(client, app, action="E")
    by_operation = {e.get("outcomeDesc"): e for e in events}
    for operation in ("$trial-report", "$response-listing", "$swimmer-plot"):
        assert _shown(by_operation[operation]) == {f"Patient/{patient_id}/_history/1"}
    assert by_operation["$trial-report"]["entity"][0]["query"] == "site=S01"
    chart = by_operation["$platelet-chart"]
    assert chart["entity"][0]["what"]["reference"].startswith(f"Patient/{patient_id}")
    refused = [e for e in await _events(client, app) if e.get("outcomeDesc", "").startswith("403")]
    assert refused and refused[0]["outcome"] == "4"


async def test_edge_trials_no_responder_and_all_responders(client):
    """Every patient responds and keeps it; then a second site where none does."""
    for subject in ("S01-001", "S01-002"):
        patient_id = (await create(client, builders.patient(subject))).json()["id"]
        await create(client, builders.platelet_count(patient_id, "2025-03-03T07:00:00Z", 12))
        await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
        for day, value in (("03-10", 120), ("03-17", 130)):
            await post_count(client, patient_id, day, value)
    report = (await client.get("/fhir/$trial-report")).json()
    assert _proportion(report["orr"]) == pytest.approx((2, 2, *_clopper_pearson(2, 2)))
    assert report["orr"]["ci95_high"] == 1.0
    dor = report["duration_of_response_days"]
    assert dor == {"n": 2, "events": 0, "median": None, "ci95_low": None, "ci95_high": None}
    for subject in ("S02-001", "S02-002"):
        patient_id = (await create(client, builders.patient(subject, site="S02"))).json()["id"]
        await create(client, builders.platelet_count(patient_id, "2025-03-03T07:00:00Z", 12))
        await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
        await post_count(client, patient_id, "03-10", 14)
    s02 = (await client.get("/fhir/$trial-report?site=S02")).json()
    assert _proportion(s02["orr"]) == pytest.approx((0, 2, 0.0, _clopper_pearson(0, 2)[1]))
    assert s02["time_to_response_days"] == {"n": 0, "median": None, "min": None, "max": None}
    assert s02["duration_of_response_days"]["n"] == 0


async def test_safety_table_counts_grades_seriousness_causality_and_bleeding(client):
    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    serious = builders.adverse_event(patient_id, "2025-03-05", grade=3)
    serious["seriousness"]["coding"][0]["code"] = "serious"
    serious["suspectEntity"] = [
        {
            "instance": {"display": "NAD+"},
            "causality": [
                {"assessment": {"coding": [{"system": RELATED_SYSTEM, "code": "Possible"}]}}
            ],
        }
    ]
    await create(client, serious)
    unlikely = builders.adverse_event(patient_id, "2025-03-06", grade=2)
    unlikely["suspectEntity"] = [
        {
            "instance": {"display": "NAD+"},
            "causality": [
                {"assessment": {"coding": [{"system": RELATED_SYSTEM, "code": "Unlikely"}]}}
            ],
        }
    ]
    await create(client, unlikely)
    await create(client, builders.adverse_event(patient_id, "2025-03-07", bleeding=True))
    potential = builders.adverse_event(patient_id, "2025-03-08", grade=4)
    potential["actuality"] = "potential"
    await create(client, potential)
    report = (await client.get("/fhir/$trial-report")).json()
    assert report["adverse_events"] == {
        "events": 3,
        "patients": 1,
        "by_grade": {"1": 0, "2": 2, "3": 1, "4": 0, "5": 0},
        "serious": 1,
        "related": 1,
        "bleeding": 1,
    }
    (row,) = (await client.get("/fhir/$response-listing")).json()["rows"]
    assert row["adverse_events"] == 3


async def test_the_page_is_self_contained_and_its_policy_says_so(anonymous):
    """The page needs no token to load (it holds no data) and names nothing of another
    origin; its CSP allows its own script and origin only (inline styles for the SVGs)."""
    page = await anonymous.get("/report")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert all("http" not in sources and "*" not in sources for sources in policy.values())
    html = page.text
    assert "http://" not in html and "https://" not in html
    assert re.findall(r"<script(?![^>]*\ssrc=)", html) == []  # no inline script
    assets = re.findall(r'(?:src|href)="(/[^"]*)"', html)
    assert sorted(assets) == ["/report/report.css", "/report/report.js"]
    for asset in assets:
        response = await anonymous.get(asset)
        assert response.status_code == 200, asset
        # The SVG namespace is a name, never fetched; no other URL is in the files.
        text = response.text.replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text, asset
    assert (await anonymous.get("/fhir/$trial-report")).status_code == 401


async def test_an_empty_trial_and_a_patient_without_records(client):
    report = (await client.get("/fhir/$trial-report")).json()
    assert (report["n_enrolled"], report["sites"], report["by_site"]) == (0, [], [])
    assert report["orr"]["rate"] is None and report["duration_of_response_days"]["n"] == 0
    swimmer = await client.get("/fhir/$swimmer-plot")
    assert swimmer.status_code == 200 and "lane-" not in swimmer.text
    patient_id = (await create(client, builders.patient())).json()["id"]
    chart = await client.get(f"/fhir/Patient/{patient_id}/$platelet-chart")
    assert chart.status_code == 200 and chart.text.startswith("<?xml")
    (row,) = (await client.get("/fhir/$response-listing")).json()["rows"]
    assert (row["status"], row["treatment_start"], row["peak_count"]) == ("NE", None, None)
