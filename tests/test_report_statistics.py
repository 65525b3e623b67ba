"""The report's statistics against independent computations.

The exact binomial interval is checked against the beta-quantile formula and published
values; the Kaplan-Meier median and its Brookmeyer-Crowley interval against a product-limit
estimate with Greenwood's variance written out here from the textbook formulas (no scipy),
on fixed data sets and on random ones."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta

from app.report.statistics import Duration, duration_of_response, proportion


def _clopper_pearson(x: int, n: int) -> tuple[float, float]:
    low = 0.0 if x == 0 else beta.ppf(0.025, x, n - x + 1)
    high = 1.0 if x == n else beta.ppf(0.975, x + 1, n - x)
    return low, high


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    [
        # Exact limits as tables of binomial confidence limits give them.
        (10, 20, 0.2720, 0.7280),
        (0, 20, 0.0, 0.1684),
        (20, 20, 0.8316, 1.0),
        (1, 10, 0.0025, 0.4450),
    ],
)
def test_exact_interval_matches_published_limits(x, n, low, high):
    result = proportion(x, n)
    assert result["method"] == "Clopper-Pearson"
    assert (result["responders"], result["n"]) == (x, n)
    assert result["rate"] == pytest.approx(x / n)
    assert result["ci95_low"] == pytest.approx(low, abs=5e-5)
    assert result["ci95_high"] == pytest.approx(high, abs=5e-5)


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
@settings(max_examples=200, deadline=None)
def test_exact_interval_is_the_beta_quantile_formula(case):
    x, n = case
    result = proportion(x, n)
    low, high = _clopper_pearson(x, n)
    assert result["ci95_low"] == pytest.approx(low, abs=1e-9)
    assert result["ci95_high"] == pytest.approx(high, abs=1e-9)


def test_no_treated_patient_has_no_rate():
    assert proportion(0, 0) == {
        "responders": 0,
        "n": 0,
        "rate": None,
        "ci95_low": None,
        "ci95_high": None,
        "method": "Clopper-Pearson",
    }


def _reference_km(durations: list[Duration]) -> dict:
    """Product-limit estimate, Greenwood variance, log-log band, by hand."""
    z = NormalDist().inv_cdf(0.975)
    times = sorted({d.days for d in durations})
    survival, greenwood = 1.0, 0.0
    steps = []
    for t in times:
        at_risk = sum(1 for d in durations if d.days >= t)
        deaths = sum(1 for d in durations if d.days == t and d.event)
        if deaths:
            survival *= 1 - deaths / at_risk
            if at_risk > deaths:
                greenwood += deaths / (at_risk * (at_risk - deaths))
        if 0 < survival < 1:
            sigma = math.sqrt(greenwood) / abs(math.log(survival))
            low = survival ** math.exp(z * sigma)
            high = survival ** math.exp(-z * sigma)
        else:  # the band is undefined at 1 and 0: the report takes the estimate there
            low = high = survival
        steps.append((t, survival, low, high))

    def first(index: int) -> float | None:
        return next((step[0] for step in steps if step[index] <= 0.5 + 1e-12), None)

    return {
        "n": len(durations),
        "events": sum(d.event for d in durations),
        "median": first(1),
        "ci95_low": first(2),
        "ci95_high": first(3),
    }


def _durations(pairs: list[tuple[float, int]]) -> list[Duration]:
    return [Duration(days, bool(event)) for days, event in pairs]


# R's `aml` data, maintained arm: 9, 13, 13+, 18, 23, 28+, 31, 34, 45+, 48, 161+.
AML = [(9, 1), (13, 1), (13, 0), (18, 1), (23, 1), (28, 0), (31, 1), (34, 1), (45, 0), (48, 1)]
AML.append((161, 0))


def test_kaplan_meier_median_of_a_known_data_set():
    result = duration_of_response(_durations(AML))
    # The product-limit estimate first falls to 0.5 or below at 31 (0.614 -> 0.491); the
    # log-log band's lower edge at 13 (0.447), its upper edge never (0.525 at the end).
    assert result == {"n": 11, "events": 7, "median": 31, "ci95_low": 13, "ci95_high": None}
    assert result == _reference_km(_durations(AML))


@pytest.mark.parametrize(
    ("name", "pairs", "expected"),
    [
        ("no responder", [], {"n": 0, "events": 0, "median": None}),
        (
            "everyone censored: nothing is reached",
            [(10, 0), (20, 0), (30, 0)],
            {"n": 3, "events": 0, "median": None, "ci95_low": None, "ci95_high": None},
        ),
        (
            "everyone lost response: the curve reaches 0",
            [(10, 1), (20, 1), (30, 1), (40, 1)],
            {"n": 4, "events": 4, "median": 20, "ci95_high": 40},
        ),
        ("one responder who lost it", [(14, 1)], {"n": 1, "events": 1, "median": 14}),
        (
            "a median not reached with the lower limit reached",
            [(5, 1), (10, 0), (20, 0), (30, 0), (40, 0), (50, 0)],
            {"events": 1, "median": None, "ci95_high": None},
        ),
    ],
)
def test_kaplan_meier_edge_cases(name, pairs, expected):
    result = duration_of_response(_durations(pairs))
    for key, value in expected.items():
        assert result[key] == value, (name, key, result)
    assert result == _reference_km(_durations(pairs)), name


@given(
    st.lists(
        st.tuples(st.integers(0, 120), st.integers(0, 1)),
        min_size=1,
        max_size=40,
    )
)
@settings(max_examples=300, deadline=None)
def test_kaplan_meier_agrees_with_the_textbook_formulas(pairs):
    durations = _durations(pairs)
    assert duration_of_response(durations) == _reference_km(durations)
