"""No audit record lost to a database outage (both databases): the queue of reads, searches
and refusals keeps its records in order through transient errors, never stores one twice,
spills them to a file at shutdown and replays that file at the next start; when it is full,
a read is refused rather than served unaudited. And a refusal about another site's resource
is recorded at that site."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import exc as sa
from sqlalchemy import text

from app.audit import trail
from app.audit.chain import verify
from app.audit.trail import AuditQueue, AuditRecord, read_spill, spill
from app.kit.dates import format_instant, utc_now
from app.kit.failures import is_transient
from app.main import create_app
from tests import builders
from tests.conftest import KEY, bearer
from tests.test_crud import create


def starting_up() -> sa.DBAPIError:
    """What a connect to a PostgreSQL that is starting up raises (tests/test_live_outage.py
    sees the real one)."""
    return sa.DBAPIError(
        None, None, asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    )


def connection_lost() -> sa.DBAPIError:
    return sa.DBAPIError(
        "COMMIT",
        None,
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
        connection_invalidated=True,
    )


def sqlite_busy() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = sqlite3.SQLITE_BUSY  # as sqlite3 sets it
    return error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), True),
        (TimeoutError(), True),  # a connect, or the final flush at shutdown, that timed out
        (sa.TimeoutError("QueuePool limit of size 1 overflow 0 reached"), True),
        (starting_up(), True),
        (connection_lost(), True),
        (sa.DBAPIError(None, None, asyncpg.exceptions.TooManyConnectionsError("too many")), True),
        (sa.DBAPIError(None, None, asyncpg.exceptions.AdminShutdownError("terminating")), True),
        (sa.OperationalError("BEGIN", None, sqlite_busy()), True),
        (sa.DBAPIError(None, None, asyncpg.exceptions.InvalidCatalogNameError("no db")), False),
        (sa.IntegrityError("INSERT", None, asyncpg.exceptions.UniqueViolationError("dup")), False),
        (sa.OperationalError("SELECT", None, sqlite3.OperationalError("no such table: x")), False),
        (RuntimeError("a bug"), False),
        (ValueError("bad"), False),
    ],
)
def test_which_database_errors_are_transient(error, transient):
    assert is_transient(error) is transient


class Flaky:
    """The app's database, whose write transactions fail the way PostgreSQL's do in an
    outage: `refuse` more connects, or `lose_commit` (the commit happens, its answer is
    lost with the connection)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.refuse = 0
        self.lose_commit = False

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        if self.refuse:
            self.refuse -= 1
            raise starting_up()
        async with self.db.write() as conn:
            yield conn
        if self.lose_commit:
            self.lose_commit = False
            raise connection_lost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _records(first: int, last: int) -> list[AuditRecord]:
    return [
        AuditRecord("read", agent="queue-test", entity_type="Patient", entity_id=str(number))
        for number in range(first, last)
    ]


async def _trail(db) -> list[str]:
    async with db.read() as conn:
        rows = await conn.execute(
            text("SELECT entity_id FROM audit_event WHERE agent = 'queue-test' ORDER BY seq")
        )
        return list(rows.scalars())


async def test_a_transient_error_keeps_the_records_in_order_until_the_database_is_back(app):
    db = app.state.services.db
    flaky = Flaky(db)
    queue = AuditQueue(flaky, batch_size=4)  # type: ignore[arg-type]
    for record in _records(0, 10):
        queue.add(record)
    flaky.refuse = 3
    for _ in range(3):
        with pytest.raises(sa.DBAPIError):
            await queue.flush()
        assert len(queue) == 10
    for record in _records(10, 12):  # what arrives during the outage comes after
        queue.add(record)
    await queue.flush()
    assert await _trail(db) == [str(n) for n in range(12)]
    assert len(queue) == 0
    assert (await verify(db)).problem is None


