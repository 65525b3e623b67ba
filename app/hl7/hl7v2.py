"""HL7 v2 ORU^R01 in, ACK out, in ER7 (the pipe-and-hat encoding).

python-hl7 reads and writes ER7: separators from MSH-1/MSH-2, repetitions, components,
escape sequences, timestamps. This module only says what the segments of an ORU^R01 mean
to the trial: the patients (PID), their orders (ORC/OBR), the results (OBX) and the comments
on them (NTE), in message order, as the standard groups them:
PID [ORC] OBR {OBX {NTE}} ... Segments the trial does not read (PV1, SPM, TQ1, Z-segments,
...) are allowed and skipped.

Errors follow HL7's two kinds: a message the receiver cannot take at all (wrong type,
version or structure) is rejected, AR; a well-formed message whose content cannot be
stored (unknown patient, unknown unit) is an application error, AE. Either way nothing is
stored and the ACK's ERR segments say what and where (HL7 table 0357 codes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal

import hl7
from hl7.exceptions import ParseException

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
# The receiving side of the ACK when the message names none (MSH-5/MSH-6 empty).
RECEIVER_NAME = "ITP-TRIAL-API"

# HL7 table 0357, message error condition codes.
ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}

AckCode = Literal["AA", "AE", "AR"]

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
# DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]. python-hl7 converts it, but it accepts
# trailing junk and odd digit counts, so the form is checked here first.
_DTM = re.compile(r"(?P<digits>\d{4}(?:\d{2}){0,5})(?P<fraction>\.\d{1,4})?(?P<offset>[+-]\d{4})?")
# Lengths the 2.5 tables allow (HD 227, ST 199 for MSH-10): longer is not HL7, and the
# redelivery key must stay indexable.
_MAX_HD, _MAX_CONTROL_ID = 227, 199


class Unreadable(Exception):
    """Not an HL7 v2 message at all: there is no MSH to answer with an ACK."""


class Garbled(Exception):
    """It starts with MSH, so the sender expects an ACK, but the MSH cannot be read: the
    answer is an AR built on a stand-in header (`garbled_ack`)."""


# What may come before MSH and is not part of the message: a byte order mark (Windows tools
# write one), MLLP's start block (0x0B), line breaks and blanks. The OpenAPI body pattern
# (app/ingest/routes.py) is built from the same characters.
LEADING_NOISE = "\ufeff\x0b\r\n\t "


@dataclass(frozen=True)
class Location:
    """Where an error is: ERR's segment id, its occurrence in the message, the field."""

    segment: str
    sequence: int
    field: int | None = None

    def __str__(self) -> str:
        # The usual notation of HL7 tools: OBX(3)-6 is field 6 of the third OBX.
        text = f"{self.segment}({self.sequence})" if self.sequence > 1 else self.segment
        return f"{text}-{self.field}" if self.field is not None else text

    def at(self, field_number: int) -> Location:
        return Location(self.segment, self.sequence, field_number)


@dataclass(frozen=True)
class Problem:
    code: str  # HL7 table 0357
    text: str
    location: Location | None = None


class Rejected(Exception):
    """The message is answered AE or AR; nothing of it is stored."""

    def __init__(self, ack_code: AckCode, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.text for p in problems))
        self.ack_code = ack_code
        self.problems = problems

    @classmethod
    def one(
        cls, ack_code: AckCode, code: str, text: str, location: Location | None = None
    ) -> Rejected:
        return cls(ack_code, [Problem(code, text, location)])


@dataclass(frozen=True)
class Coded:
    """A CE/CWE: identifier^text^coding system, and the alternate triplet after it."""

    identifier: str
    text: str
    system: str
    alternate_identifier: str = ""
    alternate_text: str = ""
    alternate_system: str = ""

    def codings(self) -> list[tuple[str, str, str]]:
        """(coding system, identifier, text) of the primary and the alternate coding."""
        pairs = [
            (self.system, self.identifier, self.text),
            (self.alternate_system, self.alternate_identifier, self.alternate_text),
        ]
        return [pair for pair in pairs if pair[1]]


@dataclass(frozen=True)
class Header:
    sending_application: str  # MSH-3 as sent (all components)
    sending_facility: str  # MSH-4 as sent
    sending_facility_name: str  # MSH-4.1, or MSH-3.1 when there is no facility
    control_id: str  # MSH-10
    version: str  # MSH-12
    zone: tzinfo | None  # MSH-7's UTC offset, the message's time zone, if it carries one


