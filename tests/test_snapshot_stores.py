"""One conformance suite for every SnapshotStore (memory, sqlite, redis, and
redis on a 3-node Redis Cluster).

``MemorySnapshotStore`` is the reference; the durable stores must behave the
same, also when they group concurrent commits into one transaction/pipeline
(one per node on a cluster). Tests that need "a second process" open a second
store object on the same file / server / key prefix (the memory store can
only share its instance).
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from threadline.persistence import (
    CommitRequest,
    ConflictError,
    FencedError,
    InboxEntry,
    KeyLayout,
    PersistenceError,
    RecoverableThread,
    RedisSnapshotStore,
    SnapshotStore,
    SqliteSnapshotStore,
    StoredThread,
    StoreUnavailableError,
)
from threadline.persistence._batch import GroupCommitter
from threadline.persistence._partitions import partition_tag

from ._cluster import ClusterNode, RedisClusterProcesses
from .conftest import CLUSTER_KIND, STORE_KINDS, start_backend, store_kind_params

pytestmark = pytest.mark.anyio


@pytest.fixture(params=store_kind_params(*STORE_KINDS, CLUSTER_KIND))
def store_kind(request: pytest.FixtureRequest) -> str:
    """conftest's kinds, and a Redis store on the 3-node cluster."""
    return start_backend(request, str(request.param))


OpenStore = Callable[..., SnapshotStore]


def req(
    thread_id: str, expected: int, epoch: int, step: bytes | None = None, full: bytes | None = None
) -> CommitRequest:
    return CommitRequest(
        thread_id=thread_id,
        expected_version=expected,
        epoch=epoch,
        step=step if step is not None else f"{thread_id}/{expected + 1}".encode(),
        full=full,
    )


def step(thread_id: str, version: int) -> bytes:
    return f"{thread_id}/{version}".encode()


async def fill(store: SnapshotStore, thread_id: str, n: int, epoch: int, start: int = 0) -> None:
    for v in range(start, start + n):
        await store.commit(req(thread_id, v, epoch))


# -- the basics -------------------------------------------------------------------


async def test_unknown_thread(snapshot_store: SnapshotStore) -> None:
    assert await snapshot_store.load("nobody") is None
    assert await snapshot_store.read_steps("nobody") == []
    assert await snapshot_store.threads() == []
    assert await snapshot_store.delete("nobody") is False
    assert await snapshot_store.delete("nobody", epoch=3) is False
    assert await snapshot_store.load("nobody") is None  # no tombstone for nothing


async def test_acquire_increments_epochs(snapshot_store: SnapshotStore) -> None:
    assert await snapshot_store.acquire("t") == 1
    assert await snapshot_store.acquire("t") == 2
    assert await snapshot_store.acquire("other") == 1
    assert await snapshot_store.acquire("t") == 3
    assert await snapshot_store.load("t") == StoredThread(
        version=0, epoch=3, full=None, full_version=0, steps=[]
    )
    # A head without steps is not a thread yet.
    assert await snapshot_store.threads() == []


async def test_commits_append_versions(snapshot_store: SnapshotStore) -> None:
    epoch = await snapshot_store.acquire("t")
    await fill(snapshot_store, "t", 5, epoch)
    expected = [step("t", v) for v in range(1, 6)]
    assert await snapshot_store.load("t") == StoredThread(
        version=5, epoch=epoch, full=None, full_version=0, steps=expected
    )
    assert await snapshot_store.read_steps("t") == expected
    assert await snapshot_store.threads() == ["t"]
    # Acquiring again keeps the records and only bumps the epoch.
    again = await snapshot_store.acquire("t")
    assert again == epoch + 1
    loaded = await snapshot_store.load("t")
    assert loaded is not None
    assert (loaded.version, loaded.epoch, loaded.steps) == (5, again, expected)


async def test_full_records_replace_older_ones(
    snapshot_store: SnapshotStore, store_kind: str, tmp_path: Path
) -> None:
    epoch = await snapshot_store.acquire("t")
    await snapshot_store.commit(req("t", 0, epoch))
    await snapshot_store.commit(req("t", 1, epoch, full=b"full@2"))
    loaded = await snapshot_store.load("t")
    assert loaded == StoredThread(version=2, epoch=epoch, full=b"full@2", full_version=2, steps=[])

    await snapshot_store.commit(req("t", 2, epoch))
    await snapshot_store.commit(req("t", 3, epoch, full=b"full@4"))
    await snapshot_store.commit(req("t", 4, epoch))
    await snapshot_store.commit(req("t", 5, epoch))
    assert await snapshot_store.load("t") == StoredThread(
        version=6,
        epoch=epoch,
        full=b"full@4",
        full_version=4,
        steps=[step("t", 5), step("t", 6)],
    )
    # The steps before the full record are still there for history.
    assert await snapshot_store.read_steps("t") == [step("t", v) for v in range(1, 7)]

    if store_kind == "sqlite":
        # Older full records are dropped, not just shadowed.
        with sqlite3.connect(tmp_path / "threads.db") as db:
            rows = db.execute("SELECT version, record FROM fulls WHERE thread_id = 't'").fetchall()
        assert rows == [(4, b"full@4")]


async def test_conflict_on_wrong_expected_version(snapshot_store: SnapshotStore) -> None:
    epoch = await snapshot_store.acquire("t")
    await fill(snapshot_store, "t", 2, epoch)
    for expected in (0, 1, 3, 10):
        with pytest.raises(ConflictError):
            await snapshot_store.commit(req("t", expected, epoch, step=b"bad"))
    # A writer with a *newer* epoch than the stored one conflicts (it is not fenced).
    with pytest.raises(ConflictError):
        await snapshot_store.commit(req("t", 2, epoch + 1, step=b"bad"))
    # No head at all: a conflict as well.
    with pytest.raises(ConflictError):
        await snapshot_store.commit(req("never-acquired", 0, 1))
    with pytest.raises(ConflictError):
        await snapshot_store.commit(req("never-acquired", 0, 0))
    loaded = await snapshot_store.load("t")
    assert loaded is not None
    assert (loaded.version, loaded.steps) == (2, [step("t", 1), step("t", 2)])
    assert await snapshot_store.load("never-acquired") is None
    assert await snapshot_store.threads() == ["t"]
    # The thread goes on from where it was.
    await snapshot_store.commit(req("t", 2, epoch))
    assert await snapshot_store.read_steps("t", 3) == [step("t", 3)]


async def test_newer_owner_fences_the_old_one(
    snapshot_store: SnapshotStore, store_kind: str, open_store: OpenStore
) -> None:
    old = await snapshot_store.acquire("t")
    await fill(snapshot_store, "t", 2, old)
    async with open_store(store_kind) as other:  # a second process
        new = await other.acquire("t")
        assert new == old + 1
        with pytest.raises(FencedError):
            await snapshot_store.commit(req("t", 2, old))
        with pytest.raises(FencedError):
            await snapshot_store.delete("t", epoch=old)
        await other.commit(req("t", 2, new, step=b"by the new owner"))
    loaded = await snapshot_store.load("t")
    assert loaded is not None
    assert (loaded.version, loaded.epoch) == (3, new)
    assert loaded.steps == [step("t", 1), step("t", 2), b"by the new owner"]
    # Still fenced later on, whatever version the old owner claims.
    with pytest.raises(FencedError):
        await snapshot_store.commit(req("t", 3, old))


