"""The rules version 2 added, one test per rule and edge: the baseline untouched by rescue,
bleeding occasions without a count, `stopped` doses, the classification of every record, and
the precisions on pending confirmation and best response."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

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
from .test_rules import INSTANT, R_STORY, VERSION_1, grade, rescue

DEFAULTS = Criteria()


def classes(timeline: Timeline, criteria: Criteria = DEFAULTS) -> dict[str, str]:
    return {c.id: c.classification for c in assess(timeline, criteria).classifications}


# --- a baseline untouched by rescue -------------------------------------------------------


LOOKBACK_21 = Criteria(baseline_lookback_days=21)


def baseline_story(*counts: PlateletCount, given: datetime) -> Timeline:
    """A count of 12 on 02-10, the morning count of 60 (03-03 07:00), then `counts`; one
    rescue. Looked back on 21 days, so both counts are in the baseline window."""
    return Timeline(
        "patient-1",
        counts=(
            PlateletCount("early", at(2, 10, 8), 12),
            PlateletCount("morning", BASELINE_TIME, 60),
            *counts,
        ),
        administrations=(dose(), rescue(given)),
    )


@pytest.mark.parametrize(
    ("given", "days", "baseline"),
    [
        (at(2, 17, 10), 14, 12),  # 03-03 is 14 calendar days after 02-17: excluded
        (at(2, 17, 10), 13, 60),
        (at(2, 16, 23), 14, 60),  # 15 calendar days
        (at(3, 3, 6, 59), 14, 12),
        (at(3, 3, 7, 30), 14, 60),  # after the count, on its day: the count is not excluded
        (at(3, 3, 6), 0, 60),  # 0 turns the exclusion off
    ],
)
def test_baseline_rescue_exclusion_on_calendar_days(
    given: datetime, days: int, baseline: float
) -> None:
    criteria = replace(LOOKBACK_21, baseline_rescue_exclusion_days=days)
    result = assess(baseline_story(given=given), criteria)
    assert result.baseline is not None and result.baseline.value == baseline


@pytest.mark.parametrize(("earlier", "baseline"), [(timedelta(0), 12), (timedelta(seconds=1), 60)])
def test_baseline_rescue_exclusion_as_instants(earlier: timedelta, baseline: float) -> None:
    given = BASELINE_TIME - timedelta(days=14) - earlier  # 14 x 24 h before the morning count
    criteria = replace(INSTANT, baseline_rescue_exclusion_days=14, baseline_lookback_days=21)
    result = assess(baseline_story(given=given), criteria)
    assert result.baseline is not None and result.baseline.value == baseline


def test_the_mean_rule_averages_the_candidates_only() -> None:
    timeline = baseline_story(PlateletCount("later", at(2, 20), 8), given=at(2, 19))
    criteria = replace(LOOKBACK_21, baseline_rule="mean-before-start")
    result = assess(timeline, criteria)  # 'later' and 'morning' are after the rescue
    assert result.baseline is not None
    assert (result.baseline.value, result.baseline.observations) == (12, ("early",))
    result = assess(timeline, replace(criteria, baseline_rescue_exclusion_days=0))
    assert result.baseline is not None
    assert result.baseline.observations == ("early", "later", "morning")


def test_excluded_and_unused_candidates_are_classified() -> None:
    timeline = baseline_story(
        PlateletCount("between", at(2, 15), 20), count("03-10", 39), given=at(2, 25, 10)
    )
    criteria = replace(LOOKBACK_21, rescue_window_days=7)
    result = assess(timeline, criteria)
    rescue_id = "rescue-2025-02-25T10:00:00+00:00"
    assert [(c.id, c.classification, c.detail, c.rescue) for c in result.classifications] == [
        ("early", "baseline-candidate", "not used (a later count is the baseline)", None),
        ("between", "baseline-candidate", "used as the baseline", None),
        ("morning", "excluded-by-rescue", "within 14 days after a rescue", rescue_id),
        ("c-03-10", "failing", "below 2 x baseline", None),
    ]
    shorter = replace(criteria, baseline_lookback_days=14)  # 02-10 leaves the window
    assert classes(timeline, shorter)["early"] == "not-evaluable"


@pytest.mark.parametrize(
    ("status", "counts"),
    [("stopped", True), ("in-progress", True), ("on-hold", False), ("unknown", False)],
)
def test_a_rescue_stopped_part_way_is_a_rescue(status: str, counts: bool) -> None:
    # A transfusion or IVIg interrupted part-way has still raised the count, as an
    # interrupted study-drug infusion has still exposed the patient; version 1 ignored it.
    timeline = replace(R_STORY, administrations=(dose(), rescue(at(3, 9), status=status)))
    # Under that rescue every count after the dose is ignored: nothing is evaluable yet.
    assert assess(timeline).status == ("NE" if counts else "R")
    assert (assess(timeline, VERSION_1).status == "R") is (status != "in-progress")


# --- bleeding occasions without a count ---------------------------------------------------


def test_a_bleed_without_a_count_breaks_a_confirmation() -> None:
    timeline = replace(R_STORY, bleeding_assessments=(grade(at(3, 13), 2),))
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("NR", True)  # 03-17 awaits its own
    assert result.evidence["bleeding"] == ["who-2025-03-13T09:00:00+00:00"]
    assert assess(timeline, VERSION_1).status == "R"  # version 1 ignored it


def test_a_bleed_below_the_minimum_grade_is_no_occasion() -> None:
    timeline = replace(R_STORY, bleeding_assessments=(grade(at(3, 13), 1),))
    assert assess(timeline, Criteria(bleeding_min_grade=2)).status == "R"


@pytest.mark.parametrize("status", ["entered-in-error", "preliminary"])
def test_a_count_that_is_no_input_leaves_the_day_without_a_count(status: str) -> None:
    timeline = replace(
        story(10, count("03-10", 40), count("03-13", 45, status=status), count("03-17", 45)),
        bleeding_assessments=(grade(at(3, 13, 12), 2),),
    )
    assert classes(timeline)["who-2025-03-13T12:00:00+00:00"] == "failing"
    assert assess(timeline).status == "NR"


def test_a_bleed_on_a_day_with_a_count_marks_the_count_instead() -> None:
    timeline = replace(
        story(10, count("03-10", 40), count("03-11", 45), count("03-17", 45), count("03-24", 45)),
        bleeding_events=(BleedingEvent("ae-1", at(3, 11, 20)),),
    )
    result = assess(timeline)
    [marked] = [c for c in result.classifications if c.id == "c-03-11"]
    assert (marked.classification, marked.detail, marked.bleeding) == (
        "failing",
        "with bleeding",
        ("AdverseEvent/ae-1",),
    )
    assert "ae-1" not in classes(timeline)  # not an occasion of its own
    assert result.response_date == day("03-17")


def test_a_bleed_on_a_day_whose_only_count_is_rescued_is_ignored() -> None:
    # The day has a count (under rescue): the bleed marks it, and it is ignored with it.
    timeline = replace(
        story(10, count("03-10", 40), count("03-13", 45), count("03-20", 45), count("03-27", 45)),
        bleeding_assessments=(grade(at(3, 13, 12), 2),),
        administrations=(dose(), rescue(at(3, 12))),
    )
    rescued = Criteria(rescue_window_days=1)  # 03-12 and 03-13
    result = assess(timeline, rescued)
    assert classes(timeline, rescued)["c-03-13"] == "under-rescue"
    assert result.evidence["bleeding"] == []
    assert result.response_date == day("03-10")


def test_a_bleed_on_the_start_day_is_not_evaluable() -> None:
    bleed = grade(at(3, 3, 20), 2)
    timeline = Timeline(
        "patient-1",
        counts=(PlateletCount("base", at(3, 2), 10), count("03-10", 40), count("03-17", 45)),
        bleeding_assessments=(bleed,),
        administrations=(dose(),),
    )
    assert classes(timeline)[bleed.id] == "not-evaluable"
    assert classes(timeline, Criteria(first_evaluable_day=0))[bleed.id] == "failing"
    # A bleed on the start day that has the baseline count: the day has a count, no occasion.
    assert bleed.id not in classes(replace(R_STORY, bleeding_assessments=(bleed,)))


def test_a_bleed_under_rescue_is_ignored() -> None:
    rescued = replace(
        R_STORY,
        bleeding_assessments=(grade(at(3, 13), 2),),
        administrations=(dose(), rescue(at(3, 12, 20))),
    )
    criteria = Criteria(rescue_window_days=2)  # 03-12 20:00 to the end of 03-14
    assert classes(rescued, criteria)["who-2025-03-13T09:00:00+00:00"] == "under-rescue"
    assert assess(rescued, criteria).status == "R"


def test_a_bleed_after_a_response_is_a_loss_on_its_day() -> None:
    timeline = replace(
        story(10, count("03-10", 110), count("03-17", 120), count("04-07", 130)),
        bleeding_events=(BleedingEvent("ae-1", at(3, 30, 22)),),
    )
    result = assess(timeline)
    assert (result.status, result.best_response) == ("LOR", "CR")
    episode = result.episodes[0]
    assert (episode.end, episode.cr_end, episode.duration_of_response_days) == (
        day("03-30"),
        day("03-30"),
        20,
    )
    assert result.evidence["bleeding_events"] == ["ae-1"]
    assert result.evidence["loss"] == []  # the loss is the bleed, an AdverseEvent
    [bleed] = [c for c in result.classifications if c.id == "ae-1"]
    assert (bleed.resource_type, bleed.value, bleed.classification) == (
        "AdverseEvent",
        None,
        "failing",
    )


def test_a_failing_count_then_a_bleed_loses_on_the_first_failing_occasion() -> None:
    timeline = replace(
        story(10, count("03-10", 40), count("03-17", 45), count("04-07", 20)),
        bleeding_assessments=(grade(at(4, 8), 3),),
    )
    result = assess(timeline)
    assert (result.status, result.episodes[0].end) == ("LOR", day("04-07"))
    assert result.evidence["loss"] == ["c-04-07"]
    assert result.evidence["bleeding"] == ["who-2025-04-08T09:00:00+00:00"]


def test_two_bleeds_on_a_day_without_a_count_are_two_occasions() -> None:
    timeline = replace(
        R_STORY,
        bleeding_assessments=(grade(at(3, 13, 15), 2),),
        bleeding_events=(BleedingEvent("ae-1", at(3, 13, 15)), BleedingEvent("ae-0", at(3, 13, 7))),
    )
    result = assess(timeline)
    assert [(c.resource_type, c.id) for c in result.classifications if c.value is None] == [
        ("AdverseEvent", "ae-0"),
        ("Observation", "who-2025-03-13T15:00:00+00:00"),  # at the same instant: grades first
        ("AdverseEvent", "ae-1"),
    ]
    assert result.evidence["bleeding_events"] == ["ae-0", "ae-1"]


# --- pending confirmation and best response -----------------------------------------------


def test_a_bleed_after_a_qualifying_count_ends_the_wait() -> None:
    timeline = replace(story(10, count("03-10", 40)), bleeding_assessments=(grade(at(3, 12), 2),))
    assert assess(timeline).pending_confirmation is False
    assert assess(story(10, count("03-10", 40))).pending_confirmation is True


def test_a_patient_in_lor_can_await_a_new_response() -> None:
    timeline = replace(
        story(10, count("03-10", 40), count("03-17", 45), count("03-31", 50)),
        bleeding_assessments=(grade(at(3, 24), 2),),
    )
    result = assess(timeline)
    assert (result.status, result.pending_confirmation, result.best_response) == ("LOR", True, "R")


def test_a_cr_qualifying_count_in_r_awaits_cr() -> None:
    timeline = story(10, count("03-10", 40), count("03-17", 45), count("03-24", 110))
    result = assess(timeline)
    assert (result.status, result.pending_confirmation) == ("R", True)


# --- stopped study-drug administrations --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "starts"),
    [("stopped", True), ("in-progress", True), ("on-hold", False), ("unknown", False)],
)
def test_which_study_drug_administrations_start_treatment(status: str, starts: bool) -> None:
    timeline = replace(R_STORY, administrations=(dose(status=status),))
    assert (assess(timeline).treatment_start == DOSE) is starts
    assert (assess(timeline, VERSION_1).treatment_start == DOSE) is (status == "in-progress")


# --- every record classified ------------------------------------------------------------


def test_every_count_and_occasion_is_classified_in_clinical_order() -> None:
    timeline = Timeline(
        "patient-1",
        counts=(
            PlateletCount("too-old", at(2, 1), 9),
            PlateletCount("b1", at(2, 20), 14),
            PlateletCount("b2", BASELINE_TIME, 12),
            PlateletCount("same-day", at(3, 3, 12), 50),
            count("03-10", 40),
            count("03-11", 22),
            count("03-12", 35),
            count("03-17", 110),
            count("03-20", 50),
            count("03-24", 70),
            PlateletCount("void", at(3, 26), 5, status="entered-in-error"),
        ),
        bleeding_assessments=(
            grade(at(3, 12, 18), 2),
            grade(at(3, 14), 3),
            grade(at(3, 26), 2),
            grade(at(3, 28), 0),
        ),
        administrations=(dose(), rescue(at(3, 19, 12))),
    )
    result = assess(timeline, Criteria(rescue_window_days=2))
    rescue_id = "rescue-2025-03-19T12:00:00+00:00"
    bleed = "who-2025-03-12T18:00:00+00:00"
    assert [
        (c.id, c.classification, c.detail, c.rescue, c.bleeding) for c in result.classifications
    ] == [
        ("too-old", "not-evaluable", "before the baseline window", None, ()),
        ("b1", "baseline-candidate", "not used (a later count is the baseline)", None, ()),
        ("b2", "baseline-candidate", "used as the baseline", None, ()),
        ("same-day", "not-evaluable", "before day 1 of treatment", None, ()),
        ("c-03-10", "qualifying-r", None, None, ()),
        ("c-03-11", "failing", "below 30", None, ()),
        ("c-03-12", "failing", "with bleeding", None, (f"Observation/{bleed}",)),
        ("who-2025-03-14T09:00:00+00:00", "failing", "bleeding without a count", None, ()),
        ("c-03-17", "qualifying-cr", None, None, ()),
        ("c-03-20", "under-rescue", "within 2 days after a rescue", rescue_id, ()),
        ("c-03-24", "qualifying-r", None, None, ()),
        ("who-2025-03-26T09:00:00+00:00", "failing", "bleeding without a count", None, ()),
    ]
    assert result.classifications[4].value == 40 and result.classifications[4].date == day("03-10")


def test_a_count_below_twice_the_baseline() -> None:
    result = assess(story(60, count("03-10", 105), count("03-17", 90)))
    assert [(c.classification, c.detail) for c in result.classifications[1:]] == [
        ("qualifying-cr", "below 2 x baseline"),  # CR-qualifying, not R-qualifying
        ("failing", "below 2 x baseline"),
    ]


def test_classifications_are_json_ready() -> None:
    timeline = replace(R_STORY, bleeding_events=(BleedingEvent("ae-1", at(3, 20)),))
    data = json.loads(json.dumps(assess(timeline).as_dict()))
    assert data["classifications"][-1] == {
        "resource_type": "AdverseEvent",
        "id": "ae-1",
        "time": "2025-03-20T09:00:00+00:00",
        "date": "2025-03-20",
        "value": None,
        "classification": "failing",
        "detail": "bleeding without a count",
        "rescue": None,
        "bleeding": [],
    }
    assert data["criteria"]["confirm_clock"] == "calendar"
    assert data["criteria"]["rules_version"] == 2


# --- the new settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        {"confirm_clock": "hours"},
        {"baseline_rescue_exclusion_days": -1},
        {"first_evaluable_day": -1},
    ],
)
def test_invalid_new_settings_are_refused(setting: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Criteria(**setting)  # type: ignore[arg-type]


def test_defaults_of_the_new_settings() -> None:
    criteria = Criteria()
    assert (
        criteria.confirm_clock,
        criteria.baseline_rescue_exclusion_days,
        criteria.first_evaluable_day,
        criteria.rules_version,
    ) == ("calendar", 14, 1, 2)


def test_loss_counts_calendar_days_too() -> None:
    # Two failing counts 20 hours apart on two calendar days: 1 day apart on the calendar.
    timeline = story(
        10,
        count("03-10", 40),
        count("03-17", 45),
        PlateletCount("f1", at(4, 7, 14), 20),
        PlateletCount("f2", at(4, 8, 10), 20),
    )
    assert assess(timeline).status == "LOR"
    assert assess(timeline, Criteria(confirm_clock="instant")).status == "R"
    # Two on one calendar day are never a day apart.
    f1, f2 = PlateletCount("f1", at(4, 7), 20), PlateletCount("f2", at(4, 7, 23), 20)
    same_day = replace(timeline, counts=(*timeline.counts[:3], f1, f2))
    assert assess(same_day).status == "R"


def test_administration_roles_are_unchanged() -> None:
    other = Administration("c", at(3, 1), role="concomitant")
    timeline = replace(R_STORY, administrations=(other, dose()))
    assert assess(timeline).treatment_start == DOSE
    assert BleedingAssessment  # imported for the grade builder's type
