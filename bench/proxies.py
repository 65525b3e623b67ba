"""PgBouncer and HAProxy on loopback, each from the system's package and a config of its own.

The replica test (`tests/test_replicas.py`) and the benchmark's topologies (`python -m bench
--scenarios topologies`) run the API as it runs behind a load balancer over a connection
pooler: `PgBouncer` in transaction pooling mode in front of PostgreSQL, `HAProxy` in front of
several API instances. Each process gets a free port, a temporary directory and is stopped
with its process group. Both refuse to run as root; as root they run as the `postgres` OS
user, like the throwaway clusters of `tests/pg_cluster.py`.

Install: `apt-get install -y pgbouncer haproxy` (Debian/Ubuntu).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

INSTALL_HINT = "`apt-get install -y pgbouncer haproxy` (Debian/Ubuntu)"
SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "pgbouncer" / "pgbouncer.sh"


class Missing(RuntimeError):
    """The binary is not installed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise Missing(f"{name} is not installed: {INSTALL_HINT}")
    return found


def stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to the process group `process` leads (started with `start_new_session`),
    SIGKILL if it has not ended after `timeout` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, name: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.returncode}): {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port}: {log.read_text()}")


class _Daemon:
    """A foreground process in its own session, run as `postgres` when we are root."""

    name = ""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"itp-{self.name}-"))
        self.port = free_port()
        self.log = self.root / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if self._as_postgres:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*prefix, *self._command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_port(self.port, self.process, self.log, self.name)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, 10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> _Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PgBouncer(_Daemon):
    """PgBouncer in transaction pooling mode in front of the PostgreSQL of `server_url`, run
    by the deployment's own script (`deploy/pgbouncer/pgbouncer.sh`, what the compose
    profile's image runs): every database of that server by the same name, at most
    `pool_size` server connections per database and user however many clients connect,
    clients authenticated by SCRAM with a password made for this run."""

    name = "pgbouncer"

    def __init__(self, server_url: str, pool_size: int = 8) -> None:
        executable = binary("pgbouncer")  # before the temporary directory: Missing leaves none
        super().__init__()
        server = urlsplit(server_url)
        self.user = server.username or "postgres"
        self.password = secrets.token_urlsafe(16)
        self.environment = {
            "DB_HOST": server.hostname or "127.0.0.1",
            "DB_PORT": str(server.port or 5432),
            "DB_USER": self.user,
            "DB_PASSWORD": self.password,
            "LISTEN_ADDR": "127.0.0.1",
            "LISTEN_PORT": str(self.port),
            "POOL_SIZE": str(pool_size),
            "PGBOUNCER_DIR": str(self.root),
            "PGBOUNCER": executable,
        }

    def _command(self) -> list[str]:
        settings = [f"{name}={value}" for name, value in self.environment.items()]
        return ["env", *settings, "sh", str(SCRIPT)]

    def url(self, database: str) -> str:
        """The app's `DATABASE_URL` for `database` through this pooler."""
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"
            "?pgbouncer=true"
        )


class HAProxy(_Daemon):
    """HAProxy, HTTP mode, round robin over `backends` (base URLs on loopback), keep-alive to
    both sides: one request at a time goes to each instance in turn, whatever connection it
    came in on."""

    name = "haproxy"

    def __init__(self, backends: list[str]) -> None:
        self.executable = binary("haproxy")
        super().__init__()
        servers = "".join(
            f"    server api{n} {urlsplit(b).hostname}:{urlsplit(b).port}\n"
            for n, b in enumerate(backends, start=1)
        )
        self.config = self.root / "haproxy.cfg"
        self.config.write_text(
            "global\n"
            "    nbthread 1\n"
            "    maxconn 2000\n"
            "defaults\n"
            "    mode http\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    option http-keep-alive\n"
            "    http-reuse always\n"
            "frontend api\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend replicas\n"
            "backend replicas\n"
            "    balance roundrobin\n" + servers
        )

    def _command(self) -> list[str]:
        return [self.executable, "-db", "-f", str(self.config)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
