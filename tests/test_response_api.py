"""The response engine through the HTTP API: the rules' 15 worked examples on both databases,
recompute on every change, the classification of every record, the server-owned status
Observation, the summary."""

from __future__ import annotations

import asyncio
import itertools
import random

import httpx
import pytest

from tests import builders
from tests.conftest import REASON, bearer
from tests.test_crud import create, new_patient

START = "2025-03-03T08:00:00Z"
BASELINE_TIME = "2025-03-03T07:00:00Z"


def at(day: str) -> str:
    return f"2025-{day}T09:00:00Z"


# (baseline value, unit), [(date, value, unit)], bleeding-grade dates, expected
EXAMPLES = {
    1: (
        (15, "10*9/L"),
        [("03-10", 60), ("03-17", 110), ("03-24", 125)],
        [],
        {
            "status": "CR",
            "best_response": "CR",
            "response_date": "2025-03-10",
            "time_to_response_days": 7,
            "complete_response_date": "2025-03-17",
            "time_to_complete_response_days": 14,
        },
    ),
    2: (
        (12, "10*9/L"),
        [("03-10", 35), ("03-17", 48)],
        [],
        {"status": "R", "best_response": "R", "time_to_response_days": 7},
    ),
    3: (
        (10, "10*9/L"),
        [("03-10", 120), ("03-14", 105)],
        [],
        {"status": "NR", "pending_confirmation": True, "time_to_response_days": None},
    ),
    4: (
        (8, "10*9/L"),
        [("03-10", 12), ("03-11", 14)],
        [],
        {"status": "NR", "best_response": "NR", "pending_confirmation": False},
    ),
    5: (
        (20, "10*9/L"),
        [("03-10", 35), ("03-17", 38)],
        [],
        {"status": "NR", "best_response": "NR"},
    ),
    6: (
        (10, "10*9/L"),
        [("03-10", 40), ("03-17", 45), ("04-07", 25), ("04-08", 22)],
        [],
        {"status": "LOR", "best_response": "R", "time_to_response_days": 7},
    ),
    7: (
        (10, "10*9/L"),
        [("03-10", 110), ("03-17", 130), ("04-07", 70), ("04-08", 65)],
        [],
        {"status": "R", "best_response": "CR"},
    ),
    8: (
        (10, "10*9/L"),
        [("03-10", 60), ("03-17", 65), ("03-24", 70)],
        ["03-10"],
        {"status": "R", "response_date": "2025-03-17", "time_to_response_days": 14},
    ),
    10: (
        (15000, "/uL"),
        [("03-10", 95000, "/uL"), ("03-17", 102, "10*3/uL"), ("03-24", 110, "10*9/L")],
        [],
        {"status": "CR", "time_to_response_days": 7, "time_to_complete_response_days": 14},
    ),
}


# One subject, one patient: each patient a test enrols gets its own subject number.
_SUBJECTS = itertools.count(1)


async def enrol_and_treat(client: httpx.AsyncClient, baseline: tuple[float, str]) -> str:
    patient_id = await new_patient(client, f"S01-{next(_SUBJECTS):03d}")
    await create(
        client, builders.platelet_count(patient_id, BASELINE_TIME, baseline[0], unit=baseline[1])
    )
    await create(client, builders.administration(patient_id, START))
    return patient_id


async def post_count(client, patient_id: str, day: str, value: float, unit: str = "10*9/L") -> str:
    body = builders.platelet_count(patient_id, at(day), value, unit=unit)
    return (await create(client, body)).json()["id"]


async def status_of(client, patient_id: str) -> dict:
    response = await client.get(f"/fhir/Patient/{patient_id}/$response-status")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("number", sorted(EXAMPLES))
