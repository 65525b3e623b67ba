"""The report's statistics, from scipy.stats (the reference implementations), never hand-rolled.

- Proportions (ORR, CR rate): the exact Clopper-Pearson 95% interval,
  `binomtest(x, n).proportion_ci(method="exact")`.
- Duration of response: the Kaplan-Meier estimate (`ecdf` over `CensoredData`) and its
  pointwise 95% band with Greenwood's variance on the log-log scale (Kalbfleisch-Prentice,
  `method="log-log"`). The median is the smallest time at which the estimate is 0.5 or
  below; its 95% interval is the Brookmeyer-Crowley one read off that band: from the first
  time the band's lower edge is 0.5 or below to the first time its upper edge is (SAS PROC
  LIFETEST's default transform; R's `survfit(conf.type = "log-log")`). Unlike R and SAS,
  no midpoint is taken when the curve sits exactly at 0.5: the first time is reported.
  A limit the data do not reach is None.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
PROPORTION_METHOD = "Clopper-Pearson"


def proportion(responders: int, n: int) -> dict[str, Any]:
    """`{responders, n, rate, ci95_low, ci95_high, method}`; rate and interval None when n=0."""
    if n == 0:
        low = high = rate = None
    else:
        interval = stats.binomtest(responders, n).proportion_ci(
            confidence_level=CONFIDENCE, method="exact"
        )
        rate, low, high = responders / n, float(interval.low), float(interval.high)
    return {
        "responders": responders,
        "n": n,
        "rate": rate,
        "ci95_low": low,
        "ci95_high": high,
        "method": PROPORTION_METHOD,
    }


def describe(values: Sequence[float]) -> dict[str, Any]:
    """`{n, median, min, max}` of the values (None where there are none)."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": median(values), "min": min(values), "max": max(values)}


@dataclass(frozen=True)
class Duration:
    """One subject's time (days) and whether it ended in the event (False: censored)."""

    days: float
    event: bool


@dataclass(frozen=True)
class KaplanMeier:
    """The step function and its band at each distinct time (right-continuous steps)."""

    times: tuple[float, ...]
    survival: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def kaplan_meier(durations: Sequence[Duration]) -> KaplanMeier:
    """The estimate at every distinct observed time, with its 95% log-log band.

    Where the estimate is 1 (before any event) or 0 (after the last subject's event) the
    log-log band is undefined (scipy says so, and gives NaN): it is taken as the estimate
    itself there, which is what it tends to."""
    if not durations:
        return KaplanMeier((), (), (), ())
    data = stats.CensoredData(
        uncensored=[d.days for d in durations if d.event],
        right=[d.days for d in durations if not d.event],
    )
    result = stats.ecdf(data).sf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the undefined ends, handled below
        band = result.confidence_interval(confidence_level=CONFIDENCE, method="log-log")
    estimate = np.asarray(result.probabilities, dtype=float)
    low = np.where(np.isnan(band.low.probabilities), estimate, band.low.probabilities)
    high = np.where(np.isnan(band.high.probabilities), estimate, band.high.probabilities)
    return KaplanMeier(
        tuple(float(t) for t in result.quantiles),
        tuple(float(s) for s in estimate),
        tuple(float(s) for s in low),
        tuple(float(s) for s in high),
    )


def _first_at_or_below(times: Sequence[float], values: Sequence[float], q: float) -> float | None:
    for time, value in zip(times, values, strict=True):
        if value <= q + 1e-12:  # 0.5 computed as 1 - 1/2 may carry rounding
            return time
    return None


def duration_of_response(durations: Sequence[Duration]) -> dict[str, Any]:
    """`{n, events, median, ci95_low, ci95_high}` by Kaplan-Meier (see the module's text)."""
    curve = kaplan_meier(durations)
    events = sum(1 for d in durations if d.event)
    median_time = _first_at_or_below(curve.times, curve.survival, 0.5)
    return {
        "n": len(durations),
        "events": events,
        "median": median_time,
        "ci95_low": _first_at_or_below(curve.times, curve.low, 0.5),
        "ci95_high": _first_at_or_below(curve.times, curve.high, 0.5),
    }
