"""Each worker's share of the requests a server answered, from its Prometheus files.

With `PROMETHEUS_MULTIPROC_DIR` set, every worker process writes its counters to files of its
own, `counter_<pid>.db`: `itp_http_requests_total` summed over one file is the requests that
worker answered. Two readings, before and after a run, give each worker's share of that run.
A worker is counted idle when it answered under a quarter of an even share (`IDLE_BELOW`):
one that took a single request while the other took 3,000 sat idle all the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector

METRIC = "itp_http_requests"
# Of an even share (1 / workers): below it a worker counts as idle.
IDLE_BELOW = 0.25
_COUNTER_FILE = re.compile(r"counter_(\d+)\.db")


def requests_by_pid(directories: Iterable[Path]) -> dict[int, float]:
    """Requests answered so far, by worker pid, over every server's metrics directory."""
    found: dict[int, float] = {}
    for directory in directories:
        for path in directory.glob("counter_*.db"):
            match = _COUNTER_FILE.fullmatch(path.name)
            if match is None:
                continue
            total = 0.0
            for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
                if metric.name == METRIC:
                    total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
            pid = int(match.group(1))
            found[pid] = found.get(pid, 0.0) + total
    return found


def shares(
    before: dict[int, float], after: dict[int, float], pids: Iterable[int]
) -> dict[str, Any]:
    """Each worker's requests between two readings and its share; every worker of the
    server is listed, so one that answered nothing shows as 0."""
    counts = {pid: after.get(pid, 0.0) - before.get(pid, 0.0) for pid in pids}
    total = sum(counts.values())
    even = total / len(counts) if counts else 0.0
    return {
        "requests": {str(pid): int(n) for pid, n in sorted(counts.items())},
        "shares": {str(pid): round(n / total, 3) if total else 0.0 for pid, n in counts.items()},
        "idle_workers": sum(1 for n in counts.values() if n < IDLE_BELOW * even or n == 0),
    }


def worker_pids(parent: int) -> list[int]:
    """The worker processes of a server started as `parent` (uvicorn's or `python -m app
    serve`'s supervisor): its children, less multiprocessing's resource tracker."""
    pids: list[int] = []
    for task in Path(f"/proc/{parent}/task").glob("*/children"):
        for word in task.read_text().split():
            try:
                command = Path(f"/proc/{word}/cmdline").read_bytes()
            except OSError:
                continue  # ended meanwhile
            if b"resource_tracker" not in command:
                pids.append(int(word))
    return sorted(pids)


def _tcp_sockets(port: int, state: str, end: int) -> int:
    """IPv4 TCP sockets in `state` (/proc/net/tcp's hex code) whose local (`end` 1) or
    remote (`end` 2) port is `port`."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == state and int(fields[end].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def listening_sockets(port: int) -> int:
    """How many sockets listen on `port` (IPv4, any address): with `python -m app serve`, one
    per worker that serves; a worker still starting has none yet."""
    return _tcp_sockets(port, "0A", 1)


def connections_to(port: int) -> int:
    """Established TCP connections whose far end is `port` (IPv4): a server's clients."""
    return _tcp_sockets(port, "01", 2)