async def test_worked_example(client, number):
    baseline, counts, bleeding_days, expected = EXAMPLES[number]
    patient_id = await enrol_and_treat(client, baseline)
    for day in bleeding_days:
        await create(client, builders.bleeding_grade(patient_id, at(day), 2))
    for count in counts:
        await post_count(client, patient_id, *count)
    assessment = await status_of(client, patient_id)
    for key, value in expected.items():
        assert assessment[key] == value, (number, key, assessment)
    assert assessment["baseline"]["value"] == pytest.approx(
        baseline[0] / (1000 if baseline[1] == "/uL" else 1)
    )
    assert assessment["treatment_start"].startswith("2025-03-03T08:00")
    assert assessment["criteria"]["r_threshold"] == 30.0


async def test_example_6_episode_duration(client):
    baseline, counts, _, _ = EXAMPLES[6]
    patient_id = await enrol_and_treat(client, baseline)
    for count in counts:
        await post_count(client, patient_id, *count)
    episodes = (await status_of(client, patient_id))["episodes"]
    assert [(e["start"], e["end"], e["duration_of_response_days"]) for e in episodes] == [
        ("2025-03-10", "2025-04-07", 28)
    ]


async def test_example_9_arrival_order_does_not_matter(client):
    orders = [[("03-10", 35), ("03-17", 48)], [("03-17", 48), ("03-10", 35)]]
    results = []
    for order in orders:
        patient_id = await enrol_and_treat(client, (12, "10*9/L"))
        for count in order:
            await post_count(client, patient_id, *count)
        assessment = await status_of(client, patient_id)
        # Ids differ between the two patients; all else is the same.
        assessment["classifications"] = [
            {k: v for k, v in item.items() if k != "id"} for item in assessment["classifications"]
        ]
        results.append(
            {
                k: v
                for k, v in assessment.items()
                if k not in ("patient", "computed_at", "observation", "evidence", "baseline")
            }
        )
    assert results[0] == results[1]
    assert len(results[0]["classifications"]) == 3
    assert results[0]["status"] == "R"


# Version 2's examples: first dose at 09:00, counts at 08:00 unless said.
V2_START = "2025-03-03T09:00:00Z"


def t(day: str, clock: str = "08:00") -> str:
    return f"2025-{day}T{clock}:00Z"


# counts [(time, value)], study-drug status, rescue time, WHO bleeding grade 2 times, expected
EXAMPLES_2 = {
    11: (
        [(t("03-03"), 12), (t("03-10", "10:00"), 40), (t("03-17"), 45)],
        "completed",
        None,
        [],
        {"status": "R", "response_date": "2025-03-10", "time_to_response_days": 7},
    ),
    12: (
        [(t("02-24"), 12), (t("03-03", "07:00"), 60), (t("04-28"), 40), (t("05-05"), 45)],
        "completed",
        t("02-25", "10:00"),
        [],
        {"status": "R", "response_date": "2025-04-28", "time_to_response_days": 56},
    ),
    13: (
        [(t("03-03"), 10), (t("03-03", "10:30"), 50), (t("03-10"), 45), (t("03-17"), 50)],
        "completed",
        None,
        [],
        {"status": "R", "response_date": "2025-03-10", "time_to_response_days": 7},
    ),
    14: (
        [(t("03-03"), 10), (t("03-10"), 40), (t("03-17"), 45), (t("04-07"), 50), (t("04-14"), 55)],
        "completed",
        None,
        [t("04-01", "11:00")],
        {
            "status": "R",
            "time_to_response_days": 7,
            "episodes": [
                {
                    "start": "2025-03-10",
                    "level": "R",
                    "end": "2025-04-01",
                    "duration_of_response_days": 22,
                    "cr_start": None,
                    "cr_end": None,
                    "cr_periods": [],
                },
                {
                    "start": "2025-04-07",
                    "level": "R",
                    "end": None,
                    "duration_of_response_days": 7,
                    "cr_start": None,
                    "cr_end": None,
                    "cr_periods": [],
                },
            ],
        },
    ),
    15: (
        [(t("03-03"), 12), (t("03-10"), 35), (t("03-17"), 48)],
        "stopped",
        None,
        [],
        {"status": "R", "response_date": "2025-03-10", "time_to_response_days": 7},
    ),
}


