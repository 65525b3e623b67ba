"""SDTM datasets (issue 17): every dataset fetched from `GET /sdtm/{domain}.{xpt|csv}`, read
back with pyreadstat (and the CSV with the csv module), and checked against the API's own
data: row counts against searches, LBSTRESN against the count's own value and unit,
LBBLFL against `$response-status`, study days around the first dose in the trial's time
zone (Europe/Paris here, so a UTC evening is the next day), RS against the status
Observation's `_history`. Both databases; the CLI on both too.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl
import pyreadstat
import pytest
from sqlalchemy import text

from app.engine import Criteria
from app.services import sdtm
from app.settings import Settings
from tests import builders
from tests.conftest import PROJECT_ROOT, client_for, running_app

ZONE = "Europe/Paris"
FIRST_DOSE = "2025-03-03T08:00:00Z"
# Independent of the app's table: the units this test sends and their factor to 10^9/L.
FACTORS = {"10*9/L": 1.0, "/uL": 0.001, "10*3/uL": 1.0}


@pytest.fixture
async def sdtm_app(database_url: str):
    settings = Settings(database_url=database_url, environment="test", study_id="ITP-TEST")
    async with running_app(settings, criteria=Criteria(trial_timezone=ZONE)) as application:
        yield application


@pytest.fixture
async def admin(sdtm_app):
    async with client_for(sdtm_app, role="admin") as http:
        yield http


async def _post(http: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    answer = await http.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert answer.status_code == 201, answer.text
    return answer.json()


def _ae(patient_id: str) -> dict[str, Any]:
    event = builders.adverse_event(patient_id, "2025-03-05T22:30:00Z", grade=3)
    event["event"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "25064002", "display": "Headache"}],
        "text": "headache after infusion",
    }
    event["seriousness"]["coding"][0]["code"] = "serious"
    event["outcome"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/adverse-event-outcome",
                "code": "resolved",
            }
        ]
    }
    event["suspectEntity"] = [
        {
            "instance": {"reference": f"Patient/{patient_id}"},
            "causality": [
                {
                    "assessment": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/"
                                "adverse-event-causality-assess",
                                "code": "possible",
                                "display": "Possible",
                            }
                        ]
                    }
                }
            ],
        }
    ]
    event["extension"].append({"url": sdtm.RESOLVE_DATE_EXTENSION, "valueDateTime": "2025-03-09"})
    return event


async def trial(http: httpx.AsyncClient) -> dict[str, Any]:
    """S01-002 (a responder) and S01-001 (never treated) at S01, S02-001 at S02; counts in
    several units, one entered in error, one deleted; rescue and concomitant drugs; an AE."""
    made: dict[str, Any] = {"counts": {}}
    responder = await _post(http, builders.patient("S01-002", "S01", gender="male"))
    untreated = await _post(http, builders.patient("S01-001", "S01"))
    other = await _post(http, builders.patient("S02-001", "S02"))
    made.update(responder=responder["id"], untreated=untreated["id"], other=other["id"])
    pid = responder["id"]
    for when in (FIRST_DOSE, "2025-03-10T08:00:00Z"):
        await _post(http, builders.administration(pid, when))
    await _post(
        http, builders.administration(pid, "2025-03-20T08:00:00Z", role="rescue", drug="IVIg")
    )
    await _post(
        http,
        builders.administration(
            pid, "2025-03-01T08:00:00Z", role="concomitant", drug="Eltrombopag"
        ),
    )
    counts = [
        ("2025-02-28T09:00:00Z", 14, "10*9/L"),  # before the baseline window's last count
        ("2025-03-02T10:00:00Z", 18000, "/uL"),  # the baseline: Paris 2 March, day -1
        ("2025-03-02T23:30:00Z", 19, "10*9/L"),  # Paris 3 March 00:30: day 1, after the dose?
        ("2025-03-03T12:00:00Z", 25, "10*3/uL"),  # day 1
        ("2025-03-10T09:00:00Z", 80, "10*9/L"),  # day 8
        ("2025-03-17T09:00:00Z", 110, "10*9/L"),  # day 15
        ("2025-03-24T09:00:00Z", 120, "10*9/L"),  # day 22
    ]
    for when, value, unit in counts:
        made["counts"][
            (await _post(http, builders.platelet_count(pid, when, value, unit=unit)))["id"]
        ] = (
            when,
            value,
            unit,
        )
    wrong = await _post(http, builders.platelet_count(pid, "2025-03-12T09:00:00Z", 500))
    wrong["status"] = "entered-in-error"
    assert (await http.put(f"/fhir/Observation/{wrong['id']}", json=wrong)).status_code == 200
    gone = await _post(http, builders.platelet_count(pid, "2025-03-13T09:00:00Z", 5))
    assert (await http.delete(f"/fhir/Observation/{gone['id']}")).status_code == 204
    made["excluded"] = {wrong["id"], gone["id"]}
    made["ae"] = (await _post(http, _ae(pid)))["id"]
    await _post(http, builders.administration(other["id"], FIRST_DOSE))
    await _post(http, builders.platelet_count(other["id"], "2025-03-01T09:00:00Z", 20))
    return made


async def fetch(
    http: httpx.AsyncClient, tmp_path: Path, code: str
) -> tuple[pl.DataFrame, Any, list[dict]]:
    """The XPT read back with pyreadstat (data and metadata) and the CSV's rows."""
    xpt = await http.get(f"/sdtm/{code}.xpt")
    assert xpt.status_code == 200, xpt.text
    path = tmp_path / f"{code}.xpt"
    path.write_bytes(xpt.content)
    frame, meta = pyreadstat.read_xport(str(path), output_format="polars")
    table = await http.get(f"/sdtm/{code}.csv")
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    return frame, meta, list(csv.DictReader(io.StringIO(table.text)))


