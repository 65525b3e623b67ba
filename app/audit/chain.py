"""The audit trail's hash chain: built after commit by one sequencer, and verified.

A write inserts its AuditEvent in its own transaction, unchained: with `digest` =
sha256(id | content) but no place in the chain (`trail.append`). No write waits for another
write's commit. The sequencer links committed records afterwards: each pass takes the
records not chained yet, in `seq` order, and gives each the next `chain_seq`, `prev_hash`
(the previous record's `hash`, or 64 zeros for the first) and `hash` = sha256(prev_hash |
id | content).

The chain's order is therefore the order in which the sequencer found the records
committed, and within one pass their `seq` (insert) order: a total order, written into the
chain itself (`chain_seq`), which `audit verify` walks. Every worker of every replica runs a
sequencer loop; a pass runs under a PostgreSQL advisory lock it only tries to take, so one
pass at a time chains and the others skip (SQLite write transactions are serial anyway). A
pass is one short transaction, so this works through PgBouncer's transaction pooling.

What the chain proves, and what it cannot: a chained record changed or removed breaks the
chain at that record; one changed before it was chained no longer matches its digest (the
sequencer refuses to chain it, and verify names it); one removed before it was chained left
no trace in the chain, so verify also checks that every version a client wrote has its
write record. Anchors kept outside the database (`--anchor`) catch a cut-off tail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Select, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.kit.background import Periodic
from app.kit.codes import RESERVED_ID_PREFIX
from app.kit.dates import utc_now
from app.kit.failures import is_transient
from app.store import repository as repo
from app.store.db import Database
from app.store.tables import audit_table as AE
from app.store.tables import version_table

log = logging.getLogger("app.audit")

GENESIS = "0" * 64
DEFAULT_CHAIN_DELAY_MS = 1000
CHAIN_LOCK = "audit-chain"
# How long `chain_all` waits before trying again while another sequencer's pass (a short
# transaction) holds the chain.
_BUSY_RETRY_SECONDS = 0.01
_WRITE_ACTIONS = ("C", "U", "D")


def chain_hash(prev_hash: str, audit_id: str, content: str) -> str:
    return hashlib.sha256(f"{prev_hash}|{audit_id}|{content}".encode()).hexdigest()


def record_digest(audit_id: str, content: str) -> str:
    """Fixed when a record is inserted: what the sequencer checks before chaining it."""
    return hashlib.sha256(f"{audit_id}|{content}".encode()).hexdigest()


_HEAD = (
    select(AE.c.chain_seq, AE.c.hash)
    .where(AE.c.chain_seq.is_not(None))
    .order_by(AE.c.chain_seq.desc())
    .limit(1)
)
_ANY_UNCHAINED = select(AE.c.seq).where(AE.c.chain_seq.is_(None)).limit(1)
_LINK = (
    update(AE)
    .where(AE.c.seq == bindparam("row_seq"), AE.c.chain_seq.is_(None))
    .values(
        chain_seq=bindparam("new_chain_seq"),
        prev_hash=bindparam("new_prev_hash"),
        hash=bindparam("new_hash"),
    )
)


class ChainSequencer:
    """Links committed records into the chain, in the background and at shutdown.

    `delay_ms` is the promise (`APP_AUDIT_CHAIN_DELAY_MS`): a record is chained within it of
    its commit under load. A pass runs every quarter of it."""

    def __init__(
        self, db: Database, delay_ms: int = DEFAULT_CHAIN_DELAY_MS, batch_size: int = 5000
    ) -> None:
        self.db = db
        self.batch_size = batch_size
        self._loop = Periodic("audit-chain", delay_ms / 4000, self.chain_pending, _pass_failed)
        # Records refused for a wrong digest: reported once each, not once a pass.
        self._refused: set[int] = set()

    async def chain_pending(self) -> int | None:
        """One pass: chain what is committed and unchained (up to `batch_size` records);
        returns how many were chained, or None when another sequencer holds the chain."""
        async with self.db.read_statement() as conn:
            if (await conn.execute(_ANY_UNCHAINED)).first() is None:
                return 0
        async with self.db.write() as conn:
            if not await repo.try_lock(conn, CHAIN_LOCK):
                return None
            return await self._link(conn)

    async def chain_all(self) -> int:
        """Chain until nothing is left (or what is left is refused); returns how many.

        Another sequencer's pass (this worker's own loop, another worker's) may hold the
        chain, and it may have read its batch before the last records committed: wait for
        it to end and go on, so that nothing committed before this call is left unchained."""
        total = 0
        while (chained := await self.chain_pending()) != 0:
            if chained is None:
                await asyncio.sleep(_BUSY_RETRY_SECONDS)
            else:
                total += chained
        return total

    async def _link(self, conn: AsyncConnection) -> int:
        head = (await conn.execute(_HEAD)).first()
        position, previous = (head[0], head[1]) if head else (0, GENESIS)
        pending = (
            await conn.execute(
                select(AE.c.seq, AE.c.id, AE.c.content, AE.c.digest)
                .where(AE.c.chain_seq.is_(None))
                .order_by(AE.c.seq)
                .limit(self.batch_size)
            )
        ).all()
        links = []
        for seq, audit_id, content, digest in pending:
            if digest != record_digest(audit_id, content):
                self._refuse(seq, audit_id)
                break  # the chain must not pass a record that was changed: it stops here
            position += 1
            digest_of_link = chain_hash(previous, audit_id, content)
            links.append(
                {
                    "row_seq": seq,
                    "new_chain_seq": position,
                    "new_prev_hash": previous,
                    "new_hash": digest_of_link,
                }
            )
            previous = digest_of_link
        if links:
            await conn.execute(_LINK, links)
        return len(links)

    def _refuse(self, seq: int, audit_id: str) -> None:
        if seq in self._refused:
            return
        self._refused.add(seq)
        log.error(
            "audit record seq=%d id=%s does not match the digest it was stored with (changed "
            "after its commit): the chain stops before it; `audit verify` names it",
            seq,
            audit_id,
        )

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop, then chain what the last requests committed."""
        await self._loop.stop()
        # What is left unchained is chained by the next start (any worker's sequencer), so
        # nothing here may keep the shutdown from closing the pool.
        try:
            await self.chain_all()
        except Exception as error:
            if not is_transient(error):
                log.exception("audit chain pass at shutdown failed; the next start chains")
                return
            log.warning("database unavailable at shutdown: the next start chains the rest")