async def test_delete_leaves_a_tombstone(snapshot_store: SnapshotStore) -> None:
    epoch = await snapshot_store.acquire("t")
    await fill(snapshot_store, "t", 3, epoch)
    await snapshot_store.commit(req("t", 3, epoch, full=b"full"))
    epoch_keep = await snapshot_store.acquire("keep")
    await fill(snapshot_store, "keep", 1, epoch_keep)
    assert await snapshot_store.threads() == ["keep", "t"]

    assert await snapshot_store.delete("t", epoch=epoch) is True
    assert await snapshot_store.load("t") == StoredThread(
        version=0, epoch=epoch + 1, full=None, full_version=0, steps=[]
    )
    assert await snapshot_store.threads() == ["keep"]
    assert await snapshot_store.read_steps("t") == []
    # The old owner stays fenced out, even starting over from version 0.
    with pytest.raises(FencedError):
        await snapshot_store.commit(req("t", 0, epoch))
    with pytest.raises(FencedError):
        await snapshot_store.commit(req("t", 4, epoch))

    fresh = await snapshot_store.acquire("t")
    assert fresh == epoch + 2
    await snapshot_store.commit(req("t", 0, fresh, step=b"reborn"))
    assert await snapshot_store.load("t") == StoredThread(
        version=1, epoch=fresh, full=None, full_version=0, steps=[b"reborn"]
    )
    assert await snapshot_store.read_steps("t") == [b"reborn"]
    assert await snapshot_store.threads() == ["keep", "t"]

    # Deleting without an epoch works for anyone; a thread without steps reports False.
    assert await snapshot_store.delete("t") is True
    assert await snapshot_store.delete("t") is False
    loaded = await snapshot_store.load("t")
    assert loaded is not None
    assert (loaded.version, loaded.epoch) == (0, fresh + 2)
    assert await snapshot_store.threads() == ["keep"]
    loaded_keep = await snapshot_store.load("keep")
    assert loaded_keep is not None
    assert loaded_keep.steps == [step("keep", 1)]


async def test_read_steps_ranges(snapshot_store: SnapshotStore) -> None:
    epoch = await snapshot_store.acquire("t")
    await fill(snapshot_store, "t", 4, epoch)
    await snapshot_store.commit(req("t", 4, epoch, full=b"full@5"))
    await fill(snapshot_store, "t", 5, epoch, start=5)
    every = [step("t", v) for v in range(1, 11)]
    assert await snapshot_store.read_steps("t") == every
    assert await snapshot_store.read_steps("t", 1, None) == every
    assert await snapshot_store.read_steps("t", 3, 5) == every[2:5]
    assert await snapshot_store.read_steps("t", 0, 2) == every[:2]
    assert await snapshot_store.read_steps("t", -5, 1) == every[:1]
    assert await snapshot_store.read_steps("t", 7) == every[6:]
    assert await snapshot_store.read_steps("t", 9, 20) == every[8:]
    assert await snapshot_store.read_steps("t", 10, 10) == [every[9]]
    assert await snapshot_store.read_steps("t", 11) == []
    assert await snapshot_store.read_steps("t", 5, 4) == []
    assert await snapshot_store.read_steps("t", 1, 0) == []
    assert await snapshot_store.read_steps("t", 1, 2**70) == every
    assert await snapshot_store.read_steps("t", 2**70) == []
    assert await snapshot_store.read_steps("t", 1, -(2**70)) == []


ODD_IDS = [
    "a}b",
    "a%7Db",
    "a{b",
    "a%7Bb",
    "{",
    "}",
    "{}",
    "}{",
    "%",
    "%25",
    "%%7B",
    "{a}",
    "{a}:head",
    "x:t:{y}:steps",
    "a:b:c",
    "with spaces ",
    " ",
    "ünïcødé 🧵",
    "中文线程",
    "*?[glob]*",
    "a" * 1000,
    "{" * 300 + "}" * 300 + "%" * 300,
]


async def test_odd_thread_ids_round_trip(snapshot_store: SnapshotStore) -> None:
    assert len(set(ODD_IDS)) == len(ODD_IDS)
    for i, thread_id in enumerate(ODD_IDS):
        epoch = await snapshot_store.acquire(thread_id)
        assert epoch == 1, thread_id  # no collision with an earlier id
        await snapshot_store.commit(req(thread_id, 0, epoch, step=f"step {i}".encode()))
        await snapshot_store.commit(
            req(thread_id, 1, epoch, step=f"step {i}b".encode(), full=f"full {i}".encode())
        )
    assert await snapshot_store.threads() == sorted(ODD_IDS)
    for i, thread_id in enumerate(ODD_IDS):
        assert await snapshot_store.load(thread_id) == StoredThread(
            version=2, epoch=1, full=f"full {i}".encode(), full_version=2, steps=[]
        ), thread_id
        assert await snapshot_store.read_steps(thread_id) == [
            f"step {i}".encode(),
            f"step {i}b".encode(),
        ]
    assert await snapshot_store.delete("a}b") is True
    assert await snapshot_store.threads() == sorted(set(ODD_IDS) - {"a}b"})
    assert await snapshot_store.read_steps("a%7Db") == [b"step 1", b"step 1b"]


async def test_records_are_opaque_bytes(snapshot_store: SnapshotStore) -> None:
    blobs = [b"", b"\x00", bytes(range(256)), b"\xff\xfe not utf-8 \x80", b"x" * 1_000_000]
    epoch = await snapshot_store.acquire("bin")
    for v, blob in enumerate(blobs):
        await snapshot_store.commit(req("bin", v, epoch, step=blob))
    await snapshot_store.commit(req("bin", len(blobs), epoch, step=b"\x00", full=b"\x00\xff"))
    assert await snapshot_store.read_steps("bin") == [*blobs, b"\x00"]
    loaded = await snapshot_store.load("bin")
    assert loaded is not None
    assert loaded.full == b"\x00\xff"


# -- concurrency and group commit ------------------------------------------------