def _check_shape(code: str, frame: pl.DataFrame, meta: Any, rows: list[dict]) -> None:
    dataset = sdtm.DOMAINS[code]
    assert frame.columns == dataset.names
    assert meta.column_labels == [v.label for v in dataset.variables]
    assert meta.table_name == dataset.code
    assert all(len(n) <= 8 for n in frame.columns) and all(len(x) <= 40 for x in meta.column_labels)
    assert len(rows) == frame.height
    if code != "dm":
        keys = [(r["USUBJID"], r[f"{dataset.code}SEQ"]) for r in frame.iter_rows(named=True)]
        assert keys == sorted(keys), "rows sorted by USUBJID and --SEQ"
        assert len(set(keys)) == len(keys), "--SEQ unique per subject"
    # CSV: the same columns and values.
    for xpt_row, csv_row in zip(frame.iter_rows(named=True), rows, strict=True):
        assert list(csv_row) == dataset.names
        for name in dataset.names:
            value = xpt_row[name]
            if isinstance(value, float):
                assert (csv_row[name] == "") if value != value else float(csv_row[name]) == value
            else:
                assert csv_row[name] == (value or "")


async def test_every_dataset_against_the_api(admin, tmp_path) -> None:
    made = await trial(admin)
    data = {code: await fetch(admin, tmp_path, code) for code in sdtm.DOMAINS}
    for code, (frame, meta, rows) in data.items():
        _check_shape(code, frame, meta, rows)
    pid = made["responder"]
    usubjid = "ITP-TEST-S01-002"

    # DM: one row per patient, sorted by USUBJID; the untreated one has no actual arm.
    dm = data["dm"][0]
    patients = (await admin.get("/fhir/Patient?_summary=count")).json()["total"]
    assert dm.height == patients == 3
    assert dm["USUBJID"].to_list() == ["ITP-TEST-S01-001", "ITP-TEST-S01-002", "ITP-TEST-S02-001"]
    row = dm.filter(pl.col("USUBJID") == usubjid).row(0, named=True)
    assert row["SUBJID"] == "S01-002" and row["SITEID"] == "S01" and row["SEX"] == "M"
    assert row["RFSTDTC"] == row["RFXSTDTC"] == "2025-03-03T09:00:00"  # Paris
    assert row["RFXENDTC"] == "2025-03-10T09:00:00"
    assert row["BRTHDTC"] == "1968-04-12" and row["AGE"] == 56 and row["AGEU"] == "YEARS"
    assert row["ACTARMCD"] == row["ARMCD"]
    untreated = dm.filter(pl.col("SUBJID") == "S01-001").row(0, named=True)
    assert untreated["ACTARMCD"] == "" and untreated["ARMNRS"] == "ASSIGNED, NOT TREATED"

    # EX and CM: the study drug; rescue and concomitant drugs with their category.
    ex = data["ex"][0]
    study_drug = (
        await admin.get("/fhir/MedicationAdministration?medication-role=study-drug&_summary=count")
    ).json()["total"]
    assert ex.height == study_drug == 3
    assert ex.filter(pl.col("USUBJID") == usubjid)["EXSTDY"].to_list() == [1.0, 8.0]
    cm = data["cm"][0]
    assert sorted(zip(cm["CMTRT"].to_list(), cm["CMCAT"].to_list(), strict=True)) == [
        ("Eltrombopag", "CONCOMITANT"),
        ("IVIg", "RESCUE"),
    ]
    assert cm.filter(pl.col("CMTRT") == "Eltrombopag")["CMSTDY"].to_list() == [-2.0]

    # LB: every platelet count but the entered-in-error and deleted ones.
    lb = data["lb"][0]
    searched = (
        await admin.get("/fhir/Observation?code=777-3&status:not=entered-in-error&_count=100")
    ).json()
    assert lb.height == len(searched["entry"])
    assert not set(lb["LBSPID"].to_list()) & made["excluded"]
    for row in lb.filter(pl.col("USUBJID") == usubjid).iter_rows(named=True):
        when, value, unit = made["counts"][row["LBSPID"]]
        assert row["LBSTRESN"] == pytest.approx(value * FACTORS[unit])
        assert row["LBORRESU"] == unit and float(row["LBORRES"]) == value
        assert (
            row["LBTESTCD"] == "PLAT"
            and row["LBCAT"] == "HEMATOLOGY"
            and row["LBSTRESU"] == "10^9/L"
        )
    days = dict(zip(lb["LBDTC"].to_list(), lb["LBDY"].to_list(), strict=True))
    assert days["2025-03-02T11:00:00"] == -1  # the day before the first dose: no day 0
    assert days["2025-03-03T00:30:00"] == 1  # 23:30 UTC on 2 March is 3 March in Paris
    assert days["2025-03-03T13:00:00"] == 1
    assert days["2025-03-10T10:00:00"] == 8
    assert days["2025-02-28T10:00:00"] == -3
    # LBBLFL: the count $response-status took as baseline, and only it.
    for patient in (pid, made["other"]):
        status = (await admin.get(f"/fhir/Patient/{patient}/$response-status")).json()
        flagged = lb.filter(pl.col("LBBLFL") == "Y")["LBSPID"].to_list()
        assert status["baseline"]["observation"] in flagged
    assert lb.filter(pl.col("LBBLFL") == "Y").height == 2

    # AE: coded, graded, serious, related, resolved.
    ae = data["ae"][0].row(0, named=True)
    assert ae["AESPID"] == made["ae"] and ae["AETERM"] == "headache after infusion"
    assert ae["AEDECOD"] == "Headache" and ae["AETOXGR"] == "3" and ae["AESER"] == "Y"
    assert ae["AEREL"] == "POSSIBLE" and ae["AEOUT"] == "RECOVERED/RESOLVED"
    assert ae["AESTDTC"] == "2025-03-05T23:30:00" and ae["AESTDY"] == 3
    assert ae["AEENDTC"] == "2025-03-09" and ae["AEENDY"] == 7

    # RS: one OVRLRESP per change of the status in its _history, one BESTRESP per patient.
    rs = data["rs"][0]
    for patient, subject in ((pid, usubjid), (made["untreated"], "ITP-TEST-S01-001")):
        status = (await admin.get(f"/fhir/Patient/{patient}/$response-status")).json()
        observation = status["observation"]
        history = (await admin.get(f"/fhir/{observation}/_history?_count=100")).json()
        values = [
            e["resource"]["valueCodeableConcept"]["coding"][0]["code"]
            for e in reversed(history["entry"])
        ]
        changes = [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]
        mine = rs.filter(pl.col("USUBJID") == subject)
        assert mine.filter(pl.col("RSTESTCD") == "OVRLRESP")["RSORRES"].to_list() == changes
        best = mine.filter(pl.col("RSTESTCD") == "BESTRESP")["RSSTRESC"].to_list()
        assert best == [status["best_response"] or "NE"]
        assert set(mine["RSEVAL"].to_list()) == {"COMPUTED"}
    assert len(changes) >= 1 and rs.filter(pl.col("RSTESTCD") == "BESTRESP").height == 3
    responder_changes = rs.filter(
        (pl.col("USUBJID") == usubjid) & (pl.col("RSTESTCD") == "OVRLRESP")
    )["RSORRES"].to_list()
    assert "CR" in responder_changes or "R" in responder_changes