async def v2_patient(client: httpx.AsyncClient, number: int) -> tuple[str, dict[str, str]]:
    """Example `number` of version 2 posted; the patient and the ids of what was posted."""
    counts, dose_status, rescue, bleeds, _ = EXAMPLES_2[number]
    patient_id = await new_patient(client, f"S01-V2-{number}")
    ids: dict[str, str] = {}
    for when, value in counts:
        posted = await create(client, builders.platelet_count(patient_id, when, value))
        ids[when] = posted.json()["id"]
    dose = builders.administration(patient_id, V2_START, status=dose_status)
    ids["dose"] = (await create(client, dose)).json()["id"]
    if rescue is not None:
        given = builders.administration(patient_id, rescue, role="rescue", drug="IVIg")
        ids["rescue"] = (await create(client, given)).json()["id"]
    for when in bleeds:
        posted = await create(client, builders.bleeding_grade(patient_id, when, 2))
        ids[when] = posted.json()["id"]
    return patient_id, ids


@pytest.mark.parametrize("number", sorted(EXAMPLES_2))
async def test_worked_example_of_version_2(client, number):
    patient_id, _ = await v2_patient(client, number)
    assessment = await status_of(client, patient_id)
    for key, value in EXAMPLES_2[number][4].items():
        assert assessment[key] == value, (number, key, assessment)
    assert assessment["treatment_start"].startswith("2025-03-03T09:00")
    assert assessment["criteria"]["confirm_clock"] == "calendar"
    assert assessment["criteria"]["rules_version"] == 2


async def test_response_status_classifies_every_count_and_bleed(client):
    patient_id, ids = await v2_patient(client, 12)
    assessment = await status_of(client, patient_id)
    assert assessment["baseline"]["observation"] == ids[t("02-24")]
    excluded = "within 14 days after a rescue"
    assert [
        (c["id"], c["classification"], c["detail"], c["rescue"])
        for c in assessment["classifications"]
    ] == [
        (ids[t("02-24")], "baseline-candidate", "used as the baseline", None),
        (ids[t("03-03", "07:00")], "excluded-by-rescue", excluded, ids["rescue"]),
        (ids[t("04-28")], "qualifying-r", None, None),
        (ids[t("05-05")], "qualifying-r", None, None),
    ]
    first = assessment["classifications"][0]
    assert (first["resource_type"], first["date"], first["value"]) == (
        "Observation",
        "2025-02-24",
        12,
    )
    assert first["time"].startswith("2025-02-24T08:00:00")

    patient_id, ids = await v2_patient(client, 14)
    event = builders.adverse_event(patient_id, "2025-04-20", bleeding=True)
    event_id = (await create(client, event)).json()["id"]
    assessment = await status_of(client, patient_id)
    bleeds = [c for c in assessment["classifications"] if c["value"] is None]
    assert [(c["resource_type"], c["id"], c["classification"], c["detail"]) for c in bleeds] == [
        ("Observation", ids[t("04-01", "11:00")], "failing", "bleeding without a count"),
        ("AdverseEvent", event_id, "failing", "bleeding without a count"),
    ]
    assert assessment["status"] == "LOR"  # the event of 04-20 ends the second episode
    assert assessment["evidence"]["bleeding_events"] == [event_id]
    patient_id, _ = await v2_patient(client, 13)
    start_day = (await status_of(client, patient_id))["classifications"]
    assert [c["classification"] for c in start_day] == [
        "baseline-candidate",
        "not-evaluable",
        "qualifying-r",
        "qualifying-r",
    ]


