"""``SqliteStore``: the cross-conversation store in one SQLite file (WAL).

Layout::

    store_meta(key, value)                         schema version
    store_items(ns, key, value, created_at, updated_at, expires_at)
        PRIMARY KEY (ns, key), WITHOUT ROWID; index on expires_at

``ns`` is the namespace in the encoded form of :mod:`._kv` (every segment
followed by U+0002; control characters never occur in a segment), so the
items under a prefix are one range of the primary key (``ns >= ? AND ns < ?``,
no LIKE patterns), and ``ORDER BY ns, key`` is the store's documented order
(namespace segment by segment, then key, by code point). ``value`` is the JSON
text. The tables do not collide with :class:`SqliteSnapshotStore`'s, so both
may share a file.

Writes run on one writer connection in ``BEGIN IMMEDIATE`` transactions, each
of which also deletes the expired rows (the lazy purge); reads use a second,
read-only connection and never see expired rows. Several processes may share
the file (``busy_timeout`` serializes their writes).
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
import msgspec

from threadline.actors import (
    PersistenceError,
    SnapshotCorruptError,
    SnapshotFormatError,
    StoreUnavailableError,
)

from ._kv import (
    Item,
    Namespace,
    check_count,
    check_filter,
    check_key,
    check_max_depth,
    check_namespace,
    check_ttl,
    decode_namespace,
    decode_value,
    encode_namespace,
    encode_value,
    matches,
    prefix_upper_bound,
    truncate_namespaces,
)

__all__ = ["SqliteStore"]

SCHEMA_VERSION: Final = 1

_SYNCHRONOUS: Final[dict[str, str]] = {
    "OFF": "PRAGMA synchronous=OFF",
    "NORMAL": "PRAGMA synchronous=NORMAL",
    "FULL": "PRAGMA synchronous=FULL",
    "EXTRA": "PRAGMA synchronous=EXTRA",
}

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS store_meta ("
    " key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS store_items ("
    " ns TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " value TEXT NOT NULL,"
    " created_at REAL NOT NULL,"
    " updated_at REAL NOT NULL,"
    " expires_at REAL,"
    " PRIMARY KEY (ns, key)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS store_items_expiry ON store_items (expires_at)"
    " WHERE expires_at IS NOT NULL",
)

_PURGE: Final = "DELETE FROM store_items WHERE expires_at IS NOT NULL AND expires_at <= ?"
# Expired rows are purged first in the same transaction, so a conflict is
# always with a live item, whose created_at is kept.
_UPSERT: Final = (
    "INSERT INTO store_items (ns, key, value, created_at, updated_at, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value,"
    " updated_at = excluded.updated_at, expires_at = excluded.expires_at"
)
_DELETE: Final = "DELETE FROM store_items WHERE ns = ? AND key = ?"
_GET: Final = (
    "SELECT value, created_at, updated_at, expires_at FROM store_items"
    " WHERE ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)"
)
# The live rows under a prefix: one range of the primary key (or everything).
_SEARCH_ALL: Final = (
    "SELECT ns, key, value, created_at, updated_at, expires_at FROM store_items"
    " WHERE (expires_at IS NULL OR expires_at > ?) ORDER BY ns, key"
)
_SEARCH_RANGE: Final = (
    "SELECT ns, key, value, created_at, updated_at, expires_at FROM store_items"
    " WHERE ns >= ? AND ns < ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY ns, key"
)
_NAMESPACES_ALL: Final = (
    "SELECT DISTINCT ns FROM store_items WHERE (expires_at IS NULL OR expires_at > ?) ORDER BY ns"
)
_NAMESPACES_RANGE: Final = (
    "SELECT DISTINCT ns FROM store_items"
    " WHERE ns >= ? AND ns < ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY ns"
)

_CLOSE_TIMEOUT: Final = 10.0

R = TypeVar("R")


class SqliteStore:
    """Cross-conversation items in a SQLite database file.

    ``synchronous`` is SQLite's ``PRAGMA synchronous`` (``FULL``: a ``put`` is
    on disk when it returns, even across power loss). ``busy_timeout`` is how
    long a write waits for another process holding the file's write lock.
    The file is created with mode 0600 (SQLite gives its ``-wal`` and ``-shm``
    files the same mode).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL",
        busy_timeout: float = 5.0,
    ) -> None:
        self._path = os.fspath(path)
        if self._path in ("", ":memory:") or self._path.startswith("file:"):
            raise ValueError(
                f"SqliteStore needs a file path (got {self._path!r}); "
                "use MemoryStore for an in-memory store"
            )
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0, got {busy_timeout}")
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._entered = 0
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({self._path!r})"

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            self._entered += 1
            return self
        await self._open()
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
        if self._entered == 0:
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
                "INSERT OR IGNORE INTO store_meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            rows = list(
                await conn.execute_fetchall(
                    "SELECT value FROM store_meta WHERE key = 'schema_version'"
                )
            )
            _check_schema_version(self._path, int(rows[0][0]))
            await conn.execute("COMMIT")
        except BaseException:
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

    # -- reads -------------------------------------------------------------

    def _open_reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreUnavailableError("store is closed")
        return self._reader

    async def get(self, namespace: Namespace, key: str) -> Item | None:
        ns = check_namespace(namespace)
        key = check_key(key)
        conn = self._open_reader()
        try:
            rows = list(await conn.execute_fetchall(_GET, (encode_namespace(ns), key, time.time())))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailableError(f"read from {self._path!r} failed: {exc}") from exc
        if not rows:
            return None
        value, created_at, updated_at, expires_at = rows[0]
        return Item(
            namespace=ns,
            key=key,
            value=self._decode(value, ns, key),
            created_at=float(created_at),
            updated_at=float(updated_at),
            expires_at=None if expires_at is None else float(expires_at),
        )

    def _decode(self, raw: Any, ns: Namespace, key: str) -> dict[str, Any]:
        try:
            return decode_value(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, TypeError) as exc:
            raise SnapshotCorruptError(
                f"{self._path!r}: undecodable value at {ns!r}/{key!r}: {exc}"
            ) from exc

    @staticmethod
    def _range(prefix: Namespace, sql_all: str, sql_range: str) -> tuple[str, tuple[Any, ...]]:
        """The query (and its parameters) over the live rows under ``prefix``."""
        upper = prefix_upper_bound(prefix)
        now = time.time()
        if upper is None:
            return sql_all, (now,)
        return sql_range, (encode_namespace(prefix), upper, now)

    async def search(
        self,
        namespace_prefix: Namespace,
        *,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[Item]:
        prefix = check_namespace(namespace_prefix, what="namespace_prefix", empty_ok=True)
        wanted = check_filter(filter)
        limit = check_count(limit, "limit")
        offset = check_count(offset, "offset")
        if limit == 0:
            return []
        sql, params = self._range(prefix, _SEARCH_ALL, _SEARCH_RANGE)
        if not wanted:
            # Without a filter the page can be cut in SQL.
            sql += " LIMIT ? OFFSET ?"
            params = (*params, limit, offset)
        conn = self._open_reader()
        out: list[Item] = []
        skipped = 0
        try:
            async with conn.execute(sql, params) as cursor:
                async for row in cursor:
                    ns = decode_namespace(str(row[0]))
                    key = str(row[1])
                    value = self._decode(row[2], ns, key)
                    if not matches(value, wanted):
                        continue
                    if wanted and skipped < offset:
                        skipped += 1
                        continue
                    out.append(
                        Item(
                            namespace=ns,
                            key=key,
                            value=value,
                            created_at=float(row[3]),
                            updated_at=float(row[4]),
                            expires_at=None if row[5] is None else float(row[5]),
                        )
                    )
                    if len(out) >= limit:
                        break
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailableError(f"read from {self._path!r} failed: {exc}") from exc
        return out

    async def list_namespaces(
        self,
        *,
        prefix: Namespace | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Namespace]:
        p = () if prefix is None else check_namespace(prefix, what="prefix", empty_ok=True)
        depth = check_max_depth(max_depth)
        limit = check_count(limit, "limit")
        offset = check_count(offset, "offset")
        sql, params = self._range(p, _NAMESPACES_ALL, _NAMESPACES_RANGE)
        conn = self._open_reader()
        try:
            rows = await conn.execute_fetchall(sql, params)
            namespaces = [decode_namespace(str(row[0])) for row in rows]
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailableError(f"read from {self._path!r} failed: {exc}") from exc
        return truncate_namespaces(namespaces, depth, limit, offset)

    # -- writes ------------------------------------------------------------

    async def put(
        self, namespace: Namespace, key: str, value: dict[str, Any], *, ttl: float | None = None
    ) -> None:
        ns = encode_namespace(check_namespace(namespace))
        key = check_key(key)
        text = encode_value(value).decode()
        seconds = check_ttl(ttl)

        async def run(conn: aiosqlite.Connection) -> None:
            now = time.time()
            expires_at = None if seconds is None else now + seconds
            await self._transaction(
                conn, [(_PURGE, (now,)), (_UPSERT, (ns, key, text, now, now, expires_at))]
            )

        await self._write(run)

    async def delete(self, namespace: Namespace, key: str) -> None:
        ns = encode_namespace(check_namespace(namespace))
        key = check_key(key)

        async def run(conn: aiosqlite.Connection) -> None:
            await self._transaction(conn, [(_PURGE, (time.time(),)), (_DELETE, (ns, key))])

        await self._write(run)

    @staticmethod
    async def _transaction(
        conn: aiosqlite.Connection, statements: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                await conn.execute(sql, params)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise

    async def _write(self, fn: Callable[[aiosqlite.Connection], Awaitable[R]]) -> R:
        """Run ``fn`` on the writer connection, serialized with every other write.

        Shielded: a transaction is never abandoned halfway on the shared connection.
        """
        conn = self._writer
        if conn is None:
            raise StoreUnavailableError("store is closed")
        async with self._write_lock:
            with anyio.CancelScope(shield=True):
                try:
                    result = await fn(conn)
                except PersistenceError:
                    raise
                except (sqlite3.Error, ValueError) as exc:
                    raise StoreUnavailableError(f"write to {self._path!r} failed: {exc}") from exc
        return result


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open; never raises (the connection may be dead)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error, ValueError):
        await conn.execute("ROLLBACK")


def _create_private_file(path: str) -> None:
    """Create the database file readable and writable by its owner only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)


def _check_schema_version(path: str, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SnapshotFormatError(
            f"{path!r} has store schema version {found}; "
            f"this threadline understands up to {SCHEMA_VERSION}"
        )