async def test_many_concurrent_commits_are_all_durable(
    snapshot_store: SnapshotStore, store_kind: str, open_store: OpenStore
) -> None:
    ids = [f"thread-{i:03d}" for i in range(200)]
    steps_per_thread = 3
    async with open_store(store_kind) as second:  # two "processes" writing at once

        async def run(i: int, thread_id: str) -> None:
            store = snapshot_store if i % 2 else second
            epoch = await store.acquire(thread_id)
            for v in range(steps_per_thread):
                full = b"full" if v == 1 else None
                await store.commit(req(thread_id, v, epoch, full=full))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, thread_id in enumerate(ids):
                    tg.start_soon(run, i, thread_id)

    async with open_store(store_kind) as fresh:
        assert await fresh.threads() == ids
        for thread_id in ids:
            loaded = await fresh.load(thread_id)
            assert loaded == StoredThread(
                version=3, epoch=1, full=b"full", full_version=2, steps=[step(thread_id, 3)]
            )
            assert await fresh.read_steps(thread_id) == [step(thread_id, v) for v in (1, 2, 3)]


async def _run_one_batch(
    store: SnapshotStore, requests: Sequence[CommitRequest]
) -> list[BaseException | None]:
    """Commit ``requests`` in this order; with a group-commit store, as ONE batch.

    A first commit is held inside the flush while the others queue up behind
    it, so they are all flushed together. Returns each request's outcome.
    """
    outcomes: list[BaseException | None] = [None] * len(requests)

    async def one(i: int) -> None:
        try:
            await store.commit(requests[i])
        except PersistenceError as exc:
            outcomes[i] = exc

    committer: GroupCommitter[CommitRequest] | None = getattr(store, "_committer", None)
    if committer is None:  # the memory store commits on the spot
        for i in range(len(requests)):
            await one(i)
        return outcomes

    sizes: list[int] = []
    gate = anyio.Event()
    real_flush = committer._flush

    async def gated_flush(items: Sequence[CommitRequest]) -> Sequence[BaseException | None]:
        sizes.append(len(items))
        await gate.wait()
        return await real_flush(items)

    blocker_epoch = await store.acquire("blocker")  # (acquires go through the flush too)
    committer._flush = gated_flush
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.commit, req("blocker", 0, blocker_epoch))
                await anyio.wait_all_tasks_blocked()
                assert sizes == [1]
                for i in range(len(requests)):
                    tg.start_soon(one, i)
                    await anyio.wait_all_tasks_blocked()  # keep the submission order
                    assert len(committer._queue) == i + 1
                gate.set()
    finally:
        committer._flush = real_flush
    assert sizes == [1, len(requests)]
    return outcomes


async def _prepare_batch_threads(store: SnapshotStore) -> dict[str, int]:
    epochs = {}
    for thread_id in "ABCDEFGH":
        epochs[thread_id] = await store.acquire(thread_id)
        await store.commit(req(thread_id, 0, epochs[thread_id]))
    epochs["C-old"] = epochs["C"]
    epochs["C"] = await store.acquire("C")  # fences C-old
    return epochs


async def test_a_batch_of_good_commits(
    snapshot_store: SnapshotStore, store_kind: str, open_store: OpenStore
) -> None:
    e = await _prepare_batch_threads(snapshot_store)
    requests = [
        req("A", 1, e["A"]),
        req("B", 1, e["B"], full=b"B full@2"),
        req("A", 2, e["A"]),  # the same thread twice in one batch, in order
        req("C", 1, e["C"]),
        req("B", 2, e["B"]),
        req("A", 3, e["A"], full=b"A full@4"),
    ]
    assert await _run_one_batch(snapshot_store, requests) == [None] * len(requests)
    async with open_store(store_kind) as fresh:
        assert await fresh.load("A") == StoredThread(
            version=4, epoch=e["A"], full=b"A full@4", full_version=4, steps=[]
        )
        assert await fresh.load("B") == StoredThread(
            version=3, epoch=e["B"], full=b"B full@2", full_version=2, steps=[step("B", 3)]
        )
        assert await fresh.read_steps("A") == [step("A", v) for v in (1, 2, 3, 4)]
        assert await fresh.read_steps("C") == [step("C", 1), step("C", 2)]


async def test_a_batch_with_bad_commits_fails_only_those(
    snapshot_store: SnapshotStore, store_kind: str, open_store: OpenStore
) -> None:
    e = await _prepare_batch_threads(snapshot_store)
    requests = [
        req("A", 1, e["A"]),  # 0 ok
        req("B", 0, e["B"], step=b"stale"),  # 1 conflict: B is at 1
        req("C", 1, e["C-old"], step=b"fenced"),  # 2 fenced
        req("D", 1, e["D"], full=b"D full@2"),  # 3 ok
        req("nobody", 0, 1),  # 4 conflict: no head
        req("F", 1, e["F"], step=b"F first"),  # 5 ok
        req("F", 1, e["F"], step=b"F second"),  # 6 conflict: F is at 2 by now
        req("G", 1, e["G"]),  # 7 ok
        req("G", 2, e["G"]),  # 8 ok, built on 7
        req("H", 1, e["H"] + 1, step=b"future epoch"),  # 9 conflict (not fenced)
        req("E", 5, e["E"], step=b"ahead"),  # 10 conflict
        req("E", 1, e["E"]),  # 11 ok
    ]
    outcomes = await _run_one_batch(snapshot_store, requests)
    kinds = [None if o is None else type(o) for o in outcomes]
    assert kinds == [
        None,
        ConflictError,
        FencedError,
        None,
        ConflictError,
        None,
        ConflictError,
        None,
        None,
        ConflictError,
        ConflictError,
        None,
    ]
    # Each failure names its own thread.
    for r, outcome in zip(requests, outcomes, strict=True):
        if outcome is not None:
            assert repr(r.thread_id) in str(outcome)

    async with open_store(store_kind) as fresh:
        versions = {}
        for thread_id in "ABCDEFGH":
            loaded = await fresh.load(thread_id)
            assert loaded is not None
            versions[thread_id] = loaded.version
        assert versions == dict(A=2, B=1, C=1, D=2, E=2, F=2, G=3, H=1)
        assert await fresh.read_steps("F") == [step("F", 1), b"F first"]
        assert await fresh.read_steps("G") == [step("G", v) for v in (1, 2, 3)]
        assert await fresh.read_steps("B") == [step("B", 1)]
        assert await fresh.read_steps("C") == [step("C", 1)]
        loaded_d = await fresh.load("D")
        assert loaded_d is not None
        assert (loaded_d.full, loaded_d.full_version) == (b"D full@2", 2)
        assert await fresh.load("nobody") is None
        assert "nobody" not in await fresh.threads()


async def test_commit_after_close_is_refused(store_kind: str, open_store: OpenStore) -> None:
    if store_kind == "memory":
        pytest.skip("the memory store has nothing to close")
    store = open_store(store_kind)
    async with store:
        epoch = await store.acquire("t")
        await store.commit(req("t", 0, epoch))
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.commit(req("t", 1, epoch))
    with pytest.raises(StoreUnavailableError):
        await store.load("t")
    # Nested entering: only the last exit closes.
    async with store:
        async with store:
            await store.commit(req("t", 1, epoch))
        await store.commit(req("t", 2, epoch))
        assert await store.read_steps("t") == [step("t", v) for v in (1, 2, 3)]


# -- the inbox -------------------------------------------------------------------------


