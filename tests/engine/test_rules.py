"""One test per rule and per criteria setting of the response rules (docs/response-rules.md,
version 2), plus the edges; version 1's behaviour where a setting keeps it reachable."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.engine import (
    BASELINE_ONLY_UNDER_RESCUE,
    NO_BASELINE,
    NO_EVALUABLE_COUNT,
    NO_TREATMENT_START,
    Administration,
    BleedingAssessment,
    BleedingEvent,
    Criteria,
    PlateletCount,
    Timeline,
    assess,
)

from .test_examples import BASELINE_TIME, DOSE, at, count, day, dose, story

R_STORY = story(10, count("03-10", 40), count("03-17", 45))  # R on 03-10, confirmed 03-17
# Version 1's settings under the version-2 rules: instants, no baseline exclusion, counts
# evaluable from the dose on.
INSTANT = Criteria(confirm_clock="instant", baseline_rescue_exclusion_days=0, first_evaluable_day=0)
# The version-1 rules themselves, as an assessment stored under version 1 is reproduced.
VERSION_1 = Criteria.from_stored({})


def rescue(when: datetime, status: str = "completed") -> Administration:
    return Administration(id=f"rescue-{when.isoformat()}", time=when, role="rescue", status=status)


def grade(when: datetime, value: int, status: str = "final") -> BleedingAssessment:
    return BleedingAssessment(id=f"who-{when.isoformat()}", time=when, grade=value, status=status)


# --- every setting changes an outcome where it should -------------------------------------


def test_r_threshold() -> None:
    timeline = story(10, count("03-10", 25), count("03-17", 26))
    assert assess(timeline).status == "NR"
    assert assess(timeline, Criteria(r_threshold=25)).status == "R"


def test_a_failing_count_says_which_rule_it_fails() -> None:
    """Exactly at the R threshold a count meets it (the rule is >= 30): with a baseline of
    20 it fails on doubling alone, and says so; one just under fails on the threshold."""
    result = assess(story(20, count("03-10", 30), count("03-17", 29.9)))
    assert [(c.id, c.classification, c.detail) for c in result.classifications[1:]] == [
        ("c-03-10", "failing", "below 2 x baseline"),
        ("c-03-17", "failing", "below 30"),
    ]


def test_cr_threshold() -> None:
    timeline = story(10, count("03-10", 90), count("03-17", 95))
    assert assess(timeline).status == "R"
    result = assess(timeline, Criteria(cr_threshold=90))
    assert (result.status, result.best_response, result.time_to_complete_response_days) == (
        "CR",
        "CR",
        7,
    )


def test_doubling_factor() -> None:
    timeline = story(20, count("03-10", 35), count("03-17", 38))
    assert assess(timeline).status == "NR"
    assert assess(timeline, Criteria(doubling_factor=1.5)).status == "R"


def test_confirm_days() -> None:
    timeline = story(10, count("03-10", 120), count("03-14", 105))
    assert assess(timeline).status == "NR"
    result = assess(timeline, Criteria(confirm_days=4))
    assert (result.status, result.pending_confirmation) == ("CR", False)


def test_loss_confirm_days() -> None:
    timeline = story(
        10, count("03-10", 40), count("03-17", 45), count("04-07", 25), count("04-08", 22)
    )
    assert assess(timeline).status == "LOR"
    assert assess(timeline, Criteria(loss_confirm_days=2)).status == "R"


def test_bleeding_min_grade() -> None:
    timeline = story(
        10,
        count("03-10", 60),
        count("03-17", 65),
        bleeding_assessments=(grade(at(3, 10, 12), 1),),
    )
    assert assess(timeline).status == "NR"
    assert assess(timeline, Criteria(bleeding_min_grade=2)).status == "R"


def test_rescue_window_days() -> None:
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 5))))
    result = assess(timeline)  # both counts within 56 days of the rescue: none is evaluable
    assert (result.status, result.status_reason) == ("NE", NO_EVALUABLE_COUNT)
    assert assess(timeline, VERSION_1).status == "NR"  # version 1: a count, so evaluable
    assert assess(timeline, Criteria(rescue_window_days=4)).status == "R"


def test_baseline_rule_mean() -> None:
    earlier = PlateletCount("early", at(2, 25), 10)
    timeline = story(20, earlier, count("03-10", 35), count("03-17", 38))
    assert assess(timeline).status == "NR"  # last baseline 20: 35 < 2 x 20
    result = assess(timeline, Criteria(baseline_rule="mean-before-start"))
    assert result.status == "R"  # mean baseline 15: 35 >= 30
    assert result.baseline is not None
    assert result.baseline.value == 15
    assert result.baseline.observations == ("early", "baseline")
    assert result.baseline.observation == "baseline"
    assert result.baseline.date == day("03-03")
    assert result.evidence["baseline"] == ["early", "baseline"]


def test_baseline_lookback_days() -> None:
    timeline = Timeline(
        "patient-1",
        counts=(PlateletCount("old", at(2, 20, 7), 10), count("03-10", 40), count("03-17", 45)),
        administrations=(dose(),),
    )
    assert assess(timeline).status == "R"
    result = assess(timeline, Criteria(baseline_lookback_days=7))
    assert (result.status, result.status_reason) == ("NE", NO_BASELINE)
    result = assess(timeline, replace(VERSION_1, baseline_lookback_days=7))
    assert result.status_reason == "no platelet count in the 7 days up to the treatment start"


def test_response_date_anchor_confirming() -> None:
    timeline = story(15, count("03-10", 60), count("03-17", 110), count("03-24", 125))
    result = assess(timeline, Criteria(response_date_anchor="confirming"))
    assert result.response_date == day("03-17")
    assert result.complete_response_date == day("03-24")
    assert (result.time_to_response_days, result.time_to_complete_response_days) == (14, 21)
    assert result.episodes[0].start == day("03-17")
    assert result.episodes[0].duration_of_response_days == 7


def test_trial_timezone_sets_the_start_day_too() -> None:
    # Dose 03-03 20:00 UTC is 03-04 05:00 in Tokyo; count 'a' is 03-10 23:00 there.
    timeline = story(
        10,
        PlateletCount("a", at(3, 10, 14), 40),
        PlateletCount("b", at(3, 17, 14), 45),
        administrations=(dose(at(3, 3, 20)),),
    )
    assert assess(timeline).time_to_response_days == 7
    result = assess(timeline, Criteria(trial_timezone="Asia/Tokyo"))
    assert (result.response_date, result.time_to_response_days) == (day("03-10"), 6)


def test_trial_timezone_sets_calendar_days() -> None:
    # Dose 03-03 03:00 in New York; counts at 03:00 UTC are still the previous evening there.
    timeline = story(
        10,
        PlateletCount("a", at(3, 10, 3), 40),
        PlateletCount("b", at(3, 17, 3), 45),
    )
    assert assess(timeline).time_to_response_days == 7
    result = assess(timeline, Criteria(trial_timezone="America/New_York"))
    assert result.time_to_response_days == 6
    assert result.response_date == day("03-09")


# --- confirmation and its edges ----------------------------------------------------------


def test_counts_exactly_confirm_days_apart_confirm() -> None:
    timeline = story(10, PlateletCount("a", at(3, 10), 40), PlateletCount("b", at(3, 17), 45))
    assert assess(timeline).status == "R"


@pytest.mark.parametrize(("clock", "status"), [("instant", "NR"), ("calendar", "R")])
def test_counts_one_second_short_do_not_confirm_as_instants(clock: str, status: str) -> None:
    timeline = story(
        10, PlateletCount("a", at(3, 10), 40), PlateletCount("b", at(3, 17, 8, 59, 59), 45)
    )
    result = assess(timeline, Criteria(confirm_clock=clock))  # type: ignore[arg-type]
    assert (result.status, result.pending_confirmation) == (status, status == "NR")


@pytest.mark.parametrize(("clock", "status"), [("instant", "NR"), ("calendar", "R")])
def test_weekly_visits_at_another_hour_confirm_on_calendar_days(clock: str, status: str) -> None:
    # Example 11's visits: day 1 at 10:00, day 8 at 08:00 (6 days 22 hours).
    timeline = story(
        10, PlateletCount("a", at(3, 10, 10), 40), PlateletCount("b", at(3, 17, 8), 45)
    )
    assert assess(timeline, Criteria(confirm_clock=clock)).status == status  # type: ignore[arg-type]


def test_calendar_days_are_counted_in_the_trial_time_zone() -> None:
    # 03-10 20:00 and 03-17 02:00 UTC: 7 UTC dates apart, but 6 dates in New York
    # (03-10 16:00 and 03-16 22:00 there).
    timeline = story(
        10, PlateletCount("a", at(3, 10, 20), 40), PlateletCount("b", at(3, 17, 2), 45)
    )
    assert assess(timeline).status == "R"
    new_york = assess(timeline, Criteria(trial_timezone="America/New_York"))
    assert (new_york.status, new_york.pending_confirmation) == ("NR", True)


NEW_YORK = ZoneInfo("America/New_York")  # clocks go forward on 2025-03-09


@pytest.mark.parametrize(("hour", "status"), [(9, "NR"), (10, "R")])
def test_confirm_days_count_instants_across_daylight_saving(hour: int, status: str) -> None:
    # 09:00 EST to 09:00 EDT a week later is 6 days 23 hours.
    first = PlateletCount("a", datetime(2025, 3, 5, 9, tzinfo=NEW_YORK), 40)
    second = PlateletCount("b", datetime(2025, 3, 12, hour, tzinfo=NEW_YORK), 45)
    assert assess(story(10, first, second), INSTANT).status == status
    # On the calendar they are a week apart whatever the hour.
    calendar = Criteria(trial_timezone="America/New_York")
    assert assess(story(10, first, second), calendar).status == "R"


@pytest.mark.parametrize(
    ("after_end", "status"), [(timedelta(0), "NR"), (timedelta(seconds=1), "R")]
)
def test_rescue_window_counts_instants_across_daylight_saving(
    after_end: timedelta, status: str
) -> None:
    given = datetime(2025, 1, 20, 3, tzinfo=NEW_YORK)  # 08:00 UTC; + 56 x 24 h = 03-17 08:00 UTC
    edge = PlateletCount("edge", (at(3, 17, 8) + after_end).astimezone(NEW_YORK), 45)
    timeline = story(10, edge, count("03-24", 48), administrations=(dose(), rescue(given)))
    assert assess(timeline, INSTANT).status == status


@pytest.mark.parametrize(
    ("moment", "status"),
    [(at(3, 17, 23, 59, 59), "NR"), (at(3, 18, 0), "R")],
    ids=["last-second-of-the-window-day", "next-day"],
)
def test_rescue_window_ends_with_a_calendar_day(moment: datetime, status: str) -> None:
    # Rescue 01-20 at 20:00: the window runs to the end of 01-20 + 56 days = 03-17.
    edge = PlateletCount("edge", moment, 45)
    administrations = (dose(), rescue(at(1, 20, 20)))
    timeline = story(10, edge, PlateletCount("later", moment + timedelta(days=7), 48))
    assert assess(replace(timeline, administrations=administrations)).status == status


def test_rescue_window_starts_at_the_rescue_instant() -> None:
    # A count earlier on the rescue's own day, before it, is not under that rescue.
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 10, 12))))
    result = assess(timeline)
    assert [c.classification for c in result.classifications if c.id == "c-03-10"] == [
        "qualifying-r"
    ]
    assert (result.status, result.pending_confirmation) == ("NR", True)  # 03-17 is rescued


def test_failing_count_between_breaks_confirmation() -> None:
    timeline = story(10, count("03-10", 40), count("03-13", 15), count("03-17", 45))
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("NR", True)


def test_later_count_confirms_when_first_pair_is_too_close() -> None:
    timeline = story(10, count("03-10", 40), count("03-14", 42), count("03-18", 44))
    result = assess(timeline)
    assert result.status == "R"
    assert result.evidence["response"] == ["c-03-10", "c-03-18"]


def test_cr_needs_no_count_below_cr_threshold_between() -> None:
    timeline = story(10, count("03-10", 110), count("03-13", 80), count("03-17", 120))
    result = assess(timeline)
    assert (result.status, result.best_response) == ("R", "R")
    assert result.pending_confirmation  # 03-17 awaits its CR confirmation


def test_pending_clears_after_a_count_below_cr() -> None:
    timeline = story(10, count("03-10", 40), count("03-17", 110), count("03-20", 80))
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("R", False)


def test_cr_without_doubling_when_baseline_above_50() -> None:
    timeline = story(60, count("03-10", 105), count("03-17", 110))
    result = assess(timeline)
    assert (result.status, result.best_response) == ("CR", "CR")
    assert result.evidence["response"] == ["c-03-10", "c-03-17"]


def test_response_on_start_day_is_day_zero_only_when_the_start_day_is_evaluable() -> None:
    timeline = story(
        10, PlateletCount("same-day", at(3, 3, 20), 40), count("03-10", 45), count("03-11", 45)
    )
    result = assess(timeline, Criteria(first_evaluable_day=0))
    assert (result.response_date, result.time_to_response_days) == (day("03-03"), 0)
    result = assess(timeline)  # the start day's count says nothing yet; 03-10/11: 1 day apart
    assert (result.status, result.pending_confirmation) == ("NR", True)
    [same_day] = [c for c in result.classifications if c.id == "same-day"]
    assert (same_day.classification, same_day.detail) == (
        "not-evaluable",
        "before day 1 of treatment",
    )


@pytest.mark.parametrize(
    ("clock", "moment", "evaluable"),
    [
        ("calendar", at(3, 4, 23, 59), False),
        ("calendar", at(3, 5, 0, 0), True),
        ("instant", at(3, 5, 7, 59, 59), False),
        ("instant", at(3, 5, 8), True),
    ],
)
def test_first_evaluable_day(clock: str, moment: datetime, evaluable: bool) -> None:
    # Day 2 of treatment: the second calendar day after the start's, or 48 hours after it.
    criteria = Criteria(first_evaluable_day=2, confirm_clock=clock)  # type: ignore[arg-type]
    timeline = story(10, PlateletCount("x", moment, 40), count("03-17", 45))
    result = assess(timeline, criteria)
    assert result.status == ("R" if evaluable else "NR")
    assert result.classifications[1].classification == (
        "qualifying-r" if evaluable else "not-evaluable"
    )


def test_no_response_without_qualifying_pair_is_not_pending() -> None:
    result = assess(story(10, count("03-10", 40), count("03-12", 12)))
    assert (result.status, result.pending_confirmation) == ("NR", False)


# --- treatment start and baseline --------------------------------------------------------


@pytest.mark.parametrize(
    ("hour", "minute", "baseline", "status"),
    [(7, 30, 25, "NR"), (8, 0, 25, "NR"), (8, 30, 10, "R")],
    ids=["before-dose", "at-dose", "after-dose"],
)
def test_count_on_start_day(hour: int, minute: int, baseline: float, status: str) -> None:
    timeline = story(
        10, PlateletCount("x", at(3, 3, hour, minute), 25), count("03-10", 45), count("03-17", 48)
    )
    result = assess(timeline)
    assert result.baseline is not None
    assert result.baseline.value == baseline
    assert result.status == status


def test_treatment_start_is_earliest_active_study_drug_dose() -> None:
    administrations = (
        dose(at(3, 3, 8), "later"),
        dose(at(3, 1, 8), "not-done", status="not-done"),
        dose(at(3, 2, 8), "in-progress", status="in-progress"),
        Administration("other", at(2, 28, 8), role="concomitant"),
        rescue(at(2, 27, 8), status="entered-in-error"),
    )
    timeline = Timeline(
        "patient-1",
        counts=(PlateletCount("base", at(3, 2, 7), 10), count("03-09", 40), count("03-16", 45)),
        administrations=administrations,
    )
    result = assess(timeline)
    assert result.treatment_start == at(3, 2, 8)
    assert (result.status, result.time_to_response_days) == ("R", 7)


def test_treatment_start_is_reported_in_utc() -> None:
    start = DOSE.astimezone(ZoneInfo("Asia/Tokyo"))
    result = assess(replace(R_STORY, administrations=(dose(start),)))
    assert result.treatment_start == DOSE
    assert result.treatment_start is not None and result.treatment_start.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("clock", "earlier", "status"),
    [
        ("instant", timedelta(0), "NR"),
        ("instant", timedelta(seconds=1), "NE"),
        ("calendar", timedelta(hours=8), "NR"),  # 02-17 00:00, 14 calendar days before
        ("calendar", timedelta(hours=8, seconds=1), "NE"),  # 02-16 23:59:59
    ],
)
def test_baseline_at_exact_lookback_edge_counts(
    clock: str, earlier: timedelta, status: str
) -> None:
    edge = PlateletCount("edge", DOSE - timedelta(days=14) - earlier, 10)
    timeline = Timeline("patient-1", counts=(edge, count("03-10", 40)), administrations=(dose(),))
    assert assess(timeline, Criteria(confirm_clock=clock)).status == status  # type: ignore[arg-type]


# --- not evaluable ------------------------------------------------------------------------


NOT_EVALUABLE = {
    "no-dose": (
        story(10, count("03-10", 40), administrations=()),
        NO_TREATMENT_START,
        "no study-drug administration",
    ),
    "dose-not-done": (
        story(10, count("03-10", 40), administrations=(dose(status="not-done"),)),
        NO_TREATMENT_START,
        "no study-drug administration",
    ),
    "only-other-roles": (
        story(
            10,
            count("03-10", 40),
            administrations=(Administration("c", DOSE, role="concomitant"), rescue(DOSE)),
        ),
        NO_TREATMENT_START,
        "no study-drug administration",
    ),
    "no-baseline": (
        story(None, count("03-10", 40)),
        NO_BASELINE,
        "no platelet count in the 14 days up to the treatment start",
    ),
    "baseline-only-under-rescue": (
        story(10, count("03-10", 40), administrations=(dose(), rescue(at(2, 25)))),
        BASELINE_ONLY_UNDER_RESCUE,
        None,  # version 1 had no exclusion: the rescued count is its baseline
    ),
    "no-follow-up": (story(10), NO_EVALUABLE_COUNT, "no platelet count after the treatment start"),
    "only-count-at-dose": (
        story(10, PlateletCount("at-dose", DOSE, 40)),
        NO_EVALUABLE_COUNT,
        "no platelet count after the treatment start",
    ),
    "only-preliminary": (
        story(10, count("03-10", 40, status="preliminary")),
        NO_EVALUABLE_COUNT,
        "no platelet count after the treatment start",
    ),
    "only-start-day": (story(10, count("03-03", 40)), NO_EVALUABLE_COUNT, None),
    "only-under-rescue": (
        story(10, count("03-10", 40), administrations=(dose(), rescue(at(3, 9)))),
        NO_EVALUABLE_COUNT,
        None,  # version 1: the count makes the patient NR
    ),
    "only-a-bleed": (
        story(10, bleeding_assessments=(grade(at(3, 10), 2),)),
        NO_EVALUABLE_COUNT,  # a bleeding occasion fails, but a response needs a count
        "no platelet count after the treatment start",
    ),
}


@pytest.mark.parametrize("name", NOT_EVALUABLE)
def test_not_evaluable_reasons(name: str) -> None:
    timeline, reason, version_1_reason = NOT_EVALUABLE[name]
    result = assess(timeline)
    assert (result.status, result.status_reason) == ("NE", reason)
    assert result.best_response == "NE"  # never evaluable
    assert result.pending_confirmation is False
    assert result.episodes == ()
    old = assess(timeline, VERSION_1)
    if version_1_reason is None:
        assert old.status != "NE"
    else:
        assert (old.status, old.status_reason, old.best_response) == ("NE", version_1_reason, None)


def test_not_evaluable_reasons_come_in_their_order() -> None:
    # No baseline and no evaluable count: the baseline is named first.
    assert assess(story(None)).status_reason == NO_BASELINE
    # Every window count rescued and nothing after the start: the rescue is named first.
    rescued = story(10, administrations=(dose(), rescue(at(3, 1))))
    assert assess(rescued).status_reason == BASELINE_ONLY_UNDER_RESCUE
    # A baseline window holding a rescued count and none at all: no baseline.
    nothing = story(None, administrations=(dose(), rescue(at(3, 1))))
    assert assess(nothing).status_reason == NO_BASELINE


def test_not_evaluable_keeps_known_baseline_and_start() -> None:
    result = assess(story(10))
    assert result.treatment_start == DOSE
    assert result.baseline is not None and result.baseline.value == 10
    assert result.evidence["baseline"] == ["baseline"]


def test_all_follow_up_under_rescue_is_not_evaluable() -> None:
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 4))))
    result = assess(timeline)
    assert (result.status, result.status_reason, result.best_response) == (
        "NE",
        NO_EVALUABLE_COUNT,
        "NE",
    )
    assert [c.classification for c in result.classifications] == [
        "baseline-candidate",
        "under-rescue",
        "under-rescue",
    ]
    old = assess(timeline, VERSION_1)  # version 1: a count after the start made it NR
    assert (old.status, old.best_response, old.pending_confirmation) == ("NR", "NR", False)


# --- statuses of observations and events --------------------------------------------------


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "preliminary", "registered"])
def test_invalid_count_is_ignored(status: str) -> None:
    timeline = story(10, count("03-10", 40), count("03-13", 5, status=status), count("03-17", 45))
    assert assess(timeline).status == "R"


@pytest.mark.parametrize("status", ["amended", "corrected"])
def test_amended_and_corrected_counts_count(status: str) -> None:
    timeline = story(10, count("03-10", 40), count("03-13", 5, status=status), count("03-17", 45))
    assert assess(timeline).status == "NR"


def test_entered_in_error_baseline_is_ignored() -> None:
    timeline = Timeline(
        "patient-1",
        counts=(
            PlateletCount("good", at(3, 2), 10),
            PlateletCount("bad", BASELINE_TIME, 30, status="entered-in-error"),
            count("03-10", 40),
            count("03-17", 45),
        ),
        administrations=(dose(),),
    )
    result = assess(timeline)
    assert result.baseline is not None and result.baseline.observation == "good"
    assert result.status == "R"


def test_entered_in_error_bleeding_assessment_is_ignored() -> None:
    timeline = replace(
        R_STORY, bleeding_assessments=(grade(at(3, 10, 12), 3, status="entered-in-error"),)
    )
    assert assess(timeline).status == "R"


def test_potential_bleeding_event_is_ignored() -> None:
    timeline = replace(
        R_STORY, bleeding_events=(BleedingEvent("ae", at(3, 10, 12), status="potential"),)
    )
    assert assess(timeline).status == "R"


def test_rescue_not_done_is_ignored() -> None:
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 5), status="not-done")))
    assert assess(timeline).status == "R"


# --- bleeding -----------------------------------------------------------------------------


@pytest.mark.parametrize(("who_grade", "status"), [(0, "R"), (1, "NR")])
def test_bleeding_assessment_grade_against_default_minimum(who_grade: int, status: str) -> None:
    timeline = replace(R_STORY, bleeding_assessments=(grade(at(3, 10, 12), who_grade),))
    assert assess(timeline).status == status


@pytest.mark.parametrize(("who_grade", "status"), [(1, "R"), (2, "NR")])
def test_bleeding_assessment_grade_against_raised_minimum(who_grade: int, status: str) -> None:
    timeline = replace(R_STORY, bleeding_assessments=(grade(at(3, 10, 12), who_grade),))
    assert assess(timeline, Criteria(bleeding_min_grade=2)).status == status


def test_count_with_bleeding_is_not_cr_qualifying() -> None:
    timeline = story(
        10,
        count("03-10", 150),
        count("03-17", 160),
        bleeding_assessments=(grade(at(3, 10, 12), 1),),
    )
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("NR", True)


def test_bleeding_evidence_is_in_clinical_order() -> None:
    late = BleedingAssessment("who-a", at(3, 10, 18), grade=2)
    early = BleedingAssessment("who-b", at(3, 10, 6), grade=1)
    event = BleedingEvent("ae-0", at(3, 10, 12))
    for reports in [(late, early), (early, late)]:
        timeline = replace(R_STORY, bleeding_assessments=reports, bleeding_events=(event,))
        evidence = assess(timeline).evidence
        assert (evidence["bleeding"], evidence["bleeding_events"]) == (["who-b", "who-a"], ["ae-0"])


def test_bleeding_on_another_day_does_not_mark_a_count() -> None:
    timeline = replace(R_STORY, bleeding_assessments=(grade(at(3, 9, 12), 4),))
    result = assess(timeline)
    assert result.status == "R"
    assert [(c.id, c.classification, c.bleeding) for c in result.classifications[1:]] == [
        ("who-2025-03-09T12:00:00+00:00", "failing", ()),  # an occasion of its own
        ("c-03-10", "qualifying-r", ()),
        ("c-03-17", "qualifying-r", ()),
    ]


def _classified(timeline: Timeline, criteria: Criteria) -> list[tuple[str, str]]:
    return [(c.id, c.classification) for c in assess(timeline, criteria).classifications]


def test_only_bleeds_after_the_start_instant_are_occasions() -> None:
    """On the dose day, with no count that day: a bleed before the dose and one at its very
    instant are history, one after it is a failing occasion (every one of the day's bleeds is
    looked at, not only those up to the first before the start)."""
    baseline = PlateletCount("baseline", at(3, 1), 10)  # no count on the dose day, 03-03
    timeline = Timeline(
        patient="patient-1",
        counts=(baseline, count("03-10", 40), count("03-17", 45)),
        administrations=(dose(),),
        bleeding_events=(
            BleedingEvent("before", DOSE - timedelta(minutes=30)),
            BleedingEvent("at-start", DOSE),
            BleedingEvent("after", DOSE + timedelta(minutes=30)),
        ),
    )
    assert _classified(timeline, INSTANT) == [
        ("baseline", "baseline-candidate"),
        ("after", "failing"),
        ("c-03-10", "qualifying-r"),
        ("c-03-17", "qualifying-r"),
    ]


@pytest.mark.parametrize(
    ("clock", "moment", "classification"),
    [
        ("calendar", at(3, 4, 23, 59), "not-evaluable"),
        ("calendar", at(3, 5, 0, 0), "failing"),
        ("instant", at(3, 5, 7, 59, 59), "not-evaluable"),
        ("instant", at(3, 5, 8), "failing"),
    ],
)
def test_first_evaluable_day_of_a_bleed_without_a_count(
    clock: str, moment: datetime, classification: str
) -> None:
    # Day 2 of treatment, as for counts: the second calendar day after the start's, or 48
    # hours after it, ends included.
    criteria = Criteria(first_evaluable_day=2, confirm_clock=clock)  # type: ignore[arg-type]
    timeline = replace(R_STORY, bleeding_events=(BleedingEvent("bleed", moment),))
    assert ("bleed", classification) in _classified(timeline, criteria)


def test_bleeding_event_same_trial_day_where_utc_date_differs() -> None:
    tokyo = Criteria(trial_timezone="Asia/Tokyo")
    # 03-17 16:00 UTC is 03-18 01:00 in Tokyo; the event 03-18 02:00 UTC is 03-18 11:00 there.
    timeline = story(
        10,
        PlateletCount("a", at(3, 10, 16), 40),
        PlateletCount("b", at(3, 17, 16), 45),
        bleeding_events=(BleedingEvent("ae-1", at(3, 18, 2)),),
    )
    # UTC days: R confirmed on 03-17, then a bleed on 03-18, a day without a count: lost.
    utc = assess(timeline)
    assert (utc.status, utc.episodes[0].end) == ("LOR", day("03-18"))
    result = assess(timeline, tokyo)
    assert result.status == "NR"  # same Tokyo day: 'b' is with bleeding, nothing confirms 'a'
    assert result.evidence["bleeding_events"] == ["ae-1"]
    assert result.evidence["bleeding"] == []


def test_bleeding_event_same_utc_day_but_other_trial_day() -> None:
    timeline = story(
        10,
        PlateletCount("a", at(3, 10, 14), 40),
        PlateletCount("b", at(3, 17, 14), 45),  # 03-17 23:00 in Tokyo
        bleeding_events=(BleedingEvent("ae-1", at(3, 17, 16)),),  # 03-18 01:00 in Tokyo
    )
    assert assess(timeline).status == "NR"  # 'b' is with bleeding
    tokyo = assess(timeline, Criteria(trial_timezone="Asia/Tokyo"))
    assert (tokyo.status, tokyo.episodes[0].end) == ("LOR", day("03-18"))  # an occasion


def test_one_count_with_bleeding_loses_response() -> None:
    timeline = replace(
        story(10, count("03-10", 40), count("03-17", 45), count("03-24", 80)),
        bleeding_assessments=(grade(at(3, 24, 10), 1),),
    )
    result = assess(timeline)
    assert result.status == "LOR"
    assert result.episodes[0].end == day("03-24")
    assert result.evidence["loss"] == ["c-03-24"]


def test_bleeding_loses_cr_and_response() -> None:
    timeline = replace(
        story(10, count("03-10", 110), count("03-17", 120), count("03-24", 150)),
        bleeding_events=(BleedingEvent("ae-1", at(3, 24, 18)),),
    )
    result = assess(timeline)
    assert (result.status, result.best_response) == ("LOR", "CR")
    assert result.episodes[0].cr_end == result.episodes[0].end == day("03-24")


# --- rescue -------------------------------------------------------------------------------


def test_qualifying_count_under_rescue_does_not_confirm() -> None:
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 12))))
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("NR", True)


def test_failing_count_under_rescue_does_not_break_confirmation() -> None:
    timeline = story(10, count("03-10", 40), count("03-13", 5), count("03-17", 45))
    assert assess(timeline).status == "NR"
    rescued = replace(timeline, administrations=(dose(), rescue(at(3, 13, 8))))
    # the rescue covers 03-13 and 03-17: 03-17 cannot confirm, 03-13 cannot fail
    assert assess(rescued).pending_confirmation is True
    short = Criteria(rescue_window_days=1)
    assert assess(rescued, short).status == "R"


def test_failing_counts_under_rescue_do_not_lose_response() -> None:
    timeline = story(
        10, count("03-10", 40), count("03-17", 45), count("04-07", 12), count("04-08", 11)
    )
    assert assess(timeline).status == "LOR"
    rescued = replace(timeline, administrations=(dose(), rescue(at(4, 6))))
    assert assess(rescued).status == "R"


@pytest.mark.parametrize(
    ("clock", "inside", "outside"),
    [
        ("instant", timedelta(0), timedelta(seconds=1)),  # 56 x 24 h after the rescue
        ("calendar", timedelta(hours=14, minutes=59), timedelta(hours=15)),  # end of the day
    ],
)
def test_rescue_window_edges(clock: str, inside: timedelta, outside: timedelta) -> None:
    given = at(3, 18)
    window = timedelta(days=56)
    response = (count("03-10", 40), count("03-17", 45))
    administrations = (dose(), rescue(given))
    follow_up = PlateletCount("later", given + window + timedelta(days=2), 5)
    criteria = Criteria(confirm_clock=clock)  # type: ignore[arg-type]

    def status_with(edge_offset: timedelta) -> str:
        edge = PlateletCount("edge", given + window + edge_offset, 5)
        timeline = replace(story(10, *response, edge, follow_up), administrations=administrations)
        return assess(timeline, criteria).status

    assert status_with(inside) == "R"  # at the window's end: under rescue, ignored
    assert status_with(outside) == "LOR"  # just outside: fails, confirmed later


# --- loss and re-response -----------------------------------------------------------------


def test_loss_of_response_needs_two_failing_counts() -> None:
    single = story(10, count("03-10", 40), count("03-17", 45), count("04-07", 25))
    assert assess(single).status == "R"


def test_loss_needs_no_qualifying_count_between() -> None:
    timeline = story(
        10,
        count("03-10", 40),
        count("03-17", 45),
        count("04-07", 25),
        count("04-08", 40),
        count("04-09", 22),
    )
    assert assess(timeline).status == "R"


def test_failing_counts_closer_than_loss_confirm_then_confirmed() -> None:
    timeline = story(
        10,
        count("03-10", 40),
        count("03-17", 45),
        PlateletCount("f1", at(4, 7, 9), 25),
        PlateletCount("f2", at(4, 7, 20), 24),
        PlateletCount("f3", at(4, 8, 9), 23),
    )
    result = assess(timeline)
    assert result.status == "LOR"
    assert result.evidence["loss"] == ["f1", "f3"]


def test_loss_of_r_gives_lor_with_episode_end() -> None:
    timeline = story(
        10, count("03-10", 40), count("03-17", 45), count("04-07", 25), count("04-08", 22)
    )
    result = assess(timeline)
    assert (result.status, result.best_response, result.pending_confirmation) == ("LOR", "R", False)
    assert result.episodes[0].end == day("04-07")
    assert result.evidence["loss"] == ["c-04-07", "c-04-08"]


def test_loss_of_cr_keeps_r_when_r_rule_holds() -> None:
    timeline = story(
        10, count("03-10", 110), count("03-17", 130), count("04-07", 70), count("04-08", 65)
    )
    result = assess(timeline)
    assert (result.status, result.best_response) == ("R", "CR")
    episode = result.episodes[0]
    assert (episode.level, episode.end, episode.cr_end) == ("CR", None, day("04-07"))
    assert not episode.in_complete_response


def test_loss_of_cr_with_failing_counts_is_lor() -> None:
    timeline = story(
        10, count("03-10", 110), count("03-17", 130), count("04-07", 25), count("04-08", 22)
    )
    result = assess(timeline)
    assert (result.status, result.best_response) == ("LOR", "CR")
    assert result.episodes[0].cr_end == result.episodes[0].end == day("04-07")


def test_cr_regained_within_the_same_episode() -> None:
    timeline = story(
        10,
        count("03-10", 110),
        count("03-17", 130),
        count("04-07", 70),
        count("04-08", 65),
        count("04-14", 120),
        count("04-21", 125),
    )
    result = assess(timeline)
    assert result.status == "CR"
    assert len(result.episodes) == 1
    periods = [(p.start, p.end) for p in result.episodes[0].cr_periods]
    assert periods == [(day("03-10"), day("04-07")), (day("04-14"), None)]


def test_re_response_after_lor_opens_a_second_episode() -> None:
    timeline = story(
        10,
        count("03-10", 40),
        count("03-17", 45),
        count("04-07", 25),
        count("04-08", 22),
        count("04-14", 50),
        count("04-21", 55),
    )
    result = assess(timeline)
    assert result.status == "R"
    assert [(e.start, e.end, e.duration_of_response_days) for e in result.episodes] == [
        (day("03-10"), day("04-07"), 28),
        (day("04-14"), None, 7),
    ]
    assert result.response_date == day("03-10")
    assert result.time_to_response_days == 7
    assert result.evidence["response"] == ["c-03-10", "c-03-17", "c-04-14", "c-04-21"]


def test_cr_after_lor_belongs_to_the_new_episode() -> None:
    timeline = story(
        10,
        count("03-10", 40),
        count("03-17", 45),
        count("04-07", 25),
        count("04-08", 22),
        count("04-14", 110),
        count("04-21", 120),
    )
    result = assess(timeline)
    assert (result.status, result.best_response) == ("CR", "CR")
    assert [(e.level, e.cr_start) for e in result.episodes] == [
        ("R", None),
        ("CR", day("04-14")),
    ]
    assert result.complete_response_date == day("04-14")
    assert result.time_to_complete_response_days == 42


def test_best_response_remembers_an_earlier_cr() -> None:
    timeline = story(
        10,
        count("03-10", 110),
        count("03-17", 120),
        count("04-07", 25),
        count("04-08", 22),
        count("04-14", 50),
        count("04-21", 55),
    )
    result = assess(timeline)
    assert (result.status, result.best_response) == ("R", "CR")
    assert [e.level for e in result.episodes] == ["CR", "R"]


def test_lor_then_pending_new_response() -> None:
    timeline = story(
        10,
        count("03-10", 40),
        count("03-17", 45),
        count("04-07", 25),
        count("04-08", 22),
        count("04-14", 50),
    )
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("LOR", True)


def test_ongoing_duration_runs_to_latest_evaluable_count() -> None:
    timeline = story(10, count("03-10", 40), count("03-17", 45), count("03-31", 5))
    rescued = replace(timeline, administrations=(dose(), rescue(at(3, 30))))
    result = assess(rescued)
    assert result.episodes[0].duration_of_response_days == 7  # 03-31 is under rescue


# --- ties and input checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("qualifying_id", "failing_id", "status"),
    [("x1", "x2", "R"), ("x2", "x1", "NR")],
    ids=["qualifying-first", "failing-first"],
)
def test_equal_timestamps_are_ordered_by_id(
    qualifying_id: str, failing_id: str, status: str
) -> None:
    qualifying = PlateletCount(qualifying_id, at(3, 17), 45)
    failing = PlateletCount(failing_id, at(3, 17), 10)
    for tied in [(qualifying, failing), (failing, qualifying)]:
        assert assess(story(10, count("03-10", 40), *tied)).status == status


NAIVE = datetime(2025, 3, 10, 9)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PlateletCount("naive", NAIVE, 40),
        lambda: BleedingAssessment("naive", NAIVE, 2),
        lambda: BleedingEvent("naive", NAIVE),
        lambda: Administration("naive", NAIVE, "study-drug"),
    ],
    ids=["PlateletCount", "BleedingAssessment", "BleedingEvent", "Administration"],
)
def test_naive_time_is_refused(build: Any, request: pytest.FixtureRequest) -> None:
    # The message names the record, so a lab can find the one it sent without a zone.
    kind = request.node.callspec.id
    with pytest.raises(ValueError, match=f"^{kind} 'naive': time must be timezone-aware$"):
        build()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"baseline_rule": "median"},
            r"baseline_rule must be one of \('last-before-start', 'mean-before-start'\)",
        ),
        ({"response_date_anchor": "last"}, r"response_date_anchor must be one of \('first', "),
        ({"confirm_clock": "sundial"}, r"confirm_clock must be one of \('calendar', 'instant'\)"),
        ({"trial_timezone": "Mars/Olympus"}, "unknown trial_timezone 'Mars/Olympus'"),
        (
            {"confirm_days": -1, "loss_confirm_days": -2},
            "criteria must not be negative: confirm_days, loss_confirm_days$",
        ),
        ({"rules_version": 3}, "rules_version must be 1 or 2"),
        (
            {"rules_version": 1},
            "rules_version 1 needs confirm_clock 'instant', "
            "baseline_rescue_exclusion_days 0 and first_evaluable_day 0",
        ),
    ],
)
def test_invalid_criteria_are_refused(settings: dict[str, object], message: str) -> None:
    # The message names the setting and what it may be: it reaches whoever set ITP_*.
    with pytest.raises(ValueError, match=message):
        Criteria(**settings)  # type: ignore[arg-type]


def test_output_is_json_ready_and_reproducible() -> None:
    criteria = Criteria(trial_timezone="Europe/Paris", confirm_days=5)
    result = assess(
        story(15, count("03-10", 60), count("03-17", 110), count("03-24", 125)), criteria
    )
    data = json.loads(json.dumps(result.as_dict()))
    assert data["status"] == "CR"
    assert data["treatment_start"] == "2025-03-03T08:00:00+00:00"
    assert data["episodes"][0]["start"] == "2025-03-10"
    assert data["baseline"] == {
        "value": 15.0,
        "observation": "baseline",
        "observations": ["baseline"],
        "date": "2025-03-03",
    }
    assert Criteria(**data["criteria"]) == criteria
    assert data["criteria"]["trial_timezone"] == "Europe/Paris"


def test_as_dict_spells_every_field_of_the_assessment() -> None:
    """The stored and served form of an assessment, field by field: CR reached, lost while
    R holds, then R lost to a count with bleeding; a count under rescue after it."""
    timeline = story(
        10,
        count("03-10", 110),
        count("03-17", 130),
        count("04-07", 70),
        count("04-21", 125),
        count("04-29", 20),
        administrations=(dose(), rescue(at(4, 28, 10))),
        bleeding_assessments=(grade(at(4, 21), 2),),
    )
    criteria = Criteria(trial_timezone="Europe/Paris")
    data = assess(timeline, criteria).as_dict()
    bleed, rescued = "who-2025-04-21T09:00:00+00:00", "rescue-2025-04-28T10:00:00+00:00"

    def row(
        ident: str, when: str, value: float, code: str, detail: str | None = None, **more: Any
    ) -> dict[str, Any]:
        return {
            "resource_type": "Observation",
            "id": ident,
            "time": f"{when}:00+00:00",
            "date": when[:10],
            "value": value,
            "classification": code,
            "detail": detail,
            "rescue": more.get("rescue"),
            "bleeding": more.get("bleeding", []),
        }

    assert data == {
        "patient": "patient-1",
        "status": "LOR",
        "status_reason": None,
        "best_response": "CR",
        "pending_confirmation": False,
        "baseline": {
            "value": 10,
            "observation": "baseline",
            "observations": ["baseline"],
            "date": "2025-03-03",
        },
        "treatment_start": "2025-03-03T08:00:00+00:00",
        "response_date": "2025-03-10",
        "complete_response_date": "2025-03-10",
        "time_to_response_days": 7,
        "time_to_complete_response_days": 7,
        "episodes": [
            {
                "start": "2025-03-10",
                "level": "CR",
                "end": "2025-04-21",
                "duration_of_response_days": 42,
                "cr_start": "2025-03-10",
                "cr_end": "2025-04-07",
                "cr_periods": [{"start": "2025-03-10", "end": "2025-04-07"}],
            }
        ],
        "evidence": {
            "baseline": ["baseline"],
            "response": ["c-03-10", "c-03-17"],
            "complete_response": ["c-03-10", "c-03-17"],
            "complete_response_loss": ["c-04-07", "c-04-21"],
            "loss": ["c-04-21"],
            "bleeding": [bleed],
            "bleeding_events": [],
        },
        "classifications": [
            row("baseline", "2025-03-03T07:00", 10, "baseline-candidate", "used as the baseline"),
            row("c-03-10", "2025-03-10T09:00", 110, "qualifying-cr"),
            row("c-03-17", "2025-03-17T09:00", 130, "qualifying-cr"),
            row("c-04-07", "2025-04-07T09:00", 70, "qualifying-r"),
            row(
                "c-04-21",
                "2025-04-21T09:00",
                125,
                "failing",
                "with bleeding",
                bleeding=[f"Observation/{bleed}"],
            ),
            row(
                "c-04-29",
                "2025-04-29T09:00",
                20,
                "under-rescue",
                "within 56 days after a rescue",
                rescue=rescued,
            ),
        ],
        "criteria": criteria.as_dict(),
    }


def test_evidence_ids_come_from_the_input() -> None:
    timeline = story(
        10, count("03-10", 110), count("03-17", 130), count("04-07", 25), count("04-08", 22)
    )
    result = assess(timeline)
    assert result.evidence == {
        "baseline": ["baseline"],
        "response": ["c-03-10", "c-03-17"],
        "complete_response": ["c-03-10", "c-03-17"],
        "complete_response_loss": ["c-04-07", "c-04-08"],
        "loss": ["c-04-07", "c-04-08"],
        "bleeding": [],
        "bleeding_events": [],
    }


def test_times_in_other_zones_compare_as_instants() -> None:
    paris = timezone(timedelta(hours=1))
    timeline = story(
        10,
        PlateletCount("a", at(3, 10).astimezone(paris), 40),
        PlateletCount("b", at(3, 17).astimezone(ZoneInfo("America/Los_Angeles")), 45),
    )
    assert assess(timeline).time_to_response_days == 7


def test_the_host_time_zone_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """No local time is read: on a server 14 hours ahead of UTC, where counts taken at noon
    UTC fall on the next local day, the result is the same as on a UTC server. The counts
    come in Paris time, so the engine has to convert them (to UTC, not to the host's zone)."""
    paris = ZoneInfo("Europe/Paris")
    noon = [at(3, d, 12).astimezone(paris) for d in (10, 17)]
    timeline = story(10, PlateletCount("a", noon[0], 40), PlateletCount("b", noon[1], 45))
    on_utc_host = assess(timeline)
    assert on_utc_host.response_date == day("03-10")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        assert assess(timeline) == on_utc_host
    finally:
        monkeypatch.undo()
        time.tzset()
