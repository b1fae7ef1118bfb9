"""The SQLite file under the SQLite stores: connections, schema check, writes.

A :class:`SqliteDatabase` is one file opened the way both SQLite stores use
it: a writer connection (WAL, the store's ``PRAGMA synchronous``) on which
every write runs, serialized, and a second, read-only connection for reads
(WAL lets them proceed during a write). Each store keeps its own tables and
SQL; the database creates them and a ``<meta_table>(key, value)`` table whose
``schema_version`` row a newer threadline may have raised (then the file is
refused). Stores with distinct tables may share a file.

SQLite failures become the store's errors: a damaged file ("database disk
image is malformed", "file is not a database") is the store's corruption
error, which retrying cannot cure; anything else is ``StoreUnavailableError``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from threadline.actors import PersistenceError, SnapshotFormatError, StoreUnavailableError

__all__ = ["SqliteDatabase", "rollback", "transaction"]

_SYNCHRONOUS: Final[dict[str, str]] = {
    "OFF": "PRAGMA synchronous=OFF",
    "NORMAL": "PRAGMA synchronous=NORMAL",
    "FULL": "PRAGMA synchronous=FULL",
    "EXTRA": "PRAGMA synchronous=EXTRA",
}

_CLOSE_TIMEOUT: Final = 10.0

# SQLite's primary result codes for a damaged file.
_DAMAGED: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

R = TypeVar("R")


class SqliteDatabase:
    """One SQLite file: a writer and a read-only reader connection.

    ``store`` and ``memory_store`` name the owning store and its in-memory
    alternative in the errors about a bad ``path``. ``schema`` holds the
    store's ``CREATE ... IF NOT EXISTS`` statements; ``schema_name`` is how
    errors name its version (``"schema"``, ``"store schema"``). ``corrupt`` is
    the error a damaged file raises (``SnapshotCorruptError``, ``ItemCorruptError``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        store: str,
        memory_store: str,
        synchronous: str,
        busy_timeout: float,
        schema: Sequence[str],
        meta_table: str,
        schema_version: int,
        schema_name: str,
        corrupt: type[PersistenceError],
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise ValueError(
                f"{store} needs a file path (got {self.path!r}); "
                f"use {memory_store} for an in-memory store"
            )
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0, got {busy_timeout}")
        if not meta_table.isidentifier():  # it is spliced into SQL
            raise ValueError(f"meta_table must be an identifier, got {meta_table!r}")
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._schema = schema
        self._meta_table = meta_table
        self._schema_version = schema_version
        self._schema_name = schema_name
        self._corrupt = corrupt
        self.writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = anyio.Lock()

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create the file (mode 0600) and the schema, and open both connections.

        Raises ``StoreUnavailableError`` if the file cannot be opened, the
        store's corruption error if it is damaged (or no database at all) and
        ``SnapshotFormatError`` if a newer threadline wrote its schema; on any
        failure nothing stays open.
        """
        try:
            await anyio.to_thread.run_sync(_create_private_file, self.path)
            writer = await aiosqlite.connect(
                self.path, isolation_level=None, timeout=self._busy_timeout
            )
        except OSError as exc:
            raise StoreUnavailableError(f"cannot open {self.path!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise self.failure(f"cannot open {self.path!r}", exc) from exc
        self.writer = writer
        try:
            await self._setup_writer(writer)
            reader = await aiosqlite.connect(
                self.path, isolation_level=None, timeout=self._busy_timeout
            )
            self._reader = reader
            await reader.execute("PRAGMA query_only=ON")
        except (OSError, sqlite3.Error, ValueError) as exc:
            await self.close()
            raise self.failure(f"cannot open {self.path!r}", exc) from exc
        except BaseException:
            await self.close()
            raise

    async def _setup_writer(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(_SYNCHRONOUS[self._synchronous])
        meta = self._meta_table
        async with transaction(conn):
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {meta} ("
                " key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID"
            )
            for statement in self._schema:
                await conn.execute(statement)
            await conn.execute(
                f"INSERT OR IGNORE INTO {meta} (key, value)"  # noqa: S608 - an identifier
                " VALUES ('schema_version', ?)",
                (self._schema_version,),
            )
            rows = list(
                await conn.execute_fetchall(
                    f"SELECT value FROM {meta} WHERE key = 'schema_version'"  # noqa: S608
                )
            )
            found = int(rows[0][0])
            if found > self._schema_version:
                raise SnapshotFormatError(
                    f"{self.path!r} has {self._schema_name} version {found}; "
                    f"this threadline understands up to {self._schema_version}"
                )

    async def close(self) -> None:
        """Close both connections: shielded, bounded, never raising."""
        writer, self.writer = self.writer, None
        reader, self._reader = self._reader, None
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            for conn in (reader, writer):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        await conn.close()

    # -- reads and writes --------------------------------------------------

    def failure(self, what: str, exc: BaseException) -> PersistenceError:
        """The store's error for an operation (``what``) that failed with ``exc``.

        A damaged file is the store's corruption error: retrying cannot cure
        it. Anything else is ``StoreUnavailableError``.
        """
        if getattr(exc, "sqlite_errorcode", -1) & 0xFF in _DAMAGED:
            return self._corrupt(
                f"{what}: the file is damaged ({exc}); restore it from a backup"
                " (or salvage what is left with the sqlite3 shell's .recover)"
            )
        return StoreUnavailableError(f"{what}: {exc}")

    @contextlib.contextmanager
    def reading(self) -> Iterator[aiosqlite.Connection]:
        """The reader connection; a SQLite failure in the block is mapped by :meth:`failure`."""
        conn = self._reader
        if conn is None:
            raise StoreUnavailableError("store is closed")
        try:
            yield conn
        except (sqlite3.Error, ValueError) as exc:
            raise self.failure(f"read from {self.path!r} failed", exc) from exc

    async def read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        with self.reading() as conn:
            return list(await conn.execute_fetchall(sql, params))

    async def write(self, fn: Callable[[aiosqlite.Connection], Awaitable[R]]) -> R:
        """Run ``fn`` on the writer connection, serialized with every other write.

        Shielded: a transaction must never be abandoned halfway on the shared
        connection (it is bounded by ``busy_timeout`` plus the work itself).
        """
        conn = self.writer
        if conn is None:
            raise StoreUnavailableError("store is closed")
        async with self._write_lock:
            with anyio.CancelScope(shield=True):
                try:
                    result = await fn(conn)
                except PersistenceError:
                    raise
                except (sqlite3.Error, ValueError) as exc:
                    raise self.failure(f"write to {self.path!r} failed", exc) from exc
        return result


@contextlib.asynccontextmanager
async def transaction(conn: aiosqlite.Connection) -> AsyncIterator[None]:
    """A ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled
    back when it raises (or the commit fails)."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        await conn.execute("COMMIT")
    except BaseException:
        await rollback(conn)
        raise


async def rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open; never raises (the connection may be dead)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error, ValueError):
        await conn.execute("ROLLBACK")


def _create_private_file(path: str) -> None:
    """Create the database file readable and writable by its owner only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)
