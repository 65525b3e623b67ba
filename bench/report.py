"""Results as a Markdown table and as JSON with the machine's facts, in bench/results/."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.load import Result

# What each scenario is measured against, in the same run. A read by id against the bare
# asyncpg read of the same row (issue 20), the bare read itself against hello-world. A
# scenario of a topology (`create [pgbouncer 2x1 haproxy]`) against its ceiling run beside
# it (`ceiling-create [pgbouncer 2x1 haproxy]`).
CEILINGS = {
    "create": "ceiling-create",
    "read": "ceiling-read",
    "ceiling-read": "hello",
    "search": "hello",
    "response-status": "hello",
}


def _ceiling(name: str) -> str | None:
    base, bracket, topology = name.partition(" [")
    ceiling = CEILINGS.get(base)
    return None if ceiling is None else ceiling + bracket + topology


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(results: dict[str, list[Result]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        summary[name] = {
            "runs": len(runs),
            "rps": [round(r.rps, 1) for r in runs],
            "median_rps": round(_median([r.rps for r in runs]), 1),
            "p50_ms": round(_median([r.p50_ms for r in runs]), 2),
            "p95_ms": round(_median([r.p95_ms for r in runs]), 2),
            "p99_ms": round(_median([r.p99_ms for r in runs]), 2),
            "errors": sum(r.errors for r in runs),
            "requests": sum(r.requests for r in runs),
        }
    for name in results:
        ceiling = _ceiling(name)
        if ceiling is not None and ceiling in results:
            # The ratio of each run to the ceiling of the same run, then the median.
            ratios = [
                own.rps / other.rps
                for own, other in zip(results[name], results[ceiling], strict=False)
                if other.rps
            ]
            summary[name]["ceiling"] = ceiling
            summary[name]["ratio"] = round(_median(ratios), 3)
    return summary


def targets(summary: dict[str, dict[str, Any]], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure that decides it."""
    checks: list[dict[str, Any]] = []

    def check(target: str, figure: Any, met: bool | None) -> None:
        checks.append({"target": target, "figure": figure, "met": met})

    if "create" in summary and "ratio" in summary["create"]:
        create = summary["create"]
        check("create >= 0.35 x ceiling", f"{create['ratio']:.2f} x", create["ratio"] >= 0.35)
        check(
            "create p99 < 50 ms (all clients)", f"{create['p99_ms']:.1f} ms", create["p99_ms"] < 50
        )
    few = summary.get("create (8 connections)")
    few_ceiling = summary.get("ceiling-create (8 connections)")
    if few and few_ceiling and few_ceiling["p99_ms"]:
        times = few["p99_ms"] / few_ceiling["p99_ms"]
        check(
            "create p99 <= 3 x the ceiling's (8 clients)",
            f"{few['p99_ms']:.1f} ms = {times:.1f} x {few_ceiling['p99_ms']:.1f} ms",
            times <= 3,
        )
    if "create (1 connection)" in summary:
        alone = summary["create (1 connection)"]
        check("create p99 < 50 ms (1 client)", f"{alone['p99_ms']:.1f} ms", alone["p99_ms"] < 50)
    if "read" in summary and "ratio" in summary["read"]:
        read = summary["read"]
        check(
            "read by id >= 0.5 x bare asyncpg read", f"{read['ratio']:.2f} x", read["ratio"] >= 0.5
        )
    if extra.get("workers"):
        runs = [seen for per_run in extra["workers"].values() for seen in per_run]
        idle = sum(1 for seen in runs if seen["idle_workers"])
        check("no run with an idle worker", f"{idle} of {len(runs)} runs", idle == 0)
    if "search" in summary:
        search = summary["search"]
        check(
            "search p50 < 10 ms (32 clients)", f"{search['p50_ms']:.2f} ms", search["p50_ms"] < 10
        )
    if "search (1 connection)" in summary:
        alone = summary["search (1 connection)"]
        check("search p50 < 10 ms (1 client)", f"{alone['p50_ms']:.2f} ms", alone["p50_ms"] < 10)
    if "recompute" in extra:
        us = extra["recompute"]["recompute_us"]
        counts = extra["recompute"]["counts"]
        check(f"recompute < 5 ms ({counts} counts)", f"{us / 1000:.2f} ms", us < 5000)
    if "bundle" in extra:
        rate = extra["bundle"].get("resources_per_s")
        if rate is None:
            check("transaction Bundle >= 1,000 resources/s", extra["bundle"].get("skipped"), None)
        else:
            check("transaction Bundle >= 1,000 resources/s", f"{rate:,.0f}/s", rate >= 1000)
    if "export" in extra:
        rate = extra["export"]["bulk"]["generate_resources_per_s"]
        check("Bulk export >= 20,000 resources/s", f"{rate:,}/s", rate >= 20_000)
    return checks