async def test_a_count_that_decides_nothing_is_classified_without_a_new_status_version(client):
    patient_id = await enrol_and_treat(client, (8, "10*9/L"))
    await post_count(client, patient_id, "03-10", 12)
    status_path = (await status_of(client, patient_id))["observation"]
    version = (await client.get(f"/fhir/{status_path}")).json()["meta"]["versionId"]
    await post_count(client, patient_id, "03-17", 14)  # failing again: still NR
    assessment = await status_of(client, patient_id)
    assert [c["classification"] for c in assessment["classifications"]] == [
        "baseline-candidate",
        "failing",
        "failing",
    ]
    assert (await client.get(f"/fhir/{status_path}")).json()["meta"]["versionId"] == version


async def test_every_change_recomputes_and_entered_in_error_is_ignored(client):
    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    assert (await status_of(client, patient_id))["status"] == "NE"
    first = await post_count(client, patient_id, "03-10", 35)
    assert (await status_of(client, patient_id))["pending_confirmation"] is True
    second = await post_count(client, patient_id, "03-17", 48)
    assert (await status_of(client, patient_id))["status"] == "R"
    # A correction (with a mistyped value) takes the response away ...
    current = (await client.get(f"/fhir/Observation/{second}")).json()
    corrected = {
        **current,
        "status": "corrected",
        "valueQuantity": {**current["valueQuantity"], "value": 4.8},
    }
    assert (await client.put(f"/fhir/Observation/{second}", json=corrected)).status_code == 200
    assert (await status_of(client, patient_id))["status"] == "NR"
    # ... marking the bad count entered-in-error ignores it ...
    current = (await client.get(f"/fhir/Observation/{second}")).json()
    await client.put(f"/fhir/Observation/{second}", json={**current, "status": "entered-in-error"})
    assessment = await status_of(client, patient_id)
    assert assessment["status"] == "NR" and assessment["pending_confirmation"] is True
    # ... and deleting the first count leaves nothing evaluable after the start.
    await client.delete(f"/fhir/Observation/{first}")
    assert (await status_of(client, patient_id))["status"] == "NE"


async def test_rescue_and_bleeding_event_are_read(client):
    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    rescue = builders.administration(patient_id, "2025-03-09T08:00:00Z", role="rescue", drug="IVIg")
    rescue_id = (await create(client, rescue)).json()["id"]
    await post_count(client, patient_id, "03-10", 60)
    await post_count(client, patient_id, "03-17", 65)
    assessment = await status_of(client, patient_id)  # both under rescue: none evaluable
    assert (assessment["status"], assessment["status_reason"]) == ("NE", "no evaluable count")
    assert [c["classification"] for c in assessment["classifications"]] == [
        "baseline-candidate",
        "under-rescue",
        "under-rescue",
    ]
    assert {c["rescue"] for c in assessment["classifications"][1:]} == {rescue_id}
    other = await enrol_and_treat(client, (12, "10*9/L"))
    await create(client, builders.adverse_event(other, "2025-03-10", bleeding=True))
    await post_count(client, other, "03-10", 60)
    await post_count(client, other, "03-17", 65)
    await post_count(client, other, "03-24", 70)
    assessment = await status_of(client, other)
    assert assessment["response_date"] == "2025-03-17"  # the bleeding day cannot qualify


