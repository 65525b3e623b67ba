"""Exports against the running API (issue 17): a Bulk Data export of the whole bench trial and
its SDTM datasets, with the API workers' memory before and after.

- Bulk: kick-off as admin, poll (honouring Retry-After), then download every file, streamed.
  Generation time is the job's own (`export_job.created` to `finished`, read from the
  database), so the client's polling interval does not count; download time is the client's.
- SDTM: `GET /sdtm/{domain}.xpt` for every domain and `lb.csv`, timed by the client.
- Memory: VmRSS of each uvicorn worker before and after, and VmHWM (the peak since it
  started), from /proc: whether a worker's memory grows with what it exported.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.workers import worker_pids

SDTM = [
    ("dm", "xpt"),
    ("ex", "xpt"),
    ("cm", "xpt"),
    ("lb", "xpt"),
    ("lb", "csv"),
    ("ae", "xpt"),
    ("rs", "xpt"),
]


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set now (VmRSS) and its peak so far (VmHWM), MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return {"rss": values.get("VmRSS", 0.0), "peak": values.get("VmHWM", 0.0)}


def _memory(server_pid: int) -> dict[str, dict[str, float]]:
    return {str(pid): memory_mb(pid) for pid in worker_pids(server_pid)}


async def _job_seconds(dsn: str, job_id: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT extract(epoch FROM finished - created) AS s FROM export_job WHERE id = $1",
            job_id,
        )
    finally:
        await conn.close()
    return float(row["s"])


def bulk(base_url: str, token: str, dsn: str, server_pid: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    before = _memory(server_pid)
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as client:
        started = time.perf_counter()
        kick = client.get("/fhir/$export", headers={"Prefer": "respond-async"})
        kick.raise_for_status()
        status_url = kick.headers["Content-Location"]
        while True:
            answer = client.get(status_url)
            if answer.status_code != 202:
                break
            time.sleep(float(answer.headers.get("Retry-After", "1")))
        answer.raise_for_status()
        waited = time.perf_counter() - started
        manifest = answer.json()
        after_generation = _memory(server_pid)
        resources = lines = 0
        downloaded = time.perf_counter()
        for item in manifest["output"]:
            resources += item["count"]
            with client.stream("GET", item["url"]) as stream:
                stream.raise_for_status()
                for chunk in stream.iter_bytes():
                    lines += chunk.count(b"\n")
        download_s = time.perf_counter() - downloaded
        generate_s = asyncio.run(_job_seconds(dsn, status_url.rsplit("/", 1)[1]))
        client.delete(status_url)
    return {
        "resources": resources,
        "lines_downloaded": lines,
        "files": len(manifest["output"]),
        "generate_s": round(generate_s, 2),
        "generate_resources_per_s": round(resources / generate_s) if generate_s else None,
        "kick_off_to_manifest_s": round(waited, 2),
        "download_s": round(download_s, 2),
        "download_resources_per_s": round(resources / download_s) if download_s else None,
        "memory_before_mb": before,
        "memory_after_generation_mb": after_generation,
        "memory_after_download_mb": _memory(server_pid),
    }


def sdtm(base_url: str, token: str, server_pid: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    datasets = []
    before = _memory(server_pid)
    with httpx.Client(base_url=base_url, headers=headers, timeout=1800) as client:
        for code, fmt in SDTM:
            started = time.perf_counter()
            answer = client.get(f"/sdtm/{code}.{fmt}")
            seconds = time.perf_counter() - started
            answer.raise_for_status()
            rows = int(answer.headers["X-Row-Count"])
            datasets.append(
                {
                    "dataset": f"{code}.{fmt}",
                    "rows": rows,
                    "bytes": len(answer.content),
                    "seconds": round(seconds, 2),
                    "rows_per_s": round(rows / seconds),
                    "memory_after_mb": _memory(server_pid),
                }
            )
    return {"memory_before_mb": before, "datasets": datasets}


def peak(memory: dict[str, dict[str, float]]) -> float:
    return max((m["peak"] for m in memory.values()), default=0.0)


def markdown(result: dict[str, Any]) -> list[str]:
    b = result["bulk"]
    lines = [
        "",
        f"Bulk Data export (`GET /fhir/$export`, every type): {b['resources']:,} resources in "
        f"{b['files']} files; generated in {b['generate_s']} s "
        f"(**{b['generate_resources_per_s']:,} resources/s**), kick-off to manifest "
        f"{b['kick_off_to_manifest_s']} s, downloaded in {b['download_s']} s "
        f"({b['download_resources_per_s']:,} resources/s). Worker RSS MiB before / after "
        f"generation / after download: "
        + "; ".join(
            f"{pid}: {b['memory_before_mb'][pid]['rss']} / "
            f"{b['memory_after_generation_mb'].get(pid, {}).get('rss')} / "
            f"{b['memory_after_download_mb'].get(pid, {}).get('rss')} "
            f"(peak {b['memory_after_download_mb'].get(pid, {}).get('peak')})"
            for pid in b["memory_before_mb"]
        )
        + ".",
        "",
        "| SDTM dataset | rows | seconds | rows/s | worker peak RSS MiB after |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in result["sdtm"]["datasets"]:
        lines.append(
            f"| {d['dataset']} | {d['rows']:,} | {d['seconds']} | {d['rows_per_s']:,} | "
            f"{peak(d['memory_after_mb'])} |"
        )
    return lines
