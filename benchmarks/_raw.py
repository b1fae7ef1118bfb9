"""Raw limits of the backends, and threadline's durable commits/s against them.

* SQLite through aiosqlite (WAL, ``synchronous=FULL``, one connection): one
  1 KiB row per transaction (an autocommit ``INSERT``), and 100 rows per
  transaction (``BEGIN``, ``executemany``, ``COMMIT``).
* redis-py asyncio on the same redis-server as threadline: ``SET`` of 1 KiB
  awaited one at a time, and 100 per pipeline (``transaction=False``).
* threadline: T threads (actors) each running turns back to back, all at
  once; a durable commit is one step (two per turn: input and model), counted
  by ``CountingStore.commits`` over the wall time. The first turn of every
  thread (activation: ownership and load) runs before the clock starts.
"""

from __future__ import annotations

import time
from typing import Any

import aiosqlite
import anyio
import redis.asyncio

from threadline.persistence import (
    RedisSnapshotStore,
    SqliteSnapshotStore,
    StoreUnavailableError,
)
from threadline.runtime import ActorSystem, Agent

from ._common import (
    CountingStore,
    FakeModel,
    GcMonitor,
    Progress,
    note,
    temp_dir,
    user_message,
)

PAYLOAD = bytes(range(256)) * 4  # 1 KiB
ROWS_PER_TX = 100


async def sqlite_limits(single: int, batches: int) -> dict[str, Any]:
    path = temp_dir() / "raw.db"
    insert = "INSERT INTO kv (v) VALUES (?)"
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("CREATE TABLE kv (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        start = time.perf_counter()
        for _ in range(single):
            await conn.execute(insert, (PAYLOAD,))  # autocommit: one transaction
        one = single / (time.perf_counter() - start)
        rows = [(PAYLOAD,)] * ROWS_PER_TX
        start = time.perf_counter()
        for _ in range(batches):
            await conn.execute("BEGIN")
            await conn.executemany(insert, rows)
            await conn.execute("COMMIT")
        tx = batches / (time.perf_counter() - start)
        count = (await (await conn.execute("SELECT count(*) FROM kv")).fetchone() or (0,))[0]
    assert count == single + batches * ROWS_PER_TX
    return {
        "single_tx_per_s": one,
        "batched_tx_per_s": tx,
        "batched_rows_per_s": tx * ROWS_PER_TX,
        "single": single,
        "batches": batches,
    }


async def redis_limits(url: str, single: int, batches: int) -> dict[str, Any]:
    client = redis.asyncio.Redis.from_url(url)
    prefix = f"raw-{time.time_ns()}"
    try:
        start = time.perf_counter()
        for i in range(single):
            await client.set(f"{prefix}:s:{i}", PAYLOAD)
        one = single / (time.perf_counter() - start)
        start = time.perf_counter()
        for b in range(batches):
            async with client.pipeline(transaction=False) as pipe:
                for j in range(ROWS_PER_TX):
                    pipe.set(f"{prefix}:p:{b}:{j}", PAYLOAD)
                await pipe.execute()
        pipelines = batches / (time.perf_counter() - start)
        keys = [k async for k in client.scan_iter(f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()
    assert len(keys) == single + batches * ROWS_PER_TX
    return {
        "single_set_per_s": one,
        "pipelines_per_s": pipelines,
        "pipelined_set_per_s": pipelines * ROWS_PER_TX,
        "single": single,
        "batches": batches,
    }


async def ours(
    kind: str, threads: int, turns: int, *, redis_url: str | None = None
) -> dict[str, Any]:
    """Durable commits/s of threadline with ``threads`` actors running turns at once.

    On Redis the store is first made with ``RedisSnapshotStore.from_url`` (its
    default client); if that fails while the threads activate (redis-py's
    default pool refuses more than 100 connections at once), the failure is
    recorded and the run is made again with a client on a
    ``BlockingConnectionPool`` of 100 connections.
    """
    if kind == "sqlite":
        sqlite = SqliteSnapshotStore(temp_dir() / "raw-ours.db", synchronous="FULL")
        return await _ours(sqlite, kind, threads, turns)
    assert redis_url is not None
    try:
        return await _ours(
            RedisSnapshotStore.from_url(redis_url, prefix=f"raw-{time.time_ns()}"),
            kind,
            threads,
            turns,
        )
    except* StoreUnavailableError as group:
        failure = f"{len(group.exceptions)} activations failed: {group.exceptions[0]}"
    note(f"  RedisSnapshotStore.from_url: {failure}; again on a BlockingConnectionPool")
    pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=100)
    client = redis.asyncio.Redis(connection_pool=pool)
    try:
        store = RedisSnapshotStore(client, prefix=f"raw-{time.time_ns()}")
        out = await _ours(store, kind, threads, turns)
    finally:
        await client.aclose()
        await pool.disconnect()
    out.update(default_client_error=failure, client="BlockingConnectionPool(max_connections=100)")
    return out


async def _ours(store: Any, kind: str, threads: int, turns: int) -> dict[str, Any]:
    counting = CountingStore(store)
    async with ActorSystem[Any](Agent(model=FakeModel()), snapshots=counting) as system:
        async with anyio.create_task_group() as tg:  # activation, not timed
            for i in range(threads):
                tg.start_soon(system.ask, f"c-{i}", user_message(0))
        progress = Progress(f"commits threadline/{kind}", threads * turns)

        async def one(i: int) -> None:
            for turn in range(1, turns + 1):
                await system.ask(f"c-{i}", user_message(turn))
                progress.step()

        commits = counting.commits
        with GcMonitor() as gc:
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(threads):
                    tg.start_soon(one, i)
            elapsed = time.perf_counter() - start
        commits = counting.commits - commits
    assert commits == 2 * threads * turns
    return {
        "system": "threadline",
        "store": kind,
        "threads": threads,
        "turns_per_thread": turns,
        "commits": commits,
        "seconds": elapsed,
        "commits_per_s": commits / elapsed,
        "turns_per_s": threads * turns / elapsed,
        "default_client_error": None,
        "client": "default",
        **gc.figures(),
    }
