"""POST /hl7/v2 beyond the corpus: HTTP answers, who may send, redelivery under concurrency,
one recompute per patient, the audit trail, and robustness against malformed input."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import hl7
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.hl7 import hl7v2
from app.hl7 import observations as mapping
from app.kit.codes import CodeSystems
from app.kit.limits import InputLimits
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
                context = mapping.MessageContext(
                    oru_message.header, ZoneInfo("Europe/Paris"), CodeSystems(), InputLimits()
                )
                mapping.observation(result, context, patient_id="p", loinc="777-3", status="final")
            except hl7v2.Rejected:
                pass
        ack = hl7v2.ack(message, "AA")
    assert ack.startswith("MSH|") and "\rMSA|" in ack


# --- the parts of a message, one by one ----------------------------------------------------
# What a lab's interface engine shows of an AE or AR is the ACK's text and locations: these
# pin the notation, each check and each message, without the HTTP round trip.


def _parsed(body: bytes) -> hl7v2.OruMessage:
    return hl7v2.parse_oru(hl7v2.read(body))


def _rejection(body: bytes) -> hl7v2.Rejected:
    with pytest.raises(hl7v2.Rejected) as raised:
        _parsed(body)
    return raised.value


def test_a_location_is_written_as_hl7_tools_write_it():
    assert str(hl7v2.Location("OBX", 1)) == "OBX"
    assert str(hl7v2.Location("OBX", 2)) == "OBX(2)"
    assert str(hl7v2.Location("OBX", 1, 5)) == "OBX-5"
    assert str(hl7v2.Location("OBX", 3, 6)) == "OBX(3)-6"
    assert hl7v2.Location("OBX", 3).at(14) == hl7v2.Location("OBX", 3, 14)
    rejected = hl7v2.Rejected("AE", [hl7v2.Problem("101", "first"), hl7v2.Problem("102", "second")])
    assert (str(rejected), rejected.ack_code) == ("first; second", "AE")
    assert hl7v2.Rejected.one("AR", "100", "why", hl7v2.Location("PID", 1)).problems == [
        hl7v2.Problem("100", "why", hl7v2.Location("PID", 1))
    ]


@pytest.mark.parametrize(
    ("body", "charset", "message"),
    [
        (oru(), "no-such-charset", "Unknown charset 'no-such-charset'"),
        (oru().replace(b"DOE", b"D\xc3"), "utf-8", "The body is not valid utf-8"),
        (oru().replace(b"DOE", b"D\x00E"), None, hl7v2._NUL_REFUSED),
        (oru().replace(b"DOE", b"D\\X00\\E"), None, hl7v2._NUL_REFUSED),
        (oru().replace(b"DOE", b"D\\X4100\\E"), None, hl7v2._NUL_REFUSED),
        (b"PID|1||S01-001\r" + oru(), None, "An HL7 v2 message starts with its MSH segment"),
    ],
    ids=["unknown charset", "not the charset", "NUL", "NUL escaped", "NUL second", "no MSH"],
)
def test_what_is_not_an_hl7_message_says_why(body, charset, message):
    with pytest.raises(hl7v2.Unreadable) as raised:
        hl7v2.read(body, charset)
    assert str(raised.value) == message


def test_a_body_is_read_whatever_its_line_endings_and_framing():
    expected = [str(segment) for segment in hl7v2.read(oru())]
    for body in (
        b"\x0b\r\n\t " + oru() + b"\x1c\r",
        oru().replace(b"\r", b"\n"),
        oru().replace(b"\r", b"\r\n"),
    ):
        assert [str(segment) for segment in hl7v2.read(body)] == expected
    # Latin-1 when the body is not UTF-8 and no charset is named; a hex escape that only
    # straddles two zero digits (\X1004\: bytes 10 and 04) is no NUL.
    latin = hl7v2.read(oru().replace(b"DOE", b"M\xdcLLER").replace(b"JANE", b"\\X1004\\"))
    assert hl7v2._text(latin.segment("PID"), 5) == "MÜLLER"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("MSH|^~\\&#|LIS|LAB", "MSH-2 must hold the four encoding characters ^~\\&"),
        ("MSH|^~\\^|LIS|LAB", "The MSH segment cannot be read"),
        ("MSH ^~\\& LIS", "The MSH segment cannot be read"),
        ("MSH|^~\\a|LIS", "The MSH segment cannot be read"),
    ],
    ids=["five encoding characters", "one twice", "space", "letter"],
)
def test_an_unreadable_header_says_what_is_wrong(header, message):
    with pytest.raises(hl7v2.Garbled) as raised:
        hl7v2.read(f"{header}\rPID|1||S01-001".encode())
    assert str(raised.value).startswith(message)


def test_the_ar_of_an_unreadable_header_answers_a_stand_in():
    garbled = hl7v2.Garbled("The MSH segment cannot be read")
    now = datetime(2025, 3, 10, 9, 30, tzinfo=UTC)
    stand_in, text = hl7v2.garbled_ack(garbled, now)
    assert str(stand_in[0]) == "MSH|^~\\&|"
    msh, msa, err = (str(segment) for segment in hl7.parse(text))
    assert re.fullmatch(
        r"MSH\|\^~\\&\|ITP-TRIAL-API\|{4}20250310093000\+0000\|\|ACK\^\^ACK\|\w+\|\|", msh
    )
    assert msa == "MSA|AR||The MSH segment cannot be read"
    # No version is readable: the ERR is written in the form of 2.5.
    assert err == "ERR||MSH^1|102^Data type error^HL70357|E||||The MSH segment cannot be read"


def _message(msh: str, *segments: str) -> bytes:
    return "\r".join([msh, *segments]).encode()


_PID = "PID|1||S01-001^^^ITP-TRIAL^RI"


def test_each_header_problem_is_an_ar_at_its_field():
    long_facility = "L" * 228
    body = _message(
        f"MSH|^~\\&|LIS|{long_facility}|ITP|TRIAL|2025031O||ADT^A01|{'C' * 200}|P|2.6", _PID
    )
    rejected = _rejection(body)
    assert rejected.ack_code == "AR"
    assert [(p.code, p.text, str(p.location)) for p in rejected.problems] == [
        (
            "200",
            "MSH-9 'ADT^A01': this endpoint receives lab results (ORU^R01) only",
            "MSH-9",
        ),
        ("203", "MSH-12 '2.6': versions 2.3, 2.3.1, 2.4, 2.5, 2.5.1 are received", "MSH-12"),
        ("102", "MSH-10 is longer than HL7 allows", "MSH-10"),
        ("102", "MSH-4 is longer than HL7 allows", "MSH-4"),
        ("102", "MSH-7 '2025031O' is not an HL7 timestamp", "MSH-7"),
    ]
    other_event = _message("MSH|^~\\&|" + "L" * 228 + "|LAB|||||ORU^R03||P|2.5", _PID)
    assert [(p.code, p.text, str(p.location)) for p in _rejection(other_event).problems] == [
        ("201", "MSH-9 'ORU^R03': only the R01 event is received", "MSH-9"),
        ("101", "MSH-10 (message control id) is required", "MSH-10"),
        ("102", "MSH-3 is longer than HL7 allows", "MSH-3"),
    ]


def test_the_header_names_the_sender_the_control_id_and_the_zone():
    limits = _message(
        "MSH|^~\\&|" + "A" * 227 + "|" + "F" * 227 + f"|||||ORU^R01|{'C' * 199}|P|2.3", _PID
    )
    head = _parsed(limits).header
    assert (len(head.sending_application), len(head.control_id)) == (227, 199)
    head = _parsed(oru()).header
    assert head == hl7v2.Header(
        sending_application="LIS",
        sending_facility="CENTRAL LAB",
        sending_facility_name="CENTRAL LAB",
        control_id="MSG-1",
        version="2.5.1",
        zone=timezone(timedelta(hours=1)),
    )
    no_facility = _message("MSH|^~\\&|LIS^1.2.3^ISO||||20250310||ORU^R01|M|P|2.4", _PID)
    head = _parsed(no_facility).header
    assert (head.sending_application, head.sending_facility) == ("LIS^1.2.3^ISO", "")
    assert (head.sending_facility_name, head.zone) == ("LIS", None)


@pytest.mark.parametrize(
    ("segments", "code", "text", "where"),
    [
        (
            [_PID, "OBR|1||F1", "OBX|1|NM|777-3^P^LN||42", "hello world"],
            "100",
            "Segment 5 ('hello world') is not an HL7 segment; a line break inside a field "
            "(e.g. in an NTE comment) must be sent as \\.br\\",
            "None",
        ),
        ([_PID, "MSH|^~\\&|X"], "100", "One message per request: a second MSH was found", None),
        (["OBR|1||F1"], "100", "OBR before any PID: whose results are these?", "OBR"),
        (
            [_PID, "OBR|1||F1", _PID, "OBX|1|NM|777-3^P^LN||42"],
            "100",
            "OBX outside an order: an OBR must precede it",
            "OBX",
        ),
        (["OBX|1|NM|777-3^P^LN||42"], "100", "OBX outside an order: an OBR must precede it", "OBX"),
        (["NTE|1||a comment", "SPM|1"], "100", "The message has no PID segment", "None"),
    ],
    ids=["not a segment", "second MSH", "OBR first", "OBX after a new PID", "OBX first", "no PID"],
)
def test_a_malformed_structure_is_an_ar_that_says_what_to_fix(segments, code, text, where):
    rejected = _rejection(_message("MSH|^~\\&|LIS|LAB|||||ORU^R01|M|P|2.5", *segments))
    assert rejected.ack_code == "AR"
    ((problem),) = rejected.problems
    assert (problem.code, problem.text) == (code, text)
    if where is not None:  # the second MSH is counted from the first after the header
        assert str(problem.location) == where


def test_the_segments_of_an_oru_are_grouped_as_the_standard_groups_them():
    body = _message(
        "MSH|^~\\&|LIS|CENTRAL LAB|||20250310093000-0500||ORU^R01|M|P|2.5",
        "",
        "PID|1||S01-001^^^ITP-TRIAL^RI~^^^X~4711^^^HOSP&1.2.250.1&ISO~99^^^LAB&1.2.3&L",
        "ORC|RE||ORC-9^ORC-NS",
        "OBR|1|||CBC|||20250310081500",
        "NTE|1||about the order",
        "OBX|1|NM|777-3^Platelets^LN^PLT^Plt^L||42^^^|10*9/L^^UCUM|150-400|L|||F|||202503100817",
        "NTE|1||first line~second line",
        "NTE|2||   ",
        "NTE|3||more",
        "SPM|1",
        "NTE|1||about the specimen",
        "PID|2||S01-002",
        "ORC|RE||ORC-1",
        "OBR|1||OBR-1^^LAB-NS",
        "OBX|1|SN|26515-7^^LN||<^5",
        "OBX|2|NM|26515-7^^LN||6",
        "PID|3||S01-003",
        "OBR|1||OBR-2",
        "OBX|1|NM|26515-7^^LN||7",
    )
    parsed = _parsed(body)
    first, second, third = parsed.patients
    assert first.location == hl7v2.Location("PID", 1)
    assert first.identifiers == [
        hl7v2.PatientIdentifier("S01-001", "ITP-TRIAL", None),
        hl7v2.PatientIdentifier("4711", "HOSP", "1.2.250.1"),
        hl7v2.PatientIdentifier("99", "LAB", None),
    ]
    assert [p.location.sequence for p in (second, third)] == [2, 3]
    assert second.identifiers == [hl7v2.PatientIdentifier("S01-002", "", None)]
    one, two, three, four = parsed.results
    assert one.location == hl7v2.Location("OBX", 1)
    assert (one.patient, one.set_id, one.value_type) == (first, "1", "NM")
    assert one.code == hl7v2.Coded("777-3", "Platelets", "LN", "PLT", "Plt", "L")
    assert one.value == ["42", "", "", ""]
    assert one.units == hl7v2.Coded("10*9/L", "", "UCUM")
    assert (one.reference_range, one.status, one.observed_at) == ("150-400", "F", "202503100817")
    assert one.notes == ["first line\nsecond line", "more"]
    assert one.order.location == hl7v2.Location("OBR", 1)
    assert (one.order.filler_number, one.order.filler_authority) == ("ORC-9", "ORC-NS")
    assert (one.order.filler_field, one.order.observed_at) == ("ORC-3", "20250310081500")
    assert one.order.notes == ["about the order"]
    assert [r.location for r in (two, three, four)] == [
        hl7v2.Location("OBX", 2),
        hl7v2.Location("OBX", 3),
        hl7v2.Location("OBX", 4),
    ]
    assert (two.patient, two.value, two.order.location.sequence) == (second, ["<", "5", "", ""], 2)
    assert (two.order.filler_number, two.order.filler_authority) == ("OBR-1", "LAB-NS")
    assert (two.order.filler_field, two.order.notes, two.notes) == ("OBR-3", [], [])
    assert three.order is two.order
    # Neither OBR-3 nor an ORC: the sending facility qualifies the number.
    assert (four.order.filler_number, four.order.filler_authority) == ("OBR-2", "CENTRAL LAB")
    assert four.patient is third
    # The hash of what follows MSH: a redelivery with another MSH-7 is the same message.
    # The hash of what follows MSH: a redelivery with another MSH-7 is the same message.
    resent = _parsed(body.replace(b"20250310093000-0500", b"20250310093500-0500"))
    assert resent.content_hash == parsed.content_hash
    assert _parsed(body.replace(b"||7", b"||8")).content_hash != parsed.content_hash
    assert (
        parsed.content_hash
        == hashlib.sha256(
            "\r".join(str(segment) for segment in hl7v2.read(body)[1:]).encode()
        ).hexdigest()
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025", (datetime(2025, 1, 1), 4, None)),
        ("202503", (datetime(2025, 3, 1), 6, None)),
        ("20250310", (datetime(2025, 3, 10), 8, None)),
        ("20250310093005.25", (datetime(2025, 3, 10, 9, 30, 5, 250000), 14, None)),
        (
            "202503100930-0030",
            (
                datetime(2025, 3, 10, 9, 30, tzinfo=timezone(-timedelta(minutes=30))),
                12,
                timezone(-timedelta(minutes=30)),
            ),
        ),
        (
            "20250310093000+1459",
            (
                datetime(2025, 3, 10, 9, 30, tzinfo=timezone(timedelta(hours=14, minutes=59))),
                14,
                timezone(timedelta(hours=14, minutes=59)),
            ),
        ),
    ],
)
def test_an_hl7_timestamp_keeps_its_precision_and_its_offset(value, expected):
    assert hl7v2.parse_timestamp(value) == expected


@pytest.mark.parametrize(
    "value", ["2025031", "202503100930.5", "2025-03-10", "20250310+1500", "20250310+0160"]
)
def test_what_is_not_an_hl7_timestamp_is_refused(value):
    with pytest.raises(ValueError):
        hl7v2.parse_timestamp(value)


_NOW = datetime(2025, 3, 10, 10, 30, tzinfo=timezone(timedelta(hours=1)))


def _ack_segments(version: str, code: hl7v2.AckCode, problems: list[hl7v2.Problem]) -> list[str]:
    body = _message(f"MSH|^~\\&|LIS^A|LAB^B|APP^C|FAC^D|20250310||ORU^R01|M-7|P^T|{version}", _PID)
    text = hl7v2.ack(hl7v2.read(body), code, problems, _NOW)
    assert text.endswith("\r")
    return [re.sub(r"\|\w{20}\|", "|ID|", segment) for segment in text.split("\r")[:-1]]


def test_an_ack_answers_its_message_in_its_version():
    assert _ack_segments("2.5.1", "AA", []) == [
        "MSH|^~\\&|APP^C|FAC^D|LIS^A|LAB^B|20250310093000+0000||ACK^R01^ACK|ID|P^T|2.5.1",
        "MSA|AA|M-7",
    ]
    # 2.3 has no message structure component (MSH-9.3).
    assert _ack_segments("2.3", "AA", [])[0] == (
        "MSH|^~\\&|APP^C|FAC^D|LIS^A|LAB^B|20250310093000+0000||ACK^R01|ID|P^T|2.3"
    )
    unnamed = hl7v2.ack(hl7v2.read(_message("MSH|^~\\&|LIS|LAB||||||M|P|2.4", _PID)), "AR")
    assert unnamed.startswith("MSH|^~\\&|ITP-TRIAL-API||LIS|LAB|")


def test_each_problem_is_an_err_in_the_form_of_the_messages_version():
    problems = [
        hl7v2.Problem("103", "Unknown unit 'x|y' " + "." * 80, hl7v2.Location("OBX", 2, 6)),
        hl7v2.Problem("100", "Segment out of place", hl7v2.Location("OBR", 3)),
        hl7v2.Problem("999", "No location"),
    ]
    modern = _ack_segments("2.5", "AE", problems)
    # MSA-3: the first problem's first 80 characters (escaped after the cut).
    assert modern[1] == "MSA|AE|M-7|Unknown unit 'x\\F\\y' " + "." * 61
    assert modern[2:] == [
        "ERR||OBX^2^6|103^Table value not found^HL70357|E||||Unknown unit 'x\\F\\y' " + "." * 80,
        "ERR||OBR^3|100^Segment sequence error^HL70357|E||||Segment out of place",
        "ERR|||999^^HL70357|E||||No location",
    ]
    old = _ack_segments("2.4", "AE", problems)
    assert old[2:] == [
        "ERR|OBX^2^6^103&Unknown unit 'x\\F\\y' " + "." * 61 + "&HL70357",
        "ERR|OBR^3^^100&Segment out of place&HL70357",
        "ERR|^^^999&No location&HL70357",
    ]


# --- an OBX as an Observation ----------------------------------------------------------------


def _result(obx: str, *, obr: str = "OBR|1||FIL-1^CENTRAL LAB||||20250310081500") -> Any:
    body = _message("MSH|^~\\&|LIS|CENTRAL LAB|||||ORU^R01|M|P|2.5", _PID, obr, obx)
    (result,) = _parsed(body).results
    return result


def _refusal(call: Any, *args: Any) -> tuple[str, str, str]:
    with pytest.raises(hl7v2.Rejected) as raised:
        call(*args)
    ((problem),) = raised.value.problems
    assert raised.value.ack_code == "AE"
    return problem.code, problem.text, str(problem.location)


def test_which_obx_is_a_platelet_count():
    local = {"L|PLT": "26515-7"}
    assert mapping.platelet_loinc(_result("OBX|1|NM|777-3^P^LN"), local) == "777-3"
    assert mapping.platelet_loinc(_result("OBX|1|NM|PLT^P^L^26515-7^P^LN"), {}) == "26515-7"
    assert mapping.platelet_loinc(_result("OBX|1|NM|PLT^P^L^718-7^Hb^LN"), local) == "26515-7"
    assert mapping.platelet_loinc(_result("OBX|1|NM|777-3^P^XX"), local) is None
    assert mapping.platelet_loinc(_result("OBX|1|NM|718-7^Hb^LN"), local) is None


def test_a_result_is_named_by_its_lab_order_and_set_id():
    result = _result("OBX|3|NM|777-3^P^LN", obr="OBR|1||FIL-1^LAB/B 2")
    systems = CodeSystems()
    assert mapping.identifier_systems(result, systems) == (
        "https://itp-trial.example/fhir/sid/lab-order/LAB%2FB%202",
        "https://itp-trial.example/fhir/sid/lab-result/LAB%2FB%202",
    )
    assert mapping.result_key(result, systems) == (
        "https://itp-trial.example/fhir/sid/lab-result/LAB%2FB%202",
        "FIL-1-3",
    )


def test_a_result_without_its_keys_is_refused_at_the_missing_field():
    assert _refusal(mapping.check_keys, _result("OBX||NM|777-3^P^LN")) == (
        "101",
        "OBX-1 (set id) is required for a platelet count: with the filler order number "
        "it names the result, so a correction can find it",
        "OBX-1",
    )
    assert _refusal(mapping.check_keys, _result("OBX|1|NM|777-3^P^LN", obr="OBR|1")) == (
        "101",
        "The filler order number (OBR-3, or ORC-3) is required for a platelet count",
        "OBR-3",
    )
    no_lab = _message("MSH|^~\\&|||||||ORU^R01|M|P|2.5", _PID, "OBR|1||F1", "OBX|1|NM|777-3")
    (result,) = _parsed(no_lab).results
    assert _refusal(mapping.check_keys, result) == (
        "101",
        "MSH-4 (or MSH-3) must name the lab: it qualifies the filler order number",
        "MSH-4",
    )
    mapping.check_keys(_result("OBX|1|NM|777-3^P^LN"))


def _observation(result: Any, zone: Any = None) -> dict[str, Any]:
    header = hl7v2.Header("LIS", "LAB", "LAB", "M", "2.5", zone)
    context = mapping.MessageContext(header, ZoneInfo("Europe/Paris"), CodeSystems(), InputLimits())
    return mapping.observation(
        result, context, patient_id="p-1", loinc="777-3", status="preliminary"
    )


def test_an_obx_becomes_the_trials_platelet_observation():
    result = _result("OBX|2|NM|777-3^Plt count^LN||42|10*9/L^^UCUM|150-400||||P|||202503100817")
    result.notes.extend(["first", "second"])
    base = "https://itp-trial.example/fhir/sid"
    assert _observation(result) == {
        "resourceType": "Observation",
        "identifier": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "FILL",
                            "display": "Filler Identifier",
                        }
                    ]
                },
                "system": f"{base}/lab-order/CENTRAL%20LAB",
                "value": "FIL-1",
            },
            {"system": f"{base}/lab-result/CENTRAL%20LAB", "value": "FIL-1-2"},
        ],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "777-3",
                    "display": "Platelets [#/volume] in Blood by Automated count",
                }
            ],
            "text": "Plt count",
        },
        "subject": {"reference": "Patient/p-1"},
        "effectiveDateTime": "2025-03-10T08:17:00+01:00",
        "valueQuantity": {
            "value": 42,
            "unit": "10*9/L",
            "system": "http://unitsofmeasure.org",
            "code": "10*9/L",
        },
        "referenceRange": [{"text": "150-400"}],
        "note": [{"text": "first"}, {"text": "second"}],
    }
    bare = _observation(_result("OBX|2|NM|PLT^^L^777-3^^LN||42|K/uL"))
    assert bare["code"] == {
        "coding": [
            {
                "system": "http://loinc.org",
                "code": "777-3",
                "display": "Platelets [#/volume] in Blood by Automated count",
            }
        ]
    }
    assert "referenceRange" not in bare and "note" not in bare
    alternate_text = _observation(_result("OBX|2|NM|PLT^^L^777-3^Platelets^LN||42|K/uL"))
    assert alternate_text["code"]["text"] == "Platelets"


@pytest.mark.parametrize(
    ("obx_14", "obr_7", "zone", "expected"),
    [
        ("2025", "", None, "2025"),
        ("202503", "", None, "2025-03"),
        ("20250310", "20240101", None, "2025-03-10"),
        ("2025031008", "", None, "2025-03-10T08:00:00+01:00"),
        ("20250710081500.5", "", None, "2025-07-10T08:15:00.500000+02:00"),
        ("202503100815-0300", "", timezone(timedelta(hours=5)), "2025-03-10T08:15:00-03:00"),
        ("202503100815", "", timezone(timedelta(hours=5)), "2025-03-10T08:15:00+05:00"),
        ("", "202503100815", None, "2025-03-10T08:15:00+01:00"),
    ],
)
def test_the_clinical_time_keeps_the_labs_precision_and_zone(obx_14, obr_7, zone, expected):
    result = _result(f"OBX|1|NM|777-3||42|K/uL||||||||{obx_14}", obr=f"OBR|1||F1^L||||{obr_7}")
    paris = ZoneInfo("Europe/Paris")
    assert mapping.clinical_time(result, zone or paris) == expected


def test_a_missing_or_malformed_clinical_time_is_refused_where_it_is():
    result = _result("OBX|1|NM|777-3||42|K/uL", obr="OBR|1||F1^L")
    assert _refusal(mapping.clinical_time, result, UTC) == (
        "101",
        "A platelet count needs its clinical time: OBX-14, or OBR-7 for the whole order",
        "OBX-14",
    )
    result = _result("OBX|1|NM|777-3||42|K/uL", obr="OBR|1||F1^L||||2025-03-10")
    assert _refusal(mapping.clinical_time, result, UTC) == (
        "102",
        "OBR-7 '2025-03-10' is not an HL7 timestamp (YYYYMMDDHHMM[SS])",
        "OBR-7",
    )
    result = _result("OBX|1|NM|777-3||42|K/uL||||||||10.3.2025")
    assert _refusal(mapping.clinical_time, result, UTC)[1:] == (
        "OBX-14 '10.3.2025' is not an HL7 timestamp (YYYYMMDDHHMM[SS])",
        "OBX-14",
    )


UCUM = "http://unitsofmeasure.org"


def _obx(value: str, units: str = "K/uL") -> Any:
    value_type, _, number = value.partition("|")
    return _result(f"OBX|1|{value_type}|777-3^P^LN||{number}|{units}")


@pytest.mark.parametrize(
    ("value", "units", "expected"),
    [
        (
            "NM|42",
            "10*9/L^^UCUM",
            {"value": 42, "unit": "10*9/L", "system": UCUM, "code": "10*9/L"},
        ),
        (
            "NM|42",
            "10*9/L^per nL^ucum",
            {"value": 42, "unit": "per nL", "system": UCUM, "code": "10*9/L"},
        ),
        ("NM|45000", "/uL", {"value": 45000, "unit": "/uL", "system": UCUM, "code": "/uL"}),
        ("NM|42", "K/uL", {"value": 42, "unit": "K/uL"}),
        ("NM|42", "^K/uL", {"value": 42, "unit": "K/uL"}),
        ("NM|42", "10*9/L^^L", {"value": 42, "unit": "10*9/L"}),
        ("NM|+42.50", "K/uL", {"value": 42.5, "unit": "K/uL"}),
        ("NM|42.", "K/uL", {"value": 42.0, "unit": "K/uL"}),
        ("ST|.5", "K/uL", {"value": 0.5, "unit": "K/uL"}),
        ("NM|0", "K/uL", {"value": 0, "unit": "K/uL"}),
        ("NM|0.000", "K/uL", {"value": 0.0, "unit": "K/uL"}),
        ("SN|<^5", "K/uL", {"value": 5, "unit": "K/uL", "comparator": "<"}),
        ("SN|>=^5", "K/uL", {"value": 5, "unit": "K/uL", "comparator": ">="}),
        ("SN|=^5", "K/uL", {"value": 5, "unit": "K/uL"}),
        ("SN|^5", "K/uL", {"value": 5, "unit": "K/uL"}),
    ],
)
def test_obx_5_and_6_become_a_quantity(value, units, expected):
    quantity = mapping.quantity(_obx(value, units), InputLimits())
    assert quantity == expected
    assert type(quantity["value"]) is type(expected["value"])


def test_an_integer_stays_one_within_a_doubles_exact_range():
    assert mapping._value(_obx("NM|9007199254740991")) == (None, 9007199254740991)
    beyond = mapping._value(_obx("NM|9007199254740993"))[1]
    assert beyond == 9007199254740992.0 and isinstance(beyond, float)


@pytest.mark.parametrize(
    ("value", "units", "code", "text", "where"),
    [
        ("NM|42", "", "101", "OBX-6 (units) is required for a platelet count", "OBX-6"),
        (
            "NM|42",
            "G/L^^XX",
            "103",
            "Unknown platelet count unit 'G/L' (OBX-6); accepted: UCUM 10*9/L, 10*3/uL, "
            "10*3/mm3, /uL, /mm3, 10*6/L, and lab spellings such as K/uL, x10^9/L, 10^9/L, "
            "x10E3/uL",
            "OBX-6",
        ),
        ("NM|42", "K/uL^^UCUM", "103", "Unknown platelet count unit 'K/uL'", "OBX-6"),
        ("NM|6000", "K/uL", "102", "OBX-5: 6000 K/uL is 6000 x10^9/L, above", "OBX-5"),
        (
            "SN|<>^5",
            "K/uL",
            "102",
            "OBX-5 '<>^5': a platelet count is one number, optionally with <, >, <= or >=",
            "OBX-5",
        ),
        ("SN|<^5^:^7", "K/uL", "102", "OBX-5 '<^5^:^7': a platelet count is one", "OBX-5"),
        ("SN|<^5^^7", "K/uL", "102", "OBX-5 '<^5^^7': a platelet count is one", "OBX-5"),
        ("NM|5^6", "K/uL", "102", "OBX-5 '5^6' is not a number (OBX-2 NM)", "OBX-5"),
        ("NM|5^^^7", "K/uL", "102", "OBX-5 '5^^^7' is not a number (OBX-2 NM)", "OBX-5"),
        ("NM|5^^:", "K/uL", "102", "OBX-5 '5^^:' is not a number (OBX-2 NM)", "OBX-5"),
        ("ST|", "K/uL", "102", "OBX-5 '(empty)' is not a number (OBX-2 ST)", "OBX-5"),
        ("NM|1e3", "K/uL", "102", "OBX-5 '1e3' is not a number (OBX-2 NM)", "OBX-5"),
        ("NM|-5", "K/uL", "102", "OBX-5 '-5': a count cannot be negative", "OBX-5"),
        ("NM|-0", "K/uL", "102", "OBX-5 '-0': a count cannot be negative", "OBX-5"),
        (
            "NM|0." + "0" * 400 + "1",
            "K/uL",
            "102",
            "OBX-5 '0.00000000000000000000000000000000000000' is too small to be stored as a "
            "number",
            "OBX-5",
        ),
    ],
)
def test_a_count_that_cannot_be_stored_is_refused_at_its_field(value, units, code, text, where):
    problem = _refusal(mapping.quantity, _obx(value, units), InputLimits())
    assert problem[0] == code and problem[1].startswith(text) and problem[2] == where