def markdown(
    machine: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, list[Result]],
    extra: dict[str, Any],
) -> str:
    summary = summarise(results)
    pg = machine["postgresql"]
    lines = [
        f"# Benchmark {machine['date']}",
        "",
        f"{machine['cores']} cores ({machine['cpu']}), load average before the report "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average'])}; Python {machine['python']}; "
        f"{pg['version'].split(' on ')[0]} (synchronous_commit={pg['synchronous_commit']}, "
        f"fsync={pg['fsync']}); load generator {machine['loadgen']}; commit {machine['commit']}.",
        f"Trial: {settings['patients']:,} patients, {settings['counts']:,} platelet counts. "
        f"{settings['workers']} uvicorn workers per server (started by "
        f"{settings.get('start', 'uvicorn')}), {settings['connections']} "
        f"connections, {settings['duration_s']:g} s per run, {settings['runs']} runs "
        "(medians over runs; ratios are per run against the ceiling of the same run).",
        "",
        "| scenario | median req/s | p50 ms | p95 ms | p99 ms | errors | ratio | against |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in summary.items():
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
        lines.append(
            f"| {name} | {row['median_rps']:,.0f} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['errors']} | {ratio} | {row.get('ceiling', '')} |"
        )
    if extra.get("workers"):
        lines += [
            "",
            "Each API worker's share of the requests of each run (from its Prometheus files; "
            "idle: under a quarter of an even share):",
            "",
            "| scenario | shares by run | idle runs |",
            "|---|---|---|",
        ]
        for name, per_run in extra["workers"].items():
            shares = "; ".join(
                " / ".join(f"{v:.2f}" for v in sorted(seen["shares"].values(), reverse=True))
                for seen in per_run
            )
            idle = sum(1 for seen in per_run if seen["idle_workers"])
            lines.append(f"| {name} | {shares} | {idle} |")
    if "bundle" in extra:
        bundle = extra["bundle"]
        lines += [
            "",
            "Transaction Bundle (`POST /fhir`): "
            + (
                f"skipped: {bundle['skipped']} (HTTP {bundle['status']})"
                if "skipped" in bundle
                else f"{bundle['entries']} entries, {bundle['resources_per_s']} resources/s "
                f"(median of {bundle['seconds']} s; statuses {bundle['statuses']})"
            ),
        ]
    if "recompute" in extra:
        r = extra["recompute"]
        lines += [
            "",
            f"Recompute, in process, patient with {r['counts']} counts in a trial of "
            f"{r['trial_resources']:,} resources: whole on-write recompute "
            f"{r['recompute_us']:,.0f} µs "
            f"(read facts {r['read_facts_us']:,.0f} µs, engine {r['engine_us']:,.0f} µs).",
            "Engine alone by patient history: "
            + ", ".join(f"{e['counts']} counts {e['engine_us']:,.0f} µs" for e in extra["engine"])
            + ".",
        ]
    if "export" in extra:
        from bench.export import markdown as export_markdown

        lines += export_markdown(extra["export"])
    checks = targets(summary, extra)
    if checks:
        lines += ["", "| target | figure | met |", "|---|---|---|"]
        for c in checks:
            met = "skipped" if c["met"] is None else ("yes" if c["met"] else "**no**")
            lines.append(f"| {c['target']} | {c['figure']} | {met} |")
    return "\n".join(lines) + "\n"


def write(
    out: Path,
    label: str,
    machine: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, list[Result]],
    extra: dict[str, Any],
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{stamp}-{settings['patients']}p-{settings['counts']}c" + (f"-{label}" if label else "")
    summary = summarise(results)
    document = {
        "machine": machine,
        "settings": settings,
        "summary": summary,
        "targets": targets(summary, extra),
        "runs": {
            name: [
                {
                    "requests": r.requests,
                    "seconds": round(r.seconds, 3),
                    "rps": round(r.rps, 1),
                    "errors": r.errors,
                    "p50_ms": r.p50_ms,
                    "p95_ms": r.p95_ms,
                    "p99_ms": r.p99_ms,
                    "statuses": r.statuses,
                }
                for r in runs
            ]
            for name, runs in results.items()
        },
        **extra,
    }
    json_path = out / f"{stem}.json"
    json_path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(machine, settings, results, extra))
    return [md_path, json_path]
