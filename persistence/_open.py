"""``open_snapshot_store``: a snapshot store from a URL or a path."""

from __future__ import annotations

import os

from ._snapshots import MemorySnapshotStore, SnapshotStore
from ._snapshots_redis import RedisSnapshotStore
from ._snapshots_sqlite import SqliteSnapshotStore


def open_snapshot_store(spec: SnapshotStore | str | os.PathLike[str] | None) -> SnapshotStore:
    """A store from a URL or path: ``redis://``/``rediss://`` (``redis+cluster://``
    for a Redis Cluster), ``sqlite:///path``,
    ``memory://``, a plain file path (SQLite), or a store object."""
    if spec is None:
        return MemorySnapshotStore()
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    if text.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    ):
        return RedisSnapshotStore.from_url(text)
    if text == "memory://":
        return MemorySnapshotStore()
    return SqliteSnapshotStore(text.removeprefix("sqlite://"))
