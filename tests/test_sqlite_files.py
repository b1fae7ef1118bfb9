"""The SQLite file under both SQLite stores: its mode, and how a bad file is reported.

``SqliteSnapshotStore`` and ``SqliteStore`` open their file the same way, so
each test here runs against both. A file that cannot be opened is
``StoreUnavailableError`` (retrying may help); a damaged one is the store's
corruption error (retrying cannot).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from threadline.actors import (
    ItemCorruptError,
    PersistenceError,
    SnapshotCorruptError,
    StoreUnavailableError,
)
from threadline.persistence import CommitRequest, SqliteSnapshotStore, SqliteStore

pytestmark = pytest.mark.anyio


async def use_snapshots(store: Any) -> None:
    """Write and read back through every path of a snapshot store."""
    epoch = await store.acquire("t")
    version = (await store.load("t")).version
    await store.commit(
        CommitRequest(thread_id="t", expected_version=version, epoch=epoch, step=b"step" * 100)
    )
    assert len(await store.read_steps("t")) == version + 1


async def use_items(store: Any) -> None:
    """Write and read back through every path of an item store."""
    count = len(await store.search(("n",), limit=1000))
    await store.put(("n",), f"k{count}", {"v": "x" * 100})
    assert await store.get(("n",), f"k{count}") is not None
    assert len(await store.search(("n",), limit=1000)) == count + 1


class Kind:
    def __init__(
        self,
        make: Callable[[Path], Any],
        use: Callable[[Any], Awaitable[None]],
        corrupt: type[PersistenceError],
        table: str,
    ) -> None:
        self.make, self.use, self.corrupt, self.table = make, use, corrupt, table


KINDS = {
    "snapshots": Kind(SqliteSnapshotStore, use_snapshots, SnapshotCorruptError, "steps"),
    "items": Kind(SqliteStore, use_items, ItemCorruptError, "store_items"),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> Kind:
    return KINDS[str(request.param)]


async def test_the_file_is_private(kind: Kind, tmp_path: Path) -> None:
    path = tmp_path / "private.db"
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        async with kind.make(path) as store:
            await kind.use(store)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            for suffix in ("-wal", "-shm"):
                side = path.with_name(path.name + suffix)
                assert side.exists()
                assert stat.S_IMODE(side.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


async def test_an_unopenable_path_is_store_unavailable(kind: Kind, tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError):
        async with kind.make(tmp_path / "missing-dir" / "x.db"):
            pass


async def test_a_file_that_is_not_a_database_is_corrupt(kind: Kind, tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 1000)
    with pytest.raises(kind.corrupt, match="not a database") as info:
        async with kind.make(path):
            pass
    assert not isinstance(info.value, StoreUnavailableError)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def damage_table(path: Path, table: str) -> None:
    """Overwrite the root page of ``table`` with garbage (the store is closed)."""
    with sqlite3.connect(path) as db:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
    db.close()
    assert not path.with_name(path.name + "-wal").exists()  # checkpointed on close
    assert root > 1  # the schema on page 1 stays readable
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes([0xDE, 0xAD, 0xBE, 0xEF]) * (page_size // 4))


async def test_a_damaged_page_is_corrupt_not_unavailable(kind: Kind, tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    async with kind.make(path) as store:
        for _ in range(3):
            await kind.use(store)
    damage_table(path, kind.table)
    async with kind.make(path) as store:
        for _ in range(2):  # the same every time: retrying does not help
            with pytest.raises(kind.corrupt, match="malformed") as info:
                await kind.use(store)
            assert not isinstance(info.value, StoreUnavailableError)
            assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


async def test_a_damaged_page_fails_a_commit_as_corrupt(tmp_path: Path) -> None:
    """The group commit hands the store's corruption error to every writer of the batch."""
    path = tmp_path / "damaged.db"
    async with SqliteSnapshotStore(path) as store:
        epoch = await store.acquire("t")
        await store.commit(CommitRequest(thread_id="t", expected_version=0, epoch=epoch, step=b"1"))
    damage_table(path, "steps")
    async with SqliteSnapshotStore(path) as store:
        with pytest.raises(SnapshotCorruptError, match="malformed"):
            await store.commit(
                CommitRequest(thread_id="t", expected_version=1, epoch=epoch, step=b"2")
            )
