"""What a create costs as a patient's history grows (issue 20, part 4), in process:

    python -m bench.history [--short 10] [--long 1000] [--patients 10] [--creates 20]
                            [--database itp_bench_history] [--sqlite] [--drop]
                            [--profile FILE]

A fresh database (dropped and made again on each run: PostgreSQL by default, `--sqlite` for a
file) gets `--patients` patients with `--short` platelet counts and as many with `--long`,
each loaded by one transaction Bundle through the API (a study-drug dose, then a count every
three days). Then every patient gets `--creates` new counts, each dated after all its others
(the common case: a lab result of today), short and long patients taking turns so that
noise on this shared machine falls on both alike. Each create is one POST through the app
in this process (httpx's ASGI transport: no HTTP server, no socket), timed whole.

It prints the median create time of each group and their ratio long / short: the issue's
target is at most 1.2 (a create for a 1,000-count patient within 20% of one for a 10-count
patient). The medians of the recompute alone (`itp_recompute_seconds`, the whole read,
assess, fingerprint and compare) are printed too, from the app's own histogram.
`--profile FILE` writes a pyinstrument profile (the `bench` extra) of the long patients'
timed creates, which makes them slower: take the medians from a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from bench import __main__ as harness
from bench import datagen

_HEADERS = {"Content-Type": "application/fhir+json", "X-Provenance": "bench: history cost"}


def patient_bundle(counts: int, rng: random.Random) -> bytes:
    """One new patient with a dose and `counts` platelet counts, as a transaction."""
    return harness.transaction_bundle(1, counts + 2, rng, "S01")


async def _fresh_postgres(admin_dsn: str, database: str) -> str:
    await _drop_postgres(admin_dsn, database)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    return harness._dsn(admin_dsn, database)


async def _drop_postgres(admin_dsn: str, database: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


async def _load(client: httpx.AsyncClient, counts: int, rng: random.Random) -> tuple[str, int]:
    """A patient with `counts` counts: its id and the day number after its last count."""
    answer = await client.post("/fhir", content=patient_bundle(counts, rng), headers=_HEADERS)
    assert answer.status_code == 200, answer.text
    location = answer.json()["entry"][0]["response"]["location"]
    return location.split("/")[1], 3 * counts


def _count(patient_id: str, day: int, rng: random.Random) -> bytes:
    # Dated after every count of the bundle (the dose is at most ~100 days after the trial
    # start, the counts every three days from it): a result of today.
    moment = datagen.TRIAL_START + timedelta(days=200 + day)
    return orjson.dumps(datagen.platelet_count(patient_id, moment, rng.uniform(8, 160)))


def _recompute_seconds() -> tuple[float, int]:
    """(sum, count) of the app's recompute histogram so far."""
    from app import metrics

    total = count = 0.0
    for family in metrics.RECOMPUTE.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, int(count)


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from app.auth.tokens import SecretKeySource, TokenGrant, issue_token
    from app.main import create_app
    from app.settings import Settings

    keys = SecretKeySource(
        "bench-only-" + secrets.token_urlsafe(32), issuer="itp-trial-api", audience="itp-trial-api"
    )
    token = issue_token(keys, TokenGrant("bench", "admin", ["S01"]), minutes=120)
    app = create_app(Settings(database_url=url, environment="test"), key_source=keys)
    rng = random.Random(11)
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
    timings: dict[str, list[float]] = {"short": [], "long": []}
    recompute: dict[str, list[float]] = {"short": [], "long": []}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://bench",
            headers={"Authorization": f"Bearer {token}"},
            timeout=600,
        ) as client:
            groups = {"short": args.short, "long": args.long}
            patients: dict[str, list[tuple[str, int]]] = {name: [] for name in groups}
            for _ in range(args.patients):
                for name, counts in groups.items():
                    patients[name].append(await _load(client, counts, rng))
            for round_ in range(args.creates + 1):
                for pair in zip(patients["short"], patients["long"], strict=True):
                    for name, (patient_id, last_day) in zip(groups, pair, strict=True):
                        body = _count(patient_id, last_day + round_, rng)
                        profiled = profiler is not None and name == "long" and round_ > 0
                        before = _recompute_seconds()
                        if profiled:
                            profiler.start()
                        started = time.perf_counter()
                        answer = await client.post(
                            "/fhir/Observation", content=body, headers=_HEADERS
                        )
                        elapsed = time.perf_counter() - started
                        if profiled:
                            profiler.stop()
                        assert answer.status_code == 201, answer.text
                        after = _recompute_seconds()
                        if round_ == 0:
                            continue  # warm-up: connections, statement caches
                        timings[name].append(elapsed)
                        if after[1] == before[1] + 1:
                            recompute[name].append(after[0] - before[0])
    if profiler is not None:
        Path(args.profile).write_text(profiler.output_text(unicode=True, color=False))
    medians = {name: statistics.median(values) * 1e3 for name, values in timings.items()}
    recomputes = {
        name: statistics.median(values) * 1e3 for name, values in recompute.items() if values
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "database": "sqlite" if args.sqlite else "postgresql",
        "short_counts": args.short,
        "long_counts": args.long,
        "creates_each": len(timings["short"]),
        "create_ms": {name: round(value, 3) for name, value in medians.items()},
        "recompute_ms": {name: round(value, 3) for name, value in recomputes.items()},
        "ratio_long_short": round(medians["long"] / medians["short"], 3),
    }


def _commit() -> str:
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=harness.ROOT, capture_output=True, text=True
    )
    return described.stdout.strip() or "unknown"


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.sqlite:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/history.db"
            harness.migrate(url)
            return await measure(url, args)
    url = await _fresh_postgres(args.admin_dsn, args.database)
    try:
        harness.migrate(url)
        return await measure(url, args)
    finally:
        if args.drop:
            await _drop_postgres(args.admin_dsn, args.database)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history")
    parser.add_argument("--short", type=int, default=10, help="counts of a short history")
    parser.add_argument("--long", type=int, default=1000, help="counts of a long history")
    parser.add_argument("--patients", type=int, default=10, help="patients of each group")
    parser.add_argument("--creates", type=int, default=20, help="timed creates per patient")
    parser.add_argument("--database", default="itp_bench_history")
    parser.add_argument(
        "--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", harness.DEFAULT_ADMIN_DSN)
    )
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead")
    parser.add_argument("--drop", action="store_true", help="drop the database afterwards")
    parser.add_argument(
        "--profile", default="", help="write a pyinstrument profile of the long creates here"
    )
    result = asyncio.run(_run(parser.parse_args(argv)))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