@dataclass(frozen=True)
class PatientIdentifier:
    """One repetition of PID-3 (CX)."""

    value: str
    authority: str  # CX.4.1, namespace of the assigning authority
    authority_oid: str | None  # CX.4.2 when CX.4.3 is ISO


@dataclass
class PatientGroup:
    location: Location
    identifiers: list[PatientIdentifier]


@dataclass
class Order:
    location: Location
    filler_number: str  # OBR-3.1, else ORC-3.1
    filler_authority: str  # the filler's namespace (EI.2 or EI.3), else the sending facility
    filler_field: str  # which field it came from, for messages
    observed_at: str  # OBR-7.1
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    """One OBX, with the order and the patient it belongs to."""

    location: Location
    patient: PatientGroup
    order: Order
    set_id: str  # OBX-1
    value_type: str  # OBX-2
    code: Coded  # OBX-3
    value: list[str]  # OBX-5, first repetition, its components
    units: Coded  # OBX-6
    reference_range: str  # OBX-7
    status: str  # OBX-11
    observed_at: str  # OBX-14.1
    notes: list[str] = field(default_factory=list)  # NTE-3 of the NTEs after it


@dataclass
class OruMessage:
    header: Header
    patients: list[PatientGroup]
    results: list[Result]
    content_hash: str  # of the segments after MSH: a redelivery's MSH may differ (MSH-7)


def _distinct_separators(text: str) -> bool:
    """MSH-1 (the field separator) and the characters of MSH-2 (the encoding characters;
    read() then requires four) are distinct, and none is a letter, digit or space: else no
    field of the message can be told from another."""
    header = text.split("\r", 1)[0]
    field_separator = header[3:4]
    end = header.find(field_separator, 4) if field_separator else -1
    encoding = header[4:end] if end != -1 else header[4:]
    separators = field_separator + encoding[:5]
    return len(set(separators)) == len(separators) and not any(
        c.isalnum() or c.isspace() for c in separators
    )


def read(body: bytes, charset: str | None = None) -> Any:
    """The message as python-hl7 parses it. Segments may end in CR (the standard), LF or
    CRLF (what files and HTTP tools produce); MLLP framing bytes are tolerated."""
    try:
        text = body.decode(charset or "utf-8")
    except LookupError:
        raise Unreadable(f"Unknown charset {charset!r}") from None
    except UnicodeDecodeError:
        if charset:
            raise Unreadable(f"The body is not valid {charset}") from None
        text = body.decode("latin-1")  # HL7's other common character set (8859/1)
    if "\x00" in text:
        raise Unreadable(_NUL_REFUSED)
    text = text.lstrip(LEADING_NOISE).rstrip()  # rstrip: also MLLP's end block 0x1C
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH"):
        raise Unreadable("An HL7 v2 message starts with its MSH segment")
    try:
        if not _distinct_separators(text):
            raise ValueError("separators")
        message = hl7.parse(text)
    # python-hl7 checks some separator inputs with `assert` (e.g. "MSHallOf", whose field
    # separator recurs among its encoding characters): _distinct_separators refuses those
    # first; AssertionError stays caught in case another input reaches one.
    except (ParseException, IndexError, ValueError, AssertionError):
        raise Garbled(
            "The MSH segment cannot be read: MSH-1 and MSH-2 must give the "
            "field separator and the four encoding characters ^~\\&"
        ) from None
    if len(_text(message[0], 2)) != 4:  # MSH-2: component, repetition, escape, subcomponent
        raise Garbled("MSH-2 must hold the four encoding characters ^~\\&")
    if _escapes_nul(text, message.esc):
        raise Unreadable(_NUL_REFUSED)
    return message


# NUL cannot be stored (PostgreSQL text refuses it), whether sent raw or as the hex escape
# \X00\ that python-hl7 decodes: the message is refused whole, as a JSON body with \u0000 is.
_NUL_REFUSED = "The message contains a NUL character (0x00, or the escape \\X00\\); remove it"


def _escapes_nul(text: str, escape: str) -> bool:
    """Whether a hex escape (HL7 2.10.5, `\\X0041\\`) in `text` decodes to NUL."""
    pattern = re.escape(escape) + "X([0-9A-Fa-f]*)" + re.escape(escape)
    for match in re.finditer(pattern, text):
        digits = match.group(1)
        if any(digits[i : i + 2] == "00" for i in range(0, len(digits), 2)):
            return True
    return False


