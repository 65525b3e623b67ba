"""Platelet charts and the swimmer plot as SVG, with matplotlib's SVG backend.

No display and no network: figures are built with the object API (`Figure`, no pyplot, so
two requests drawing at once in two threads share no state) and written as SVG text.
The output is reproducible: a fixed `svg.hashsalt` makes the ids matplotlib generates
stable, the date is left out of the metadata, and text stays text (`svg.fonttype: none`,
no embedded glyphs), so a page can read the labels.

Ids a page relies on, set as artist gids (matplotlib writes them as the `id` of the
artist's `<g>`):
- platelet chart: each count's marker `id` is its Observation id;
- swimmer plot: each lane `lane-<patient id>`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from app.engine import Criteria
from app.report.model import PatientData

matplotlib.rcParams.update(
    {
        "svg.hashsalt": "itp-trial-report",
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.size": 9,
    }
)

# One colour per status, the same in both pictures and on the page (report.css).
STATUS_COLOURS = {
    "CR": "#1a7f37",
    "R": "#74c476",
    "NR": "#9ecae1",
    "LOR": "#e6550d",
    "NE": "#bdbdbd",
}
STATUS_NAMES = {
    "CR": "Complete response",
    "R": "Response",
    "NR": "No response (yet)",
    "LOR": "Loss of response",
    "NE": "Not evaluable",
}
_BLEEDING = "#b30000"
_RESCUE = "#fdd0a2"


def _svg(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def status_segments(patient: PatientData, criteria: Criteria) -> list[tuple[int, int, str]]:
    """(first day, last day, status) stretches from day 0 to the follow-up, from the
    assessment's episodes: no response until an episode starts, R or CR during it (CR in
    its CR stretches), loss of response after it ends."""
    end = max(patient.last_day(criteria), 0)
    a = patient.assessment
    if a.status == "NE":
        return [(0, end, "NE")]
    segments: list[tuple[int, int, str]] = []
    cursor, current = 0, "NR"
    for episode in a.episodes:
        start = patient.day(episode.start, criteria)
        segments.append((cursor, start, current))
        cursor = start
        for period in episode.cr_periods:
            cr_start = patient.day(period.start, criteria)
            segments.append((cursor, cr_start, "R"))
            cursor = cr_start
            cr_end = patient.day(period.end, criteria) if period.end else end
            segments.append((cursor, cr_end, "CR"))
            cursor = cr_end
        stop = patient.day(episode.end, criteria) if episode.end else end
        segments.append((cursor, stop, "R"))
        cursor, current = stop, "LOR"
    segments.append((cursor, end, current))
    return [(lo, hi, status) for lo, hi, status in segments if hi > lo]


def platelet_chart(patient: PatientData, criteria: Criteria) -> bytes:
    """Counts against study day on a log scale, with the thresholds, the baseline, each
    study-drug dose as a tick, rescue windows shaded, bleeding marked, and the status
    changes the assessment dates."""
    figure = Figure(figsize=(8, 4.2))
    ax = figure.add_subplot()
    counts = patient.counts()
    days = [patient.day(c.time, criteria) for c in counts]
    values = [max(c.value, 1.0) for c in counts]  # a log axis has no 0
    ax.set_yscale("log")
    floor = min([5.0, *(v / 1.5 for v in values)])
    ax.set_ylim(floor, max([400.0, *(v * 1.5 for v in values)]))
    _draw_levels(ax, patient, criteria)
    _shade_rescues(ax, patient, criteria)
    if counts:
        ax.plot(days, values, color="#444444", linewidth=1, zorder=2)
    for count, day, value in zip(counts, days, values, strict=True):
        (marker,) = ax.plot(
            [day], [value], marker="o", markersize=5, color="#252525", linestyle="", zorder=3
        )
        marker.set_gid(count.id)
    _tick_doses(ax, patient, criteria, floor * 1.12)
    _mark_bleeding(ax, patient, criteria)
    _annotate_status(ax, patient, criteria)
    _label_chart(ax, patient)
    figure.tight_layout()
    return _svg(figure)


def _draw_levels(ax: Axes, patient: PatientData, criteria: Criteria) -> None:
    """The R and CR thresholds, and the patient's baseline."""
    for threshold, label in ((criteria.r_threshold, "R"), (criteria.cr_threshold, "CR")):
        line = ax.axhline(threshold, color="#636363", linestyle=":", linewidth=1)
        line.set_gid(f"threshold-{label}")
        ax.annotate(
            f"{threshold:g}",
            (1, threshold),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            color="#636363",
        )
    baseline = patient.assessment.baseline
    if baseline is not None:
        line = ax.axhline(
            baseline.value, color="#3182bd", linestyle="--", linewidth=1, label="Baseline"
        )
        line.set_gid("baseline")


def _shade_rescues(ax: Axes, patient: PatientData, criteria: Criteria) -> None:
    for rescue in patient.administrations("rescue"):
        first = patient.day(rescue.time, criteria)
        span = ax.axvspan(
            first, first + criteria.rescue_window_days, color=_RESCUE, alpha=0.5, linewidth=0
        )
        span.set_gid(f"rescue-{rescue.id}")