def _pass_failed(error: Exception) -> None:
    if not is_transient(error):  # an outage is reported by the requests and the audit queue
        log.exception("audit chain pass failed; the next pass retries")


@dataclass(frozen=True)
class Broken:
    """The first thing verify found wrong, and the record it is about (its `seq` and id in
    the table) when there is one: a missing anchored record or version has none."""

    problem: str
    seq: int | None = None
    audit_id: str | None = None


@dataclass
class VerifyResult:
    checked: int
    broken: Broken | None = None
    # The newest record verified, (chain position, hash): an anchor to keep outside the
    # database (see verify).
    head: tuple[int, str] | None = None
    # Records not chained yet but within the sequencer's delay: not a problem, said.
    unchained: int = 0

    @property
    def problem(self) -> str | None:
        return None if self.broken is None else self.broken.problem


def parse_anchor(text: str) -> tuple[int, str]:
    """`SEQ:HASH`, as `audit verify` prints the head, into (chain position, hash)."""
    seq, separator, digest = text.strip().partition(":")
    if not separator or not seq.isascii() or not seq.isdigit() or not digest:
        raise ValueError(f"an anchor is SEQ:HASH as `audit verify` prints it, not {text!r}")
    return int(seq), digest


async def verify(
    db: Database,
    batch: int = 1000,
    anchors: dict[int, str] | None = None,
    *,
    chain_delay_ms: int = DEFAULT_CHAIN_DELAY_MS,
) -> VerifyResult:
    """Check the trail; name the first record that does not hold.

    1. The chain, in `chain_seq` order: each record's link to the one before and its hash.
       The chain alone cannot show that its newest records were cut off: what remains is a
       valid chain. `anchors` closes that gap: heads printed by earlier runs (position ->
       hash) and kept outside the database; each must still be in the chain, unchanged.
    2. The records not chained yet: each must match its digest, and none may be older than
       `chain_delay_ms` (the sequencer would be stopped or behind).
    3. Every version a client wrote has its write record (the server's own response-status
       versions ride on the write that caused them): a write record removed before it was
       chained left no gap in the chain, but it leaves its version unaudited."""
    walk = _ChainWalk(dict(anchors or {}))
    async with db.read() as conn:
        result = await walk.chained(conn, batch)
        if result.problem is None:
            result = await walk.unchained(conn, result, timedelta(milliseconds=chain_delay_ms))
        if result.problem is None:
            result = await walk.unaudited_versions(conn, result)
    return result


class _Link(NamedTuple):
    """A chained record as `chained` reads it: its chain position, its seq and id, its
    content, the hash it links to and its own hash."""

    position: int
    seq: int
    audit_id: str
    content: str
    prev_hash: str
    digest: str