def ids(entries: Sequence[InboxEntry]) -> list[str]:
    return [e.message_id for e in entries]


async def test_inbox_keeps_arrival_order_and_ignores_a_repeated_id(
    snapshot_store: SnapshotStore, store_kind: str, open_store: OpenStore
) -> None:
    assert await snapshot_store.pending("t") == []
    for mid in ("m2", "m1", "m3"):
        await snapshot_store.enqueue("t", mid, f"env {mid}".encode())
    await snapshot_store.enqueue("t", "m1", b"a retry: ignored")
    await snapshot_store.enqueue("other", "m1", b"same id, other thread")
    expected = [
        InboxEntry("m2", b"env m2"),
        InboxEntry("m1", b"env m1"),
        InboxEntry("m3", b"env m3"),
    ]
    assert await snapshot_store.pending("t") == expected
    assert await snapshot_store.pending("other") == [InboxEntry("m1", b"same id, other thread")]
    # An inbox is not a thread: no head, no steps.
    assert await snapshot_store.load("t") is None
    assert await snapshot_store.threads() == []
    async with open_store(store_kind) as second:  # durable: another "process" sees it
        assert await second.pending("t") == expected


async def test_many_concurrent_enqueues_keep_each_threads_order(
    snapshot_store: SnapshotStore,
) -> None:
    async def tell(thread_id: str) -> None:
        for i in range(20):
            await snapshot_store.enqueue(thread_id, f"{thread_id}-{i}", b"x")

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(tell, f"t{n}")
    for n in range(10):
        assert ids(await snapshot_store.pending(f"t{n}")) == [f"t{n}-{i}" for i in range(20)]


async def test_the_consuming_commit_removes_the_inbox_entry(snapshot_store: SnapshotStore) -> None:
    for mid in ("a", "b", "c"):
        await snapshot_store.enqueue("t", mid, mid.encode())
    epoch = await snapshot_store.acquire("t")
    await snapshot_store.commit(
        CommitRequest(
            thread_id="t", expected_version=0, epoch=epoch, step=b"1", consumed="b", turn="b"
        )
    )
    assert ids(await snapshot_store.pending("t")) == ["a", "c"]
    # A commit that fails removes nothing.
    with pytest.raises(ConflictError):
        await snapshot_store.commit(
            CommitRequest(thread_id="t", expected_version=0, epoch=epoch, step=b"x", consumed="a")
        )
    assert ids(await snapshot_store.pending("t")) == ["a", "c"]
    # Consuming an id that is not in the inbox is fine (an ask, a recovered duplicate).
    await snapshot_store.commit(
        CommitRequest(thread_id="t", expected_version=1, epoch=epoch, step=b"2", consumed="zz")
    )
    assert ids(await snapshot_store.pending("t")) == ["a", "c"]
    # Consumed and removed, a retried id is appended again (its consumer knows the id).
    await snapshot_store.enqueue("t", "b", b"b again")
    assert ids(await snapshot_store.pending("t")) == ["a", "c", "b"]


async def test_dequeue_and_dead_letters(snapshot_store: SnapshotStore) -> None:
    for mid in ("a", "b", "c"):
        await snapshot_store.enqueue("t", mid, mid.encode())
    assert await snapshot_store.dequeue("t", "a") is True
    assert await snapshot_store.dequeue("t", "a") is False
    assert await snapshot_store.dequeue("nobody", "a") is False
    assert await snapshot_store.dead_letters("t") == []
    assert await snapshot_store.dead_letter("t", "b", "cannot decode: garbage") is True
    assert await snapshot_store.dead_letter("t", "b", "again") is False
    assert ids(await snapshot_store.pending("t")) == ["c"]
    (dead,) = await snapshot_store.dead_letters("t")
    assert (dead.message_id, dead.envelope, dead.reason) == ("b", b"b", "cannot decode: garbage")
    assert dead.ts > 0
    assert await snapshot_store.dead_letters("other") == []


async def test_recoverable_threads_are_those_with_a_turn_or_an_inbox(
    snapshot_store: SnapshotStore, store_kind: str, open_store: OpenStore
) -> None:
    assert await snapshot_store.recoverable_threads() == []

    async def commit(thread_id: str, version: int, epoch: int, turn: str | None) -> None:
        await snapshot_store.commit(
            CommitRequest(
                thread_id=thread_id, expected_version=version, epoch=epoch, step=b"s", turn=turn
            )
        )

    epochs = {tid: await snapshot_store.acquire(tid) for tid in ("parked", "done", "both", "gone")}
    await commit("parked", 0, epochs["parked"], "m1")
    await commit("parked", 1, epochs["parked"], "m1")  # the turn goes on
    await commit("done", 0, epochs["done"], "m1")
    await commit("done", 1, epochs["done"], None)  # the turn ended
    await commit("both", 0, epochs["both"], "x")
    await snapshot_store.enqueue("both", "y", b"y")
    await snapshot_store.enqueue("inbox-only", "z", b"z")
    await commit("gone", 0, epochs["gone"], "g")
    await snapshot_store.enqueue("gone", "h", b"h")
    assert await snapshot_store.delete("gone") is True  # the turn goes, the inbox stays
    expected = [
        RecoverableThread(thread_id="both", turn="x"),
        RecoverableThread(thread_id="gone"),
        RecoverableThread(thread_id="inbox-only"),
        RecoverableThread(thread_id="parked", turn="m1"),
    ]
    assert await snapshot_store.recoverable_threads() == expected
    async with open_store(store_kind) as second:
        assert await second.recoverable_threads() == expected
    await snapshot_store.dequeue("inbox-only", "z")
    await snapshot_store.dead_letter("gone", "h", "bad")
    await commit("parked", 2, epochs["parked"], None)
    assert await snapshot_store.recoverable_threads() == [
        RecoverableThread(thread_id="both", turn="x")
    ]


async def test_inbox_of_odd_thread_ids(snapshot_store: SnapshotStore) -> None:
    odd = ["a{b}c", "}{", "%7B", "ünï: c{o}de", "x" * 256]
    for tid in odd:
        await snapshot_store.enqueue(tid, "m", tid.encode())
    for tid in odd:
        assert await snapshot_store.pending(tid) == [InboxEntry("m", tid.encode())]
    found = await snapshot_store.recoverable_threads()
    assert [r.thread_id for r in found] == sorted(odd)