async def test_datasets_hold_the_callers_sites_and_are_audited(admin, sdtm_app, tmp_path) -> None:
    await trial(admin)
    async with client_for(sdtm_app, role="monitor", sites=("S02",), sub="monitor-2") as monitor:
        dm = (await fetch(monitor, tmp_path, "dm"))[0]
        assert dm["SITEID"].to_list() == ["S02"]
        lb = (await fetch(monitor, tmp_path, "lb"))[0]
        assert set(lb["USUBJID"].to_list()) == {"ITP-TEST-S02-001"}
    for role in ("investigator", "lab"):
        async with client_for(sdtm_app, role=role) as other:
            assert (await other.get("/sdtm/dm.xpt")).status_code == 403
    assert (await admin.get("/sdtm/vs.xpt")).status_code in (400, 404)
    assert (await admin.get("/sdtm/dm.sas7bdat")).status_code in (400, 404)
    await sdtm_app.state.services.audit.flush()
    async with sdtm_app.state.services.db.read() as conn:
        audited = (
            (await conn.execute(text("SELECT content FROM audit_event WHERE agent = 'monitor-2'")))
            .scalars()
            .all()
        )
    assert {orjson.loads(c)["outcomeDesc"].split(":")[0] for c in audited} >= {
        "SDTM dm.xpt",
        "SDTM lb.csv",
    }


