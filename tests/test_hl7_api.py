"""POST /hl7/v2 beyond the corpus: HTTP answers, who may send, redelivery under concurrency,
one recompute per patient, the audit trail, and robustness against malformed input."""

from __future__ import annotations

import asyncio
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.hl7 import hl7v2
from app.hl7 import observations as mapping
from app.kit.codes import CodeSystems
from app.services import hl7_ingest
from app.services.response import response_observation_id
from app.settings import Settings
from tests import builders
from tests.conftest import bearer
from tests.hl7_support import ER7, enrol, lab_headers, platelet_counts, read_ack, rows, send


def oru(
    control_id: str = "MSG-1",
    *,
    subject: str = "S01-001",
    results: list[tuple[str, str, str, str]] | None = None,
    version: str = "2.5.1",
    message_type: str = "ORU^R01^ORU_R01",
    note: str | None = None,
) -> bytes:
    """An ORU^R01 from the central lab; each result is (filler order, value, status, time)."""
    segments = [
        f"MSH|^~\\&|LIS|CENTRAL LAB|ITP-TRIAL-API|TRIAL|20250310093000+0100||{message_type}|"
        f"{control_id}|P|{version}",
        f"PID|1||{subject}^^^ITP-TRIAL^RI||DOE^JANE",
    ]
    for order, value, status, when in results or [("FIL-1", "42", "F", "20250310081500")]:
        segments += [
            f"OBR|1||{order}^CENTRAL LAB|777-3^Platelets^LN|||{when}",
            f"OBX|1|NM|777-3^Platelets^LN||{value}|10*9/L^^UCUM|150-400|L|||{status}|||{when}",
        ]
        if note:
            segments.append(f"NTE|1|L|{note}")
    return ("\r".join(segments) + "\r").encode()


# --- HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [ER7, "text/plain", "text/plain; charset=ISO-8859-1", "TEXT/PLAIN"]
)
async def test_both_media_types_are_received(client, app, content_type):
    await enrol(client, "S01-001")
    body = oru().replace(
        b"DOE^JANE", "MÜLLER^JOSÉ".encode("latin-1" if "8859" in content_type else "utf-8")
    )
    ack = read_ack(await send(client, body, {**lab_headers(), "Content-Type": content_type}))
    assert ack.code == "AA", ack.text
    assert len(await platelet_counts(app)) == 1


async def test_a_byte_order_mark_and_crlf_are_tolerated(client, app):
    await enrol(client, "S01-001")
    body = "\ufeff".encode() + oru().replace(b"\r", b"\r\n")
    assert read_ack(await send(client, body)).code == "AA"
    assert len(await platelet_counts(app)) == 1


async def test_what_the_schema_allows_before_msh_arrives_intact_from_the_fuzzer(client, app):
    """The schema lets BOM, VT, CR, LF, tab and space precede MSH; the fuzzer's serializer
    sends them as UTF-8 (it used Latin-1 with "?" for the BOM: a 400 for a valid body)."""
    from tests.fuzz.hooks import er7_bytes

    await enrol(client, "S01-001")
    body = er7_bytes("\ufeff\x0b\r\n\t " + oru().decode())
    assert body.startswith("\ufeff".encode())
    assert read_ack(await send(client, body)).code == "AA"
    assert len(await platelet_counts(app)) == 1