async def test_a_batch_whose_commit_answer_was_lost_is_not_stored_twice(app, caplog):
    db = app.state.services.db
    flaky = Flaky(db)
    queue = AuditQueue(flaky, batch_size=4)  # type: ignore[arg-type]
    for record in _records(0, 6):
        queue.add(record)
    flaky.lose_commit = True  # the first batch (0-3) is committed, its answer lost
    with pytest.raises(sa.DBAPIError):
        await queue.flush()
    assert len(queue) == 6  # the queue cannot know: it keeps all six
    await queue.flush()
    assert await _trail(db) == [str(n) for n in range(6)]
    assert (await verify(db)).problem is None
    # Skipped, not refused by the database's unique id and logged instead.
    assert not [r for r in caplog.records if r.name == "app.audit" and r.levelno >= 40]


async def test_records_the_database_cannot_take_at_shutdown_are_replayed_at_the_next_start(
    app, settings
):
    spill_dir = settings.audit_spill_dir
    flaky = Flaky(app.state.services.db)
    queue = AuditQueue(flaky, spill_dir=spill_dir)  # type: ignore[arg-type]
    for record in _records(0, 5):
        queue.add(record)
    flaky.refuse = 10**6  # the database stays away for the rest of this run
    await queue.stop()
    [spilled] = spill_dir.glob("*.jsonl")
    assert [r.entity_id for r in read_spill(spilled)] == [str(n) for n in range(5)]
    assert len(queue) == 0

    # The next start writes them before it serves: the records are there when the app is up.
    restarted = create_app(settings, key_source=KEY)
    async with restarted.router.lifespan_context(restarted):
        assert await _trail(restarted.state.services.db) == [str(n) for n in range(5)]
        assert list(spill_dir.glob("*.jsonl")) == []
        assert (await verify(restarted.state.services.db)).problem is None


async def test_a_spill_replayed_twice_stores_each_record_once(app, settings, caplog):
    """A start that wrote a spill file but died before removing it: the next start finds
    the file again, and skips what is already in the trail."""
    from app.audit.trail import spill

    records = _records(0, 3)
    spill(settings.audit_spill_dir, records)
    queue = AuditQueue(app.state.services.db, spill_dir=settings.audit_spill_dir)
    assert await queue.replay() == 3
    spill(settings.audit_spill_dir, records)
    assert await queue.replay() == 3
    assert await _trail(app.state.services.db) == ["0", "1", "2"]
    assert not [r for r in caplog.records if r.name == "app.audit" and r.levelno >= 40]


async def test_a_full_queue_refuses_reads_rather_than_serve_them_unaudited(settings):
    application = create_app(settings.model_copy(update={"audit_queue_max": 2}), key_source=KEY)
    async with application.router.lifespan_context(application):
        import httpx

        services = application.state.services
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=bearer("admin")
        ) as client:
            patient = (await create(client, builders.patient("S01-777"))).json()
            flaky = Flaky(services.db)
            flaky.refuse = 10**6
            services.audit.db = flaky  # the trail's database is away; writes still work
            for _ in range(2):
                assert (await client.get(f"/fhir/Patient/{patient['id']}")).status_code == 200
            refused = await client.get(f"/fhir/Patient/{patient['id']}")
            assert refused.status_code == 503
            assert refused.headers["retry-after"].isdigit()
            assert refused.json()["issue"][0]["code"] == "transient"
            assert "S01-777" not in refused.text  # nothing of the patient was shown
            assert (await client.get("/fhir/Patient/nobody")).status_code == 404
            services.audit.db = services.db  # back
            await services.audit.flush()
        async with services.db.read() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT outcome, content FROM audit_event WHERE action <> 'C' ORDER BY seq"
                    )
                )
            ).all()
    events = [(outcome, orjson.loads(content)) for outcome, content in rows]
    assert [outcome for outcome, _ in events] == ["0", "0", "8"]
    summary = events[-1][1]["outcomeDesc"]
    assert summary.startswith("503: 2 requests refused between ")
    assert "audit queue was full" in summary


