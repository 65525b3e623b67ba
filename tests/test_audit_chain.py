"""The audit chain built after commit (issue 20, part 1; both databases).

A write inserts its record unchained, with a digest; the sequencer links committed records
into the hash chain. These tests hold the sequencer still where they need records unchained
(a chain delay of an hour: its passes run every quarter of the delay) and run passes
themselves (`ChainSequencer.chain_all`)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.audit import trail
from app.audit.chain import (
    CHAIN_LOCK,
    GENESIS,
    Broken,
    ChainSequencer,
    VerifyResult,
    chain_hash,
    verify,
)
from app.audit.trail import AuditRecord
from app.settings import Settings
from app.store import repository as repo
from app.store.db import Database, async_url
from tests import builders
from tests.conftest import PROJECT_ROOT, client_for, running_app
from tests.test_audit import _as_owner
from tests.test_audit_outage import starting_up
from tests.test_crud import create
from tests.test_search_migration import _alembic, empty_database  # noqa: F401 (a fixture)

AN_HOUR_MS = 3_600_000


def _held(settings: Settings) -> Settings:
    """The server's sequencer makes no pass while the test runs (it chains at shutdown)."""
    return settings.model_copy(update={"audit_chain_delay_ms": AN_HOUR_MS})


async def _rows(db) -> list:
    async with db.read() as conn:
        return (
            await conn.execute(
                text(
                    "SELECT seq, id, content, chain_seq, prev_hash, hash, digest, appended "
                    "FROM audit_event ORDER BY seq"
                )
            )
        ).all()


async def _remove(db, seq: int) -> dict:
    """Record `seq` deleted as the table's owner could; returns the row, to put back."""
    async with db.write() as conn:
        query = text("SELECT * FROM audit_event WHERE seq = :s")
        removed = dict((await conn.execute(query, {"s": seq})).mappings().one())
        await _as_owner(conn, "DELETE FROM audit_event WHERE seq = :s", {"s": seq})
    return removed


async def _put_back(db, row: dict) -> None:
    columns, values = ", ".join(row), ", ".join(f":{name}" for name in row)
    async with db.write() as conn:
        await conn.execute(text(f"INSERT INTO audit_event ({columns}) VALUES ({values})"), row)


async def test_a_write_stores_its_record_unchained_and_the_sequencer_chains_it(settings):
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        for number in range(3):
            await create(client, builders.patient(f"S01-00{number}"))
        rows = await _rows(db)
        assert len(rows) == 3
        assert all(row.chain_seq is None and row.hash is None for row in rows)
        assert all(row.digest and row.appended for row in rows)
        # Unchained but within the delay: nothing is wrong yet, and verify says how many.
        result = await verify(db, chain_delay_ms=AN_HOUR_MS)
        assert (result.problem, result.checked, result.unchained) == (None, 0, 3)

        assert await ChainSequencer(db).chain_all() == 3
        rows = await _rows(db)
        assert [row.chain_seq for row in rows] == [1, 2, 3]
        assert rows[0].prev_hash == "0" * 64
        assert [row.prev_hash for row in rows[1:]] == [row.hash for row in rows[:-1]]
        result = await verify(db, chain_delay_ms=AN_HOUR_MS)
        assert (result.problem, result.checked, result.unchained) == (None, 3, 0)
        assert result.head == (3, rows[-1].hash)
        assert await ChainSequencer(db).chain_all() == 0  # each record is chained once


async def test_a_record_changed_before_it_is_chained_is_detected(settings, caplog):
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        for number in range(3):
            await create(client, builders.patient(f"S01-00{number}"))
        target = (await _rows(db))[1]
        changed = "UPDATE audit_event SET content = :content WHERE seq = :seq"
        async with db.write() as conn:
            await _as_owner(conn, changed, {"content": target.content + " ", "seq": target.seq})

        result = await verify(db, chain_delay_ms=AN_HOUR_MS)
        assert result.broken is not None
        assert (result.broken.seq, result.broken.audit_id) == (target.seq, target.id)
        assert "does not match its digest" in result.broken.problem
        # The sequencer chains what comes before it and stops there, saying why.
        assert await ChainSequencer(db).chain_all() == 1
        assert f"seq={target.seq}" in caplog.text and "digest" in caplog.text
        assert [row.chain_seq for row in await _rows(db)] == [1, None, None]

        async with db.write() as conn:  # back as it was: the chain goes on
            await _as_owner(conn, changed, {"content": target.content, "seq": target.seq})
        assert await ChainSequencer(db).chain_all() == 2
        assert (await verify(db)).problem is None