async def test_response_status_observation_is_versioned_and_server_owned(client):
    patient_id = await enrol_and_treat(client, (12, "10*9/L"))
    observation = (await status_of(client, patient_id))["observation"]
    await post_count(client, patient_id, "03-10", 35)
    await post_count(client, patient_id, "03-17", 48)
    # An unrelated write (a non-bleeding adverse event) changes nothing: no new version.
    await create(client, builders.adverse_event(patient_id, "2025-03-18"))
    resource = (await client.get(f"/fhir/{observation}")).json()
    assert resource["valueCodeableConcept"]["coding"][0]["code"] == "R"
    assert {"reference": f"Patient/{patient_id}"} == resource["subject"]
    assert resource["derivedFrom"]
    history = (await client.get(f"/fhir/{observation}/_history")).json()
    codes = [
        e["resource"]["valueCodeableConcept"]["coding"][0]["code"] for e in history.get("entry", [])
    ]
    # Newest first: enrolled (NE, not treated), treated (NE, no count since), pending (NR),
    # confirmed (R). The baseline count and the adverse event changed nothing: no version.
    assert codes == ["R", "NR", "NE", "NE"]
    notes = [e["resource"]["note"][0]["text"] for e in history.get("entry", [])[2:]]
    assert notes[0] != notes[1]
    assert [e["resource"]["meta"]["versionId"] for e in history.get("entry", [])] == [
        "4",
        "3",
        "2",
        "1",
    ]
    # Clients cannot create, change or delete it.
    forged = {**resource}
    forged.pop("id")
    assert (await client.post("/fhir/Observation", json=forged)).status_code == 403
    assert (await client.put(f"/fhir/{observation}", json=resource)).status_code == 403
    deleted = await client.delete(f"/fhir/{observation}")
    assert deleted.status_code == 403
    assert deleted.json()["issue"][0]["code"] == "forbidden"
    assert (await client.get(f"/fhir/{observation}")).status_code == 200


async def test_response_status_of_missing_or_deleted_patient(client):
    assert (await client.get("/fhir/Patient/nobody/$response-status")).status_code == 404
    patient_id = await new_patient(client)
    assert (await client.delete(f"/fhir/Patient/{patient_id}")).status_code == 204
    assert (await client.get(f"/fhir/Patient/{patient_id}/$response-status")).status_code == 410


async def test_summary_counts_and_response_rate(client):
    for baseline, counts in [
        ((12, "10*9/L"), [("03-10", 35), ("03-17", 48)]),  # R
        ((8, "10*9/L"), [("03-10", 12), ("03-11", 14)]),  # NR
        ((15, "10*9/L"), [("03-10", 110), ("03-17", 120)]),
    ]:  # CR
        patient_id = await enrol_and_treat(client, baseline)
        for count in counts:
            await post_count(client, patient_id, *count)
    await new_patient(client, "S01-099")  # NE: not treated yet
    summary = (await client.get("/fhir/$response-summary")).json()
    assert summary["patients"] == 4
    assert summary["evaluable"] == 3
    assert summary["by_status"] == {"CR": 1, "R": 1, "NR": 1, "LOR": 0, "NE": 1}
    assert summary["by_best_response"] == {"CR": 1, "R": 1, "NR": 1, "NE": 1}
    assert summary["overall_response_rate"] == pytest.approx(2 / 3, abs=1e-4)


async def test_summary_adds_up_patients_of_one_status_with_different_best_responses(client):
    """The database groups by status and best response together: two LOR patients (one
    lost R, one lost CR) are one status in two rows, and R is the best response of an R and
    of an LOR patient. The summary adds the rows up."""
    for baseline, counts in [
        (10, [("03-10", 40), ("03-17", 45)]),  # R, best R
        (10, [("03-10", 40), ("03-17", 45), ("04-07", 25), ("04-08", 22)]),  # LOR, best R
        (10, [("03-10", 110), ("03-17", 130), ("04-07", 25), ("04-08", 22)]),  # LOR, best CR
    ]:
        patient_id = await enrol_and_treat(client, (baseline, "10*9/L"))
        for count in counts:
            await post_count(client, patient_id, *count)
    summary = (await client.get("/fhir/$response-summary")).json()
    assert summary["by_status"] == {"CR": 0, "R": 1, "NR": 0, "LOR": 2, "NE": 0}
    assert summary["by_best_response"] == {"CR": 1, "R": 2, "NR": 0, "NE": 0}
    assert (summary["patients"], summary["evaluable"], summary["responders"]) == (3, 3, 3)


