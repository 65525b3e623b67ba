"""FHIR date/dateTime values as UTC ranges: what a value of a given precision covers.

Stored index columns and search parameters both go through `fhir_range`, so `date=2025-03`
matches a count taken on 2025-03-10T09:00+01:00 by one comparison of ranges (FHIR search,
section 3.1.1.4.4). Values without a time zone (dates, partial dates) are read as UTC.
All datetimes returned are naive UTC, as the database columns store them.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime, timedelta

# --- The FHIR date grammar, every form the server reads, in one place ---------------------
# The pieces. The year as FHIR writes it: 0001-9999, there is no year 0000.
YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
MONTH = r"(0[1-9]|1[0-2])"
# A day of any month (01-31), for the R4B element patterns; the calendar check follows.
DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
# A month and one of its days, 29 February aside (it needs its year: _CALENDAR_DAY).
MONTH_DAY = (
    "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    "|02-(0[1-9]|1[0-9]|2[0-8]))"
)
_CALENDAR_DAY = rf"({YEAR}-{MONTH_DAY}|{_LEAP_YEAR}-02-29)"
# A resource's time of day: seconds required, a leap second allowed (FHIR R4B).
TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"

# A resource's date, dateTime and instant elements (the R4B patterns, as the OpenAPI
# document states them); `real_calendar_date` and `date_problem` add the calendar.
DATE_ELEMENT_PATTERN = f"{YEAR}(-{MONTH}(-{DAY})?)?"
DATE_TIME_ELEMENT_PATTERN = f"{YEAR}(-{MONTH}(-{DAY}(T{TIME}{ZONE})?)?)?"
INSTANT_ELEMENT_PATTERN = f"{YEAR}-{MONTH}-{DAY}T{TIME}{ZONE}"

# A date or dateTime a client searches or pages by (`date=`, `_since`, AuditEvent `date`):
# only days on the calendar (no 31 November, 29 February in leap years only), and the
# seconds may be left out.
DATE_TIME_PATTERN = (
    rf"({YEAR}(-{MONTH})?|{_CALENDAR_DAY}(T([01][0-9]|2[0-3]):[0-5][0-9]"
    r"(:[0-5][0-9](\.[0-9]+)?)?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))?)?)"
)
# A FHIR instant: a whole date and time to the second, with its offset (Bulk Data `_since`).
INSTANT_PATTERN = (
    rf"({_CALENDAR_DAY}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
    r"(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))"
)
# A search parameter's date value as the OpenAPI document declares it: a prefix, then only
# years whose instants exist whatever the time zone (1000-8999), microseconds at most.
_SEARCH_YEAR = "[1-8][0-9]{3}"
_SEARCH_TIME = (
    "T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\\.[0-9]{1,6})?)?"
    "(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9]|[+-]14:00)?"
)
SEARCH_DATE_PATTERN = (
    f"(eq|ne|lt|le|gt|ge|sa|eb)?{_SEARCH_YEAR}(-(0[1-9]|1[0-2])|-{MONTH_DAY}({_SEARCH_TIME})?)?"
)

# What a resource's element is checked with, to say which part is wrong: any digits where
# the grammar has them, then the calendar (`date_problem`).
_DATE_PARTS = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_DATE_TIME_PARTS = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T([01]\d|2[0-3]):([0-5]\d):([0-5]\d|60)(\.\d+)?"
    r"(Z|[+-](?:(?:0\d|1[0-3]):[0-5]\d|14:00)))?)?)?"
)
_INSTANT_PARTS = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T([01]\d|2[0-3]):([0-5]\d):([0-5]\d|60)(\.\d+)?"
    r"(Z|[+-](?:(?:0\d|1[0-3]):[0-5]\d|14:00))"
)
_ELEMENT_PARTS = {"date": _DATE_PARTS, "dateTime": _DATE_TIME_PARTS, "instant": _INSTANT_PARTS}
# A date and a time of day with neither a time zone nor, perhaps, seconds: the form people
# write, and what FHIR does not take (a time is only meaningful with its zone).
_ZONELESS_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})(:\d{2}(?:\.\d+)?)?")
_FORMS = {
    "date": "YYYY, YYYY-MM or YYYY-MM-DD, e.g. 2025-03-10",
    "dateTime": "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a time zone, "
    "e.g. 2025-03-10 or 2025-03-10T09:00:00Z",
    "instant": "YYYY-MM-DDThh:mm:ss with a time zone, e.g. 2025-03-10T09:00:00Z",
}


def date_problem(value: str, element_type: str) -> str | None:
    """Why `value` is not a FHIR `element_type` (date, dateTime or instant) element; None if
    it is."""
    match = _ELEMENT_PARTS[element_type].fullmatch(value)
    zoneless = _ZONELESS_TIME.fullmatch(value) if element_type != "date" else None
    if match is None and zoneless is not None:
        day, minutes, seconds = zoneless.groups()
        time = f"{day}T{minutes}{seconds or ':00'}"
        return (
            f"{value!r} has a time of day but no time zone: a FHIR {element_type} with a time "
            f"needs its zone (and seconds), e.g. {time}Z in UTC or {time}+01:00"
        )
    if match is None:
        return f"{value!r} is not a valid FHIR {element_type}: {_FORMS[element_type]}"
    year, month, day = match.group(1), match.group(2), match.group(3)
    if int(year) == 0:
        return f"{value!r}: year 0000 does not exist"
    if month is not None and not 1 <= int(month) <= 12:
        return f"{value!r}: month {month} does not exist"
    if day is not None and not 1 <= int(day) <= calendar.monthrange(int(year), int(month))[1]:
        return f"{value!r}: day {day} does not exist in that month"
    return None


def real_calendar_date(value: str) -> str:
    """`value` if its day is on the calendar (a pydantic validator: ValueError if not).
    The R4B regexes accept 2023-02-31; FHIR requires valid dates and the server refuses it."""
    if len(value) >= 10:
        date.fromisoformat(value[:10])
    return value


_DATE_TIME_RE = re.compile(DATE_TIME_PATTERN)
_PARTIAL_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<H>\d{2}):(?P<M>\d{2})"
    r"(?::(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_ONE_US = timedelta(microseconds=1)


def fhir_range(value: str) -> tuple[datetime, datetime] | None:
    """Inclusive [start, end] in naive UTC covered by a FHIR date/dateTime/instant, or None."""
    if not _DATE_TIME_RE.fullmatch(value):
        return None
    match = _PARTIAL_RE.fullmatch(value)
    if match is None:
        return None
    try:
        return _whole_days(match) if match["H"] is None else _time_span(match)
    except ValueError:
        return None
    except OverflowError:  # 0001-01-01T00:30+01:00 is before the first representable instant
        return None


def _whole_days(match: re.Match[str]) -> tuple[datetime, datetime]:
    """A year, a month or a day, from its first microsecond to its last."""
    year = int(match["y"])
    if match["m"] is None:
        return datetime(year, 1, 1), datetime(year, 12, 31, 23, 59, 59, 999999)
    month = int(match["m"])
    if match["d"] is None:
        last = calendar.monthrange(year, month)[1]
        return datetime(year, month, 1), datetime(year, month, last, 23, 59, 59, 999999)
    day = int(match["d"])
    return datetime(year, month, day), datetime(year, month, day, 23, 59, 59, 999999)


def _time_span(match: re.Match[str]) -> tuple[datetime, datetime]:
    """A date with a time of day, in UTC: its minute or second, or the instant a fraction
    gives."""
    hour, minute = int(match["H"]), int(match["M"])
    second = int(match["S"] or 0)
    second = min(second, 59)  # a leap second is read as the last second of the minute
    micro = int((match["f"] or ".0")[1:].ljust(6, "0")[:6])
    start = datetime(int(match["y"]), int(match["m"]), int(match["d"]), hour, minute, second, micro)
    tz = match["tz"]
    if tz is not None and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        start -= sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
    if match["f"] is not None:
        return start, start
    if match["S"] is not None:
        return start, start + timedelta(seconds=1) - _ONE_US
    return start, start + timedelta(minutes=1) - _ONE_US


def utc_now() -> datetime:
    """Now, as the database columns store it (naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def format_instant(moment: datetime) -> str:
    """A FHIR instant with microseconds and an explicit UTC offset."""
    return to_naive_utc(moment).isoformat(timespec="microseconds") + "Z"