async def test_a_write_record_removed_before_it_is_chained_is_detected(settings):
    """A record removed before it was chained leaves no gap in the chain; the version it
    recorded is left without a write record, and verify names that version."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        patient = (await create(client, builders.patient("S01-001"))).json()
        await create(client, builders.patient("S01-002"))
        (row,) = [r for r in await _rows(db) if f"Patient/{patient['id']}/" in r.content]
        removed = await _remove(db, row.seq)
        await ChainSequencer(db).chain_all()
        result = await verify(db)
        assert result.problem == (
            f"Patient/{patient['id']}/_history/1 has no write record: it was written without "
            "one, or its record was removed"
        )
        await _put_back(db, removed)  # unchained, as it was, for the teardown's check
        await ChainSequencer(db).chain_all()
        assert (await verify(db)).problem is None


async def test_verify_reports_a_record_left_unchained_beyond_the_delay(settings, database_url):
    async with running_app(_held(settings)) as app, client_for(app) as client:
        await create(client, builders.patient("S01-001"))
        await asyncio.sleep(0.01)
        result = await verify(app.state.services.db, chain_delay_ms=1)
        assert "still not chained 1 ms after it was stored" in (result.problem or "")
        cli = subprocess.run(
            [sys.executable, "-m", "app", "audit", "verify"],
            cwd=PROJECT_ROOT,
            env={**os.environ, "DATABASE_URL": database_url, "APP_AUDIT_CHAIN_DELAY_MS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 1, cli.stdout
        assert "the audit sequencer is not running or is behind" in cli.stderr
    # The server's shutdown chained it.
    async with running_app(_held(settings)) as app:
        assert (await verify(app.state.services.db, chain_delay_ms=1)).problem is None


async def test_the_server_chains_records_while_it_runs(settings):
    """Liveness, not timing: with the default cadence every record written by concurrent
    requests ends up chained, once, in one unbroken chain."""
    fast = settings.model_copy(update={"audit_chain_delay_ms": 200})
    async with running_app(fast) as app, client_for(app) as client:
        db = app.state.services.db
        await asyncio.gather(*(create(client, builders.patient(f"S01-{n:03}")) for n in range(20)))
        for _ in range(300):
            if all(row.chain_seq is not None for row in await _rows(db)):
                break
            await asyncio.sleep(0.1)
        rows = await _rows(db)
        assert sorted(row.chain_seq for row in rows) == list(range(1, len(rows) + 1))
        assert (await verify(db, chain_delay_ms=200)).problem is None


async def test_sequencers_racing_chain_each_record_once(settings):
    """Every worker of every replica runs a sequencer: passes racing each other and the
    writes still give each record one place in one chain."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        sequencers = [ChainSequencer(db, batch_size=3) for _ in range(3)]

        async def keep_chaining() -> None:
            for _ in range(20):
                await asyncio.gather(*(s.chain_pending() for s in sequencers))

        await asyncio.gather(
            keep_chaining(),
            *(create(client, builders.patient(f"S01-{n:03}")) for n in range(12)),
        )
        await ChainSequencer(db).chain_all()
        rows = await _rows(db)
        assert sorted(row.chain_seq for row in rows) == list(range(1, len(rows) + 1))
        assert (await verify(db)).problem is None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_chaining_everything_waits_out_another_sequencers_pass(settings):
    """`chain_all` (a test's, the CLI's, the shutdown's) must leave nothing unchained that was
    committed before it: when another sequencer's pass holds the chain, possibly with a
    batch read before the last commit, it waits for that pass and chains the rest. It once
    returned at once, and a test's verify found records of its own writes unchained."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        await create(client, builders.patient("S01-001"))
        async with db.write() as holder:
            assert await repo.try_lock(holder, CHAIN_LOCK)  # another sequencer's pass
            chaining = asyncio.create_task(ChainSequencer(db).chain_all())
            await asyncio.sleep(0.3)
            assert not chaining.done()
        assert await asyncio.wait_for(chaining, 10) == 1
        assert [row.chain_seq for row in await _rows(db)] == [1]
        assert (await verify(db)).problem is None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_write_does_not_wait_for_another_writes_commit(settings):
    """Before the sequencer, every write took the chain's lock and held it to its commit: a
    write whose transaction stayed open stopped all others."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        async with db.write() as conn:
            await trail.append(conn, [AuditRecord("operation", description="held open")])
            await asyncio.wait_for(create(client, builders.patient("S01-001")), 30)
        await ChainSequencer(db).chain_all()
        assert (await verify(db)).problem is None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_trigger_lets_only_the_sequencers_update_through(settings):
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        await create(client, builders.patient("S01-001"))
        await create(client, builders.patient("S01-002"))
        first, second = await _rows(db)
        link = "chain_seq = 7, prev_hash = repeat('0', 64), hash = repeat('1', 64)"
        for statement in (
            # Chaining and changing the content at once.
            f"UPDATE audit_event SET {link}, content = content || ' ' WHERE seq = {first.seq}",
            f"UPDATE audit_event SET {link}, digest = NULL WHERE seq = {first.seq}",
            # A half link.
            f"UPDATE audit_event SET chain_seq = 7 WHERE seq = {first.seq}",
        ):
            with pytest.raises(Exception, match="append-only"):
                async with db.write() as conn:
                    await conn.execute(text(statement))
        await ChainSequencer(db).chain_all()
        # Once chained, a record's link is fixed too.
        for statement in (
            f"UPDATE audit_event SET chain_seq = 9 WHERE seq = {second.seq}",
            f"UPDATE audit_event SET hash = repeat('2', 64) WHERE seq = {second.seq}",
        ):
            with pytest.raises(Exception, match="append-only"):
                async with db.write() as conn:
                    await conn.execute(text(statement))
        assert (await verify(db)).problem is None


