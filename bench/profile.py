"""Profile one scenario in process with pyinstrument (the `bench` extra):

    python -m bench.profile create --requests 300 [--database itp_bench] [--html out.html]
    python -m bench.profile bundle --requests 3 --concurrency 1   # 1,000-entry transactions

The app runs in this process on the bench database, driven through httpx's ASGI transport
by `--concurrency` tasks: the profile shows where a request's CPU time goes (the HTTP
server and the socket are left out, the database round trips are in)."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import time
from pathlib import Path

import httpx

from bench import __main__ as harness
from bench import datagen


async def _drive(args: argparse.Namespace) -> None:
    from pyinstrument import Profiler

    from app.auth.tokens import SecretKeySource, TokenGrant, issue_token
    from app.main import create_app
    from app.settings import Settings

    dsn = harness._dsn(args.admin_dsn, args.database)
    loaded = await datagen.describe(dsn)
    keys = SecretKeySource(
        "bench-only-" + secrets.token_urlsafe(32), issuer="itp-trial-api", audience="itp-trial-api"
    )
    role = "lab" if args.scenario == "create" else "admin"
    token = issue_token(keys, TokenGrant("bench", role, loaded.sites), minutes=60)
    app = create_app(Settings(database_url=dsn, environment="test"), key_source=keys)
    if args.scenario == "bundle":
        rng = random.Random()
        requests = [
            harness.Request("POST", "/fhir", harness.transaction_bundle(10, 1_000, rng, "S01"))
            for _ in range(args.requests + 1)
        ]
    else:
        requests = harness.build_requests(loaded, seed=random.randrange(1 << 30))[args.scenario]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def worker(items: list[harness.Request]) -> None:
                for r in items:
                    answer = await client.request(r.method, r.path, content=r.body, headers=headers)
                    assert answer.status_code < 300, answer.text

            await worker(requests[:1] if args.scenario == "bundle" else requests[:20])  # warm up
            if args.scenario == "bundle":  # each Bundle creates its own Patients: no repeats
                chosen = requests[1:]
            else:
                chosen = [random.choice(requests) for _ in range(args.requests)]
            shares = [chosen[i :: args.concurrency] for i in range(args.concurrency)]
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            started = time.perf_counter()
            profiler.start()
            await asyncio.gather(*(worker(share) for share in shares))
            profiler.stop()
            elapsed = time.perf_counter() - started
    print(
        f"{args.requests} {args.scenario} requests in {elapsed:.2f} s: "
        f"{elapsed / args.requests * 1e3:.2f} ms each (profiled)"
    )
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    if args.html:
        Path(args.html).write_text(profiler.output_html())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument(
        "scenario", choices=["create", "read", "search", "response-status", "bundle"]
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--database", default="itp_bench")
    parser.add_argument(
        "--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", harness.DEFAULT_ADMIN_DSN)
    )
    parser.add_argument("--html", default="")
    asyncio.run(_drive(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
