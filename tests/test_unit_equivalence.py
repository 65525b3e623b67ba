"""Equivalent units give the same result: a property over the normalisation the service
applies before the engine sees a count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import Administration, PlateletCount, Timeline, assess
from app.kit.limits import InputLimits
from app.services.indexing import normalised_platelet_value

LIMITS = InputLimits()

START = datetime(2025, 3, 3, 8, tzinfo=UTC)
# (unit code, factor from 10^9/L to that unit)
EQUIVALENT_UNITS = [
    ("10*9/L", 1),
    ("10*3/uL", 1),
    ("10*3/mm3", 1),
    ("/uL", 1000),
    ("/mm3", 1000),
    ("10*6/L", 1000),
]
LAB_SPELLINGS = [("K/uL", 1), ("x10^9/L", 1), ("10^9/L", 1), ("x10E3/uL", 1)]


def _observation(value: float, unit: str, ucum: bool) -> dict:
    quantity = {"value": value, "unit": unit}
    if ucum:
        quantity |= {"system": "http://unitsofmeasure.org", "code": unit}
    return {"valueQuantity": quantity}


counts = st.lists(
    st.tuples(
        st.integers(min_value=-3, max_value=120),  # day relative to the first dose
        st.integers(min_value=1, max_value=400),
    ),  # count in 10^9/L
    min_size=1,
    max_size=12,
)


@settings(max_examples=120, deadline=None)
@given(counts=counts, units=st.data())
def test_equivalent_units_give_the_same_assessment(counts, units):
    reference, converted = [], []
    for index, (day, value) in enumerate(counts):
        time = START + timedelta(days=day, hours=1)
        reference.append(PlateletCount(f"c{index}", time, float(value)))
        unit, factor = units.draw(st.sampled_from(EQUIVALENT_UNITS + LAB_SPELLINGS))
        ucum = (unit, factor) in EQUIVALENT_UNITS
        normalised = normalised_platelet_value(_observation(value * factor, unit, ucum), LIMITS)
        assert normalised is not None
        converted.append(PlateletCount(f"c{index}", time, normalised))
    dose = (Administration("d1", START, "study-drug"),)
    expected = assess(Timeline("p", tuple(reference), administrations=dose))
    actual = assess(Timeline("p", tuple(converted), administrations=dose))
    assert actual == expected