async def test_sqlite_enqueues_share_the_group_commit(tmp_path: Path) -> None:
    """Many tells are a few transactions, not one fsync each; one that cannot be
    stored fails alone."""
    async with SqliteSnapshotStore(tmp_path / "burst.db") as store:
        committer = store._committer
        assert committer is not None
        sizes: list[int] = []
        real_flush = committer._flush

        async def counting_flush(items: Sequence[Any]) -> Sequence[object]:
            sizes.append(len(items))
            return await real_flush(items)

        committer._flush = counting_flush
        failures: list[BaseException] = []

        async def tell(i: int) -> None:
            # An int too large for SQLite cannot be stored: that one request
            # must fail on its own, the batch around it must not.
            envelope: Any = (1 << 70) if i == 7 else b"e"
            try:
                await store.enqueue(f"t{i % 10}", f"m{i}", envelope)
            except StoreUnavailableError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(tell, i)
        assert sum(sizes) == 200
        assert len(sizes) < 20
        assert len(failures) == 1 and "m7" in str(failures[0])
        stored = [m for n in range(10) for m in ids(await store.pending(f"t{n}"))]
        assert sorted(stored) == sorted(f"m{i}" for i in range(200) if i != 7)


async def test_sqlite_file_without_the_turn_column_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with SqliteSnapshotStore(path) as store:
        epoch = await store.acquire("t")
        await store.commit(req("t", 0, epoch))
    with sqlite3.connect(path) as conn:  # as a threadline without the inbox left it
        conn.execute("ALTER TABLE threads DROP COLUMN turn")
    async with SqliteSnapshotStore(path) as store:
        assert await store.recoverable_threads() == []
        await store.commit(
            CommitRequest(thread_id="t", expected_version=1, epoch=epoch, step=b"2", turn="m")
        )
        assert await store.recoverable_threads() == [RecoverableThread(thread_id="t", turn="m")]
        assert await store.read_steps("t") == [step("t", 1), b"2"]


# -- sqlite specifics ------------------------------------------------------------------


async def test_sqlite_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SqliteSnapshotStore(":memory:")
    with pytest.raises(ValueError):
        SqliteSnapshotStore(tmp_path / "x.db", synchronous="SOMETIMES")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SqliteSnapshotStore(tmp_path / "x.db", max_batch=0)


async def test_sqlite_synchronous_setting_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    async with SqliteSnapshotStore(path, synchronous="NORMAL") as store:
        writer = store._writer
        assert writer is not None
        assert list(await writer.execute_fetchall("PRAGMA synchronous")) == [(1,)]
        assert list(await writer.execute_fetchall("PRAGMA journal_mode")) == [("wal",)]
    async with SqliteSnapshotStore(path) as store:
        writer = store._writer
        assert writer is not None
        assert list(await writer.execute_fetchall("PRAGMA synchronous")) == [(2,)]


# -- redis specifics -------------------------------------------------------------------


def _escape(thread_id: str) -> str:
    return thread_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, if it has a (non-empty) tag."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


@pytest.fixture(params=store_kind_params("redis", CLUSTER_KIND))
def redis_kind(request: pytest.FixtureRequest) -> str:
    """A standalone redis-server, or the 3-node cluster."""
    return start_backend(request, str(request.param))


@pytest.fixture
def server_urls(redis_kind: str, request: pytest.FixtureRequest) -> list[str]:
    """URLs of the kind's servers, for plain clients: the one server, or each node."""
    if redis_kind == CLUSTER_KIND:
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        return [f"redis://127.0.0.1:{node.port}/0" for node in cluster.nodes]
    return [str(request.getfixturevalue("redis_server").url)]


async def _scan(url: str, match: str) -> list[str]:
    raw = redis.asyncio.Redis.from_url(url)
    try:
        return [k.decode() async for k in raw.scan_iter(match=match, count=1000)]
    finally:
        await raw.aclose()


@pytest.mark.redis
async def test_redis_keys_of_a_thread_share_one_hash_tag(
    redis_kind: str, server_urls: list[str], redis_prefix: str, open_store: OpenStore
) -> None:
    ids = ["plain", "a{b}c", "}{", "{x}", "a}b", "a%7Db", "%", "ünï: c{o}de"]
    async with open_store(redis_kind) as store:
        for thread_id in ids:
            epoch = await store.acquire(thread_id)
            await store.commit(req(thread_id, 0, epoch, full=b"full"))
            for mid in ("m1", "m2", "m3"):
                await store.enqueue(thread_id, mid, b"envelope")
            await store.dead_letter(thread_id, "m2", "bad")
        assert isinstance(store, RedisSnapshotStore)
        members = await store._client.smembers(f"{redis_prefix}:threads")
        index_members = {m.decode() for m in members if isinstance(m, bytes)}
    keys_by_server = [await _scan(url, f"{redis_prefix}:*") for url in server_urls]
    keys = [key for server_keys in keys_by_server for key in server_keys]
    assert len(keys) == len(set(keys))
    assert index_members == set(ids)
    by_tag: dict[str | None, set[str]] = {}
    for key in keys:
        by_tag.setdefault(_hash_tag(key), set()).add(key)
    # On a cluster, all the keys of a tag are on one node (the slot's).
    servers_of_tag: dict[str | None, set[int]] = {}
    for n, server_keys in enumerate(keys_by_server):
        for key in server_keys:
            servers_of_tag.setdefault(_hash_tag(key), set()).add(n)
    assert all(len(servers) == 1 for tag, servers in servers_of_tag.items() if tag is not None)
    if redis_kind == CLUSTER_KIND:  # the threads are spread over the nodes
        assert len(set().union(*servers_of_tag.values())) == len(server_urls)
    assert by_tag.pop(None) == {f"{redis_prefix}:threads", f"{redis_prefix}:config"}
    # Format 2: a thread's keys carry its partition's tag (crc32 % 64, the default).
    layout = KeyLayout(prefix=redis_prefix, partitions=64)
    expected: dict[str, set[str]] = {}
    for thread_id in ids:
        tag = partition_tag(layout.partition_of(thread_id))[1:-1]
        base = f"{redis_prefix}:{{{tag}}}:t:{_escape(thread_id)}"
        expected.setdefault(tag, set()).update(
            f"{base}:{name}" for name in ("head", "steps", "full", "inbox", "told", "dead")
        )
    assert by_tag == expected


@pytest.mark.redis
async def test_redis_survives_kill_and_restart(
    redis_kind: str, request: pytest.FixtureRequest, open_store: OpenStore
) -> None:
    if redis_kind == CLUSTER_KIND:
        pytest.skip(
            "kills and restarts the one redis-server; a cluster node that dies is a "
            "failover matter (replicas), and the shared 3-node fixture has none"
        )
    redis_server = request.getfixturevalue("redis_server")
    async with open_store(redis_kind) as store:
        epoch = await store.acquire("t")
        await fill(store, "t", 3, epoch)
        try:
            redis_server.kill()
            with anyio.fail_after(30):
                with pytest.raises(StoreUnavailableError) as info:
                    await store.commit(req("t", 3, epoch))
                assert not isinstance(info.value, redis.RedisError)
                assert isinstance(info.value.__cause__, Exception)
                for call in (
                    lambda: store.load("t"),
                    lambda: store.acquire("t"),
                    lambda: store.read_steps("t"),
                    lambda: store.threads(),
                    lambda: store.delete("t", epoch=epoch),
                ):
                    with pytest.raises(StoreUnavailableError) as info2:
                        await call()
                    assert not isinstance(info2.value, redis.RedisError)
        finally:
            redis_server.start()
        # Same store, same client: it reconnects, reloads its scripts and the
        # data written before the kill is there (appendfsync always).
        with anyio.fail_after(30):
            loaded = await store.load("t")
            assert loaded is not None
            assert loaded.version == 3
            assert loaded.steps == [step("t", v) for v in (1, 2, 3)]
            await store.commit(req("t", 3, epoch))
            assert await store.read_steps("t") == [step("t", v) for v in (1, 2, 3, 4)]
            assert await store.threads() == ["t"]


