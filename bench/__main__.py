"""`python -m bench`: generate (once), serve, load, report. See bench/README.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import socket
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

from bench import datagen, export, load, proxies, recompute, report, workers
from bench.load import Request

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# New results are dated after the generated data, as a lab's new results would be.
NEW_RESULTS_FROM = datagen.DATA_END + timedelta(days=1)


def _say(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--patients", type=int, default=2_000)
    parser.add_argument("--counts", type=int, default=1_000_000, help="platelet counts")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bundle-entries", type=int, default=1_000)
    parser.add_argument(
        "--pool-size", type=int, default=16, help="database connections per worker, both servers"
    )
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", DEFAULT_ADMIN_DSN))
    parser.add_argument("--database", default="itp_bench")
    parser.add_argument(
        "--regenerate", action="store_true", help="reload even if the scale matches"
    )
    parser.add_argument("--drop", action="store_true", help="drop the database afterwards")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--scenarios",
        default="create,read,search,response-status,bundle,recompute,export,topologies",
        help="comma-separated subset",
    )
    parser.add_argument("--label", default="", help="added to the result file names")
    parser.add_argument(
        "--start",
        choices=["serve", "uvicorn"],
        default="serve",
        help="how the servers start: `python -m app serve` (a socket per worker, production) "
        "or `uvicorn --workers` (one shared socket)",
    )
    parser.add_argument(
        "--pgbouncer-pool",
        type=int,
        default=16,
        help="server connections PgBouncer keeps per database (topologies)",
    )
    return parser.parse_args(argv)


def _dsn(admin_dsn: str, database: str) -> str:
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{database}"


def migrate(url: str) -> None:
    """The app's migrations applied to the database at `url`."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
        capture_output=True,
    )