@pytest.mark.parametrize("content_type", ["application/json", "application/fhir+json", None])
async def test_other_media_types_are_415_operation_outcomes(client, content_type):
    headers = lab_headers()
    headers.pop("Content-Type")
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.post("/hl7/v2", content=oru(), headers=headers)
    assert response.status_code == 415
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize(
    "body",
    [b"", b"hello", b'{"resourceType":"Observation"}', b"PID|1||S01-001\rOBX|1", b"xMSH|"],
    ids=["empty", "text", "json", "no MSH", "not at the start"],
)
async def test_a_body_that_is_not_hl7_is_a_400_operation_outcome(client, body):
    response = await send(client, body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "invalid"


@pytest.mark.parametrize(
    "body",
    [
        b"MSH|",
        b"MSH",
        b"\xef\xbb\xbf\x0b\r\n MSH|^~",
        b"MSH|^~&|LIS|LAB\rPID|1",
        # Found by schemathesis: a 500 (python-hl7 asserts its separators are distinct).
        b"\r\x0b\n\n\n\r\t\x0b\n\x0b\r\xef\xbb\xbf\r\n\n \r MSHallOf",
        b"MSH|^^\\&|LIS|LAB",
        b"MSH1^~\\&1LIS",
    ],
    ids=[
        "truncated",
        "bare",
        "noise before a short MSH",
        "three encoding characters",
        "letters as separators",
        "a separator twice",
        "a digit as field separator",
    ],
)
async def test_an_unreadable_msh_is_answered_ar(app, client, body):
    """The sender expects an ACK for anything that starts with MSH: an AR says the message
    was rejected, with an empty MSA-2 since no control id could be read."""
    ack = read_ack(await send(client, body))
    assert (ack.code, ack.acknowledged) == ("AR", "")
    assert [error[:2] for error in ack.errors] == [("102", "MSH^1")]
    assert await rows(app, "SELECT id FROM resource") == []


async def test_a_message_with_a_broken_header_is_answered_ar_not_500(client):
    """MSH-9 empty and MSH-10 missing: still an MSH, so still an ACK."""
    body = b"MSH|^~\\&|LIS|CENTRAL LAB|ITP|TRIAL|20250310||||P|2.5\rPID|1||S01-001\r"
    ack = read_ack(await send(client, body))
    assert ack.code == "AR"
    assert {code for code, _, _ in ack.errors} == {"200", "101"}


# --- who may send -------------------------------------------------------------------------


async def test_a_request_without_a_token_is_401(anonymous):
    response = await anonymous.post("/hl7/v2", content=oru(), headers={"Content-Type": ER7})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("role", "scope"),
    [("monitor", None), ("lab", "user/Observation.rus user/Patient.rs")],
    ids=["monitor", "lab without create scope"],
)
async def test_roles_and_scopes_that_may_not_ingest_get_403(client, app, role, scope):
    await enrol(client, "S01-001")
    headers = {**bearer(role, ("S01",), scope=scope), "Content-Type": ER7}
    response = await send(client, oru(), headers)
    assert response.status_code == 403
    assert response.json()["issue"][0]["code"] == "forbidden"
    assert await platelet_counts(app) == {}


async def test_an_admin_sends_for_any_site(client):
    await enrol(client, "S02-001@S02")
    headers = {**bearer("admin", ()), "Content-Type": ER7}
    ack = read_ack(await send(client, oru(subject="S02-001"), headers))
    assert ack.code == "AA", ack.text


async def test_a_correction_needs_the_update_scope(client, app):
    await enrol(client, "S01-001")
    headers = lab_headers()
    no_update = {**bearer("lab", ("S01",), scope="user/Observation.crs user/Patient.rs")}
    no_update["Content-Type"] = ER7
    assert read_ack(await send(client, oru("M1"), headers)).code == "AA"
    correction = oru("M2", results=[("FIL-1", "24", "C", "20250310081500")])
    refused = read_ack(await send(client, correction, no_update))
    assert refused.code == "AE" and refused.errors[0][0] == "207", refused.text
    assert "update" in refused.errors[0][2]
    (stored,) = (await platelet_counts(app)).values()
    assert stored["version"] == 1


@pytest.mark.parametrize("status", ["C", "F", "P"])
async def test_a_result_cannot_move_to_another_patient(client, app, status):
    """The result identifier (order and OBX-1) names one result of one patient: a message
    that sends it for another patient is an AE, whatever its status, and changes nothing."""
    patients = await enrol(client, "S01-001", "S01-002")
    first = oru("M1", results=[("FIL-1", "42", "P", "20250310081500")])
    assert read_ack(await send(client, first)).code == "AA"
    other = oru("M2", subject="S01-002", results=[("FIL-1", "24", status, "20250310081500")])
    refused = read_ack(await send(client, other))
    assert refused.code == "AE", refused.text
    assert [(code, where) for code, where, _ in refused.errors] == [("205", "OBX^1")]
    assert "another patient" in refused.errors[0][2]
    (stored,) = (await platelet_counts(app)).values()
    assert stored["version"] == 1
    assert stored["resource"]["subject"] == {"reference": f"Patient/{patients['S01-001']}"}


# --- redelivery and concurrency -----------------------------------------------------------


