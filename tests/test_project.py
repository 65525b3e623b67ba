"""Checks a fresh clone relies on: the OpenAPI file, the migrations, the container files."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.auth.settings import AuthSettings
from app.cli import OPENAPI_PATH, render_openapi
from app.main import create_app
from app.settings import Settings
from tests.conftest import KEY

ROOT = Path(__file__).resolve().parents[1]


def test_openapi_file_is_current():
    assert OPENAPI_PATH.read_text() == render_openapi(), (
        "openapi/openapi.json is stale: run `python -m app openapi`"
    )


def test_openapi_operation_ids_are_stable_and_unique():
    spec = json.loads(render_openapi())
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    for expected in (
        "createObservation",
        "readPatient",
        "vreadAdverseEvent",
        "updateMedicationAdministration",
        "deletePatient",
        "searchObservation",
        "historyPatientInstance",
        "historyPatientType",
        "capabilities",
    ):
        assert expected in ids
    create = spec["paths"]["/fhir/Observation"]["post"]
    body_schema = create["requestBody"]["content"]["application/fhir+json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/Observation"}
    assert "Observation" in spec["components"]["schemas"]


def test_links_name_operations_of_the_file():
    """OpenAPI links (what to do next with the resource a response names; the fuzzer's
    stateful phase follows them): each names an operation that exists, with its path
    parameter, and a delete leads to the history FHIR keeps."""
    spec = json.loads(render_openapi())
    operations = {op["operationId"]: op for item in spec["paths"].values() for op in item.values()}
    links = [
        (operation["operationId"], link)
        for operation in operations.values()
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) == 4 * 5
    for source, link in links:
        target = operations[link["operationId"]]
        names = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
        assert set(link["parameters"]) <= names, (source, link)
    delete_links = {link["operationId"] for source, link in links if source == "deletePatient"}
    assert delete_links == {"readPatient", "historyPatientInstance"}


def test_every_error_documents_its_operation_outcome_as_sent():
    """The server sends every error as an application/fhir+json OperationOutcome: each 4xx
    and 5xx of the file says so, and nothing else (a generated client parses an error
    only by the media type documented; one documented as application/json alone was
    parsed as None)."""
    spec = json.loads(render_openapi())
    outcome = {"$ref": "#/components/schemas/OperationOutcome"}
    checked = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status[0] not in "45":
                    continue
                content = response.get("content", {})
                assert content == {"application/fhir+json": {"schema": outcome}}, (
                    method,
                    path,
                    status,
                )
                checked += 1
    assert checked > 400


def test_migrations_match_the_models(database_url):
    """`alembic check`: a model change without its migration fails here, on both databases."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "check"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr


def test_compose_file_parses_and_uses_the_settings_names():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api, db = compose["services"]["api"], compose["services"]["db"]
    assert db["image"].startswith("postgres:15")
    assert "healthcheck" in db
    assert api["depends_on"]["db"]["condition"] == "service_healthy"
    assert "pgdata" in compose["volumes"]
    known = (
        {"DATABASE_URL"}
        | {f"APP_{name.upper()}" for name in Settings.model_fields if name != "database_url"}
        | {f"APP_AUTH_{name.upper()}" for name in AuthSettings.model_fields}
    )
    # Read by `python -m app serve` (and uvicorn) in the image's command.
    server_names = {"WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS"}
    for service in ("api", "api-replica", "migrate"):
        for name in compose["services"][service]["environment"]:
            assert name in known | server_names, f"{service}: {name} is not a setting"
        url = compose["services"][service]["environment"]["DATABASE_URL"]
        settings = Settings(**{"_env_file": None}, database_url=url)
        assert settings.database_url.startswith("postgresql://")


def test_compose_file_holds_no_secret():
    """The database password and the token secret come from the environment compose runs
    in (it refuses to start without them), never from a literal in the file."""
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    secrets = []
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            if any(word in name for word in ("PASSWORD", "SECRET", "TOKEN", "KEY")):
                secrets.append((name, value))
    # PgBouncer's DB_PASSWORD is the database password, passed on.
    names = {"POSTGRES_PASSWORD", "APP_AUTH_JWT_SECRET", "DB_PASSWORD"}
    assert {name for name, _ in secrets} == names
    for name, value in secrets:
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, value)
    password = r"\$\{POSTGRES_PASSWORD:\?[^}]+\}"
    expected = {
        "api": rf"postgresql://itp:{password}@db:5432/itp",
        "migrate": rf"postgresql://itp:{password}@db:5432/itp",
        "api-replica": rf"postgresql://itp:{password}@pgbouncer:6432/itp\?pgbouncer=true",
    }
    for service, interpolated in expected.items():
        database_url = compose["services"][service]["environment"]["DATABASE_URL"]
        assert re.fullmatch(interpolated, database_url), database_url


def test_dockerfile_runs_as_non_root_migrates_checks_then_serves():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "\nUSER app" in dockerfile
    assert "HEALTHCHECK" in dockerfile
    [command] = [line for line in dockerfile.splitlines() if line.startswith("CMD ")]
    script = json.loads(command[4:])[2]
    steps = [step.strip() for step in script.split("&&")]
    assert steps[0] == "alembic upgrade head"
    assert steps[1].endswith("python -m app check")  # one line and a non-zero exit
    serve = steps[-1]
    # The production start: a listening socket per worker (app/serve.py).
    assert serve.startswith("exec python -m app serve ")
    # Production logs: JSON lines, and no uvicorn access log (raw paths and query strings).
    assert "--log-config app/logging.json" in serve
    from app.serve import uvicorn_config

    config = uvicorn_config({}, "0.0.0.0", 8000, 2048)
    assert config.access_log is False and config.proxy_headers is True
    assert "PROMETHEUS_MULTIPROC_DIR=" in dockerfile and 'mkdir -p "$PROMETHEUS' in script