async def _store_chain_as_revision_0009_did(url: str) -> list[tuple[int, str]]:
    """Three records chained as the code before the sequencer chained them: in `seq` order,
    under the lock; returns each (seq, hash), an anchor an auditor may have kept."""
    engine = create_async_engine(async_url(url))
    previous, anchors = GENESIS, []
    try:
        async with engine.begin() as conn:
            for _ in range(3):
                record = AuditRecord("read", agent="before", entity_type="Patient", entity_id="p")
                content = orjson.dumps(trail.to_fhir(record, record.audit_id)).decode()
                digest = chain_hash(previous, record.audit_id, content)
                seq = (
                    await conn.execute(
                        text(
                            "INSERT INTO audit_event (id, recorded, action, outcome, agent, "
                            "content, prev_hash, hash) VALUES (:id, :recorded, 'R', '0', "
                            "'before', :content, :prev_hash, :hash) RETURNING seq"
                        ),
                        {
                            "id": record.audit_id,
                            "recorded": record.recorded,
                            "content": content,
                            "prev_hash": previous,
                            "hash": digest,
                        },
                    )
                ).scalar_one()
                previous = digest
                anchors.append((seq, digest))
    finally:
        await engine.dispose()
    return anchors


async def _verified(url: str, anchors: dict[int, str]) -> VerifyResult:
    db = Database.from_url(url)
    try:
        return await verify(db, anchors=anchors)
    finally:
        await db.dispose()


async def test_the_migration_keeps_the_chain_and_its_anchors(empty_database):  # noqa: F811
    """Records chained before the sequencer keep their place (`chain_seq = seq`) and hashes,
    so anchors printed before the upgrade still verify; downgrading is refused while a
    record is unchained."""
    url = empty_database
    _alembic(url, "upgrade", "0009")
    anchors = await _store_chain_as_revision_0009_did(url)
    _alembic(url, "upgrade", "head")
    result = await _verified(url, dict(anchors))
    assert (result.problem, result.checked, result.head) == (None, 3, anchors[-1])

    db = Database.from_url(url)
    try:
        async with db.write() as conn:
            await trail.append(conn, [AuditRecord("read", agent="after")])
        with pytest.raises(subprocess.CalledProcessError) as refused:
            _alembic(url, "downgrade", "0009")
        assert b"1 audit records are not chained yet" in refused.value.stderr
        assert await ChainSequencer(db).chain_all() == 1
    finally:
        await db.dispose()
    _alembic(url, "downgrade", "0009")
    _alembic(url, "upgrade", "head")
    result = await _verified(url, dict(anchors))
    assert (result.problem, result.checked) == (None, 4)