async def test_concurrent_results_for_one_patient_end_in_the_sequential_status(live_server):
    """Many counts for one patient at once through a real uvicorn end in the same status as
    posting them one by one (no stale status from interleaved recomputes)."""
    values = [35, 48, 60, 110, 120, 125, 130, 20, 18, 90, 140, 150]
    days = [f"03-{d:02d}" for d in range(10, 10 + len(values))]
    async with httpx.AsyncClient(
        base_url=live_server, timeout=60, headers={**bearer(), "X-Provenance": REASON}
    ) as http:
        sequential = await enrol_and_treat(http, (12, "10*9/L"))
        for day, value in zip(days, values, strict=True):
            await post_count(http, sequential, day, value)
        concurrent = await enrol_and_treat(http, (12, "10*9/L"))
        pairs = list(zip(days, values, strict=True))
        random.Random(7).shuffle(pairs)
        await asyncio.gather(*(post_count(http, concurrent, d, v) for d, v in pairs))
        expected = await status_of(http, sequential)
        actual = await status_of(http, concurrent)
    for key in (
        "status",
        "best_response",
        "response_date",
        "complete_response_date",
        "time_to_response_days",
        "episodes",
        "pending_confirmation",
    ):
        assert actual[key] == expected[key], key


async def test_deleting_a_count_and_posting_it_again_gives_the_same_result(client):
    patient_id = await enrol_and_treat(client, (15, "10*9/L"))
    ids = [
        await post_count(client, patient_id, day, value)
        for day, value in [("03-10", 60), ("03-17", 110), ("03-24", 125)]
    ]
    before = await status_of(client, patient_id)
    await client.delete(f"/fhir/Observation/{ids[1]}")
    assert (await status_of(client, patient_id))["status"] != before["status"]
    await post_count(client, patient_id, "03-17", 110)
    after = await status_of(client, patient_id)
    for key in (
        "status",
        "best_response",
        "response_date",
        "complete_response_date",
        "time_to_response_days",
        "time_to_complete_response_days",
        "episodes",
    ):
        assert after[key] == before[key], key


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_configured_code_makes_an_adverse_event_a_bleeding(settings):
    from app.main import create_app
    from tests.conftest import KEY, bearer

    local = "https://hospital.example/ae|BLEED"
    app = create_app(settings.model_copy(update={"bleeding_event_codes": [local]}), key_source=KEY)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", headers=bearer()) as http,
    ):
        patient_id = await enrol_and_treat(http, (10, "10*9/L"))
        event = builders.adverse_event(patient_id, "2025-03-10")
        event["event"] = {"coding": [{"system": "https://hospital.example/ae", "code": "BLEED"}]}
        await create(http, event)
        for day, value in (("03-10", 60), ("03-17", 65), ("03-24", 70)):
            await post_count(http, patient_id, day, value)
        assessment = await status_of(http, patient_id)
    assert assessment["response_date"] == "2025-03-17"  # 03-10 was a bleeding day
    assert assessment["evidence"]["bleeding_events"]


@pytest.mark.parametrize("how", ["update", "patch"])
async def test_a_count_moved_to_another_patient_recomputes_both(client, how):
    """A record moved between patients changes both responses: the patient it left is
    recomputed too, not only the one it joined."""
    first = await enrol_and_treat(client, (12, "10*9/L"))
    second = await enrol_and_treat(client, (12, "10*9/L"))
    moved = await post_count(client, first, "03-10", 35)
    assert (await status_of(client, first))["status"] == "NR"
    assert (await status_of(client, second))["status"] == "NE"  # no count after its start
    path = f"/fhir/Observation/{moved}"
    subject = {"reference": f"Patient/{second}"}
    if how == "update":
        current = (await client.get(path)).json()
        response = await client.put(path, json={**current, "subject": subject})
    else:
        response = await client.patch(
            path,
            json={"subject": subject},
            headers={"Content-Type": "application/merge-patch+json"},
        )
    assert response.status_code == 200, response.text
    left, joined = await status_of(client, first), await status_of(client, second)
    assert left["status"] == "NE" and left["status_reason"] == "no evaluable count"
    assert joined["status"] == "NR"  # the moved count is its first after the start
