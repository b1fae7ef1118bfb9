"""One thread's broken records never fail another thread's commit.

A head that disagrees with its step records (behind them, ahead of them, or
gone while they remain) is that thread's corruption: loading it raises
``SnapshotCorruptError``, and a commit to it fails alone, while the other
requests of the same group-commit batch are written. The damage is crafted in
real SQLite files and a real redis-server.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from threadline.actors import SnapshotCorruptError
from threadline.persistence import CommitRequest, KeyLayout, SnapshotStore, SqliteSnapshotStore
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel

pytestmark = pytest.mark.anyio

HEALTHY = [f"good-{i}" for i in range(12)]

# How the bad thread's head is made to disagree with its 4 step records.
DAMAGES = ["head-behind", "head-missing", "head-ahead"]


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


def req(thread_id: str, expected: int, epoch: int) -> CommitRequest:
    return CommitRequest(
        thread_id=thread_id,
        expected_version=expected,
        epoch=epoch,
        step=f"{thread_id}/{expected + 1}".encode(),
    )


def damage_sqlite(path: Path, damage: str, thread_id: str = "bad") -> None:
    with sqlite3.connect(path) as db:
        (steps,) = db.execute(
            "SELECT count(*) FROM steps WHERE thread_id = ?", (thread_id,)
        ).fetchone()
        assert steps == 4
        if damage == "head-behind":
            db.execute("UPDATE threads SET version = 2 WHERE thread_id = ?", (thread_id,))
        elif damage == "head-missing":
            db.execute("DELETE FROM threads WHERE thread_id = ?", (thread_id,))
        else:
            db.execute("DELETE FROM steps WHERE thread_id = ? AND version = 4", (thread_id,))
    db.close()


def damage_redis(port: int, prefix: str, damage: str, thread_id: str = "bad") -> None:
    keys = KeyLayout(prefix=prefix, partitions=64).for_thread(thread_id)
    head, steps = keys.thread(thread_id, "head"), keys.thread(thread_id, "steps")
    raw = redis.Redis(host="127.0.0.1", port=port)
    try:
        assert raw.llen(steps) == 4
        if damage == "head-behind":
            raw.hset(head, "version", 2)
        elif damage == "head-missing":
            raw.delete(head)
        else:
            raw.rpop(steps)
    finally:
        raw.close()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_server")
    return str(request.param)


@pytest.fixture
def damage_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> Any:
    def _damage(damage: str, thread_id: str = "bad") -> None:
        if kind == "sqlite":
            damage_sqlite(tmp_path / "threads.db", damage, thread_id)
        else:
            port = request.getfixturevalue("redis_server").port
            damage_redis(port, redis_prefix, damage, thread_id)

    return _damage


@pytest.mark.parametrize("damage", DAMAGES)
async def test_a_bad_head_fails_only_its_thread_through_the_system(
    kind: str, open_store: Any, damage_store: Any, damage: str
) -> None:
    agent = Agent(model=ScriptedModel(echo))
    async with ActorSystem(agent, snapshots=open_store(kind)) as system:
        for thread in ("bad", *HEALTHY):
            await system.ask(thread, "hi")
            await system.ask(thread, "again")
    damage_store(damage)

    versions: dict[str, int] = {}
    failures: list[BaseException] = []

    async with ActorSystem(agent, snapshots=open_store(kind)) as system:

        async def healthy(thread: str) -> None:
            versions[thread] = (await system.ask(thread, "fine")).version

        async def bad() -> None:
            try:
                await system.ask("bad", "hello?")
            except Exception as exc:
                failures.append(exc)

        # All activations and first commits start together, so the bad
        # thread's requests share the group-commit batches of the healthy ones.
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(bad)
            for thread in HEALTHY:
                tg.start_soon(healthy, thread)

        assert versions == {thread: 6 for thread in HEALTHY}
        assert len(failures) == 3
        assert all(isinstance(exc, SnapshotCorruptError) for exc in failures), failures
        with pytest.raises(SnapshotCorruptError):
            await system.get_state("bad")
        # Deleting the thread is the way out.
        assert await system.delete("bad") is True
        assert (await system.ask("bad", "fresh")).version == 2


@pytest.mark.parametrize("damage", DAMAGES)
async def test_load_checks_the_head_against_the_records(
    kind: str, open_store: Any, damage_store: Any, damage: str
) -> None:
    async with open_store(kind) as store:
        for thread in ("bad", "good"):
            epoch = await store.acquire(thread)
            for v in range(4):
                await store.commit(req(thread, v, epoch))
    damage_store(damage)
    async with open_store(kind) as store:
        with pytest.raises(SnapshotCorruptError, match="'bad'"):
            await store.load("bad")
        good = await store.load("good")
        assert good is not None and good.version == 4
        # A delete clears the thread, even one whose head is gone.
        assert await store.delete("bad") is True
        loaded = await store.load("bad")
        assert loaded is None or (loaded.version, loaded.steps) == (0, [])
        epoch = await store.acquire("bad")
        await store.commit(req("bad", 0, epoch))
        assert await store.read_steps("bad") == [b"bad/1"]


async def _commit_together(
    store: SnapshotStore, requests: list[CommitRequest]
) -> dict[str, BaseException | None]:
    """Commit every request concurrently; each thread's outcome."""
    outcomes: dict[str, BaseException | None] = {}

    async def one(r: CommitRequest) -> None:
        try:
            await store.commit(r)
        except Exception as exc:
            outcomes[r.thread_id] = exc
        else:
            outcomes[r.thread_id] = None

    # Every submission is queued before the writer task runs: one batch.
    async with anyio.create_task_group() as tg:
        for r in requests:
            tg.start_soon(one, r)
    return outcomes