async def test_verify_matches_each_version_to_its_write_record(settings):
    """The check walks versions and write records side by side in (type, id) order: ids
    that sort differently by locale than by bytes, several versions, and a record missing
    for a version in the middle of a resource's history."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        for number, patient_id in enumerate(("a-b", "ab", "a.b", "A0", "b")):
            patient = {**builders.patient(f"S01-{number:03}"), "id": patient_id}
            answer = await client.put(f"/fhir/Patient/{patient_id}", json=patient)
            assert answer.status_code == 201, answer.text
        for birth_date in ("1960-01-01", "1961-01-01"):
            patient = {**builders.patient("S01-001"), "id": "ab", "birthDate": birth_date}
            assert (await client.put("/fhir/Patient/ab", json=patient)).status_code == 200
        await create(client, builders.platelet_count("ab", "2025-03-01T09:00:00Z", 10))
        # Unchained: the chain does not see a record go, only this check does.
        assert (await verify(db, chain_delay_ms=AN_HOUR_MS)).problem is None

        (row,) = [r for r in await _rows(db) if '"Patient/ab/_history/2"' in r.content]
        removed = await _remove(db, row.seq)
        problem = (await verify(db, chain_delay_ms=AN_HOUR_MS)).problem or ""
        assert problem.startswith("Patient/ab/_history/2 has no write record")
        await _put_back(db, removed)  # unchained, as it was, for the teardown's check
        await ChainSequencer(db).chain_all()
        assert (await verify(db)).problem is None


async def test_a_changed_record_is_reported_once_by_its_seq_and_id(settings, caplog):
    """The sequencer stops before a record that no longer matches its digest at every pass,
    but says so once: the error log names the record, it does not repeat every pass."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        await create(client, builders.patient("S01-001"))
        [target] = await _rows(db)
        changed = "UPDATE audit_event SET content = :content WHERE seq = :seq"
        async with db.write() as conn:
            await _as_owner(conn, changed, {"content": target.content + " ", "seq": target.seq})
        sequencer = ChainSequencer(db)
        for _ in range(3):
            assert await sequencer.chain_pending() == 0
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert logged == [
            f"audit record seq={target.seq} id={target.id} does not match the digest it was "
            "stored with (changed after its commit): the chain stops before it; `audit "
            "verify` names it"
        ]
        async with db.write() as conn:  # back as it was, for the teardown's check
            await _as_owner(conn, changed, {"content": target.content, "seq": target.seq})


async def test_verify_in_process_names_the_record_after_a_removed_one(settings):
    """A chained record removed from the middle: the next one's link no longer holds, and
    verify names that one (the `audit verify` tests see it through the command)."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        for number in range(3):
            await create(client, builders.patient(f"S01-00{number}"))
        await ChainSequencer(db).chain_all()
        first, middle, last = await _rows(db)
        removed = await _remove(db, middle.seq)
        assert await verify(db) == VerifyResult(
            1,
            Broken(
                "its prev_hash is not the previous record's hash (a record before it was "
                "removed or changed)",
                last.seq,
                last.id,
            ),
        )
        await _put_back(db, removed)
        assert (await verify(db)).problem is None


class _FailingReads:
    """A database whose one-statement reads raise `error`: a sequencer's pass fails."""

    def __init__(self, db: Database, error: Exception) -> None:
        self.db = db
        self.error = error
        self.passes = 0

    @asynccontextmanager
    async def read_statement(self) -> AsyncIterator[Any]:
        self.passes += 1
        raise self.error
        yield  # an async generator, as the context manager needs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize(
    ("error", "logged"),
    [(RuntimeError("a bug"), True), (starting_up(), False)],
)
async def test_the_sequencer_logs_a_failed_pass_but_not_an_outage(app, caplog, error, logged):
    """A pass that fails for a bug is logged, with its traceback, at each pass; an outage is
    not (the requests and the audit queue report it), and the loop goes on either way."""
    failing = _FailingReads(app.state.services.db, error)
    sequencer = ChainSequencer(failing, delay_ms=40)  # type: ignore[arg-type]
    sequencer.start()
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if failing.passes >= 2:
                break
    finally:
        await sequencer.stop()  # its last pass fails too, and says so as the shutdown's
    errors = [r for r in caplog.records if r.name == "app.audit" and r.levelno >= logging.ERROR]
    if not logged:
        assert failing.passes >= 3
        assert errors == []
        warnings = [r.getMessage() for r in caplog.records if r.name == "app.audit"]
        assert warnings == ["database unavailable at shutdown: the next start chains the rest"]
        return
    *passes, shutdown = errors
    assert len(passes) >= 2
    assert {r.getMessage() for r in passes} == {"audit chain pass failed; the next pass retries"}
    assert all(r.exc_info and r.exc_info[1] is error for r in passes)
    assert shutdown.getMessage() == "audit chain pass at shutdown failed; the next start chains"


