"""``SqliteSnapshotStore``: threads in one SQLite file (WAL, group commit).

Layout::

    meta(key, value)                       schema version
    threads(thread_id, version, epoch, full_version, updated_at, turn)
    steps(thread_id, version, record)      WITHOUT ROWID, one row per step
    fulls(thread_id, version, record)      WITHOUT ROWID, the latest full record
                                           and the older ones kept as checkpoints
    inbox(seq, thread_id, message_id, envelope, enqueued_at)
                                           told, not yet consumed; unique per
                                           (thread_id, message_id), ordered by seq
    dead_letters(thread_id, message_id, envelope, reason, ts)
                                           inbox entries moved aside

``threads.turn`` is the message id of the turn in flight (NULL: none); files
written before it existed gain the column when opened (older threadlines
ignore it). Enqueues ride the group commit with the commits (one transaction,
one fsync); the step that consumes an inbox entry deletes it in its commit.

Every write runs on one writer connection in an explicit ``BEGIN IMMEDIATE``
transaction; reads use a second connection (WAL lets them proceed during a
write). Commits are grouped: a batch is one transaction with a handful of
statements, whatever its size. Every condition lives in the SQL, so several
processes can share a file (``BEGIN IMMEDIATE`` plus ``busy_timeout``
serialize them).

One request never fails another: when a batch does not apply as a whole, the
requests are decided one by one against the heads and the step records, and
a request the heads did not predict to fail runs in a savepoint of its own.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Final, Literal

import aiosqlite

from threadline.actors import (
    ConflictError,
    PersistenceError,
    SnapshotCorruptError,
    StoreUnavailableError,
)

from ._batch import GroupCommitter
from ._lifecycle import ExcInfo, Reentrant
from ._snapshots import (
    AcquireRequest,
    CommitRequest,
    DeadLetter,
    EnqueueRequest,
    InboxEntry,
    RecoverableThread,
    StoredThread,
    StoredVersion,
    check_fence,
    check_head,
    check_records,
)
from ._sqlite_db import SqliteDatabase, rollback, transaction

__all__ = ["SqliteSnapshotStore"]

SCHEMA_VERSION: Final = 1

# The tables besides ``meta``, which SqliteDatabase creates.
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS threads ("
    " thread_id TEXT PRIMARY KEY,"
    " version INTEGER NOT NULL,"
    " epoch INTEGER NOT NULL,"
    " full_version INTEGER NOT NULL DEFAULT 0,"
    " updated_at REAL,"
    " turn TEXT"
    ")",
    "CREATE TABLE IF NOT EXISTS steps ("
    " thread_id TEXT NOT NULL,"
    " version INTEGER NOT NULL,"
    " record BLOB NOT NULL,"
    " PRIMARY KEY (thread_id, version)"
    ") WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS fulls ("
    " thread_id TEXT NOT NULL,"
    " version INTEGER NOT NULL,"
    " record BLOB NOT NULL,"
    " PRIMARY KEY (thread_id, version)"
    ") WITHOUT ROWID",
    # seq is the rowid: a new row gets max(seq) + 1, so it orders arrivals.
    "CREATE TABLE IF NOT EXISTS inbox ("
    " seq INTEGER PRIMARY KEY,"
    " thread_id TEXT NOT NULL,"
    " message_id TEXT NOT NULL,"
    " envelope BLOB NOT NULL,"
    " enqueued_at REAL NOT NULL,"
    " UNIQUE (thread_id, message_id)"
    ")",
    "CREATE TABLE IF NOT EXISTS dead_letters ("
    " thread_id TEXT NOT NULL,"
    " message_id TEXT NOT NULL,"
    " envelope BLOB NOT NULL,"
    " reason TEXT NOT NULL,"
    " ts REAL NOT NULL,"
    " PRIMARY KEY (thread_id, message_id)"
    ") WITHOUT ROWID",
)

# The conditional head update of a commit. SET expressions see the old row,
# so ``version + 1`` is the new version in both places.
_ADVANCE: Final = (
    "UPDATE threads SET version = version + 1,"
    " full_version = CASE WHEN ? THEN version + 1 ELSE full_version END,"
    " updated_at = ?, turn = ?"
    " WHERE thread_id = ? AND version = ? AND epoch = ?"
)
_INSERT_STEP: Final = "INSERT INTO steps (thread_id, version, record) VALUES (?, ?, ?)"
_INSERT_FULL: Final = "INSERT OR REPLACE INTO fulls (thread_id, version, record) VALUES (?, ?, ?)"
# The previous latest full record (the newest one below the new one); the
# older ones are checkpoints the journal asked to keep.
_DROP_PREVIOUS_FULL: Final = (
    "DELETE FROM fulls WHERE thread_id = ?1 AND version ="
    " (SELECT max(version) FROM fulls WHERE thread_id = ?1 AND version < ?2)"
)
_DEQUEUE: Final = "DELETE FROM inbox WHERE thread_id = ? AND message_id = ?"
_ENQUEUE: Final = (
    "INSERT OR IGNORE INTO inbox (thread_id, message_id, envelope, enqueued_at) VALUES (?, ?, ?, ?)"
)
# Threads with a turn in flight or inbox entries (a scan of the heads: it runs
# once, when a system starts, and a per-commit index would cost every step).
_RECOVERABLE: Final = (
    "SELECT thread_id, max(turn) FROM ("
    " SELECT thread_id, turn FROM threads WHERE turn IS NOT NULL"
    " UNION ALL SELECT DISTINCT thread_id, NULL FROM inbox"
    ") GROUP BY thread_id ORDER BY thread_id"
)
_HEAD: Final = "SELECT version, epoch FROM threads WHERE thread_id = ?"
# The head (NULLs if there is none) and the last step stored (NULL if none).
_HEAD_AND_LAST: Final = (
    "SELECT (SELECT version FROM threads WHERE thread_id = ?1),"
    " (SELECT epoch FROM threads WHERE thread_id = ?1),"
    " (SELECT max(version) FROM steps WHERE thread_id = ?1)"
)
_ACQUIRE: Final = (
    "INSERT INTO threads (thread_id, version, epoch, full_version, updated_at)"
    " VALUES (?, 0, 1, 0, ?)"
    " ON CONFLICT (thread_id) DO UPDATE SET epoch = epoch + 1, updated_at = excluded.updated_at"
)


# One statement, hence one consistent snapshot: the head (kind 0), the latest
# full record (kind 1), the steps after it (kind 2) and the last step stored,
# whatever the head says (kind 3, one row, NULL if there is none).
_LOAD: Final = (
    "SELECT 0, version, epoch, full_version, NULL FROM threads WHERE thread_id = ?1"
    " UNION ALL"
    " SELECT 1, f.version, NULL, NULL, f.record FROM fulls AS f JOIN threads AS t"
    "  ON t.thread_id = f.thread_id AND t.full_version = f.version"
    "  WHERE f.thread_id = ?1"
    " UNION ALL"
    " SELECT 2, s.version, NULL, NULL, s.record FROM steps AS s JOIN threads AS t"
    "  ON t.thread_id = s.thread_id AND s.version > t.full_version AND s.version <= t.version"
    "  WHERE s.thread_id = ?1"
    " UNION ALL"
    " SELECT 3, max(version), NULL, NULL, NULL FROM steps WHERE thread_id = ?1"
    " ORDER BY 1, 2"
)

# One statement for ``load_at``: the head's version (kind 0), the newest full
# record at or before ?2 (kind 1) and the steps from its version (or 1) to ?2
# (kind 2), none past the head.
_LOAD_AT: Final = (
    "SELECT 0, version, NULL FROM threads WHERE thread_id = ?1"
    " UNION ALL"
    " SELECT 1, version, record FROM (SELECT version, record FROM fulls"
    "  WHERE thread_id = ?1 AND version <= ?2 ORDER BY version DESC LIMIT 1)"
    " UNION ALL"
    " SELECT 2, s.version, s.record FROM steps AS s JOIN threads AS t"
    "  ON t.thread_id = s.thread_id AND s.version <= t.version"
    "  WHERE s.thread_id = ?1 AND s.version <= ?2 AND s.version >= max(1, coalesce("
    "   (SELECT max(version) FROM fulls WHERE thread_id = ?1 AND version <= ?2), 1))"
    " ORDER BY 1, 2"
)

_MAX_INT: Final = (1 << 63) - 1

# What one request's statements can raise without the database being at fault:
# a step that collides with a stored one (the head is behind its steps), a
# record or number SQLite cannot take. Only that request fails.
_REQUEST_ERRORS: Final = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError)

_Request = CommitRequest | AcquireRequest | EnqueueRequest


class SqliteSnapshotStore(Reentrant):
    """Durable threads in a SQLite database file.

    ``synchronous`` is SQLite's ``PRAGMA synchronous`` (``FULL``: a commit is
    on disk when ``commit`` returns, even across power loss; ``NORMAL`` in WAL
    mode may lose the last commits on power loss, never on a process crash).
    ``busy_timeout`` is how long a write waits for another process holding the
    file's write lock. ``max_batch`` caps the commits grouped in one
    transaction.

    The file is created with mode 0600 (SQLite gives its ``-wal`` and ``-shm``
    files the same mode).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL",
        busy_timeout: float = 5.0,
        max_batch: int = 512,
    ) -> None:
        self._db = SqliteDatabase(
            path,
            store="SqliteSnapshotStore",
            memory_store="MemorySnapshotStore",
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            schema=_SCHEMA,
            meta_table="meta",
            schema_version=SCHEMA_VERSION,
            schema_name="schema",
            corrupt=SnapshotCorruptError,
        )
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._max_batch = max_batch
        self._committer: GroupCommitter[_Request] | None = None

    def __repr__(self) -> str:
        return f"SqliteSnapshotStore({self._db.path!r})"

    @property
    def _writer(self) -> aiosqlite.Connection | None:
        """The writer connection while the store is open (tests check its pragmas)."""
        return self._db.writer

    # -- lifecycle ---------------------------------------------------------

    async def _open(self) -> None:
        await self._db.open()
        try:
            await self._db.write(_add_turn_column)
        except BaseException:
            await self._db.close()
            raise
        committer: GroupCommitter[_Request] = GroupCommitter(
            self._flush, max_batch=self._max_batch, name="threadline-sqlite-commit"
        )
        try:
            await committer.__aenter__()
        except BaseException:
            await self._db.close()
            raise
        self._committer = committer

    async def _close(self, exc_info: ExcInfo) -> None:
        committer, self._committer = self._committer, None
        try:
            if committer is not None:
                await committer.__aexit__(*exc_info)
        finally:
            await self._db.close()

    # -- reads -------------------------------------------------------------

    async def load(self, thread_id: str) -> StoredThread | None:
        rows = await self._db.read(_LOAD, (thread_id,))
        head: tuple[int, int, int] | None = None
        full: bytes | None = None
        steps: list[bytes] = []
        last_step = 0
        for kind, version, epoch, full_version, record in rows:
            if kind == 0:
                head = (int(version), int(epoch), int(full_version))
            elif kind == 1:
                full = bytes(record)
            elif kind == 2:
                steps.append(bytes(record))
            else:
                last_step = 0 if version is None else int(version)
        check_records(thread_id, None if head is None else head[0], last_step)
        if head is None:
            return None
        return StoredThread(
            version=head[0], epoch=head[1], full=full, full_version=head[2], steps=steps
        )

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        rows = await self._db.read(
            "SELECT record FROM steps WHERE thread_id = ? AND version >= ? AND version <= ?"
            " ORDER BY version",
            (
                thread_id,
                min(max(start, 1), _MAX_INT),
                _MAX_INT if stop is None else max(min(stop, _MAX_INT), 0),
            ),
        )
        return [bytes(row[0]) for row in rows]

    async def read_steps_before(
        self, thread_id: str, before: int | None, limit: int
    ) -> list[bytes]:
        rows = await self._db.read(
            "SELECT record FROM steps WHERE thread_id = ? AND version < ?"
            " ORDER BY version DESC LIMIT ?",
            (
                thread_id,
                _MAX_INT if before is None else max(min(before, _MAX_INT), 0),
                max(min(limit, _MAX_INT), 0),
            ),
        )
        return [bytes(row[0]) for row in reversed(rows)]

    async def load_at(self, thread_id: str, version: int) -> StoredVersion | None:
        if not 1 <= version <= _MAX_INT:
            rows = await self._db.read(_HEAD, (thread_id,))
            if not rows:
                return None
            return StoredVersion(head=int(rows[0][0]), full=None, full_version=0, steps=[])
        head: int | None = None
        full: bytes | None = None
        full_version = 0
        steps: list[bytes] = []
        for kind, row_version, record in await self._db.read(_LOAD_AT, (thread_id, version)):
            if kind == 0:
                head = int(row_version)
            elif kind == 1:
                full, full_version = bytes(record), int(row_version)
            else:
                steps.append(bytes(record))
        if head is None:
            return None
        if version > head:
            return StoredVersion(head=head, full=None, full_version=0, steps=[])
        return StoredVersion(head=head, full=full, full_version=full_version, steps=steps)

    async def threads(self) -> list[str]:
        rows = await self._db.read("SELECT thread_id FROM threads WHERE version > 0", ())
        return sorted(str(row[0]) for row in rows)

    async def pending(self, thread_id: str) -> list[InboxEntry]:
        rows = await self._db.read(
            "SELECT message_id, envelope FROM inbox WHERE thread_id = ? ORDER BY seq",
            (thread_id,),
        )
        return [InboxEntry(str(mid), bytes(envelope)) for mid, envelope in rows]

    async def dead_letters(self, thread_id: str) -> list[DeadLetter]:
        rows = await self._db.read(
            "SELECT message_id, envelope, reason, ts FROM dead_letters WHERE thread_id = ?"
            " ORDER BY ts, message_id",
            (thread_id,),
        )
        return [
            DeadLetter(message_id=str(mid), envelope=bytes(env), reason=str(why), ts=float(ts))
            for mid, env, why, ts in rows
        ]

    async def recoverable_threads(self) -> list[RecoverableThread]:
        rows = await self._db.read(_RECOVERABLE, ())
        return [
            RecoverableThread(thread_id=str(tid), turn=None if turn is None else str(turn))
            for tid, turn in rows
        ]

    # -- writes ------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> None:
        committer = self._committer
        if committer is None:
            raise StoreUnavailableError("store is closed")
        await committer.submit(request)

    async def acquire(self, thread_id: str) -> int:
        # Through the group committer: a burst of activations shares one
        # transaction (one fsync) with whatever commits are waiting.
        committer = self._committer
        if committer is None:
            raise StoreUnavailableError("store is closed")
        epoch = await committer.submit(AcquireRequest(thread_id))
        assert isinstance(epoch, int)
        return epoch

    async def enqueue(self, thread_id: str, message_id: str, envelope: bytes) -> None:
        # Through the group committer: many tells share one transaction (one
        # fsync), with whatever commits are waiting.
        committer = self._committer
        if committer is None:
            raise StoreUnavailableError("store is closed")
        await committer.submit(EnqueueRequest(thread_id, message_id, envelope))

    async def dequeue(self, thread_id: str, message_id: str) -> bool:
        async def run(conn: aiosqlite.Connection) -> bool:
            async with transaction(conn):
                cursor = await conn.execute(_DEQUEUE, (thread_id, message_id))
            return cursor.rowcount > 0

        return await self._db.write(run)

    async def dead_letter(self, thread_id: str, message_id: str, reason: str) -> bool:
        async def run(conn: aiosqlite.Connection) -> bool:
            async with transaction(conn):
                rows = list(
                    await conn.execute_fetchall(
                        "SELECT envelope FROM inbox WHERE thread_id = ? AND message_id = ?",
                        (thread_id, message_id),
                    )
                )
                if not rows:
                    return False
                await conn.execute(
                    "INSERT OR REPLACE INTO dead_letters"
                    " (thread_id, message_id, envelope, reason, ts) VALUES (?, ?, ?, ?, ?)",
                    (thread_id, message_id, rows[0][0], reason, time.time()),
                )
                await conn.execute(_DEQUEUE, (thread_id, message_id))
            return True

        return await self._db.write(run)

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        async def run(conn: aiosqlite.Connection) -> bool:
            async with transaction(conn):
                rows = list(await conn.execute_fetchall(_HEAD, (thread_id,)))
                if rows and epoch is not None:
                    check_fence(thread_id, int(rows[0][1]), epoch)
                dropped = await conn.execute("DELETE FROM steps WHERE thread_id = ?", (thread_id,))
                await conn.execute("DELETE FROM fulls WHERE thread_id = ?", (thread_id,))
                had_steps = dropped.rowcount > 0
                if not rows:  # steps without a head (corrupt) are gone; no tombstone
                    return had_steps
                await conn.execute(
                    "UPDATE threads SET version = 0, full_version = 0, epoch = epoch + 1,"
                    " turn = NULL, updated_at = ? WHERE thread_id = ?",
                    (time.time(), thread_id),
                )
            return had_steps or int(rows[0][0]) > 0

        return await self._db.write(run)

    async def _flush(self, batch: Sequence[_Request]) -> list[object]:
        return await self._db.write(lambda conn: self._write_batch(conn, batch))

    async def _write_batch(
        self, conn: aiosqlite.Connection, batch: Sequence[_Request]
    ) -> list[object]:
        """One transaction: the batch's commits, then its acquires, then its enqueues."""
        commits = [r for r in batch if isinstance(r, CommitRequest)]
        acquires = [r.thread_id for r in batch if isinstance(r, AcquireRequest)]
        enqueues = [r for r in batch if isinstance(r, EnqueueRequest)]
        now = time.time()
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Commits first: their slow path starts the transaction over.
            committed = await self._commit_batch(conn, commits, now)
            epochs = await self._acquire_batch(conn, acquires, now)
            enqueued = await self._enqueue_batch(conn, enqueues, now)
            await conn.execute("COMMIT")
        except BaseException:
            await rollback(conn)
            raise
        results: dict[type, Iterator[object]] = {
            CommitRequest: iter(committed),
            AcquireRequest: iter(epochs),
            EnqueueRequest: iter(enqueued),
        }
        return [next(results[type(r)]) for r in batch]

    async def _enqueue_batch(
        self, conn: aiosqlite.Connection, batch: Sequence[EnqueueRequest], now: float
    ) -> list[BaseException | None]:
        """Append to the inboxes inside the open transaction; one result each.

        One statement for the batch. If some envelope cannot be stored, the
        rows go again one by one: a failed statement undoes only itself, and
        the rows the first attempt stored are ignored the second time (same
        ids), so only that request fails.
        """
        if not batch:
            return []
        rows = [(r.thread_id, r.message_id, r.envelope, now) for r in batch]
        try:
            await conn.executemany(_ENQUEUE, rows)
        except _REQUEST_ERRORS:
            pass
        else:
            return [None] * len(batch)
        results: list[BaseException | None] = []
        for r, row in zip(batch, rows, strict=True):
            try:
                await conn.execute(_ENQUEUE, row)
            except _REQUEST_ERRORS as exc:
                error = StoreUnavailableError(
                    f"{self._db.path!r} cannot store message {r.message_id!r}"
                    f" for thread {r.thread_id!r}: {exc}"
                )
                error.__cause__ = exc
                results.append(error)
            else:
                results.append(None)
        return results

    async def _commit_batch(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest], now: float
    ) -> list[BaseException | None]:
        """Apply the commits inside the open transaction; one result each."""
        if not batch:
            return []
        # Fast path: every request applies; a handful of statements in all.
        try:
            if await self._apply(conn, batch, now):
                return [None] * len(batch)
        except _REQUEST_ERRORS:
            pass  # some request's records do not fit: found below
        # Some request conflicts, is fenced or cannot be stored: start over,
        # deciding request by request against the heads and the step records
        # (read under the write lock), so it fails alone.
        await conn.execute("ROLLBACK")
        await conn.execute("BEGIN IMMEDIATE")
        results = await self._decide(conn, batch)
        good = [r for r, result in zip(batch, results, strict=True) if result is None]
        if good and await self._in_savepoint(conn, good, now) is not None:
            # A failure the heads did not predict: one savepoint per request.
            for i, r in enumerate(batch):
                if results[i] is None:
                    failure = await self._in_savepoint(conn, [r], now)
                    if failure is not None:
                        results[i] = await self._explain(conn, r, failure)
        return results

    async def _apply(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest], now: float
    ) -> bool:
        """Advance the heads and store the records; False (with the heads
        advanced in part) if some head is not where its request expects it."""
        cursor = await conn.executemany(
            _ADVANCE,
            [
                (r.full is not None, now, r.turn, r.thread_id, r.expected_version, r.epoch)
                for r in batch
            ],
        )
        if cursor.rowcount != len(batch):
            return False
        await conn.executemany(
            _INSERT_STEP, [(r.thread_id, r.expected_version + 1, r.step) for r in batch]
        )
        fulls = [(r.thread_id, r.expected_version + 1, r.full) for r in batch if r.full is not None]
        if fulls:
            await conn.executemany(_INSERT_FULL, fulls)
            dropped = [
                (r.thread_id, r.expected_version + 1)
                for r in batch
                if r.full is not None and not r.keep_full
            ]
            if dropped:
                await conn.executemany(_DROP_PREVIOUS_FULL, dropped)
        consumed = [(r.thread_id, r.consumed) for r in batch if r.consumed is not None]
        if consumed:
            await conn.executemany(_DEQUEUE, consumed)
        return True

    async def _in_savepoint(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest], now: float
    ) -> BaseException | None:
        """:meth:`_apply`, all or nothing: None once applied, else why it was not."""
        await conn.execute("SAVEPOINT requests")
        failure: BaseException | None = None
        try:
            if not await self._apply(conn, batch, now):
                failure = ConflictError("a head moved")  # _explain says which and where
        except _REQUEST_ERRORS as exc:
            failure = exc
        if failure is not None:
            await conn.execute("ROLLBACK TO requests")
        await conn.execute("RELEASE requests")
        return failure

    async def _explain(
        self, conn: aiosqlite.Connection, r: CommitRequest, failure: BaseException
    ) -> PersistenceError:
        """The error of a request that failed in its own savepoint with ``failure``."""
        rows = list(await conn.execute_fetchall(_HEAD_AND_LAST, (r.thread_id,)))
        version, epoch, last = rows[0]
        try:
            check_records(r.thread_id, version, last or 0)
            check_head(r.thread_id, version, epoch or 0, r.expected_version, r.epoch)
        except PersistenceError as exc:
            return exc
        error: PersistenceError
        if isinstance(failure, sqlite3.IntegrityError):
            # The stored records refuse this step although the head admits it.
            error = SnapshotCorruptError(
                f"thread {r.thread_id!r}: step {r.expected_version + 1} violates"
                f" a constraint of {self._db.path!r}: {failure}"
            )
        else:
            error = StoreUnavailableError(
                f"{self._db.path!r} cannot store step {r.expected_version + 1}"
                f" of thread {r.thread_id!r}: {failure}"
            )
        error.__cause__ = failure
        return error

    async def _acquire_batch(
        self, conn: aiosqlite.Connection, thread_ids: Sequence[str], now: float
    ) -> list[int]:
        """Bump each thread's epoch (creating version-0 heads); the new epochs."""
        if not thread_ids:
            return []
        await conn.executemany(_ACQUIRE, [(tid, now) for tid in thread_ids])
        distinct = list(dict.fromkeys(thread_ids))
        final: dict[str, int] = {}
        for start in range(0, len(distinct), 500):  # stay under SQLite's variable limit
            chunk = distinct[start : start + 500]
            marks = ",".join("?" * len(chunk))  # placeholders only: still parameterized
            rows = await conn.execute_fetchall(
                f"SELECT thread_id, epoch FROM threads WHERE thread_id IN ({marks})",  # noqa: S608
                chunk,
            )
            final.update((str(tid), int(epoch)) for tid, epoch in rows)
        # A thread acquired k times in this batch went up by k: hand the
        # epochs out in order, the last acquirer holding the current one.
        remaining = Counter(thread_ids)
        epochs = []
        for tid in thread_ids:
            remaining[tid] -= 1
            epochs.append(final[tid] - remaining[tid])
        return epochs

    async def _decide(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest]
    ) -> list[BaseException | None]:
        """Each request's fate against the stored heads and records, in batch order."""
        last_steps: dict[str, tuple[int | None, int]] = {}
        heads: dict[str, tuple[int, int]] = {}
        for thread_id in dict.fromkeys(r.thread_id for r in batch):
            rows = list(await conn.execute_fetchall(_HEAD_AND_LAST, (thread_id,)))
            version, epoch, last = rows[0]
            last_steps[thread_id] = (version, last or 0)
            if version is not None:
                heads[thread_id] = (int(version), int(epoch))
        results: list[BaseException | None] = []
        for r in batch:
            head = heads.get(r.thread_id)
            try:
                check_records(r.thread_id, *last_steps[r.thread_id])
                check_head(
                    r.thread_id,
                    None if head is None else head[0],
                    0 if head is None else head[1],
                    r.expected_version,
                    r.epoch,
                )
            except PersistenceError as exc:
                results.append(exc)
                continue
            assert head is not None
            heads[r.thread_id] = (head[0] + 1, head[1])
            results.append(None)
        return results


async def _add_turn_column(conn: aiosqlite.Connection) -> None:
    """Give a file written before ``threads.turn`` existed the column (NULL: no turn known)."""

    async def has_it() -> bool:
        rows = await conn.execute_fetchall("PRAGMA table_info(threads)")
        return any(row[1] == "turn" for row in rows)

    if await has_it():
        return
    async with transaction(conn):
        if not await has_it():  # another process may have added it meanwhile
            await conn.execute("ALTER TABLE threads ADD COLUMN turn TEXT")
