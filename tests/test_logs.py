"""Structured logs: one JSON object per line, with the request id of its request."""

from __future__ import annotations

import json
import logging

import pytest

from app.logs import JsonFormatter
from tests import builders
from tests.test_crud import create


@pytest.fixture
def json_lines():
    """Every record of the app's loggers, formatted as the production config formats them."""
    lines: list[str] = []
    formatter = JsonFormatter()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("app")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


async def test_every_request_logs_a_json_line_with_its_request_id(client, json_lines) -> None:
    patient = await create(client, builders.patient())
    answer = await client.get(
        f"/fhir/Patient/{patient.json()['id']}", headers={"X-Request-Id": "trace-42"}
    )
    assert answer.headers["x-request-id"] == "trace-42"
    records = [json.loads(line) for line in json_lines]
    access = [r for r in records if r["logger"] == "app.access"]
    assert access and all(r["request_id"] for r in access)
    [read] = [r for r in access if r["request_id"] == "trace-42"]
    assert read["route"] == "/fhir/Patient/{resource_id}"
    assert read["status"] == 200 and read["method"] == "GET"
    assert isinstance(read["duration_ms"], float)
    # The route template only: ids stay in the audit trail, reachable by the request id.
    assert patient.json()["id"] not in json.dumps(read)
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= set(record)


def test_a_line_outside_requests_has_a_null_request_id() -> None:
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    try:
        raise ValueError("cause")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "boom x" and document["request_id"] is None
    assert "ValueError: cause" in document["exception"]


def test_the_production_logging_config_formats_as_json() -> None:
    import logging.config
    from pathlib import Path

    config = json.loads((Path(__file__).parents[1] / "app" / "logging.json").read_text())
    factory = logging.config.BaseConfigurator({}).resolve(config["formatters"]["json"]["()"])
    assert factory is JsonFormatter
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "app"):
        [handler] = config["loggers"][name]["handlers"]
        assert config["handlers"][handler]["formatter"] == "json"


async def test_log_lines_carry_no_query_string_and_no_body(client, json_lines) -> None:
    """Subject numbers travel in query strings and bodies; the log has neither (the request
    id leads to the audit trail, which has the details)."""
    await create(client, builders.patient("S01-LOGSECRET"))
    await client.get("/fhir/Patient", params={"identifier": "S01-LOGSECRET"})
    await client.post("/fhir/Patient", json={"resourceType": "Patient", "id": "S01-LOGSECRET"})
    assert json_lines and not [line for line in json_lines if "LOGSECRET" in line]


def test_uvicorns_raw_access_lines_are_dropped_by_the_production_config() -> None:
    """uvicorn's access log writes the raw path and query string: the production config
    keeps its logger above INFO even where `--no-access-log` is forgotten."""
    from pathlib import Path

    config = json.loads((Path(__file__).parents[1] / "app" / "logging.json").read_text())
    assert logging.getLevelName(config["loggers"]["uvicorn.access"]["level"]) > logging.INFO


async def test_database_errors_do_not_carry_the_statements_values(app) -> None:
    """An error's text (logged with its traceback when unexpected) names the statement but
    not its parameters, which hold resource bodies and identifiers."""
    from sqlalchemy import exc, text

    with pytest.raises(exc.DBAPIError) as raised:
        async with app.state.services.db.write() as conn:
            await conn.execute(
                text("INSERT INTO audit_event (id) VALUES (:id)"), {"id": "S01-LOGSECRET"}
            )
    assert "LOGSECRET" not in str(raised.value)