def _tick_doses(ax: Axes, patient: PatientData, criteria: Criteria, height: float) -> None:
    """Each study-drug dose as a tick at `height`, just above the chart's floor."""
    doses = patient.administrations("study-drug")
    if doses:
        (ticks,) = ax.plot(
            [patient.day(d.time, criteria) for d in doses],
            [height] * len(doses),
            marker="|",
            markersize=8,
            linestyle="",
            color="#6a51a3",
            label="Study-drug dose",
        )
        ticks.set_gid("doses")


def _label_chart(ax: Axes, patient: PatientData) -> None:
    """Title, axis labels, grid and legend."""
    a = patient.assessment
    title = f"{patient.label} ({patient.site or 'no site'}): {a.status}"
    if a.best_response:
        title += f", best response {a.best_response}"
    ax.set_title(title)
    ax.set_xlabel("Days since first study-drug dose" if patient.treated else "Days")
    ax.set_ylabel("Platelets (10^9/L)")
    ax.grid(True, which="major", axis="x", color="#eeeeee")
    handles, _ = ax.get_legend_handles_labels()
    if patient.administrations("rescue"):
        handles.append(Patch(color=_RESCUE, label="Rescue window"))
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.8)


def _mark_bleeding(ax: Axes, patient: PatientData, criteria: Criteria) -> None:
    top = ax.get_ylim()[1] / 1.25
    occasions = [
        (g.id, g.time, f"WHO {g.grade}")
        for g in patient.timeline.bleeding_assessments
        if g.grade >= criteria.bleeding_min_grade and g.status in ("final", "amended", "corrected")
    ] + [(e.id, e.time, "bleeding AE") for e in patient.timeline.bleeding_events]
    for ident, time, label in occasions:
        day = patient.day(time, criteria)
        (marker,) = ax.plot([day], [top], marker="v", color=_BLEEDING, linestyle="", markersize=7)
        marker.set_gid(f"bleeding-{ident}")
        ax.annotate(label, (day, top), xytext=(4, -3), textcoords="offset points", fontsize=7)


def _annotate_status(ax: Axes, patient: PatientData, criteria: Criteria) -> None:
    changes: list[tuple[int, str]] = []
    for episode in patient.assessment.episodes:
        changes.append((patient.day(episode.start, criteria), "R"))
        for period in episode.cr_periods:
            changes.append((patient.day(period.start, criteria), "CR"))
            if period.end is not None and period.end != episode.end:
                changes.append((patient.day(period.end, criteria), "CR lost"))
        if episode.end is not None:
            changes.append((patient.day(episode.end, criteria), "LOR"))
    bottom = ax.get_ylim()[0] * 1.4
    for number, (day, label) in enumerate(changes):
        status = "CR" if label == "CR" else "LOR" if label in ("LOR", "CR lost") else "R"
        line = ax.axvline(day, color=STATUS_COLOURS[status], linewidth=1.2)
        line.set_gid(f"status-{number}-{label.replace(' ', '-')}")
        ax.annotate(
            label,
            (day, bottom),
            xytext=(3, 0),
            textcoords="offset points",
            color=STATUS_COLOURS[status],
            fontsize=8,
            rotation=90,
            va="bottom",
        )


def swimmer_plot(patients: Sequence[PatientData], criteria: Criteria) -> bytes:
    """One lane per treated patient, longest follow-up on top, coloured by status over
    time; triangles at rescues, crosses at losses of response."""
    treated = sorted(
        (p for p in patients if p.treated),
        key=lambda p: (p.last_day(criteria), p.label),
    )
    height = max(2.5, 0.9 + 0.28 * len(treated))
    figure = Figure(figsize=(8, height))
    ax = figure.add_subplot()
    for row, patient in enumerate(treated):
        segments = status_segments(patient, criteria)
        lane = ax.broken_barh(
            [(lo, hi - lo) for lo, hi, _ in segments] or [(0, 0.0001)],
            (row - 0.35, 0.7),
            facecolors=[STATUS_COLOURS[status] for _, _, status in segments] or ["#bdbdbd"],
        )
        lane.set_gid(f"lane-{patient.id}")
        for rescue in patient.administrations("rescue"):
            (marker,) = ax.plot(
                [patient.day(rescue.time, criteria)],
                [row],
                marker="^",
                color="#d94801",
                markeredgecolor="black",
                markersize=7,
                linestyle="",
            )
            marker.set_gid(f"rescue-{rescue.id}")
        for number, episode in enumerate(patient.assessment.episodes):
            if episode.end is not None:
                (marker,) = ax.plot(
                    [patient.day(episode.end, criteria)],
                    [row],
                    marker="X",
                    color="black",
                    markersize=7,
                    linestyle="",
                )
                marker.set_gid(f"loss-{patient.id}-{number}")
    ax.set_yticks(range(len(treated)), [p.label for p in treated])
    ax.set_ylim(-0.8, max(len(treated), 1) - 0.2)
    ax.set_xlim(left=0)
    ax.set_xlabel("Days since first study-drug dose")
    ax.set_title(f"Response over time: {len(treated)} treated patients")
    ax.grid(True, axis="x", color="#eeeeee")
    ax.set_axisbelow(True)
    handles: list[Artist] = [
        Patch(color=STATUS_COLOURS[code], label=STATUS_NAMES[code]) for code in STATUS_NAMES
    ]
    handles += [
        ax.plot([], [], marker="^", color="#d94801", linestyle="", label="Rescue")[0],
        ax.plot([], [], marker="X", color="black", linestyle="", label="Loss of response")[0],
    ]
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False
    )
    figure.tight_layout()
    return _svg(figure)
