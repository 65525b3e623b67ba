"""Load generators: wrk with a Lua script (preferred), or a bounded asyncio client.

Both send to 127.0.0.1 only, keep `connections` connections open for `duration` seconds,
cycle through a prepared list of requests (the body mix) from a random start per
connection, and report requests/s, latency percentiles and errors (non-2xx answers, socket
errors, timeouts). wrk is a C program: on a 2-core machine it takes a fraction of the CPU the
Python client needs, so the Python client's figures are a floor, and the report says which
one ran. Install wrk with `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

WRK_INSTALL_HINT = "wrk is not installed: `apt-get install -y wrk` (or `brew install wrk`)"


@dataclass
class Request:
    method: str
    path: str
    body: bytes = b""


@dataclass
class Result:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_LUA = r"""
local requests = {}
local counter = 0
local thread_id = 0
local next_id = 0

setup = function(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
end

init = function(args)
  local headers = {}
  headers["Authorization"] = "Bearer " .. args[2]
  headers["Content-Type"] = "application/fhir+json"
  headers["Accept"] = "application/fhir+json"
  local file = io.open(args[1], "r")
  for line in file:lines() do
    local method, path, body = line:match("^(%S+)\t(%S+)\t(.*)$")
    if body == "" then body = nil end
    requests[#requests + 1] = wrk.format(method, path, headers, body)
  end
  file:close()
  math.randomseed(os.time() + thread_id * 7919)
  counter = math.random(#requests)
end

request = function()
  counter = counter + 1
  if counter > #requests then counter = 1 end
  return requests[counter]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\": %d, \"duration_us\": %d, \"connect\": %d, \"read\": %d, " ..
    "\"write\": %d, \"status\": %d, \"timeout\": %d, \"p50\": %d, \"p95\": %d, \"p99\": %d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load goes to loopback only, not {host!r}")


def run_wrk(
    base_url: str,
    requests: list[Request],
    token: str,
    *,
    connections: int,
    duration: float,
    threads: int = 2,
) -> Result:
    _check_loopback(base_url)
    if not wrk_available():
        raise RuntimeError(WRK_INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as work:
        script = Path(work) / "mix.lua"
        script.write_text(_LUA)
        mix = Path(work) / "requests.tsv"
        with mix.open("w") as out:
            for request in requests:
                body = request.body.decode()
                assert "\n" not in body and "\t" not in body
                out.write(f"{request.method}\t{request.path}\t{body}\n")
        command = [
            "wrk",
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(int(round(duration)), 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base_url,
            "--",
            str(mix),
            token,
        ]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    line = next((x for x in completed.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {completed.stderr or completed.stdout}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Result(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=errors,
        p50_ms=data["p50"] / 1000,
        p95_ms=data["p95"] / 1000,
        p99_ms=data["p99"] / 1000,
        statuses={"non-2xx/3xx": data["status"]},
    )


async def _connection(
    host: str,
    port: int,
    wire: list[bytes],
    deadline: float,
    latencies: list[float],
    statuses: dict[str, int],
    rng: random.Random,
) -> int:
    errors = 0
    reader, writer = await asyncio.open_connection(host, port)
    position = rng.randrange(len(wire))
    try:
        while time.perf_counter() < deadline:
            position = (position + 1) % len(wire)
            started = time.perf_counter()
            writer.write(wire[position])
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = head[9:12].decode()
            length = 0
            for header in head.split(b"\r\n")[1:]:
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if not status.startswith(("2", "3")):
                errors += 1
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        errors += 1
    finally:
        writer.close()
    return errors


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


def run_python(
    base_url: str,
    requests: list[Request],
    token: str,
    *,
    connections: int,
    duration: float,
) -> Result:
    """The fallback: HTTP/1.1 keep-alive over asyncio streams, one task per connection."""
    _check_loopback(base_url)
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    wire = [
        (
            f"{r.method} {r.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\n"
            f"Accept: application/fhir+json\r\nContent-Length: {len(r.body)}\r\n\r\n"
        ).encode()
        + r.body
        for r in requests
    ]

    async def main() -> Result:
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        started = time.perf_counter()
        deadline = started + duration
        rng = random.Random(1)
        errors = await asyncio.gather(
            *(
                _connection(host, port, wire, deadline, latencies, statuses, rng)
                for _ in range(connections)
            )
        )
        seconds = time.perf_counter() - started
        ordered = sorted(latencies)
        return Result(
            requests=len(latencies),
            seconds=seconds,
            errors=sum(errors),
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p95_ms=_percentile(ordered, 0.95) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            statuses=statuses,
        )

    return asyncio.run(main())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