async def test_a_refused_read_of_another_sites_patient_is_recorded_at_its_site(
    app, client, anonymous
):
    patient_id = (await create(client, builders.patient("S02-001", site="S02"))).json()["id"]
    probe = await anonymous.get(
        f"/fhir/Patient/{patient_id}", headers=bearer("investigator", ("S01",), sub="prober")
    )
    missing = await anonymous.get(
        "/fhir/Patient/no-such-id", headers=bearer("investigator", ("S01",), sub="prober")
    )
    # The caller learns nothing: the same answer as for an id that does not exist.
    assert probe.status_code == missing.status_code == 404
    assert probe.json()["issue"][0]["code"] == missing.json()["issue"][0]["code"]
    assert "S02" not in probe.text
    await app.state.services.audit.flush()
    seen = await anonymous.get(
        "/fhir/AuditEvent", params={"agent": "prober"}, headers=bearer("monitor", ("S02",))
    )
    entries = [e["resource"] for e in seen.json().get("entry", [])]
    [event] = entries  # the S02 monitor sees the probe of its patient, not the other miss
    assert event["outcome"] == "4"
    assert event["entity"][0]["what"]["reference"] == f"Patient/{patient_id}"
    details = {d["type"]: d["valueString"] for d in event["entity"][0]["detail"]}
    assert details["site"] == "S02"


async def test_a_write_about_another_sites_patient_is_recorded_at_its_site(app, client, anonymous):
    patient_id = (await create(client, builders.patient("S02-002", site="S02"))).json()["id"]
    count = builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42)
    refused = await anonymous.post(
        "/fhir/Observation",
        json=count,
        headers=bearer("investigator", ("S01",), sub="writer-s01"),
    )
    assert refused.status_code == 422
    await app.state.services.audit.flush()
    seen = await anonymous.get(
        "/fhir/AuditEvent", params={"agent": "writer-s01"}, headers=bearer("monitor", ("S02",))
    )
    [event] = [e["resource"] for e in seen.json().get("entry", [])]
    assert {d["type"]: d["valueString"] for d in event["entity"][0]["detail"]}["site"] == "S02"


class _Failing(Flaky):
    """A database that takes `writes` write transactions, then raises `error` for the next
    `refuse` ones, then takes them again."""

    def __init__(self, db: Any, error: Exception, *, writes: int = 0) -> None:
        super().__init__(db)
        self.error = error
        self.writes = writes

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        if self.writes:
            self.writes -= 1
        elif self.refuse:
            self.refuse -= 1
            raise self.error
        async with self.db.write() as conn:
            yield conn


async def test_a_long_queue_is_written_in_batches_so_an_outage_keeps_only_the_rest(app):
    """One transaction per batch, not one for the whole queue: the batches written before
    the database went away leave the queue, the rest stays, in order."""
    db = app.state.services.db
    failing = _Failing(db, starting_up(), writes=1)
    failing.refuse = 10**6
    queue = AuditQueue(failing)  # type: ignore[arg-type]
    for record in _records(0, 1001):
        queue.add(record)
    with pytest.raises(sa.DBAPIError):
        await queue.flush()
    assert 0 < len(queue) < 1001
    assert await _trail(db) == [str(n) for n in range(1001 - len(queue))]


async def test_a_full_queue_stays_within_its_bound_through_an_outage(app):
    """The record summing up the refusals waits for room: a flush that fails while the queue
    is full does not add it beyond `max_records`."""
    db = app.state.services.db
    flaky = Flaky(db)
    queue = AuditQueue(flaky, max_records=2)  # type: ignore[arg-type]
    for record in _records(0, 2):
        queue.add(record)
    queue.add(AuditRecord("read", outcome="4", agent="queue-test", entity_id="refused"))
    flaky.refuse = 1
    with pytest.raises(sa.DBAPIError):
        await queue.flush()
    assert len(queue) == 2
    await queue.flush()
    assert await _trail(db) == ["0", "1"]
    assert len(queue) == 0


async def _summaries(db) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = await conn.execute(text("SELECT content FROM audit_event WHERE outcome = '8'"))
        return [orjson.loads(content) for content in rows.scalars()]