def test_the_replicas_profile_runs_replicas_behind_a_proxy_over_pgbouncer():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    profile = {
        name for name, service in services.items() if "replicas" in service.get("profiles", [])
    }
    assert profile == {"migrate", "pgbouncer", "api-replica", "proxy"}
    # The default `docker compose up` is unchanged: no profile on the database and the API.
    assert "profiles" not in services["db"] and "profiles" not in services["api"]

    replica = services["api-replica"]
    assert replica["build"] == "."
    assert re.fullmatch(r"\$\{API_REPLICAS:-\d+\}", str(replica["deploy"]["replicas"]))
    assert "ports" not in replica  # reached through the proxy only
    assert replica["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert replica["depends_on"]["pgbouncer"]["condition"] == "service_healthy"
    # The image's command less the migration, which `migrate` runs once.
    dockerfile = (ROOT / "Dockerfile").read_text()
    [command] = [line for line in dockerfile.splitlines() if line.startswith("CMD ")]
    image_steps = [step.strip() for step in json.loads(command[4:])[2].split("&&")]
    replica_steps = [step.strip().replace("$$", "$") for step in replica["command"][2].split("&&")]
    assert replica["command"][:2] == ["sh", "-c"]
    assert replica_steps == image_steps[1:]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]

    pgbouncer = services["pgbouncer"]
    assert (ROOT / pgbouncer["build"] / "Dockerfile").exists()
    assert "pgbouncer.sh" in (ROOT / pgbouncer["build"] / "Dockerfile").read_text()
    assert pgbouncer["environment"]["DB_HOST"] == "db"
    assert "pool_mode = transaction" in (ROOT / pgbouncer["build"] / "pgbouncer.sh").read_text()

    proxy = services["proxy"]
    assert proxy["ports"] == ["127.0.0.1:8080:8000"]
    [mount] = proxy["volumes"]
    source, target, mode = mount.split(":")
    assert mode == "ro" and target == "/usr/local/etc/haproxy/haproxy.cfg"
    config = (ROOT / source).read_text()
    # The proxy sends to the API service by its compose name, checking each on /readyz.
    backend = re.search(r"^\s*server-template \S+ \S+ ([\w-]+):8000 check", config, re.M)
    assert backend is not None and backend.group(1) == "api-replica"
    assert "option httpchk GET /readyz" in config and "bind :8000" in config


def test_the_proxy_config_is_valid_for_haproxy(tmp_path):
    """haproxy itself checks the profile's config (`-c`): it installs from the system's
    packages (scripts/test.sh); without it this fails in CI and is skipped elsewhere."""
    from bench.proxies import Missing, binary

    try:
        haproxy = binary("haproxy")
    except Missing as missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing} (CI=true: the proxy config must be checked)")
        pytest.skip(str(missing))
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "haproxy.cfg"
    broken.write_text((ROOT / "deploy" / "haproxy.cfg").read_text().replace("balance", "balanse"))
    assert subprocess.run([haproxy, "-c", "-f", str(broken)], capture_output=True).returncode != 0


def test_the_build_context_leaves_out_secrets_data_and_caches():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".git", ".venv", "data", "**/jwt-secret", "**/__pycache__", ".env", "mutants"):
        assert entry in ignored, entry
    # And nothing the image needs is left out.
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {
        name
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for name in line.split()[1:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "app", "alembic.ini", "migrations"}
    assert not copied & ignored


async def test_docs_work_offline(client):
    for page in ("/docs", "/redoc"):
        response = await client.get(page)
        html = response.text
        # What the bundled scripts may still name at run time (ReDoc's "powered by" logo is
        # a cdn.redoc.ly URL) is not fetched either: the page's CSP allows its own origin
        # only (and data: images).
        policy = dict(
            directive.strip().split(" ", 1)
            for directive in response.headers["content-security-policy"].split(";")
        )
        assert policy["default-src"] == "'self'", policy
        assert all("http" not in sources and "*" not in sources for sources in policy.values())
        assert "cdn" not in html.lower() and "unpkg" not in html.lower(), page
        assets = [part.split('"')[0] for part in html.split('src="')[1:]]
        assert assets, page
        for asset in assets:
            assert asset.startswith("/static/docs/"), asset
            assert (await client.get(asset)).status_code == 200, asset


@pytest.mark.parametrize(
    ("environment", "gc_freeze", "frozen"),
    [("production", None, True), ("test", None, False), ("test", True, True)],
)
async def test_a_started_worker_freezes_what_it_holds_in_production(
    environment: str, gc_freeze: bool | None, frozen: bool, tmp_path: Path
) -> None:
    """APP_GC_FREEZE (issue 8): full collections skip the startup's objects, which cost
    40-50 ms each; in production by default, never behind a test's back."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/gc.db", environment=environment, gc_freeze=gc_freeze
    )
    application = create_app(settings, key_source=KEY)
    gc.unfreeze()
    try:
        async with application.router.lifespan_context(application):
            assert (gc.get_freeze_count() > 0) is frozen
    finally:
        gc.unfreeze()
