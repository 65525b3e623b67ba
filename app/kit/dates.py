"""FHIR date/dateTime values as UTC ranges: what a value of a given precision covers.

Stored index columns and search parameters both go through `fhir_range`, so `date=2025-03`
matches a count taken on 2025-03-10T09:00+01:00 by one comparison of ranges (FHIR search,
section 3.1.1.4.4). Values without a time zone (dates, partial dates) are read as UTC.
All datetimes returned are naive UTC, as the database columns store them.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DAY = (
    rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    rf"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
# A FHIR date or dateTime, only those on the calendar (no 31 November, 29 February in leap
# years only); the year as FHIR writes it (0001-9999: there is no year 0000).
DATE_TIME_PATTERN = (
    rf"({_YEAR}(-(0[1-9]|1[0-2]))?|{_DAY}(T([01][0-9]|2[0-3]):[0-5][0-9]"
    r"(:[0-5][0-9](\.[0-9]+)?)?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))?)?)"
)
# A FHIR instant: a whole date and time to the second, with its offset (Bulk Data `_since`).
INSTANT_PATTERN = (
    rf"({_DAY}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
    r"(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))"
)
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
    year = int(match["y"])
    try:
        if match["m"] is None:
            return datetime(year, 1, 1), datetime(year, 12, 31, 23, 59, 59, 999999)
        month = int(match["m"])
        if match["d"] is None:
            last = calendar.monthrange(year, month)[1]
            return datetime(year, month, 1), datetime(year, month, last, 23, 59, 59, 999999)
        day = int(match["d"])
        if match["H"] is None:
            return datetime(year, month, day), datetime(year, month, day, 23, 59, 59, 999999)
        hour, minute = int(match["H"]), int(match["M"])
        second = int(match["S"] or 0)
        second = min(second, 59)  # a leap second is read as the last second of the minute
        micro = int((match["f"] or ".0")[1:].ljust(6, "0")[:6])
        start = datetime(year, month, day, hour, minute, second, micro)
    except ValueError:
        return None
    tz = match["tz"]
    try:
        if tz is not None and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            start -= sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        if match["f"] is not None:
            end = start
        elif match["S"] is not None:
            end = start + timedelta(seconds=1) - _ONE_US
        else:
            end = start + timedelta(minutes=1) - _ONE_US
    except OverflowError:  # 0001-01-01T00:30+01:00 is before the first representable instant
        return None
    return start, end


def parse_instant(value: str) -> datetime | None:
    """The start of a FHIR date/dateTime as an aware UTC datetime (clinical time)."""
    bounds = fhir_range(value)
    return bounds[0].replace(tzinfo=UTC) if bounds else None


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