@pytest.mark.parametrize("damage", ["head-behind", "head-missing"])
async def test_a_commit_to_a_bad_head_fails_alone_in_its_batch(
    kind: str, open_store: Any, damage_store: Any, damage: str
) -> None:
    # A writer that took the thread before the damage (so it never loaded it)
    # commits in the same batch as twelve healthy writers.
    async with open_store(kind) as store:
        epochs = {thread: await store.acquire(thread) for thread in ("bad", *HEALTHY)}
        for thread, epoch in epochs.items():
            for v in range(4):
                await store.commit(req(thread, v, epoch))
        damage_store(damage)
        expected = 2 if damage == "head-behind" else 4
        outcomes = await _commit_together(
            store,
            [
                req("bad", expected, epochs["bad"]),
                *(req(thread, 4, epochs[thread]) for thread in HEALTHY),
            ],
        )
        assert {t: outcomes[t] for t in HEALTHY} == {t: None for t in HEALTHY}
        assert isinstance(outcomes["bad"], SnapshotCorruptError), outcomes["bad"]
        for thread in HEALTHY:
            assert (await store.read_steps(thread, 5)) == [f"{thread}/5".encode()]
        assert len(await store.read_steps("bad")) == 4


async def test_sqlite_a_request_the_heads_do_not_predict_to_fail_fails_alone(
    tmp_path: Path,
) -> None:
    """A constraint the heads cannot foresee (here a trigger) fails one request, not its batch."""
    path = tmp_path / "threads.db"
    async with SqliteSnapshotStore(path) as store:
        epochs = {thread: await store.acquire(thread) for thread in ("bad", *HEALTHY)}
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER refuse_bad BEFORE INSERT ON steps WHEN NEW.thread_id = 'bad'"
            " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        )
    db.close()
    async with SqliteSnapshotStore(path) as store:
        outcomes = await _commit_together(
            store,
            [req(thread, 0, epochs[thread]) for thread in (*HEALTHY[:6], "bad", *HEALTHY[6:])],
        )
        assert {t: outcomes[t] for t in HEALTHY} == {t: None for t in HEALTHY}
        failure = outcomes["bad"]
        assert isinstance(failure, SnapshotCorruptError), failure
        assert "refused by a test trigger" in str(failure)
        for thread in HEALTHY:
            loaded = await store.load(thread)
            assert loaded is not None and loaded.version == 1
        loaded = await store.load("bad")
        assert loaded is not None and (loaded.version, loaded.steps) == (0, [])