def test_domain_checks_refuse_what_xpt_v5_cannot_hold(tmp_path) -> None:
    long_name = sdtm.Domain("LB", "x", (sdtm.Variable("LBSTRESNX", "x"),), ())
    long_label = sdtm.Domain("LB", "x", (sdtm.Variable("LBSTRESN", "x" * 41),), ())
    for bad in (long_name, long_label):
        with pytest.raises(ValueError):
            sdtm.DatasetWriter(bad, tmp_path / "lb.xpt", "xpt")
    assert list(tmp_path.iterdir()) == []  # nothing opened, nothing left behind


def test_study_days_have_no_day_zero() -> None:
    from datetime import date

    first = date(2025, 3, 3)
    assert [sdtm.study_day(date(2025, 3, d), first) for d in (1, 2, 3, 4)] == [-2, -1, 1, 2]


def _run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "export", *args],
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "APP_ENVIRONMENT": "test",
            "APP_STUDY_ID": "ITP-TEST",
            "ITP_TRIAL_TIMEZONE": ZONE,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_the_cli_writes_the_same_datasets(admin, database_url, tmp_path) -> None:
    await trial(admin)
    (tmp_path / "served").mkdir()
    served = {code: await fetch(admin, tmp_path / "served", code) for code in ("lb", "rs")}
    out = tmp_path / "sdtm"
    done = _run_cli(database_url, "sdtm", str(out), "--format", "both")
    assert done.returncode == 0, done.stderr
    assert "lb.xpt" in done.stderr  # the progress bar names each dataset
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{code}.{fmt}" for code in sdtm.DOMAINS for fmt in ("xpt", "csv")
    )
    for code, (frame, _, _) in served.items():
        written, _ = pyreadstat.read_xport(str(out / f"{code}.xpt"), output_format="polars")
        assert written.equals(frame)


async def test_the_cli_writes_what_a_bulk_export_holds(admin, database_url, tmp_path) -> None:
    await trial(admin)
    out = tmp_path / "ndjson"
    done = _run_cli(database_url, "ndjson", str(out))
    assert done.returncode == 0, done.stderr
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    for resource_type in ("Patient", "Observation", "MedicationAdministration", "AdverseEvent"):
        ids = [
            orjson.loads(line)["id"]
            for item in manifest["output"]
            if item["type"] == resource_type
            for line in (out / item["url"]).read_bytes().splitlines()
        ]
        total = (await admin.get(f"/fhir/{resource_type}?_summary=count")).json()["total"]
        assert len(ids) == len(set(ids)) == total