async def test_each_spell_of_a_full_queue_is_summed_up_on_its_own(app):
    """The summary of refusals is an operation record (the refused requests were of any
    kind), and counts only the refusals since the last summary."""
    db = app.state.services.db
    queue = AuditQueue(db, max_records=1)
    for spell in (2, 1):
        queue.add(AuditRecord("read", agent="queue-test"))
        for _ in range(spell):
            queue.add(AuditRecord("read", outcome="4", agent="queue-test"))
        await queue.flush()
    summaries = await _summaries(db)
    assert [s["outcomeDesc"].split(" between ")[0] for s in summaries] == [
        "503: 2 requests refused",
        "503: 1 requests refused",
    ]
    for summary in summaries:
        assert summary["subtype"][0]["code"] == "operation"
        assert summary["action"] == "E"


async def test_refusals_counted_while_the_queue_was_full_are_spilled_at_shutdown(
    app, tmp_path, caplog
):
    """The summary goes into the spill file even though the queue is full, and the log says
    how many records went where."""
    flaky = Flaky(app.state.services.db)
    queue = AuditQueue(flaky, max_records=1, spill_dir=tmp_path)  # type: ignore[arg-type]
    queue.add(AuditRecord("read", agent="queue-test", entity_type="Patient", entity_id="1"))
    queue.add(AuditRecord("read", outcome="4", agent="queue-test"))
    flaky.refuse = 10**6
    await queue.stop()
    [path] = tmp_path.glob("*.jsonl")
    spilled = read_spill(path)
    assert [(r.interaction, r.outcome) for r in spilled] == [("read", "0"), ("operation", "8")]
    assert spilled[1].description is not None
    assert spilled[1].description.startswith("503: 1 requests refused between ")
    [message] = [r.getMessage() for r in caplog.records if r.name == "app.audit"]
    assert message == (
        f"database unavailable at shutdown: 2 audit records spilled to {path}; the next start "
        "writes them before serving"
    )


async def test_only_an_outage_at_shutdown_is_spilled_and_only_where_it_can_be(
    app, tmp_path, caplog, monkeypatch
):
    """A final flush that fails for a bug raises it: the records are not spilled as if the
    database were away. Without a spill directory an outage raises too, its own error."""
    spill_dir = tmp_path / "spill"
    queue = AuditQueue(app.state.services.db, spill_dir=spill_dir)
    queue.add(AuditRecord("read", agent="queue-test", entity_id="1"))

    async def failing() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(queue, "flush", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        await queue.stop()
    assert not spill_dir.exists()
    assert len(queue) == 1
    assert _audit_log(caplog) == []

    flaky = Flaky(app.state.services.db)
    queue = AuditQueue(flaky)  # type: ignore[arg-type]
    queue.add(AuditRecord("read", agent="queue-test", entity_id="2"))
    flaky.refuse = 10**6
    with pytest.raises(sa.DBAPIError, match="starting up"):
        await queue.stop()
    assert len(queue) == 1
    assert _audit_log(caplog) == []


async def test_a_replay_writes_the_spilled_records_before_the_queued_ones(app, tmp_path, caplog):
    db = app.state.services.db
    spill(tmp_path, _records(0, 2))
    queue = AuditQueue(db, spill_dir=tmp_path)
    queue.add(_records(2, 3)[0])
    assert await queue.replay() == 2
    assert await _trail(db) == ["0", "1", "2"]
    messages = [r.getMessage() for r in caplog.records if r.name == "app.audit"]
    assert messages == ["2 audit records spilled by an earlier run written to the trail"]


async def test_a_start_without_spilled_records_replays_none(app, tmp_path):
    db = app.state.services.db
    for spill_dir in (None, tmp_path / "absent", tmp_path):
        assert await AuditQueue(db, spill_dir=spill_dir).replay() == 0, spill_dir


async def _until_written(queue: AuditQueue) -> None:
    """Run the flush loop until the queue is empty (or five seconds have passed)."""
    queue.start()
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if not len(queue):
                break
    finally:
        await queue.stop()
    assert len(queue) == 0


def _audit_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "app.audit"]