async def _prepare_database(args: argparse.Namespace, scale: datagen.Scale) -> str:
    dsn = _dsn(args.admin_dsn, args.database)
    admin = await asyncpg.connect(args.admin_dsn)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", args.database)
        if exists and not args.regenerate:
            conn = await asyncpg.connect(dsn)
            try:
                marker = await conn.fetchval(
                    "SELECT scale FROM bench_meta LIMIT 1"
                    if await conn.fetchval("SELECT to_regclass('bench_meta') IS NOT NULL")
                    else "SELECT NULL"
                )
            finally:
                await conn.close()
            if marker == scale.label:
                _say(f"database {args.database} already holds {scale.label}: reused")
                return dsn
        if exists:
            await admin.execute(f'DROP DATABASE "{args.database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{args.database}"')
    finally:
        await admin.close()
    _say(f"database {args.database}: migrating")
    migrate(dsn)
    _say(f"generating {scale.patients:,} patients and {scale.counts:,} platelet counts")
    await datagen.generate(dsn, scale, _say)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE bench_meta (scale text NOT NULL)")
        await conn.execute("INSERT INTO bench_meta VALUES ($1)", scale.label)
    finally:
        await conn.close()
    return dsn


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server's process group on loopback, its output in a log file. `start`: `serve`
    (`python -m app serve`, a listening socket per worker, as in production) or `uvicorn`
    (`uvicorn --workers`, one socket all workers accept from). With `metrics`, each worker
    writes its Prometheus files there (the API only): `shares` reads them."""

    def __init__(
        self,
        name: str,
        target: str,
        workers: int,
        env: dict[str, str],
        logs: Path,
        start: str = "serve",
        metrics: Path | None = None,
    ):
        self.name = name
        self.workers = workers
        self.start = start
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        self.metrics = metrics
        if metrics is not None:
            metrics.mkdir(parents=True, exist_ok=True)
            env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
        server = ["app", "serve", "--app", target] if start == "serve" else ["uvicorn", target]
        command = [
            sys.executable,
            "-m",
            *server,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ]
        if start == "uvicorn":
            command.append("--no-access-log")
        log_config = ROOT / "app" / "logging.json"
        if target.startswith("app.") and log_config.exists():
            command += ["--log-config", str(log_config)]  # production logging: JSON lines
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, path: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}:\n{self.log.read_text()}")
            try:
                # Every worker serving: with a socket each, one that still starts has none.
                expected = self.workers if self.start == "serve" else 1
                if (
                    httpx.get(self.url + path, timeout=2).status_code == 200
                    and workers.listening_sockets(self.port) == expected
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {path} in {timeout} s; see {self.log}")

    def requests_by_pid(self) -> dict[int, float]:
        return workers.requests_by_pid([self.metrics]) if self.metrics else {}

    def worker_pids(self) -> list[int]:
        return workers.worker_pids(self.process.pid)

    def stop(self) -> None:
        proxies.stop_group(self.process, 20)


def _create_bodies(loaded: datagen.Loaded, n: int, rng: random.Random) -> list[bytes]:
    bodies = []
    for _ in range(n):
        moment = NEW_RESULTS_FROM + timedelta(minutes=rng.randint(0, 60 * 24 * 300))
        raw = datagen.platelet_count(rng.choice(loaded.patients), moment, rng.uniform(5, 250))
        bodies.append(orjson.dumps(raw))
    return bodies


def build_requests(loaded: datagen.Loaded, seed: int = 1) -> dict[str, list[Request]]:
    rng = random.Random(seed)
    bodies = _create_bodies(loaded, 2_000, rng)
    searches = []
    for _ in range(1_000):
        since = datagen.TRIAL_START + timedelta(days=rng.randint(100, 900))
        searches.append(
            Request(
                "GET",
                f"/fhir/Observation?patient={rng.choice(loaded.patients)}&code=777-3"
                f"&date=ge{since:%Y-%m-%d}&_sort=-date&_count=50",
            )
        )
    return {
        "ceiling-create": [Request("POST", "/Observation", body) for body in bodies],
        "create": [Request("POST", "/fhir/Observation", body) for body in bodies],
        "hello": [Request("GET", "/hello")],
        "read": [Request("GET", f"/fhir/Observation/{i}") for i in loaded.observations],
        "ceiling-read": [Request("GET", f"/Observation/{i}") for i in loaded.observations],
        "search": searches,
        "response-status": [
            Request("GET", f"/fhir/Patient/{p}/$response-status") for p in loaded.patients
        ],
    }


def transaction_bundle(site_patients: int, entries: int, rng: random.Random, site: str) -> bytes:
    """A site's backlog as one FHIR transaction: new Patients (urn:uuid fullUrls), each with
    its first study-drug dose and platelet counts that reference it by its urn:uuid."""
    per_patient = max(entries // site_patients, 3)
    bundle_entries: list[dict[str, Any]] = []
    for number in range(site_patients):
        full_url = f"urn:uuid:{datagen.uuid.uuid4()}"
        subject = f"BACKLOG-{datagen.uuid.uuid4().hex[:12]}"
        patient = datagen.patient(subject, site, rng)
        bundle_entries.append(
            {
                "fullUrl": full_url,
                "resource": patient,
                "request": {"method": "POST", "url": "Patient"},
            }
        )
        start = datagen.TRIAL_START + timedelta(days=rng.randint(0, 100) + number)
        records = [datagen.dose("X", start, "study-drug", "NAD+ 500 mg IV")] + [
            datagen.platelet_count("X", start + timedelta(days=3 * k - 1), rng.uniform(8, 160))
            for k in range(per_patient - 2)
        ]
        for record in records:
            record["subject"] = {"reference": full_url}
            bundle_entries.append(
                {
                    "fullUrl": f"urn:uuid:{datagen.uuid.uuid4()}",
                    "resource": record,
                    "request": {"method": "POST", "url": record["resourceType"]},
                }
            )
    bundle_entries = bundle_entries[:entries]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": bundle_entries})


def run_bundles(base_url: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    timings: list[float] = []
    statuses: list[int] = []
    with httpx.Client(base_url=base_url, timeout=300) as client:
        for _ in range(max(args.runs, 1)):
            body = transaction_bundle(10, args.bundle_entries, rng, "S01")
            started = time.perf_counter()
            answer = client.post("/fhir", content=body, headers=headers)
            elapsed = time.perf_counter() - started
            statuses.append(answer.status_code)
            if answer.status_code in (404, 405):
                return {"skipped": "POST /fhir not available", "status": answer.status_code}
            if answer.status_code == 200:
                timings.append(elapsed)
    entries = args.bundle_entries
    return {
        "entries": entries,
        "statuses": statuses,
        "seconds": [round(t, 3) for t in timings],
        "resources_per_s": round(entries / load.median(timings), 1) if timings else None,
    }


def _machine(dsn: str, loadgen: str) -> dict[str, Any]:
    async def postgres() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            facts = {"version": await conn.fetchval("SELECT version()")}
            for setting in ("synchronous_commit", "fsync", "shared_buffers", "max_connections"):
                facts[setting] = await conn.fetchval(f"SHOW {setting}")
            return facts
        finally:
            await conn.close()

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": asyncio.run(postgres()),
        "loadgen": loadgen,
        "commit": commit,
    }


# Clients of the latency runs of create (issue 20's p99 target).
FEW = 8


class _Measure:
    """One timed load run of a scenario, recorded under `label`, with each API worker's
    share of its requests when `counted` names the API servers it went to."""

    def __init__(
        self,
        runner: Any,
        args: argparse.Namespace,
        requests: dict[str, list[Request]],
        results: dict[str, list[load.Result]],
        extra: dict[str, Any],
    ) -> None:
        self.runner, self.args, self.requests = runner, args, requests
        self.results, self.extra = results, extra

    def __call__(
        self,
        run: int,
        label: str,
        scenario: str,
        counted: list[Server],
        url: str,
        token: str,
        connections: int | None = None,
    ) -> None:
        before = {pid: n for server in counted for pid, n in server.requests_by_pid().items()}
        result = self.runner(
            url,
            self.requests[scenario],
            token,
            connections=connections or self.args.connections,
            duration=self.args.duration,
        )
        self.results.setdefault(label, []).append(result)
        line = (
            f"run {run} {label:34} {result.rps:9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}"
        )
        if counted:
            after = {pid: n for server in counted for pid, n in server.requests_by_pid().items()}
            pids = [pid for server in counted for pid in server.worker_pids()]
            seen = workers.shares(before, after, pids)
            self.extra.setdefault("workers", {}).setdefault(label, []).append(seen)
            line += f"  worker shares {sorted(seen['shares'].values())}"
        _say(line)


# Through PgBouncer (transaction pooling): (label, instances, workers each, behind HAProxy).
TOPOLOGIES = [
    ("pgbouncer 1x2", 1, 2, False),
    ("pgbouncer 1x2 haproxy", 1, 2, True),
    ("pgbouncer 2x1 haproxy", 2, 1, True),
]


def run_topologies(
    args: argparse.Namespace,
    dsn: str,
    env: dict[str, str],
    logs: Path,
    reference: Server,
    lab: str,
    admin: str,
    measure: _Measure,
) -> None:
    """Create and read through PgBouncer: one instance with two workers, with and without
    HAProxy in front, and two instances with one worker each behind HAProxy, each beside
    the ceilings of the same run. Every instance keeps its `--pool-size` x workers client
    connections; PgBouncer lends them `--pgbouncer-pool` server connections."""
    database = dsn.rpartition("/")[2]
    with proxies.PgBouncer(args.admin_dsn, pool_size=args.pgbouncer_pool) as bouncer:
        for label, instances, per_instance, balanced in TOPOLOGIES:
            pooled = {**env, "DATABASE_URL": bouncer.url(database)}
            servers = [
                Server(
                    f"{label.replace(' ', '-')}-{n}",
                    "app.main:app",
                    per_instance,
                    pooled,
                    logs,
                    args.start,
                    logs / f"metrics-{label.replace(' ', '-')}-{n}",
                )
                for n in range(instances)
            ]
            balancer = proxies.HAProxy([s.url for s in servers]) if balanced else None
            try:
                for server in servers:
                    server.wait("/readyz")
                if balancer is not None:
                    balancer.start()
                url = balancer.url if balancer is not None else servers[0].url
                _say(f"{label}: {url}")
                for scenario, token in (("create", lab), ("read", admin)):
                    measure.runner(
                        url, measure.requests[scenario], token, connections=2, duration=1
                    )
                for run in range(1, args.runs + 1):
                    for scenario, ceiling, token in (
                        ("create", "ceiling-create", lab),
                        ("read", "ceiling-read", admin),
                    ):
                        measure(run, f"{ceiling} [{label}]", ceiling, [], reference.url, token)
                        measure(run, f"{scenario} [{label}]", scenario, servers, url, token)
            finally:
                if balancer is not None:
                    balancer.stop()
                for server in servers:
                    server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = set(args.scenarios.split(","))
    scale = datagen.Scale(args.patients, args.counts)
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if load.wrk_available() else "python"
        if loadgen == "python":
            _say(f"{load.WRK_INSTALL_HINT}; falling back to the Python load generator")
    elif loadgen == "wrk" and not load.wrk_available():
        _say(load.WRK_INSTALL_HINT)
        return 2
    dsn = asyncio.run(_prepare_database(args, scale))
    loaded = asyncio.run(datagen.describe(dsn))
    _say(
        f"data: {len(loaded.patients):,} patients, {len(loaded.observations):,} sampled counts, "
        f"heavy patients {len(loaded.heavy_patients)}"
    )
    secret = "bench-only-" + secrets.token_urlsafe(32)
    from app.auth.tokens import SecretKeySource, TokenGrant, issue_token

    keys = SecretKeySource(secret, issuer="itp-trial-api", audience="itp-trial-api")
    sites = loaded.sites or ["S01"]
    lab = issue_token(keys, TokenGrant("bench-lab", "lab", sites), minutes=180)
    admin = issue_token(keys, TokenGrant("bench-admin", "admin", sites), minutes=180)
    requests = build_requests(loaded)
    results: dict[str, list[load.Result]] = {}
    extra: dict[str, Any] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    servers: list[Server] = []
    try:
        env = {
            "DATABASE_URL": dsn,
            "APP_ENVIRONMENT": "production",
            "APP_AUTH_JWT_SECRET": secret,
            "BENCH_DSN": dsn,
            # A pool as large as the connections a worker serves at once, no overflow: an
            # overflow connection is closed on return, so a pool smaller than the load
            # connects to PostgreSQL (a new backend process) over and over (bench/README.md).
            "APP_DB_POOL_SIZE": str(args.pool_size),
            "APP_DB_MAX_OVERFLOW": "0",
            "BENCH_POOL_SIZE": str(args.pool_size),
        }
        # As in production with several workers (README, "Production start"); each worker's
        # requests are counted from its own files there.
        api = Server("api", "app.main:app", args.workers, env, logs, args.start, logs / "metrics")
        servers.append(api)
        reference = Server("reference", "bench.servers:app", args.workers, env, logs, args.start)
        servers.append(reference)
        api.wait("/readyz")
        reference.wait("/hello")
        _say(
            f"servers up: api {api.url}, reference {reference.url} ({args.workers} workers, "
            f"started by {args.start})"
        )
        plan: list[tuple[str, Server, str]] = []
        if "create" in scenarios:
            plan += [("ceiling-create", reference, lab), ("create", api, lab)]
        if "read" in scenarios:
            plan += [
                ("hello", reference, admin),
                ("ceiling-read", reference, admin),
                ("read", api, admin),
            ]
        if "search" in scenarios:
            plan.append(("search", api, admin))
        if "response-status" in scenarios:
            plan.append(("response-status", api, admin))
        runner = load.run_wrk if loadgen == "wrk" else load.run_python
        measure = _Measure(runner, args, requests, results, extra)
        # Untimed first: each worker imports the R4B models it validates with on first use
        # (both servers do), and fills its pool and statement caches.
        for name, server, token in plan:
            runner(server.url, requests[name], token, connections=args.connections, duration=1)
        # Every scenario once per run, ceilings beside what they bound: noise from other
        # processes on the machine hits both sides of a ratio alike.
        for run in range(1, args.runs + 1):
            for name, server, token in plan:
                measure(run, name, name, [server] if server is api else [], server.url, token)
            if "create" in scenarios:
                # The latency target is set at 8 clients, against the ceiling's at 8.
                for name, server in (("ceiling-create", reference), ("create", api)):
                    label = f"{name} ({FEW} connections)"
                    counted = [server] if server is api else []
                    measure(run, label, name, counted, server.url, lab, connections=FEW)
        # Service time without queueing: with 32 clients a p50 is mostly the wait in line
        # (32 / throughput); one client at a time shows what one request costs.
        for name in ("create", "read", "search"):
            if name in scenarios:
                alone = runner(
                    api.url,
                    requests[name],
                    lab if name == "create" else admin,
                    connections=1,
                    duration=args.duration,
                )
                results[f"{name} (1 connection)"] = [alone]
                _say(f"{name} alone: p50 {alone.p50_ms:.2f} ms, p99 {alone.p99_ms:.2f} ms")
        if "topologies" in scenarios:
            run_topologies(args, dsn, env, logs, reference, lab, admin, measure)
        if "bundle" in scenarios:
            extra["bundle"] = run_bundles(api.url, admin, args)
            _say(f"transaction bundle: {extra['bundle']}")
        if "export" in scenarios:
            extra["export"] = {"bulk": export.bulk(api.url, admin, dsn, api.process.pid)}
            extra["export"]["sdtm"] = export.sdtm(api.url, admin, api.process.pid)
            _say("\n".join(export.markdown(extra["export"])))
    finally:
        for server in servers:
            server.stop()
    if "recompute" in scenarios:
        extra["engine"] = recompute.engine_timings()
        patient = (loaded.heavy_patients or loaded.patients)[0]
        extra["recompute"] = asyncio.run(recompute.database_timings(dsn, patient))
        _say(f"recompute: {extra['recompute']}; engine: {extra['engine']}")
    machine = _machine(dsn, loadgen)
    settings = {
        "patients": args.patients,
        "counts": args.counts,
        "workers": args.workers,
        "start": args.start,
        "connections": args.connections,
        "duration_s": args.duration,
        "runs": args.runs,
    }
    paths = report.write(args.out, args.label, machine, settings, results, extra)
    _say(report.markdown(machine, settings, results, extra))
    _say(f"written: {', '.join(str(p) for p in paths)}; server logs in {logs}")
    if args.drop:
        asyncio.run(_drop(args))
    return 0


async def _drop(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(args.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    finally:
        await admin.close()


if __name__ == "__main__":
    sys.exit(main())
