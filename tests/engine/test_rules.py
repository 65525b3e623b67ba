"""One test per rule and per criteria setting of response-criteria.md, plus the edges."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from app.engine import (
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


def rescue(when: datetime, status: str = "completed") -> Administration:
    return Administration(id=f"rescue-{when.isoformat()}", time=when, role="rescue", status=status)


def grade(when: datetime, value: int, status: str = "final") -> BleedingAssessment:
    return BleedingAssessment(id=f"who-{when.isoformat()}", time=when, grade=value, status=status)


# --- every setting changes an outcome where it should -------------------------------------


def test_r_threshold() -> None:
    timeline = story(10, count("03-10", 25), count("03-17", 26))
    assert assess(timeline).status == "NR"
    assert assess(timeline, Criteria(r_threshold=25)).status == "R"


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
    assert assess(timeline).status == "NR"  # both counts within 56 days of the rescue
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
    assert result.status == "NE"
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


def test_counts_one_second_short_do_not_confirm() -> None:
    timeline = story(
        10, PlateletCount("a", at(3, 10), 40), PlateletCount("b", at(3, 17, 8, 59, 59), 45)
    )
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("NR", True)


NEW_YORK = ZoneInfo("America/New_York")  # clocks go forward on 2025-03-09


@pytest.mark.parametrize(("hour", "status"), [(9, "NR"), (10, "R")])
def test_confirm_days_count_instants_across_daylight_saving(hour: int, status: str) -> None:
    # 09:00 EST to 09:00 EDT a week later is 6 days 23 hours.
    first = PlateletCount("a", datetime(2025, 3, 5, 9, tzinfo=NEW_YORK), 40)
    second = PlateletCount("b", datetime(2025, 3, 12, hour, tzinfo=NEW_YORK), 45)
    assert assess(story(10, first, second)).status == status


@pytest.mark.parametrize(
    ("after_end", "status"), [(timedelta(0), "NR"), (timedelta(seconds=1), "R")]
)
def test_rescue_window_counts_instants_across_daylight_saving(
    after_end: timedelta, status: str
) -> None:
    given = datetime(2025, 1, 20, 3, tzinfo=NEW_YORK)  # 08:00 UTC; + 56 x 24 h = 03-17 08:00 UTC
    edge = PlateletCount("edge", (at(3, 17, 8) + after_end).astimezone(NEW_YORK), 45)
    timeline = story(10, edge, count("03-24", 48), administrations=(dose(), rescue(given)))
    assert assess(timeline).status == status


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


def test_response_on_start_day_is_day_zero() -> None:
    timeline = story(
        10, PlateletCount("same-day", at(3, 3, 20), 40), count("03-10", 45), count("03-11", 45)
    )
    result = assess(timeline)
    assert (result.response_date, result.time_to_response_days) == (day("03-03"), 0)


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


def test_baseline_at_exact_lookback_edge_counts() -> None:
    edge = PlateletCount("edge", DOSE - timedelta(days=14), 10)
    timeline = Timeline("patient-1", counts=(edge, count("03-10", 40)), administrations=(dose(),))
    assert assess(timeline).status == "NR"
    moved = replace(
        timeline, counts=(replace(edge, time=edge.time - timedelta(seconds=1)), count("03-10", 40))
    )
    assert assess(moved).status == "NE"


# --- not evaluable ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeline", "reason"),
    [
        (story(10, count("03-10", 40), administrations=()), "no study-drug administration"),
        (
            story(10, count("03-10", 40), administrations=(dose(status="not-done"),)),
            "no study-drug administration",
        ),
        (
            story(
                10,
                count("03-10", 40),
                administrations=(Administration("c", DOSE, role="concomitant"), rescue(DOSE)),
            ),
            "no study-drug administration",
        ),
        (
            story(None, count("03-10", 40)),
            "no platelet count in the 14 days up to the treatment start",
        ),
        (story(10), "no platelet count after the treatment start"),
        (
            story(10, PlateletCount("at-dose", DOSE, 40)),
            "no platelet count after the treatment start",
        ),
        (
            story(10, count("03-10", 40, status="preliminary")),
            "no platelet count after the treatment start",
        ),
    ],
    ids=[
        "no-dose",
        "dose-not-done",
        "only-other-roles",
        "no-baseline",
        "no-follow-up",
        "only-count-at-dose",
        "only-preliminary",
    ],
)
def test_not_evaluable_reasons(timeline: Timeline, reason: str) -> None:
    result = assess(timeline)
    assert (result.status, result.status_reason) == ("NE", reason)
    assert result.best_response is None
    assert result.pending_confirmation is False
    assert result.episodes == ()


def test_not_evaluable_keeps_known_baseline_and_start() -> None:
    result = assess(story(10))
    assert result.treatment_start == DOSE
    assert result.baseline is not None and result.baseline.value == 10
    assert result.evidence["baseline"] == ["baseline"]


def test_all_follow_up_under_rescue_is_no_response() -> None:
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 4))))
    result = assess(timeline)
    assert (result.status, result.best_response, result.pending_confirmation) == ("NR", "NR", False)


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
    timeline = replace(R_STORY, bleeding_assessments=(grade(at(3, 11, 12), 4),))
    assert assess(timeline).status == "R"


def test_bleeding_event_same_trial_day_where_utc_date_differs() -> None:
    tokyo = Criteria(trial_timezone="Asia/Tokyo")
    # 03-10 16:00 UTC is 03-11 01:00 in Tokyo; the event 03-11 02:00 UTC is 03-11 11:00 there.
    timeline = story(
        10,
        PlateletCount("a", at(3, 10, 16), 40),
        PlateletCount("b", at(3, 17, 16), 45),
        bleeding_events=(BleedingEvent("ae-1", at(3, 11, 2)),),
    )
    assert assess(timeline).status == "R"  # different UTC days
    result = assess(timeline, tokyo)
    assert result.status == "NR"  # same Tokyo day: 'a' is with bleeding
    assert result.evidence["bleeding_events"] == ["ae-1"]
    assert result.evidence["bleeding"] == []


def test_bleeding_event_same_utc_day_but_other_trial_day() -> None:
    timeline = story(
        10,
        PlateletCount("a", at(3, 10, 14), 40),  # 03-10 23:00 in Tokyo
        PlateletCount("b", at(3, 17, 14), 45),
        bleeding_events=(BleedingEvent("ae-1", at(3, 10, 16)),),  # 03-11 01:00 in Tokyo
    )
    assert assess(timeline).status == "NR"
    assert assess(timeline, Criteria(trial_timezone="Asia/Tokyo")).status == "R"


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


def test_rescue_window_edges() -> None:
    given = at(3, 18)
    window = timedelta(days=56)
    response = (count("03-10", 40), count("03-17", 45))
    administrations = (dose(), rescue(given))
    follow_up = PlateletCount("later", given + window + timedelta(days=2), 5)

    def status_with(edge_offset: timedelta) -> str:
        edge = PlateletCount("edge", given + window + edge_offset, 5)
        timeline = replace(story(10, *response, edge, follow_up), administrations=administrations)
        return assess(timeline).status

    assert status_with(timedelta(0)) == "R"  # at the window's end: under rescue, ignored
    assert status_with(timedelta(seconds=1)) == "LOR"  # just outside: fails, confirmed later


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


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        PlateletCount("naive", datetime(2025, 3, 10, 9), 40)


@pytest.mark.parametrize(
    "settings",
    [
        {"baseline_rule": "median"},
        {"response_date_anchor": "last"},
        {"trial_timezone": "Mars/Olympus"},
        {"confirm_days": -1},
    ],
)
def test_invalid_criteria_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
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