async def _flush_scripts(*urls: str) -> None:
    """``SCRIPT FLUSH`` on each server (every node of a cluster)."""
    for url in urls:
        raw = redis.asyncio.Redis.from_url(url)
        try:
            await raw.script_flush()
        finally:
            await raw.aclose()


@pytest.mark.redis
async def test_redis_reloads_flushed_scripts(
    redis_kind: str, server_urls: list[str], open_store: OpenStore
) -> None:
    async with open_store(redis_kind) as store:
        epoch = await store.acquire("t")
        await store.commit(req("t", 0, epoch))
        await _flush_scripts(*server_urls)
        await store.commit(req("t", 1, epoch))
        await _flush_scripts(*server_urls)
        with pytest.raises(ConflictError):
            await store.commit(req("t", 1, epoch))
        await _flush_scripts(*server_urls)
        assert await store.acquire("t") == epoch + 1
        await _flush_scripts(*server_urls)
        loaded = await store.load("t")
        assert loaded is not None
        assert loaded.steps == [step("t", 1), step("t", 2)]
        await _flush_scripts(*server_urls)
        assert await store.delete("t") is True
        for mid in ("a", "b", "c"):
            await _flush_scripts(*server_urls)
            await store.enqueue("t", mid, mid.encode())
        await _flush_scripts(*server_urls)
        assert await store.dequeue("t", "a") is True
        await _flush_scripts(*server_urls)
        assert await store.dead_letter("t", "b", "bad") is True
        assert await store.pending("t") == [InboxEntry("c", b"c")]


