"""`python -m app serve`: the production start, uvicorn workers that share the load.

`uvicorn --workers N` hands one listening socket to N processes, and whichever worker wakes
first accepts every connection that is waiting: under keep-alive load (32 clients) one worker
held all connections in 9 of 22 benchmark runs and the other sat idle. Here every worker
opens a listening socket of its own on the same address with `SO_REUSEPORT`, and the kernel
spreads new connections over the sockets that listen (by a hash of each connection's
addresses), so each worker gets its share of the connections from the start.

A worker listens only once its app has started (uvicorn listens after the lifespan's
start-up), so no connection waits on a worker that is still starting. The supervisor here
restarts a worker that dies; if a worker cannot start (exit status 3: a bad setting, no
token key, the database unreachable or not migrated) it stops the others and exits 3 itself,
where `uvicorn --workers` exits 0. SIGTERM or SIGINT stops the workers gracefully (each
finishes its requests and its lifespan's shutdown) and exits 0.

The parent imports neither the app nor its metrics: it writes nothing to
`PROMETHEUS_MULTIPROC_DIR`, and marks each worker that ended as dead there, so the pool
gauges stop counting it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

APP = "app.main:app"
# uvicorn's own exit status for "the server could not start".
STARTUP_FAILURE = 3
# A worker that keeps dying is restarted at most this often.
RESTART_PAUSE_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Another ASGI app served the same way: the benchmark's reference server, so that both
    # sides of a ratio are started alike.
    parser.add_argument("--app", default=APP, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("WEB_CONCURRENCY", "1")),
        help="worker processes (default: $WEB_CONCURRENCY or 1); one per core",
    )
    parser.add_argument("--log-config", help="logging config file (app/logging.json in production)")
    parser.add_argument("--log-level", default=None)
    parser.add_argument(
        "--forwarded-allow-ips",
        default=None,
        help="proxies whose X-Forwarded-* headers are trusted (uvicorn's option; default: "
        "$FORWARDED_ALLOW_IPS or 127.0.0.1)",
    )
    parser.add_argument("--backlog", type=int, default=2048)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port beside the other workers' (SO_REUSEPORT); it starts to
    listen when uvicorn serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_config(options: dict[str, Any], host: str, port: int, backlog: int) -> Any:
    """A worker's uvicorn configuration."""
    import uvicorn

    options = {"app": APP, **options}
    return uvicorn.Config(
        host=host,
        port=port,
        backlog=backlog,
        access_log=False,  # raw paths and query strings carry ids; the app logs its own line
        proxy_headers=True,
        **options,
    )


def _worker(options: dict[str, Any], host: str, port: int, backlog: int) -> None:
    """One worker process (spawned, so it imports the app itself)."""
    import uvicorn

    config = uvicorn_config(options, host, port, backlog)
    try:
        sock = listening_socket(host, port)
    except OSError as error:
        print(f"cannot listen on {host}:{port}: {error}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host = args.host
        self.workers = args.workers
        self.backlog = args.backlog
        self.app = args.app
        self.options: dict[str, Any] = {"app": args.app}
        if args.log_config:
            self.options["log_config"] = args.log_config
        if args.log_level:
            self.options["log_level"] = args.log_level
        if args.forwarded_allow_ips:
            self.options["forwarded_allow_ips"] = args.forwarded_allow_ips
        self.context = multiprocessing.get_context("spawn")
        self.stopping = False
        self.processes: list[BaseProcess] = []
        # Bound in the parent first: a port taken by another program is one line and exit 3
        # before any worker starts, and port 0 becomes the port every worker binds. A socket
        # that is bound but never listens is given no connections.
        self.reservation = listening_socket(args.host, args.port)
        self.port = int(self.reservation.getsockname()[1])

    def _start(self) -> BaseProcess:
        process = self.context.Process(
            target=_worker,
            args=(self.options, self.host, self.port, self.backlog),
            name="itp-worker",
        )
        process.start()
        return process

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _ended(self, process: BaseProcess) -> None:
        process.join()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory and process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, directory)  # type: ignore[no-untyped-call]

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        print(
            f"serving {self.app} on {self.host}:{self.port}: {self.workers} workers, "
            f"one SO_REUSEPORT socket each (parent {os.getpid()})",
            file=sys.stderr,
            flush=True,
        )
        self.processes = [self._start() for _ in range(self.workers)]
        status = 0
        while not self.stopping:
            ended = wait([p.sentinel for p in self.processes], timeout=0.5)
            for sentinel in ended:
                index = next(i for i, p in enumerate(self.processes) if p.sentinel == sentinel)
                process = self.processes[index]
                self._ended(process)
                if self.stopping:
                    break
                if process.exitcode == STARTUP_FAILURE:
                    # Another start would fail the same way: stop, and say so by the status.
                    print(
                        f"worker {process.pid} could not start (exit {STARTUP_FAILURE}): "
                        "stopping the server",
                        file=sys.stderr,
                        flush=True,
                    )
                    status = STARTUP_FAILURE
                    self.stopping = True
                    break
                print(
                    f"worker {process.pid} ended (exit {process.exitcode}): starting another",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(RESTART_PAUSE_S)
                self.processes[index] = self._start()
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
            self._ended(process)
        self.reservation.close()
        return status


def serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    try:
        supervisor = Supervisor(args)
    except OSError as error:
        print(f"cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return STARTUP_FAILURE
    return supervisor.run()