async def test_the_flush_loop_reports_each_outage_and_when_it_began(app, caplog):
    flaky = Flaky(app.state.services.db)
    queue = AuditQueue(flaky, interval_seconds=0.01)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="app.audit")
    began = []
    for outage in range(2):
        queue.add(AuditRecord("read", agent="queue-test", entity_id=str(outage)))
        flaky.refuse = 3
        began.append(utc_now())
        await _until_written(queue)
    messages = [record.getMessage() for record in _audit_log(caplog)]
    assert [message.split(" (")[0].split(";")[0] for message in messages] == [
        "audit trail unreachable",
        "audit trail reachable again",
    ] * 2, messages
    for began_at, back in zip(began, messages[1::2], strict=True):
        since = back.removeprefix("audit trail reachable again; the records queued since ")
        since = since.removesuffix(" are written")
        assert format_instant(began_at) <= since <= format_instant(utc_now()), back


async def test_an_outage_whose_error_has_no_text_is_reported_and_outlived(app, caplog):
    """A connect that timed out says nothing (`str(TimeoutError())` is empty): the report
    says so, and the loop goes on to write the records once the database is back."""
    raising = _Failing(app.state.services.db, TimeoutError())
    queue = AuditQueue(raising, interval_seconds=0.01)  # type: ignore[arg-type]
    queue.add(AuditRecord("read", agent="queue-test", entity_id="1"))
    raising.refuse = 3
    caplog.set_level(logging.WARNING, logger="app.audit")
    await _until_written(queue)
    assert _audit_log(caplog)[0].getMessage() == (
        "audit trail unreachable (TimeoutError: ); 1 records kept in order, retried every 0.01s"
    )
    assert await _trail(app.state.services.db) == ["1"]


async def test_an_unexpected_flush_error_is_logged_with_its_traceback_each_time(
    app, caplog, monkeypatch
):
    """A bug, not an outage: each failed flush is logged with its traceback (not once per
    outage), and the loop goes on."""
    queue = AuditQueue(app.state.services.db, interval_seconds=0.01)
    queue.add(AuditRecord("read", agent="queue-test", entity_id="1"))
    flush, failures = queue.flush, [RuntimeError("a bug"), RuntimeError("a bug again")]

    async def failing_twice() -> None:
        if failures:
            raise failures.pop(0)
        await flush()

    monkeypatch.setattr(queue, "flush", failing_twice)
    await _until_written(queue)
    logged = _audit_log(caplog)
    assert [record.getMessage() for record in logged] == [
        "audit flush failed; retrying in 0.01s"
    ] * 2
    assert [str(record.exc_info[1]) for record in logged if record.exc_info] == [
        "a bug",
        "a bug again",
    ]
    assert await _trail(app.state.services.db) == ["1"]


async def test_an_outage_while_writing_one_by_one_keeps_the_rest_queued(app, caplog, monkeypatch):
    """After a batch the database refused for good, the records go one at a time; when the
    database goes away meanwhile, the records not written yet stay queued, in order, and are
    not logged as refused: only the one the database refused is."""
    db = app.state.services.db
    original = trail.append
    outage = [starting_up()]

    async def refusing(conn, records):
        if any(record.agent == "refused" for record in records):
            raise sa.IntegrityError("INSERT", None, Exception("a lasting refusal"))
        if len(records) == 1 and records[0].entity_id == "2" and outage:
            raise outage.pop()
        await original(conn, records)

    monkeypatch.setattr(trail, "append", refusing)
    queue = AuditQueue(db)
    for record in (*_records(0, 1), AuditRecord("read", agent="refused"), *_records(2, 4)):
        queue.add(record)
    with pytest.raises(sa.DBAPIError):
        await queue.flush()
    assert len(queue) == 2
    await queue.flush()
    assert await _trail(db) == ["0", "2", "3"]
    refused = [r.getMessage() for r in _audit_log(caplog) if r.levelno >= logging.ERROR]
    assert len(refused) == 1
    assert refused[0].startswith("audit record refused by the database, logged instead: ")
