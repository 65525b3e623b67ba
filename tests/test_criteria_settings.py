"""The ITP_* settings of the response rules: read from the environment, refused when bad,
and handed to the engine whole (every assessment shows them under `criteria`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.engine import Criteria
from app.settings import CriteriaSettings


def test_defaults_are_the_rules_version_2_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(CriteriaSettings.model_fields):
        monkeypatch.delenv(f"ITP_{name.upper()}", raising=False)
    criteria = CriteriaSettings().to_criteria()
    assert criteria == Criteria()
    assert criteria.as_dict()["confirm_clock"] == "calendar"
    assert criteria.rules_version == 2


def test_version_1_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITP_CONFIRM_CLOCK", "instant")
    monkeypatch.setenv("ITP_BASELINE_RESCUE_EXCLUSION_DAYS", "0")
    monkeypatch.setenv("ITP_FIRST_EVALUABLE_DAY", "0")
    criteria = CriteriaSettings().to_criteria()
    assert (
        criteria.confirm_clock,
        criteria.baseline_rescue_exclusion_days,
        criteria.first_evaluable_day,
        criteria.rules_version,  # the settings of version 1, the rules of version 2
    ) == ("instant", 0, 0, 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ITP_CONFIRM_CLOCK", "hours"),
        ("ITP_BASELINE_RESCUE_EXCLUSION_DAYS", "-1"),
        ("ITP_FIRST_EVALUABLE_DAY", "-1"),
        ("ITP_FIRST_EVALUABLE_DAY", "one"),
    ],
)
def test_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("ITP_").lower()):
        CriteriaSettings()


def test_the_rules_version_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITP_RULES_VERSION", "1")
    assert CriteriaSettings().to_criteria().rules_version == 2