async def test_concurrent_redeliveries_get_one_ack_and_store_once(client, app):
    await enrol(client, "S01-001")
    body = oru(results=[("FIL-1", "42", "F", "20250310081500"), ("FIL-2", "47", "F", "20250311")])
    replies = await asyncio.gather(*(send(client, body) for _ in range(8)))
    texts = {read_ack(reply).text for reply in replies}
    assert len(texts) == 1, texts
    assert len(await platelet_counts(app)) == 2
    assert (await rows(app, "SELECT count(*) FROM hl7_message"))[0][0] == 1


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_unique_key_holds_when_deliveries_are_not_serialised(client, app, monkeypatch):
    """Without the advisory lock, racing deliveries both get past the lookup; the unique
    key refuses the second row, its transaction rolls back, and it answers the first ACK."""

    async def no_lock(conn: Any, key: Any) -> None:
        return None

    monkeypatch.setattr(hl7_ingest, "serialise_deliveries", no_lock)
    await enrol(client, "S01-001")
    body = oru()
    replies = await asyncio.gather(*(send(client, body) for _ in range(6)))
    assert len({read_ack(reply).text for reply in replies}) == 1
    assert len(await platelet_counts(app)) == 1
    assert (
        await rows(
            app,
            "SELECT count(*) FROM resource_version WHERE method = 'create' "
            "AND resource_type = 'Observation' AND id NOT LIKE 'rs-%'",
        )
    )[0][0] == 1


async def test_a_preliminary_and_its_final_sent_at_once_leave_one_final_result(client, app):
    await enrol(client, "S01-001")
    preliminary = oru("P-1", results=[("FIL-9", "38", "P", "20250310081500")])
    final = oru("F-1", results=[("FIL-9", "38", "F", "20250310081500")])
    replies = await asyncio.gather(send(client, preliminary), send(client, final))
    assert [read_ack(reply).code for reply in replies] == ["AA", "AA"]
    (stored,) = (await platelet_counts(app)).values()
    assert stored["resource"]["status"] == "final"


async def test_the_same_control_id_from_two_senders_is_two_messages(client, app):
    await enrol(client, "S01-001")
    first = read_ack(await send(client, oru("1"), lab_headers(sub="lab-a")))
    other = oru("1", results=[("FIL-7", "51", "F", "20250312")])
    second = read_ack(await send(client, other, lab_headers(sub="lab-b")))
    assert (first.code, second.code) == ("AA", "AA")
    assert first.text != second.text
    assert len(await platelet_counts(app)) == 2


async def test_an_ae_is_not_remembered_so_the_resend_after_enrolment_is_stored(client, app):
    """A lab resends an AE'd message once the site has fixed the cause (the same MSH-10)."""
    refused = read_ack(await send(client, oru("LATE-1")))
    assert refused.code == "AE" and refused.errors[0][0] == "204"
    await enrol(client, "S01-001")
    accepted = read_ack(await send(client, oru("LATE-1")))
    assert accepted.code == "AA", accepted.text
    assert len(await platelet_counts(app)) == 1


async def test_one_result_twice_in_a_message_is_refused(client, app):
    await enrol(client, "S01-001")
    body = oru(results=[("FIL-1", "42", "F", "20250310"), ("FIL-1", "43", "F", "20250310")])
    ack = read_ack(await send(client, body))
    assert ack.code == "AE" and ack.errors[0][:2] == ("205", "OBX^2^1"), ack.text
    assert await platelet_counts(app) == {}


async def test_every_problem_of_a_message_is_reported_at_once(client, app):
    await enrol(client, "S01-001")
    body = oru(
        results=[
            ("FIL-1", "lots", "F", "20250310"),
            ("FIL-2", "42", "Q", "20250310"),
            ("FIL-3", "42", "F", "2025-03-10"),
            ("FIL-4", "42", "", "20250310"),
        ]
    )
    ack = read_ack(await send(client, body))
    assert ack.code == "AE"
    assert [(code, where) for code, where, _ in ack.errors] == [
        ("102", "OBX^1^5"),
        ("103", "OBX^2^11"),
        ("102", "OBX^3^14"),
        ("101", "OBX^4^11"),
    ]
    assert await platelet_counts(app) == {}


# --- response, audit ----------------------------------------------------------------------