@pytest.mark.redis
async def test_redis_client_ownership(redis_server: Any, redis_prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with RedisSnapshotStore(client, prefix=redis_prefix) as store:
            epoch = await store.acquire("t")
            await store.commit(req("t", 0, epoch))
        assert await client.ping()  # a client passed in stays open
        assert (
            await client.hget(
                KeyLayout(prefix=redis_prefix, partitions=64).for_thread("t").thread("t", "head"),
                "version",
            )
            == b"1"
        )
    finally:
        await client.aclose()

    decoding = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with pytest.raises(ValueError):
            RedisSnapshotStore(decoding, prefix=redis_prefix)
    finally:
        await decoding.aclose()
    with pytest.raises(ValueError):
        RedisSnapshotStore.from_url("http://127.0.0.1:1/")
    with pytest.raises(ValueError):
        RedisSnapshotStore.from_url(redis_server.url, prefix="bad{prefix}")
    store = RedisSnapshotStore.from_url(
        redis_server.url.replace("redis://", "rediss://"), prefix=redis_prefix
    )
    assert isinstance(store, RedisSnapshotStore)  # accepted (not connected here)


@pytest.mark.redis
async def test_redis_cluster_client_ownership(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    host, port = redis_cluster.startup
    client = RedisCluster(host=host, port=port)
    try:
        async with RedisSnapshotStore(client, prefix=redis_prefix) as store:
            epoch = await store.acquire("t")
            await store.commit(req("t", 0, epoch))
        assert await client.ping()  # a client passed in stays open
        head = KeyLayout(prefix=redis_prefix, partitions=64).for_thread("t").thread("t", "head")
        assert await client.hget(head, "version") == b"1"
    finally:
        await client.aclose()
    decoding = RedisCluster(host=host, port=port, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisSnapshotStore(decoding, prefix=redis_prefix)
    finally:
        await decoding.aclose()


# -- the group committer itself ------------------------------------------------------


def _recording_flush(
    seen: list[list[int]], gate: anyio.Event | None = None
) -> Callable[[Sequence[int]], Awaitable[list[BaseException | None]]]:
    async def flush(items: Sequence[int]) -> list[BaseException | None]:
        seen.append(list(items))
        if gate is not None:
            await gate.wait()
        return [ConflictError(f"odd {i}") if i % 2 else None for i in items]

    return flush


async def test_group_committer_batches_what_queues_during_a_flush() -> None:
    seen: list[list[int]] = []
    gate = anyio.Event()
    outcomes: dict[int, BaseException | None] = {}

    async def submit(committer: GroupCommitter[int], i: int) -> None:
        try:
            await committer.submit(i)
            outcomes[i] = None
        except ConflictError as exc:
            outcomes[i] = exc

    with anyio.fail_after(10):
        async with (
            GroupCommitter(_recording_flush(seen, gate), max_batch=4) as committer,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(submit, committer, 0)
            await anyio.wait_all_tasks_blocked()
            assert seen == [[0]]
            for i in range(1, 11):
                tg.start_soon(submit, committer, i)
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert seen == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert sorted(outcomes) == list(range(11))
    for i, outcome in outcomes.items():
        if i % 2:
            assert isinstance(outcome, ConflictError)
            assert str(outcome) == f"odd {i}"
        else:
            assert outcome is None


async def test_group_committer_flush_failure_fails_the_whole_batch() -> None:
    boom = RuntimeError("disk on fire")
    calls = 0

    async def flush(items: Sequence[int]) -> list[BaseException | None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise boom
        return [None] * len(items)

    errors: list[StoreUnavailableError] = []

    async def submit(committer: GroupCommitter[int], i: int) -> None:
        try:
            await committer.submit(i)
        except StoreUnavailableError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with GroupCommitter(flush) as committer:
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(submit, committer, i)
            assert len(errors) == 3
            assert len({id(e) for e in errors}) == 3  # one exception object per submitter
            assert all(e.__cause__ is boom for e in errors)
            await committer.submit(99)  # the writer goes on
    with pytest.raises(StoreUnavailableError, match="store is closed"):
        await committer.submit(100)


async def test_group_committer_survives_a_cancelled_submitter() -> None:
    seen: list[list[int]] = []
    gate = anyio.Event()
    done: list[int] = []
    scopes: list[anyio.CancelScope] = []

    async def submit(committer: GroupCommitter[int], i: int) -> None:
        await committer.submit(i)
        done.append(i)

    async def submit_then_give_up(committer: GroupCommitter[int], i: int) -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await committer.submit(i)
            done.append(i)

    with anyio.fail_after(10):
        async with (
            GroupCommitter(_recording_flush(seen, gate)) as committer,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(submit, committer, 0)
            await anyio.wait_all_tasks_blocked()
            assert seen == [[0]]
            tg.start_soon(submit, committer, 2)
            tg.start_soon(submit_then_give_up, committer, 4)
            await anyio.wait_all_tasks_blocked()
            scopes[0].cancel()
            tg.start_soon(submit, committer, 6)
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert sorted(done) == [0, 2, 6]
    assert seen == [[0], [2, 4, 6]]  # 4 was still written


async def test_group_committer_close_flushes_the_queue() -> None:
    seen: list[list[int]] = []
    results: dict[int, bool] = {}

    async def slow_flush(items: Sequence[int]) -> list[BaseException | None]:
        seen.append(list(items))
        await anyio.sleep(0.05)
        return [None] * len(items)

    async def submit(committer: GroupCommitter[int], i: int) -> None:
        await committer.submit(i)
        results[i] = True

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, GroupCommitter(slow_flush) as committer:
            for i in range(5):
                tg.start_soon(submit, committer, i)
            await anyio.wait_all_tasks_blocked()
        # Closed while items were queued: they were flushed, not dropped.
    assert results == dict.fromkeys(range(5), True)
    assert sorted(i for batch in seen for i in batch) == list(range(5))


async def test_group_committer_close_is_bounded() -> None:
    async def stuck_flush(items: Sequence[int]) -> list[BaseException | None]:
        await anyio.sleep_forever()
        raise AssertionError

    errors: list[BaseException] = []

    async def submit(committer: GroupCommitter[int]) -> None:
        try:
            await committer.submit(1)
        except StoreUnavailableError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with (
            anyio.create_task_group() as tg,
            GroupCommitter(stuck_flush, close_timeout=0.2) as committer,
        ):
            tg.start_soon(submit, committer)
            await anyio.wait_all_tasks_blocked()
    assert len(errors) == 1
    assert "outcome unknown" in str(errors[0])


async def test_group_committer_cancelled_with_its_host_still_flushes_the_queue() -> None:
    seen: list[list[int]] = []
    first_started = anyio.Event()

    async def flush(items: Sequence[int]) -> list[BaseException | None]:
        seen.append(list(items))
        if len(seen) == 1:
            first_started.set()
            await anyio.sleep_forever()  # in flight when the host is cancelled
        return [None] * len(items)

    outcomes: dict[int, BaseException | None] = {}

    async def submit(committer: GroupCommitter[int], i: int) -> None:
        try:
            await committer.submit(i)
            outcomes[i] = None
        except StoreUnavailableError as exc:
            outcomes[i] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as submitters:  # outside the cancelled scope
            with anyio.CancelScope() as host:
                async with GroupCommitter(flush) as committer:
                    submitters.start_soon(submit, committer, 0)
                    await first_started.wait()
                    submitters.start_soon(submit, committer, 1)
                    submitters.start_soon(submit, committer, 2)
                    await anyio.wait_all_tasks_blocked()
                    host.cancel()
                    await anyio.sleep_forever()
    assert host.cancelled_caught
    assert seen == [[0], [1, 2]]
    assert isinstance(outcomes[0], StoreUnavailableError)
    assert "outcome unknown" in str(outcomes[0])
    assert outcomes[1] is None
    assert outcomes[2] is None
    with pytest.raises(StoreUnavailableError, match="store is closed"):
        await committer.submit(3)


@pytest.mark.redis
@pytest.mark.anyio
async def test_redis_store_queues_for_connections_under_a_burst(
    redis_server: Any, redis_prefix: str
) -> None:
    """A thousand concurrent activations wait for a pooled connection, none fails."""
    from threadline.persistence import RedisSnapshotStore

    async with RedisSnapshotStore.from_url(
        redis_server.url, prefix=redis_prefix, max_connections=8
    ) as store:
        epochs: list[int] = []

        async def activate(i: int) -> None:
            epochs.append(await store.acquire(f"burst-{i}"))
            await store.load(f"burst-{i}")

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(activate, i)
    assert epochs == [1] * 1000


@pytest.mark.anyio
async def test_sqlite_acquires_share_the_group_commit(tmp_path: Path) -> None:
    """A burst of activations is a few transactions, not one fsync each, and
    every acquirer gets its own epoch even for the same thread."""
    from threadline.persistence import SqliteSnapshotStore

    async with SqliteSnapshotStore(tmp_path / "burst.db") as store:
        committer = store._committer
        assert committer is not None
        sizes: list[int] = []
        real_flush = committer._flush

        async def counting_flush(items: Sequence[Any]) -> Sequence[object]:
            sizes.append(len(items))
            return await real_flush(items)

        committer._flush = counting_flush
        epochs: dict[str, list[int]] = {}

        async def activate(thread_id: str) -> None:
            epochs.setdefault(thread_id, []).append(await store.acquire(thread_id))

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(activate, f"t{i % 150}")  # 50 threads acquired twice
        assert sum(sizes) == 200
        assert len(sizes) < 20
        for thread_id, got in epochs.items():
            assert sorted(got) == list(range(1, len(got) + 1)), thread_id
        fresh = await store.acquire("t0")
        assert fresh == len(epochs["t0"]) + 1


# -- redis on a cluster: slots that move, replies that are lost -------------------------


def _slot_of(store: SnapshotStore, thread_id: str) -> tuple[str, int]:
    assert isinstance(store, RedisSnapshotStore)
    head = store.layout.for_thread(thread_id).thread(thread_id, "head")
    return head, key_slot(head.encode())


async def _admin(node: ClusterNode, *command: Any) -> Any:
    raw = redis.asyncio.Redis(host="127.0.0.1", port=node.port)
    try:
        return await raw.execute_command(*command)
    finally:
        await raw.aclose()


async def _tryagain_count(cluster: RedisClusterProcesses) -> int:
    total = 0
    for node in cluster.nodes:
        raw = redis.asyncio.Redis(host="127.0.0.1", port=node.port)
        try:
            stats = await raw.info("errorstats")
        finally:
            await raw.aclose()
        total += int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))
    return total


async def _begin_migration(
    cluster: RedisClusterProcesses, slot: int
) -> tuple[ClusterNode, ClusterNode]:
    """Mark ``slot`` as migrating to another node, moving no key yet."""
    source = cluster.node_of_slot(slot)
    target = next(node for node in cluster.nodes if node is not source)
    source_id = await _admin(source, "CLUSTER", "MYID")
    target_id = await _admin(target, "CLUSTER", "MYID")
    await _admin(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await _admin(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    return source, target


async def _steps_on(node: ClusterNode, store: SnapshotStore, thread_id: str) -> list[bytes]:
    assert isinstance(store, RedisSnapshotStore)
    key = store.layout.for_thread(thread_id).thread(thread_id, "steps")
    raw = redis.asyncio.Redis(host="127.0.0.1", port=node.port)
    try:
        return list(await raw.lrange(key, 0, -1))
    finally:
        await raw.aclose()


def _same_partition(store: SnapshotStore, thread_id: str, n: int) -> list[str]:
    assert isinstance(store, RedisSnapshotStore)
    partition = store.layout.partition_of(thread_id)
    found = [f"{thread_id}-{i}" for i in range(10_000)]
    return [t for t in found if store.layout.partition_of(t) == partition][:n]


@pytest.mark.redis
async def test_redis_cluster_commit_follows_a_moved_slot(
    redis_cluster: RedisClusterProcesses, open_store: OpenStore
) -> None:
    async with open_store(CLUSTER_KIND) as store:
        assert isinstance(store, RedisSnapshotStore)
        client = store._client
        assert isinstance(client, RedisCluster)
        epoch = await store.acquire("t")
        await store.commit(req("t", 0, epoch))
        other = _same_partition(store, "t", 1)[0]
        await store.enqueue(other, "m", b"m")
        head, slot = _slot_of(store, "t")
        source = redis_cluster.node_of_slot(slot)
        target = next(node for node in redis_cluster.nodes if node is not source)
        await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, target)

        # The store's map still names the old node: MOVED, a new map, sent again.
        node = client.get_node_from_key(head)
        assert node is not None and node.port == source.port
        with anyio.fail_after(10):
            outcomes = await _run_one_batch(store, [req("t", 1, epoch), req(other, 0, 1)])
        assert outcomes[0] is None
        assert isinstance(outcomes[1], ConflictError)  # no head: it ran on the new node
        node = client.get_node_from_key(head)
        assert node is not None and node.port == target.port
        assert await _steps_on(target, store, "t") == [step("t", 1), step("t", 2)]
        assert await store.acquire(other) == 1
        await store.commit(
            CommitRequest(thread_id=other, expected_version=0, epoch=1, step=b"s", consumed="m")
        )
        assert await store.pending(other) == []


@pytest.mark.redis
async def test_redis_cluster_commit_waits_out_a_slot_migration(
    redis_cluster: RedisClusterProcesses, open_store: OpenStore
) -> None:
    """While a slot migrates, a thread's script can run on neither side (ASK, then
    TRYAGAIN); the commit is sent again until the migration ends, the rest of
    its batch is written at once."""
    async with open_store(CLUSTER_KIND) as store:
        old, new = _same_partition(store, "m", 2)
        _, slot = _slot_of(store, old)
        elsewhere = next(
            f"e{i}"
            for i in range(10_000)
            if redis_cluster.node_of_slot(_slot_of(store, f"e{i}")[1])
            is not redis_cluster.node_of_slot(slot)
        )
        epochs = {t: await store.acquire(t) for t in (old, new, elsewhere)}
        await store.commit(req(old, 0, epochs[old]))
        source, target = await _begin_migration(redis_cluster, slot)
        try:
            before = await _tryagain_count(redis_cluster)
            outcomes: list[Any] = []

            async def commit_batch() -> None:
                outcomes.extend(
                    await _run_one_batch(
                        store,
                        [
                            req(old, 1, epochs[old]),
                            req(new, 0, epochs[new]),
                            req(elsewhere, 0, epochs[elsewhere]),
                        ],
                    )
                )

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(commit_batch)
                    # Once a node has answered TRYAGAIN, finish the migration.
                    while await _tryagain_count(redis_cluster) == before:
                        await anyio.sleep(0.005)
                    # The rest of the batch is written already.
                    assert await store.read_steps(elsewhere) == [step(elsewhere, 1)]
                    await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, target)
        finally:
            if redis_cluster.node_of_slot(slot) is source:  # the test failed midway
                await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, target)
        assert outcomes == [None, None, None]
        assert await _steps_on(target, store, old) == [step(old, 1), step(old, 2)]
        assert await _steps_on(target, store, new) == [step(new, 1)]
        assert await store.threads() == sorted([old, new, elsewhere, "blocker"])


@pytest.mark.redis
async def test_redis_cluster_commit_refused_during_a_stalled_migration_is_not_written(
    redis_cluster: RedisClusterProcesses, open_store: OpenStore
) -> None:
    async with open_store(CLUSTER_KIND) as store:
        epoch = await store.acquire("s")
        await store.commit(req("s", 0, epoch))
        _, slot = _slot_of(store, "s")
        source, target = await _begin_migration(redis_cluster, slot)
        try:
            with anyio.fail_after(20), pytest.raises(StoreUnavailableError, match="not written"):
                await store.commit(req("s", 1, epoch))
        finally:
            for node in (source, target):
                await _admin(node, "CLUSTER", "SETSLOT", slot, "STABLE")
        assert await _steps_on(source, store, "s") == [step("s", 1)]
        assert await _admin(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        await store.commit(req("s", 1, epoch))  # the same commit: it was not written
        assert await store.read_steps("s") == [step("s", 1), step("s", 2)]


@pytest.mark.redis
async def test_redis_cluster_lost_reply_is_outcome_unknown_not_resent(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    """A node that stops answering mid-commit: ``StoreUnavailableError`` at the
    client's socket timeout, not a retry (the cluster client's own policy
    would send the commit again once the node is back, and report
    ``ConflictError`` for a commit it applied)."""
    host, port = redis_cluster.startup
    client = RedisCluster(host=host, port=port, socket_timeout=0.5)
    try:
        async with RedisSnapshotStore(client, prefix=redis_prefix) as store:
            epoch = await store.acquire("lost")
            await store.commit(req("lost", 0, epoch))
            _, slot = _slot_of(store, "lost")
            node = redis_cluster.node_of_slot(slot)
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
            try:
                started = anyio.current_time()
                with pytest.raises(StoreUnavailableError) as info:
                    await store.commit(req("lost", 1, epoch))
                assert not isinstance(info.value, ConflictError)
                assert anyio.current_time() - started < 3.0  # the node was still stopped
            finally:
                node.proc.send_signal(signal.SIGCONT)
            with anyio.fail_after(30):
                while True:  # the node answers again
                    try:
                        loaded = await store.load("lost")
                        break
                    except StoreUnavailableError:
                        await anyio.sleep(0.05)
            # Applied once or not at all (the reply was lost, not the request).
            assert loaded is not None and loaded.version in (1, 2)
            assert await store.read_steps("lost") == [
                step("lost", v) for v in range(1, loaded.version + 1)
            ]
            await store.commit(req("lost", loaded.version, epoch))
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_redis_cluster_url_opens_a_cluster_store(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    from threadline.persistence import open_snapshot_store

    host, port = redis_cluster.startup
    store = open_snapshot_store(f"redis+cluster://{host}:{port}")
    assert isinstance(store, RedisSnapshotStore) and isinstance(store._client, RedisCluster)
    store = RedisSnapshotStore.from_url(f"redis+cluster://{host}:{port}", prefix=redis_prefix)
    async with store:
        for thread_id in ("a", "b", "c", "d"):  # spread over the nodes
            epoch = await store.acquire(thread_id)
            await store.commit(req(thread_id, 0, epoch))
        assert await store.threads() == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="decode_responses"):
        RedisSnapshotStore.from_url(f"redis+cluster://{host}:{port}", decode_responses=True)