class _ChainWalk:
    def __init__(self, anchors: dict[int, str]) -> None:
        self.anchors = anchors

    async def chained(self, conn: AsyncConnection, batch: int) -> VerifyResult:
        previous, checked, after = GENESIS, 0, 0
        columns = (AE.c.chain_seq, AE.c.seq, AE.c.id, AE.c.content, AE.c.prev_hash, AE.c.hash)
        while True:
            rows = (
                await conn.execute(
                    select(*columns)
                    .where(AE.c.chain_seq > after)
                    .order_by(AE.c.chain_seq)
                    .limit(batch)
                )
            ).all()
            if not rows:
                return self._end(checked, after, previous)
            for row in rows:
                link = _Link(*row)
                problem = self._link_problem(link, previous)
                if problem:
                    return VerifyResult(checked, Broken(problem, link.seq, link.audit_id))
                previous, checked, after = link.digest, checked + 1, link.position

    def _link_problem(self, link: _Link, previous: str) -> str | None:
        """What is wrong with a chained record, whose predecessor's hash is `previous`."""
        if link.prev_hash != previous:
            return (
                "its prev_hash is not the previous record's hash "
                "(a record before it was removed or changed)"
            )
        if chain_hash(link.prev_hash, link.audit_id, link.content) != link.digest:
            return "its content does not match its hash (changed)"
        if self.anchors.pop(link.position, link.digest) != link.digest:
            return "its hash is not the anchored one (replaced)"
        return None

    def _end(self, checked: int, after: int, previous: str) -> VerifyResult:
        if self.anchors:
            position = min(self.anchors)
            problem = (
                f"the anchored record seq={position} is not in the chain, which ends at "
                f"seq={after} (records were cut off)"
            )
            return VerifyResult(checked, Broken(problem))
        return VerifyResult(checked, head=(after, previous) if after else None)

    async def unchained(
        self, conn: AsyncConnection, result: VerifyResult, delay: timedelta
    ) -> VerifyResult:
        overdue_before = utc_now() - delay
        rows = await conn.execute(
            select(AE.c.seq, AE.c.id, AE.c.content, AE.c.digest, AE.c.appended)
            .where(AE.c.chain_seq.is_(None))
            .order_by(AE.c.seq)
        )
        for seq, audit_id, content, digest, appended in rows:
            if digest != record_digest(audit_id, content):
                problem = (
                    "it is not chained yet and its content does not match its digest "
                    "(changed after it was stored)"
                )
                result.broken = Broken(problem, seq, audit_id)
                return result
            if appended is None or appended < overdue_before:
                problem = (
                    f"it is still not chained {delay.total_seconds() * 1000:.0f} ms after it "
                    "was stored: the audit sequencer is not running or is behind (a server "
                    "chains records while it runs and at shutdown)"
                )
                result.broken = Broken(problem, seq, audit_id)
                return result
            result.unchained += 1
        return result

    async def unaudited_versions(self, conn: AsyncConnection, result: VerifyResult) -> VerifyResult:
        """A merge of two streams in (type, id) order, each resource's versions against the
        versions its write records name: memory holds one resource's, not the trail's."""
        byte_order = _byte_order(conn)
        written = _by_resource(
            await conn.stream(_client_versions(byte_order)), lambda row: (row[0], row[1], row[2])
        )
        audited = _by_resource(await conn.stream(_write_records(byte_order)), _recorded_version)
        current = await anext(audited, None)
        async for resource, stored in written:
            while current is not None and current[0] < resource:
                current = await anext(audited, None)
            recorded: set[int] = set()
            if current is not None and current[0] == resource:
                recorded = current[1]
            missing = sorted(stored - recorded)
            if missing:
                reference = f"{resource[0]}/{resource[1]}/_history/{missing[0]}"
                result.broken = Broken(
                    f"{reference} has no write record: it was written without one, or its "
                    "record was removed"
                )
                return result
        return result


def _byte_order(conn: AsyncConnection) -> Callable[[Any], Any]:
    """Strings sorted by their bytes, the order Python compares the keys of the merge in (a
    locale's collation could put "a-b" and "ab" the other way round). SQLite's default
    collation is bytewise already."""
    if conn.dialect.name == "postgresql":
        return lambda column: column.collate("C")
    return lambda column: column


def _client_versions(byte_order: Callable[[Any], Any]) -> Select[Any]:
    versions = version_table.c
    return (
        select(versions.resource_type, versions.id, versions.version_id)
        .where(~versions.id.startswith(RESERVED_ID_PREFIX, autoescape=True))
        .order_by(byte_order(versions.resource_type), byte_order(versions.id))
    )


def _write_records(byte_order: Callable[[Any], Any]) -> Select[Any]:
    return (
        select(AE.c.entity_type, AE.c.entity_id, AE.c.content)
        .where(AE.c.action.in_(_WRITE_ACTIONS), AE.c.outcome == "0")
        .order_by(byte_order(AE.c.entity_type), byte_order(AE.c.entity_id))
    )


def _recorded_version(row: Any) -> tuple[str, str, int]:
    """(type, id, version) a successful write record names: `Type/id/_history/N`."""
    reference = orjson.loads(row[2])["entity"][0]["what"]["reference"]
    resource_type, resource_id, _, version = reference.split("/")
    return resource_type, resource_id, int(version)


async def _by_resource(
    rows: AsyncIterator[Any], version_of: Callable[[Any], tuple[str, str, int]]
) -> AsyncIterator[tuple[tuple[str, str], set[int]]]:
    """Consecutive rows of one resource, as ((type, id), {versions})."""
    key: tuple[str, str] | None = None
    versions: set[int] = set()
    async for row in rows:
        resource_type, resource_id, version = version_of(row)
        if (resource_type, resource_id) != key:
            if key is not None:
                yield key, versions
            key, versions = (resource_type, resource_id), set()
        versions.add(version)
    if key is not None:
        yield key, versions