def garbled_ack(garbled: Garbled, now: datetime | None = None) -> tuple[Any, str]:
    """The AR of a message whose MSH cannot be read, and the stand-in header it answers
    (nothing of the sender's MSH can be echoed: MSA-2 stays empty)."""
    stand_in = hl7.parse("MSH|^~\\&|")
    problem = Problem("102", str(garbled), Location("MSH", 1))
    return stand_in, ack(stand_in, "AR", [problem], now)


def _text(segment: Any, field_number: int, repetition: int = 1, component: int = 1) -> str:
    """A field's (or component's) text, unescaped; '' when absent."""
    try:
        return str(segment.extract_field(1, field_number, repetition, component, 1)).strip()
    except IndexError:
        return ""


def field_text(segment: Any, field_number: int) -> str:
    """The whole field as sent (components, repetitions, escapes): keys and messages."""
    return str(segment(field_number)).strip() if field_number < len(segment) else ""


def _repetitions(segment: Any, field_number: int) -> int:
    if field_number >= len(segment):
        return 0
    return len(segment(field_number))


def _coded(segment: Any, field_number: int) -> Coded:
    return Coded(*(_text(segment, field_number, 1, component) for component in range(1, 7)))


def _segment_id(segment: Any) -> str:
    return str(segment[0]).strip() if len(segment) else ""


def header(message: Any) -> Header:
    """MSH, checked: an ORU^R01 of a supported version with a control id. AR otherwise."""
    msh = message[0]
    where = Location("MSH", 1)
    message_type, event = _text(msh, 9, 1, 1), _text(msh, 9, 1, 2)
    version = _text(msh, 12)
    control_id = _text(msh, 10)
    problems = []
    if message_type != "ORU":
        problems.append(
            Problem(
                "200",
                f"MSH-9 {field_text(msh, 9)!r}: this endpoint receives lab results (ORU^R01) only",
                where.at(9),
            )
        )
    elif event != "R01":
        problems.append(
            Problem(
                "201", f"MSH-9 {field_text(msh, 9)!r}: only the R01 event is received", where.at(9)
            )
        )
    if version not in SUPPORTED_VERSIONS:
        problems.append(
            Problem(
                "203",
                f"MSH-12 {version!r}: versions {', '.join(SUPPORTED_VERSIONS)} are received",
                where.at(12),
            )
        )
    if not control_id:
        problems.append(Problem("101", "MSH-10 (message control id) is required", where.at(10)))
    for number, text, limit in (
        (10, control_id, _MAX_CONTROL_ID),
        (3, field_text(msh, 3), _MAX_HD),
        (4, field_text(msh, 4), _MAX_HD),
    ):
        if len(text) > limit:
            problems.append(
                Problem("102", f"MSH-{number} is longer than HL7 allows", where.at(number))
            )
    zone = None
    sent_at = _text(msh, 7)
    if sent_at:
        try:
            _, _, zone = parse_timestamp(sent_at)
        except ValueError:
            problems.append(
                Problem("102", f"MSH-7 {sent_at!r} is not an HL7 timestamp", where.at(7))
            )
    if problems:
        raise Rejected("AR", problems)
    facility = _text(msh, 4) or _text(msh, 3)
    return Header(field_text(msh, 3), field_text(msh, 4), facility, control_id, version, zone)


def parse_oru(message: Any) -> OruMessage:
    """The message's patients, orders and results, in order. AR on a malformed structure."""
    reading = _OruReading(header(message))
    for where, segment in _segments(message):
        reading.take(where, segment)
    if not reading.patients:
        raise Rejected.one("AR", "100", "The message has no PID segment")
    content = "\r".join(str(segment) for segment in message[1:])
    return OruMessage(
        reading.head,
        reading.patients,
        reading.results,
        hashlib.sha256(content.encode()).hexdigest(),
    )


