"""``SqliteSnapshotStore``: threads in one SQLite file (WAL, group commit).

Layout::

    meta(key, value)                       schema version
    threads(thread_id, version, epoch, full_version, updated_at)
    steps(thread_id, version, record)      WITHOUT ROWID, one row per step
    fulls(thread_id, version, record)      WITHOUT ROWID, the latest full record

Every write runs on one writer connection in an explicit ``BEGIN IMMEDIATE``
transaction; reads use a second connection (WAL lets them proceed during a
write). Commits are grouped: a batch is one transaction with a handful of
statements, whatever its size. Every condition lives in the SQL, so several
processes can share a file (``BEGIN IMMEDIATE`` plus ``busy_timeout``
serialize them).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from threadline.actors import (
    FencedError,
    PersistenceError,
    SnapshotFormatError,
    StoreUnavailableError,
)

from ._batch import GroupCommitter
from ._store import CommitRequest, StoredThread, check_head

__all__ = ["SqliteSnapshotStore"]

SCHEMA_VERSION: Final = 1

_SYNCHRONOUS: Final[dict[str, str]] = {
    "OFF": "PRAGMA synchronous=OFF",
    "NORMAL": "PRAGMA synchronous=NORMAL",
    "FULL": "PRAGMA synchronous=FULL",
    "EXTRA": "PRAGMA synchronous=EXTRA",
}

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta ( key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS threads ("
    " thread_id TEXT PRIMARY KEY,"
    " version INTEGER NOT NULL,"
    " epoch INTEGER NOT NULL,"
    " full_version INTEGER NOT NULL DEFAULT 0,"
    " updated_at REAL"
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
)

# The conditional head update of a commit. SET expressions see the old row,
# so ``version + 1`` is the new version in both places.
_ADVANCE: Final = (
    "UPDATE threads SET version = version + 1,"
    " full_version = CASE WHEN ? THEN version + 1 ELSE full_version END,"
    " updated_at = ?"
    " WHERE thread_id = ? AND version = ? AND epoch = ?"
)
_INSERT_STEP: Final = "INSERT INTO steps (thread_id, version, record) VALUES (?, ?, ?)"
_INSERT_FULL: Final = "INSERT OR REPLACE INTO fulls (thread_id, version, record) VALUES (?, ?, ?)"
_DROP_OLD_FULLS: Final = "DELETE FROM fulls WHERE thread_id = ? AND version < ?"
_HEAD: Final = "SELECT version, epoch FROM threads WHERE thread_id = ?"

# One statement, hence one consistent snapshot: the head (kind 0), the latest
# full record (kind 1) and the steps after it (kind 2).
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
    " ORDER BY 1, 2"
)

_MAX_INT: Final = (1 << 63) - 1
_CLOSE_TIMEOUT: Final = 10.0

R = TypeVar("R")


class SqliteSnapshotStore:
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
        self._path = os.fspath(path)
        if self._path in ("", ":memory:") or self._path.startswith("file:"):
            raise ValueError(
                f"SqliteSnapshotStore needs a file path (got {self._path!r}); "
                "use MemorySnapshotStore for an in-memory store"
            )
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0, got {busy_timeout}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._max_batch = max_batch
        self._entered = 0
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._committer: GroupCommitter[CommitRequest] | None = None
        self._write_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"SqliteSnapshotStore({self._path!r})"

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            self._entered += 1
            return self
        await self._open()
        committer: GroupCommitter[CommitRequest] = GroupCommitter(
            self._flush, max_batch=self._max_batch, name="threadline-sqlite-commit"
        )
        try:
            await committer.__aenter__()
        except BaseException:
            await self._close_connections()
            raise
        self._committer = committer
        self._entered = 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entered == 0:
            return
        self._entered -= 1
        if self._entered:
            return
        committer, self._committer = self._committer, None
        try:
            if committer is not None:
                await committer.__aexit__(exc_type, exc, tb)
        finally:
            await self._close_connections()

    async def _open(self) -> None:
        try:
            await anyio.to_thread.run_sync(_create_private_file, self._path)
            writer = await aiosqlite.connect(
                self._path, isolation_level=None, timeout=self._busy_timeout
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailableError(f"cannot open {self._path!r}: {exc}") from exc
        self._writer = writer
        try:
            await self._setup_writer(writer)
            reader = await aiosqlite.connect(
                self._path, isolation_level=None, timeout=self._busy_timeout
            )
            self._reader = reader
            await reader.execute("PRAGMA query_only=ON")
        except (OSError, sqlite3.Error, ValueError) as exc:
            await self._close_connections()
            raise StoreUnavailableError(f"cannot open {self._path!r}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise

    async def _setup_writer(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(_SYNCHRONOUS[self._synchronous])
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                await conn.execute(statement)
            await conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            rows = list(
                await conn.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
            )
            _check_schema_version(self._path, int(rows[0][0]))
            await conn.execute("COMMIT")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _rollback(conn)
            raise

    async def _close_connections(self) -> None:
        writer, self._writer = self._writer, None
        reader, self._reader = self._reader, None
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            for conn in (reader, writer):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        await conn.close()

    def _open_writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreUnavailableError("store is closed")
        return self._writer

    def _open_reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreUnavailableError("store is closed")
        return self._reader

    # -- reads -------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        conn = self._open_reader()
        try:
            return list(await conn.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailableError(f"read from {self._path!r} failed: {exc}") from exc

    async def load(self, thread_id: str) -> StoredThread | None:
        rows = await self._read(_LOAD, (thread_id,))
        if not rows or rows[0][0] != 0:
            return None
        _, version, epoch, full_version, _ = rows[0]
        full: bytes | None = None
        steps: list[bytes] = []
        for kind, _v, _e, _f, record in rows[1:]:
            if kind == 1:
                full = bytes(record)
            else:
                steps.append(bytes(record))
        return StoredThread(
            version=int(version),
            epoch=int(epoch),
            full=full,
            full_version=int(full_version),
            steps=steps,
        )

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        rows = await self._read(
            "SELECT record FROM steps WHERE thread_id = ? AND version >= ? AND version <= ?"
            " ORDER BY version",
            (
                thread_id,
                min(max(start, 1), _MAX_INT),
                _MAX_INT if stop is None else max(min(stop, _MAX_INT), 0),
            ),
        )
        return [bytes(row[0]) for row in rows]

    async def threads(self) -> list[str]:
        rows = await self._read("SELECT thread_id FROM threads WHERE version > 0", ())
        return sorted(str(row[0]) for row in rows)

    # -- writes ------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> None:
        committer = self._committer
        if committer is None:
            raise StoreUnavailableError("store is closed")
        await committer.submit(request)

    async def acquire(self, thread_id: str) -> int:
        async def run(conn: aiosqlite.Connection) -> int:
            # One statement is one (atomic) transaction in autocommit mode.
            rows = list(
                await conn.execute_fetchall(
                    "INSERT INTO threads (thread_id, version, epoch, full_version, updated_at)"
                    " VALUES (?, 0, 1, 0, ?)"
                    " ON CONFLICT (thread_id) DO UPDATE SET epoch = epoch + 1,"
                    " updated_at = excluded.updated_at"
                    " RETURNING epoch",
                    (thread_id, time.time()),
                )
            )
            return int(rows[0][0])

        return await self._write(run)

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        async def run(conn: aiosqlite.Connection) -> bool:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                rows = list(await conn.execute_fetchall(_HEAD, (thread_id,)))
                if not rows:
                    await conn.execute("COMMIT")
                    return False
                stored_version, stored_epoch = int(rows[0][0]), int(rows[0][1])
                if epoch is not None:
                    _check_fence(thread_id, stored_epoch, epoch)
                await conn.execute("DELETE FROM steps WHERE thread_id = ?", (thread_id,))
                await conn.execute("DELETE FROM fulls WHERE thread_id = ?", (thread_id,))
                await conn.execute(
                    "UPDATE threads SET version = 0, full_version = 0, epoch = epoch + 1,"
                    " updated_at = ? WHERE thread_id = ?",
                    (time.time(), thread_id),
                )
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
            return stored_version > 0

        return await self._write(run)

    async def _write(self, fn: Callable[[aiosqlite.Connection], Awaitable[R]]) -> R:
        """Run ``fn`` on the writer connection, serialized with every other write.

        Shielded: a transaction must never be abandoned halfway on the shared
        connection (it is bounded by ``busy_timeout`` plus the work itself).
        """
        conn = self._open_writer()
        async with self._write_lock:
            with anyio.CancelScope(shield=True):
                try:
                    result = await fn(conn)
                except PersistenceError:
                    raise
                except (sqlite3.Error, ValueError) as exc:
                    raise StoreUnavailableError(f"write to {self._path!r} failed: {exc}") from exc
        return result

    async def _flush(self, batch: Sequence[CommitRequest]) -> list[BaseException | None]:
        return await self._write(lambda conn: self._commit_batch(conn, batch))

    async def _commit_batch(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest]
    ) -> list[BaseException | None]:
        now = time.time()
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Fast path: every request applies; a handful of statements in all.
            cursor = await conn.executemany(
                _ADVANCE,
                [
                    (r.full is not None, now, r.thread_id, r.expected_version, r.epoch)
                    for r in batch
                ],
            )
            if cursor.rowcount == len(batch):
                await self._insert_records(conn, batch)
                await conn.execute("COMMIT")
                return [None] * len(batch)
            # Some request conflicts or is fenced: start over, deciding request
            # by request against the heads (read under the write lock).
            await conn.execute("ROLLBACK")
            await conn.execute("BEGIN IMMEDIATE")
            results = await self._decide(conn, batch)
            good = [r for r, result in zip(batch, results, strict=True) if result is None]
            if good:
                cursor = await conn.executemany(
                    _ADVANCE,
                    [
                        (r.full is not None, now, r.thread_id, r.expected_version, r.epoch)
                        for r in good
                    ],
                )
                if cursor.rowcount != len(good):
                    raise StoreUnavailableError(  # noqa: TRY301 - rolled back below
                        f"{self._path!r}: heads changed inside a write transaction"
                    )
                await self._insert_records(conn, good)
            await conn.execute("COMMIT")
            return results
        except BaseException:
            await _rollback(conn)
            raise

    async def _decide(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest]
    ) -> list[BaseException | None]:
        heads: dict[str, tuple[int, int]] = {}
        for thread_id in dict.fromkeys(r.thread_id for r in batch):
            rows = list(await conn.execute_fetchall(_HEAD, (thread_id,)))
            if rows:
                heads[thread_id] = (int(rows[0][0]), int(rows[0][1]))
        results: list[BaseException | None] = []
        for r in batch:
            head = heads.get(r.thread_id)
            try:
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

    async def _insert_records(
        self, conn: aiosqlite.Connection, batch: Sequence[CommitRequest]
    ) -> None:
        await conn.executemany(
            _INSERT_STEP, [(r.thread_id, r.expected_version + 1, r.step) for r in batch]
        )
        fulls = [(r.thread_id, r.expected_version + 1, r.full) for r in batch if r.full is not None]
        if fulls:
            await conn.executemany(_INSERT_FULL, fulls)
            await conn.executemany(_DROP_OLD_FULLS, [(tid, v) for tid, v, _ in fulls])


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open; never raises (the connection may be dead)."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(sqlite3.Error, ValueError):
            await conn.execute("ROLLBACK")


def _create_private_file(path: str) -> None:
    """Create the database file readable and writable by its owner only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)


def _check_schema_version(path: str, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SnapshotFormatError(
            f"{path!r} has schema version {found}; "
            f"this threadline understands up to {SCHEMA_VERSION}"
        )


def _check_fence(thread_id: str, stored_epoch: int, epoch: int) -> None:
    if stored_epoch > epoch:
        raise FencedError(
            f"thread {thread_id!r} is owned by epoch {stored_epoch}; this writer holds {epoch}"
        )