async def test_a_pass_chains_one_batch_and_chaining_everything_counts_every_pass(settings):
    """A pass is one short transaction of at most `batch_size` records; `chain_all` makes
    passes until nothing is left and counts what each chained."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        for number in range(6):
            await create(client, builders.patient(f"S01-00{number}"))
        sequencer = ChainSequencer(db, batch_size=2)
        assert await sequencer.chain_pending() == 2
        assert await sequencer.chain_all() == 4
        assert [row.chain_seq for row in await _rows(db)] == [1, 2, 3, 4, 5, 6]


async def test_a_trail_with_nothing_chained_has_no_head_to_anchor(settings):
    async with running_app(_held(settings)) as app, client_for(app) as client:
        await create(client, builders.patient("S01-001"))
        result = await verify(app.state.services.db, chain_delay_ms=AN_HOUR_MS)
        assert result == VerifyResult(0, head=None, unchained=1)


async def test_verify_names_an_unchained_record_changed_after_it_was_stored(settings):
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        for number in range(2):
            await create(client, builders.patient(f"S01-00{number}"))
        _, target = await _rows(db)
        changed = "UPDATE audit_event SET content = :content WHERE seq = :seq"
        async with db.write() as conn:
            await _as_owner(conn, changed, {"content": target.content + " ", "seq": target.seq})
        assert await verify(db, chain_delay_ms=AN_HOUR_MS) == VerifyResult(
            0,
            Broken(
                "it is not chained yet and its content does not match its digest (changed "
                "after it was stored)",
                target.seq,
                target.id,
            ),
            unchained=1,
        )
        async with db.write() as conn:  # back as it was, for the teardown's check
            await _as_owner(conn, changed, {"content": target.content, "seq": target.seq})


async def test_verify_says_how_long_a_record_has_waited_unchained(settings):
    """The first record still unchained past the delay is named, with the delay in ms."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        await create(client, builders.patient("S01-001"))
        [row] = await _rows(db)
        await asyncio.sleep(0.65)
        assert await verify(db, chain_delay_ms=600) == VerifyResult(
            0,
            Broken(
                "it is still not chained 600 ms after it was stored: the audit sequencer is "
                "not running or is behind (a server chains records while it runs and at "
                "shutdown)",
                row.seq,
                row.id,
            ),
        )


async def test_a_refused_write_is_no_write_record_for_the_check(settings):
    """Only a write that succeeded vouches for a version: the records of a refused create
    and a refused update name no version, and the check passes them by rather than count
    them (or read a version out of them)."""
    async with running_app(_held(settings)) as app, client_for(app) as client:
        db = app.state.services.db
        answer = await client.put("/fhir/Patient/ab", json={**builders.patient(), "id": "ab"})
        assert answer.status_code == 201, answer.text
        refused_update = {**builders.patient(), "id": "ab", "birthDate": "not a date"}
        assert (await client.put("/fhir/Patient/ab", json=refused_update)).status_code == 422
        refused_create = {**builders.patient("S01-002"), "birthDate": "not a date"}
        assert (await client.post("/fhir/Patient", json=refused_create)).status_code == 422
        await app.state.services.audit.flush()  # refusals are queued, writes are not
        rows = await _rows(db)
        refused = [orjson.loads(row.content) for row in rows[1:]]
        assert [(e["action"], e["outcome"]) for e in refused] == [("U", "4"), ("C", "4")]
        assert (await verify(db, chain_delay_ms=AN_HOUR_MS)).problem is None
