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

import os
import time
from collections.abc import Sequence
from typing import Any, Final, Literal

import aiosqlite
import msgspec

from threadline.actors import ItemCorruptError

from ._items import (
    Item,
    Namespace,
    SearchPage,
    check_key,
    check_listing,
    check_namespace,
    check_search,
    check_ttl,
    decode_namespace,
    decode_value,
    encode_namespace,
    encode_value,
    prefix_upper_bound,
    truncate_namespaces,
)
from ._lifecycle import ExcInfo, Reentrant
from ._sqlite_db import SqliteDatabase, transaction

__all__ = ["SqliteStore"]

SCHEMA_VERSION: Final = 1

# The tables besides ``store_meta``, which SqliteDatabase creates.
_SCHEMA: Final = (
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


class SqliteStore(Reentrant):
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
        self._db = SqliteDatabase(
            path,
            store="SqliteStore",
            memory_store="MemoryStore",
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            schema=_SCHEMA,
            meta_table="store_meta",
            schema_version=SCHEMA_VERSION,
            schema_name="store schema",
            corrupt=ItemCorruptError,
        )

    def __repr__(self) -> str:
        return f"SqliteStore({self._db.path!r})"

    # -- lifecycle ---------------------------------------------------------

    async def _open(self) -> None:
        await self._db.open()

    async def _close(self, exc_info: ExcInfo) -> None:
        await self._db.close()

    # -- reads -------------------------------------------------------------

    async def get(self, namespace: Namespace, key: str) -> Item | None:
        ns = check_namespace(namespace)
        key = check_key(key)
        rows = await self._db.read(_GET, (encode_namespace(ns), key, time.time()))
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
            raise ItemCorruptError(
                f"{self._db.path!r}: undecodable value at {ns!r}/{key!r}: {exc}"
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
        prefix, wanted, limit, offset = check_search(namespace_prefix, filter, limit, offset)
        if limit == 0:
            return []
        sql, params = self._range(prefix, _SEARCH_ALL, _SEARCH_RANGE)
        if not wanted:
            # Without a filter the page can be cut in SQL.
            sql += " LIMIT ? OFFSET ?"
            params = (*params, limit, offset)
        page = SearchPage(wanted, limit, offset if wanted else 0)
        with self._db.reading() as conn:
            async with conn.execute(sql, params) as cursor:
                async for row in cursor:
                    ns = decode_namespace(str(row[0]))
                    key = str(row[1])
                    item = Item(
                        namespace=ns,
                        key=key,
                        value=self._decode(row[2], ns, key),
                        created_at=float(row[3]),
                        updated_at=float(row[4]),
                        expires_at=None if row[5] is None else float(row[5]),
                    )
                    if page.offer(item):
                        break
        return page.items

    async def list_namespaces(
        self,
        *,
        prefix: Namespace | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Namespace]:
        p, depth, limit, offset = check_listing(prefix, max_depth, limit, offset)
        sql, params = self._range(p, _NAMESPACES_ALL, _NAMESPACES_RANGE)
        with self._db.reading() as conn:
            rows = await conn.execute_fetchall(sql, params)
            namespaces = [decode_namespace(str(row[0])) for row in rows]
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

        await self._db.write(run)

    async def delete(self, namespace: Namespace, key: str) -> None:
        ns = encode_namespace(check_namespace(namespace))
        key = check_key(key)

        async def run(conn: aiosqlite.Connection) -> None:
            await self._transaction(conn, [(_PURGE, (time.time(),)), (_DELETE, (ns, key))])

        await self._db.write(run)

    @staticmethod
    async def _transaction(
        conn: aiosqlite.Connection, statements: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> None:
        async with transaction(conn):
            for sql, params in statements:
                await conn.execute(sql, params)