def _segments(message: Any) -> Iterator[tuple[Location, Any]]:
    """The segments after MSH with where each is (its id and occurrence); empty lines are
    skipped, anything else that is not a segment, or a second MSH, is an AR."""
    counts: dict[str, int] = {}
    for position, segment in enumerate(message[1:], start=2):
        segment_id = _segment_id(segment)
        if not segment_id and not str(segment).strip():
            continue  # an empty line between segments
        if not _SEGMENT_ID.fullmatch(segment_id):
            shown = str(segment)[:40]
            raise Rejected.one(
                "AR",
                "100",
                f"Segment {position} ({shown!r}) is not an HL7 segment; a line break inside "
                "a field (e.g. in an NTE comment) must be sent as \\.br\\",
            )
        counts[segment_id] = counts.get(segment_id, 0) + 1
        where = Location(segment_id, counts[segment_id])
        if segment_id == "MSH":
            raise Rejected.one(
                "AR", "100", "One message per request: a second MSH was found", where
            )
        yield where, segment


@dataclass
class _OruReading:
    """What `parse_oru` has read so far, and where it is: the current patient and order, an
    ORC waiting for its OBR, and the result or order an NTE comments on."""

    head: Header
    patients: list[PatientGroup] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    patient: PatientGroup | None = None
    order: Order | None = None
    pending_orc: Any = None
    last: Result | Order | None = None

    def take(self, where: Location, segment: Any) -> None:
        segment_id = where.segment
        if segment_id == "PID":
            self.patient = PatientGroup(where, _patient_identifiers(segment))
            self.patients.append(self.patient)
            self.order, self.pending_orc, self.last = None, None, None
        elif segment_id == "ORC":
            self.pending_orc, self.last = segment, None
        elif segment_id == "OBR":
            if self.patient is None:
                raise Rejected.one(
                    "AR", "100", "OBR before any PID: whose results are these?", where
                )
            self.order = _order(segment, where, self.pending_orc, self.head)
            self.pending_orc, self.last = None, self.order
        elif segment_id == "OBX":
            if self.order is None or self.patient is None:
                raise Rejected.one(
                    "AR", "100", "OBX outside an order: an OBR must precede it", where
                )
            self.last = _result(segment, where, self.patient, self.order)
            self.results.append(self.last)
        elif segment_id == "NTE" and self.last is not None:
            self._comment(segment, self.last)
        else:
            self.last = None  # a comment after another segment is not about a result

    @staticmethod
    def _comment(nte: Any, about: Result | Order) -> None:
        comment = "\n".join(
            _text(nte, 3, repetition) for repetition in range(1, _repetitions(nte, 3) + 1)
        ).replace("\r", "\n")
        if comment.strip():
            about.notes.append(comment.strip())


def _patient_identifiers(pid: Any) -> list[PatientIdentifier]:
    identifiers = []
    for repetition in range(1, _repetitions(pid, 3) + 1):
        value = _text(pid, 3, repetition, 1)
        if not value:
            continue
        authority = _text(pid, 3, repetition, 4)
        oid = None
        try:
            if pid.extract_field(1, 3, repetition, 4, 3) == "ISO":
                oid = str(pid.extract_field(1, 3, repetition, 4, 2)).strip() or None
        except IndexError:
            pass
        identifiers.append(PatientIdentifier(value, authority, oid))
    return identifiers


def _order(obr: Any, where: Location, orc: Any, head: Header) -> Order:
    source, field_number = obr, 3
    if not _text(obr, 3) and orc is not None and _text(orc, 3):
        source, field_number = orc, 3
    number = _text(source, field_number, 1, 1)
    authority = (
        _text(source, field_number, 1, 2)
        or _text(source, field_number, 1, 3)
        or head.sending_facility_name
    )
    label = "OBR-3" if source is obr else "ORC-3"
    return Order(where, number, authority, label, _text(obr, 7))


def _result(obx: Any, where: Location, patient: PatientGroup, order: Order) -> Result:
    # Four components cover SN (comparator^number^separator^number); NM uses the first.
    value = [_text(obx, 5, 1, component) for component in range(1, 5)]
    return Result(
        location=where,
        patient=patient,
        order=order,
        set_id=_text(obx, 1),
        value_type=_text(obx, 2),
        code=_coded(obx, 3),
        value=value,
        units=_coded(obx, 6),
        reference_range=_text(obx, 7),
        status=_text(obx, 11),
        observed_at=_text(obx, 14),
    )


