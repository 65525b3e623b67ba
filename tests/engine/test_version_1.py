"""Rules version 1 stays reachable: with `confirm_clock = instant`, no baseline exclusion and
counts evaluable from the dose on, the version-2 rules give version 1's worked examples; and
an assessment stored under version 1 (its criteria without the version-2 keys) is reproduced
exactly, by `Criteria.from_stored`, for every timeline."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import VERSION_1_CRITERIA, Assessment, Criteria, Timeline, assess

from . import version_1_rules
from .test_examples import EXAMPLES, check
from .test_properties import criteria_strategy, timelines

# The settings a version-1 assessment stored, exactly as it stored them.
STORED_BY_VERSION_1 = {
    "r_threshold": 30.0,
    "cr_threshold": 100.0,
    "doubling_factor": 2.0,
    "confirm_days": 7,
    "loss_confirm_days": 1,
    "bleeding_min_grade": 1,
    "rescue_window_days": 56,
    "baseline_rule": "last-before-start",
    "baseline_lookback_days": 14,
    "response_date_anchor": "first",
    "trial_timezone": "UTC",
}
INSTANT = Criteria(confirm_clock="instant", baseline_rescue_exclusion_days=0, first_evaluable_day=0)


def test_stored_version_1_criteria_read_as_version_1() -> None:
    criteria = Criteria.from_stored(STORED_BY_VERSION_1)
    assert criteria == replace(INSTANT, rules_version=1)
    assert (
        criteria.rules_version,
        criteria.confirm_clock,
        criteria.baseline_rescue_exclusion_days,
        criteria.first_evaluable_day,
    ) == (1, "instant", 0, 0)
    assert criteria.as_dict() == {**STORED_BY_VERSION_1, **VERSION_1_CRITERIA}


def test_stored_version_2_criteria_read_as_they_were_stored() -> None:
    criteria = Criteria(confirm_clock="instant", first_evaluable_day=2, trial_timezone="Asia/Tokyo")
    assert Criteria.from_stored(criteria.as_dict()) == criteria
    assert Criteria.from_stored(Criteria().as_dict()).rules_version == 2


@pytest.mark.parametrize(
    "setting",
    [
        {"confirm_clock": "calendar"},
        {"baseline_rescue_exclusion_days": 14},
        {"first_evaluable_day": 1},
    ],
)
def test_version_1_had_none_of_the_new_settings(setting: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="rules_version 1"):
        Criteria(**{**VERSION_1_CRITERIA, **setting})


@pytest.mark.parametrize("value", [0, 3, "2"])
def test_unknown_rules_version_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="rules_version"):
        Criteria(rules_version=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize(
    "criteria", [INSTANT, Criteria.from_stored(STORED_BY_VERSION_1)], ids=["instant-0-0", "v1"]
)
def test_version_1_worked_examples(name: str, criteria: Criteria) -> None:
    timeline, expected = EXAMPLES[name]
    check(assess(timeline, criteria), expected)


def version_1_criteria() -> st.SearchStrategy[Criteria]:
    """Random criteria as version 1 could have stored them."""
    return criteria_strategy("instant").map(
        lambda drawn: replace(
            drawn, rules_version=1, baseline_rescue_exclusion_days=0, first_evaluable_day=0
        )
    )


def _without_classifications(assessment: Assessment) -> dict[str, Any]:
    # Version 1 classified nothing: its assessments have no classifications to compare.
    return {k: v for k, v in assessment.as_dict().items() if k != "classifications"}


@settings(max_examples=300, deadline=None)
@given(timelines(), version_1_criteria())
def test_version_1_assessments_are_reproduced_exactly(
    timeline: Timeline, criteria: Criteria
) -> None:
    stored = version_1_rules.assess(timeline, criteria)
    # What version 1 wrote: its criteria had none of version 2's keys.
    written = {k: v for k, v in stored.criteria.as_dict().items() if k not in VERSION_1_CRITERIA}
    reproduced = assess(timeline, Criteria.from_stored(written))
    assert _without_classifications(reproduced) == _without_classifications(stored)
