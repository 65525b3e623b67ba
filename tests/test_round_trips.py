"""Database round trips per request (issue 20, part 2), so that a regression fails CI.

PostgreSQL: counted on the wire by a proxy between the app and the server
(`tests/wire_counter.py`): every message that makes the server answer, BEGIN and COMMIT
included. SQLite is in-process: there each statement the app executes counts (SQLAlchemy's
cursor events), BEGIN and COMMIT included.

`CREATE_*` are the counts today, not the issue's target (6 for a create, whether or not
the patient's status changes): what stands between the two is written in bench/README.md.
A read by id meets its target (2) on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from app.main import create_app
from app.services.response import response_observation_id
from app.settings import Settings
from tests import builders
from tests.conftest import KEY, client_for, running_app
from tests.test_crud import create
from tests.wire_counter import counting_proxy

READ_BY_ID = 2
# A platelet create that leaves the patient's status as it was / that changes it.
CREATE_STATUS_KEPT = {"postgresql": 10, "sqlite": 10}
CREATE_STATUS_CHANGED = {"postgresql": 16, "sqlite": 16}


class _StatementCounter:
    """SQLite: each SQL statement the app executes (BEGIN, sent by the engine's listener,
    included), and the COMMIT or ROLLBACK that ends a transaction a BEGIN opened."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.messages: list[str] = []
        self.counting = False
        self._open = False

    @asynccontextmanager
    async def window(self) -> AsyncIterator[None]:
        self.round_trips, self.messages, self.counting = 0, [], True
        try:
            yield
        finally:
            self.counting = False

    def on_statement(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self._open = self._open or statement.startswith("BEGIN")
        if self.counting:
            self.round_trips += 1
            self.messages.append(statement[:60])

    def on_transaction_end(self, conn) -> None:
        if self.counting and self._open:
            self.round_trips += 1
            self.messages.append("COMMIT or ROLLBACK")
        self._open = False


@asynccontextmanager
async def _counted_app(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    """The app, and a counter of its database round trips with a `window()` to count in."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "postgresql":
        async with counting_proxy(url.host or "127.0.0.1", url.port or 5432) as (port, counter):
            proxied = url.set(port=port).render_as_string(hide_password=False)
            application = create_app(
                settings.model_copy(update={"database_url": proxied}), key_source=KEY
            )
            async with application.router.lifespan_context(application):
                yield application, _Windowed(counter)
        return
    counter = _StatementCounter()
    application = create_app(settings, key_source=KEY)
    async with application.router.lifespan_context(application):
        for engine in {application.state.services.db.writer, application.state.services.db.reader}:
            # BEGIN is executed by the engine's `begin` listener, so it is a cursor event too.
            event.listen(engine.sync_engine, "before_cursor_execute", counter.on_statement)
            event.listen(engine.sync_engine, "commit", counter.on_transaction_end)
            event.listen(engine.sync_engine, "rollback", counter.on_transaction_end)
        yield application, counter


class _Windowed:
    """The wire counter's synchronous window, as the async one the tests use."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    @asynccontextmanager
    async def window(self) -> AsyncIterator[None]:
        with self.counter.window():
            yield

    @property
    def round_trips(self) -> int:
        return int(self.counter.round_trips)

    @property
    def messages(self) -> list[str]:
        return list(self.counter.messages)


async def _status_version(client, patient_id: str) -> str | None:
    """The version of the patient's response-status Observation (None before the first)."""
    status = await client.get(f"/fhir/Observation/{response_observation_id(patient_id)}")
    return status.json()["meta"]["versionId"] if status.status_code == 200 else None


async def test_round_trips_of_a_create_and_a_read(settings, database_url):
    dialect = make_url(settings.database_url).get_backend_name()
    # The sequencer chains the audit trail off the request path: held still here. One
    # pooled connection: its statements are prepared once (a new connection's first use of
    # a statement costs a parse, and asyncpg's type introspection, which is not the point).
    quiet = settings.model_copy(
        update={"audit_chain_delay_ms": 3_600_000, "db_pool_size": 1, "db_max_overflow": 0}
    )
    async with _counted_app(quiet) as (application, counter), client_for(application) as client:
        patient_id = (await create(client, builders.patient("S01-001"))).json()["id"]
        kept, changed = [], []

        async def post(day: str, value: float) -> Any:
            before = await _status_version(client, patient_id)
            body = builders.platelet_count(patient_id, f"2025-03-{day}T09:00:00Z", value)
            # The read's queued audit record is written now, not during the count.
            await application.state.services.audit.flush()
            async with counter.window():
                observation = await create(client, body)
            after = await _status_version(client, patient_id)
            (kept if before == after else changed).append((counter.round_trips, counter.messages))
            return observation

        # Untreated, the status stays "not evaluable" whatever the counts; treated, every
        # count is assessed and the status Observation written again. The first create of
        # each kind warms the statement caches and is not counted.
        for day, value in (("01", 10), ("02", 11), ("03", 12)):
            await post(day, value)
        await create(client, builders.administration(patient_id, "2025-03-04T09:00:00Z"))
        for day, value in (("05", 12), ("10", 40), ("17", 45), ("18", 46)):
            observation = await post(day, value)
        del kept[0], changed[0]
        assert kept and changed, (kept, changed)
        for trips, messages in kept:
            assert trips <= CREATE_STATUS_KEPT[dialect], messages
        for trips, messages in changed:
            assert trips <= CREATE_STATUS_CHANGED[dialect], messages

        path = f"/fhir/Observation/{observation.json()['id']}"
        for _ in range(2):
            async with counter.window():
                assert (await client.get(path)).status_code == 200
            assert counter.round_trips <= READ_BY_ID, counter.messages


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_pooled_connection_the_server_closed_is_replaced_before_use(settings):
    """Without a ping, a connection the server closed (a restart, pg_terminate_backend) is
    known closed to asyncpg already: it is replaced at checkout and the request succeeds,
    where it would otherwise be answered 503."""
    async with running_app(settings) as application, client_for(application) as client:
        patient_id = (await create(client, builders.patient("S01-001"))).json()["id"]
        # Several pooled connections, all idle in the pool afterwards.
        await asyncio.gather(*(client.get(f"/fhir/Patient/{patient_id}") for _ in range(4)))
        url = make_url(settings.database_url)
        admin = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        try:
            terminated = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert terminated >= 1
        await asyncio.sleep(0.2)  # the event loop reads each socket's end
        for _ in range(4):
            assert (await client.get(f"/fhir/Patient/{patient_id}")).status_code == 200
        await create(client, builders.platelet_count(patient_id, "2025-03-01T09:00:00Z", 10))