async def test_a_message_recomputes_each_patient_once(client, app):
    patients = await enrol(client, "S01-001")
    patient_id = patients["S01-001"]
    dose = builders.administration(patient_id, "2025-03-03T08:00:00Z")
    response = await client.post(
        "/fhir/MedicationAdministration",
        json=dose,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 201
    status_id = response_observation_id(patient_id)

    async def status_versions() -> int:
        return len((await client.get(f"/fhir/Observation/{status_id}/_history")).json()["entry"])

    before = await status_versions()
    # A baseline before the first dose and two counts after it: each alone would change
    # the assessment, so a recompute per OBX would write three versions.
    body = oru(
        results=[
            ("FIL-1", "12", "F", "20250301080000"),
            ("FIL-2", "45", "F", "20250310080000"),
            ("FIL-3", "61", "F", "20250318080000"),
        ]
    )
    assert read_ack(await send(client, body)).code == "AA"
    assert await status_versions() == before + 1
    assessment = (await client.get(f"/fhir/Patient/{patient_id}/$response-status")).json()
    assert assessment["baseline"]["value"] == 12
    assert assessment["status"] == "R"


async def test_writes_and_refusals_are_audited(client, app):
    await enrol(client, "S01-001")
    assert read_ack(await send(client, oru("AUD-1"))).code == "AA"
    assert read_ack(await send(client, oru("AUD-1"))).code == "AA"  # a redelivery
    assert read_ack(await send(client, oru("AUD-2", subject="S01-404"))).code == "AE"
    await app.state.services.audit.flush()
    events = [
        orjson.loads(content)
        for (content,) in await rows(app, "SELECT content FROM audit_event ORDER BY seq")
    ]
    about = [event for event in events if "AUD-" in event.get("outcomeDesc", "")]
    created = [e for e in about if e["action"] == "C"]
    assert len(created) == 1
    assert created[0]["agent"][0]["who"]["identifier"]["value"] == "central-lab-interface"
    assert "AUD-1" in created[0]["outcomeDesc"]
    messages = [(e["outcome"], e["outcomeDesc"]) for e in about if e["action"] == "E"]
    assert [outcome for outcome, _ in messages] == ["0", "0", "4"]
    assert "1 created" in messages[0][1]
    assert "redelivery" in messages[1][1]
    assert "Unknown patient" in messages[2][1]


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [{"PLT": "777-3"}, {"L|": "777-3"}, {"L|PLT": "718-7"}],
    ids=["no coding system", "no code", "not a platelet LOINC"],
)
def test_a_bad_local_code_mapping_stops_the_server(mapping):
    with pytest.raises(ValidationError, match="APP_HL7_LOCAL_CODES"):
        Settings(hl7_local_codes=mapping)


# --- robustness: whatever arrives, an ACK or a 400, never an error ------------------------

_FIELD = st.one_of(
    st.text(alphabet="AB19 .-|^~\\&<>=+/", max_size=12),
    st.sampled_from(["777-3^Plt^LN", "20250310", "202503100930-0030", "<^5", "K/uL", "F", "C"]),
)
_SEGMENT = st.builds(
    lambda name, fields: name + "|" + "|".join(fields),
    st.sampled_from(["PID", "ORC", "OBR", "OBX", "NTE", "SPM", "ZXX", "MSH", "obx", ""]),
    st.lists(_FIELD, max_size=16),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.lists(_FIELD, min_size=0, max_size=12),
    segments=st.lists(_SEGMENT, max_size=8),
)
def test_any_message_is_read_or_refused_never_crashes(header, segments):
    text = "\r".join(["MSH|^~\\&|" + "|".join(header), *segments])
    try:
        message = hl7v2.read(text.encode())
    except hl7v2.Unreadable:
        return
    try:
        oru_message = hl7v2.parse_oru(message)
    except hl7v2.Rejected as rejected:
        ack = hl7v2.ack(message, rejected.ack_code, rejected.problems)
    else:
        assert oru_message.patients
        for result in oru_message.results:
            try:
                mapping.check_keys(result)
                mapping.observation(
                    result,
                    patient_id="p",
                    loinc="777-3",
                    status="final",
                    header=oru_message.header,
                    trial_zone=ZoneInfo("Europe/Paris"),
                    code_systems=CodeSystems(),
                )
            except hl7v2.Rejected:
                pass
        ack = hl7v2.ack(message, "AA")
    assert ack.startswith("MSH|") and "\rMSA|" in ack