def parse_timestamp(value: str) -> tuple[datetime, int, tzinfo | None]:
    """An HL7 DTM/TS as (datetime, digits of precision, its own offset or None).

    The datetime is naive unless the value carries an offset. Raises ValueError when the
    value is not a timestamp.
    """
    match = _DTM.fullmatch(value)
    if match is None or (match["fraction"] and len(match["digits"]) != 14):
        raise ValueError(value)
    moment = hl7.parse_datetime(value)
    zone = None
    if match["offset"]:
        # Taken from the text, not the library: it loses the sign of offsets under an hour.
        sign = -1 if match["offset"][0] == "-" else 1
        hours, minutes = int(match["offset"][1:3]), int(match["offset"][3:5])
        if hours > 14 or minutes > 59:
            raise ValueError(value)
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
        moment = moment.replace(tzinfo=zone)
    return moment, len(match["digits"]), zone


# --- the ACK ------------------------------------------------------------------------------


def ack(
    message: Any, code: AckCode, problems: list[Problem] | None = None, now: datetime | None = None
) -> str:
    """The ACK of `message` in ER7: MSH with sender and receiver swapped, MSA (code and the
    message's MSH-10), and one ERR per problem in the form of the message's version.

    python-hl7's `create_ack` would do the first two, but it fails on a message whose MSH-9
    has no components, and such a message deserves an AR, not an error."""
    msh = message[0]
    version = _text(msh, 12)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    header_segment = message.create_segment([message.create_field(["MSH"])])
    for number, value in (
        (1, str(msh(1))),
        (2, str(msh(2))),
        (3, field_text(msh, 5) or RECEIVER_NAME),
        (4, field_text(msh, 6)),
        (5, field_text(msh, 3)),
        (6, field_text(msh, 4)),
        (7, moment.strftime("%Y%m%d%H%M%S") + "+0000"),
        (10, hl7.generate_message_control_id()),
        (11, field_text(msh, 11)),
        (12, field_text(msh, 12)),
    ):
        header_segment.assign_field(value, number)  # a field as sent keeps its components
    header_segment.assign_field("ACK", 9, 1, 1)
    header_segment.assign_field(_text(msh, 9, 1, 2), 9, 1, 2)
    if version != "2.3":  # the message structure component exists from 2.3.1
        header_segment.assign_field("ACK", 9, 1, 3)
    acknowledgment = message.create_segment([message.create_field(["MSA"])])
    acknowledgment.assign_field(code, 1)
    acknowledgment.assign_field(field_text(msh, 10), 2)
    problems = problems or []
    if problems:
        # MSA-3 is deprecated from 2.4 but still what most interface engines display.
        acknowledgment.assign_field(message.escape(problems[0].text[:80]), 3)
    reply = message.create_message([header_segment, acknowledgment])
    modern = version not in ("2.3", "2.3.1", "2.4")
    for problem in problems:
        reply.append(_err(reply, problem, modern))
    return str(reply)


def _err(reply: Any, problem: Problem, modern: bool) -> Any:
    segment = reply.create_segment([reply.create_field(["ERR"])])
    where = problem.location
    if modern:
        label = ERROR_TEXT.get(problem.code, "")
        # 2.5: ERR-2 location (ERL), ERR-3 code (CWE, table 0357), ERR-4 severity, ERR-8 text.
        segment.assign_field("", 1)
        if where is not None:
            segment.assign_field(where.segment, 2, 1, 1)
            segment.assign_field(str(where.sequence), 2, 1, 2)
            if where.field is not None:
                segment.assign_field(str(where.field), 2, 1, 3)
        segment.assign_field(problem.code, 3, 1, 1)
        segment.assign_field(label, 3, 1, 2)
        segment.assign_field("HL70357", 3, 1, 3)
        segment.assign_field("E", 4)
        segment.assign_field(reply.escape(problem.text), 8)
    else:
        # 2.3 and 2.4: ERR-1 (segment^sequence^field^code&text&table).
        segment.assign_field(where.segment if where else "", 1, 1, 1)
        segment.assign_field(str(where.sequence) if where else "", 1, 1, 2)
        segment.assign_field(str(where.field) if where and where.field else "", 1, 1, 3)
        segment.assign_field(problem.code, 1, 1, 4, 1)
        # The code's text component carries the detail: these versions have no ERR-8.
        segment.assign_field(reply.escape(problem.text[:80]), 1, 1, 4, 2)
        segment.assign_field("HL70357", 1, 1, 4, 3)
    return segment
