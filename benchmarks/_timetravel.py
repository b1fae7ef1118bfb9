"""Time travel: ``get_state(version=v)`` on a long thread, ``fork`` cost, checkpoint bytes.

Two threads of ``steps`` steps each, on SQLite (``synchronous=FULL``) and
Redis (``appendfsync always``):

* ``growing``: W1's conversation (a 200-character question and answer per
  turn, two steps), whose state grows with its history;
* ``trimmed``: the same, but after each turn an ``update_state`` removes the
  two oldest messages once there are 40 (three steps a turn), so the state
  stays small while the history grows: the case where replaying from the
  start would cost the whole history and the kept full records matter.

For each: the median latency of ``get_state(version=v)`` at v = 1, the middle
and the latest (and of a plain ``get_state()``, and of reading and replaying
the whole history, which is what a past version would cost without full
records); ``fork`` at the middle and at the latest version; and the bytes the
store holds for the thread: step records, the latest full record, and the
older full records kept as checkpoints.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio

from threadline.actors import RemoveMessage
from threadline.persistence import Codec, RedisSnapshotStore, SqliteSnapshotStore, StoredThread
from threadline.persistence._journal import replay
from threadline.runtime import ActorSystem, Agent

from ._common import FakeModel, note, temp_dir, user_message

SHAPES = ("growing", "trimmed")


async def _median_ms(fn: Callable[[], Awaitable[Any]], reps: int) -> float:
    await fn()  # warm (caches, prepared statements, scripts)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def _fill(system: ActorSystem[Any], thread_id: str, shape: str, steps: int) -> int:
    turn = 0
    version = 0
    while version < steps:
        result = await system.ask(thread_id, user_message(turn))
        version = result.version
        if shape == "trimmed" and len(result.messages) >= 40 and version < steps:
            old = [RemoveMessage(id=m.id) for m in result.messages[:2]]
            version = (await system.update_state(thread_id, {"messages": old})).version
        turn += 1
        if turn % 500 == 0:
            note(f"  {shape}: {version}/{steps} steps")
    return version


async def _stored_bytes(
    kind: str, path: Path | None, client: Any, prefix: str, thread_id: str
) -> dict[str, int]:
    """Bytes the backend holds for the thread's records (read from the backend itself)."""
    if kind == "sqlite":
        import sqlite3

        assert path is not None
        with sqlite3.connect(path) as db:
            (steps,) = db.execute(
                "SELECT coalesce(sum(length(record)), 0) FROM steps WHERE thread_id = ?",
                (thread_id,),
            ).fetchone()
            (full_version,) = db.execute(
                "SELECT full_version FROM threads WHERE thread_id = ?", (thread_id,)
            ).fetchone()
            rows = db.execute(
                "SELECT version, length(record) FROM fulls WHERE thread_id = ?", (thread_id,)
            ).fetchall()
        full = sum(n for v, n in rows if v == full_version)
        kept = [n for v, n in rows if v != full_version]
        return {
            "steps_bytes": int(steps),
            "full_bytes": full,
            "kept_bytes": sum(kept),
            "kept_count": len(kept),
        }
    store = RedisSnapshotStore(client, prefix=prefix)
    async with store:
        keys = store.layout.for_thread(thread_id)
        steps = sum(map(len, await client.lrange(keys.thread(thread_id, "steps"), 0, -1)))
        full = await client.strlen(keys.thread(thread_id, "full"))
        kept = list(await client.hvals(keys.thread(thread_id, "fulls")))
    return {
        "steps_bytes": steps,
        "full_bytes": int(full),
        "kept_bytes": sum(map(len, kept)),
        "kept_count": len(kept),
    }


async def run(
    kind: str, steps: int, reps: int, *, redis_url: str | None = None
) -> list[dict[str, Any]]:
    """One result per thread shape on ``kind`` ("sqlite" or "redis")."""
    path: Path | None = None
    prefix = f"tt-{time.time_ns()}"
    client: Any = None
    if kind == "sqlite":
        path = temp_dir() / "timetravel.db"
        snapshots: Any = SqliteSnapshotStore(path, synchronous="FULL")
    else:
        assert redis_url is not None
        client = redis.asyncio.Redis.from_url(redis_url)
        snapshots = RedisSnapshotStore(client, prefix=prefix)
    results = []
    try:
        async with ActorSystem[Any](Agent(model=FakeModel()), snapshots=snapshots) as system:
            codec: Codec[Any] = system.codec
            for shape in SHAPES:
                thread_id = f"tt-{shape}"
                note(f"time travel {kind}/{shape}: {steps} steps")
                head = await _fill(system, thread_id, shape, steps)
                state = (await system.get_state(thread_id)).state
                # The middle: the last version at or before head / 2 that ends a
                # turn (fork takes those only).
                page = await system.history(thread_id, limit=5, before=head // 2 + 1)
                mid = next(s.version for s in page if s.turn is None)

                async def at(version: int, tid: str = thread_id) -> None:
                    await system.get_state(tid, version=version)

                async def latest(tid: str = thread_id) -> None:
                    await system.client.get_state(tid)  # may answer from the live actor
                    await system.snapshots.load(tid)

                async def whole_history(tid: str = thread_id, v: int = head) -> None:
                    everything = await system.snapshots.read_steps(tid)
                    stored = StoredThread(
                        version=v, epoch=0, full=None, full_version=0, steps=everything
                    )
                    replay(codec, tid, stored, 0)

                forks = iter(range(10**9))

                async def fork(version: int, tid: str = thread_id, numbers: Any = forks) -> None:
                    await system.fork(tid, f"{tid}-fork-{next(numbers)}", at=version)

                def call(fn: Any, *args: Any) -> Callable[[], Awaitable[Any]]:
                    return lambda: fn(*args)

                figures = {
                    "v1_ms": await _median_ms(call(at, 1), reps),
                    "mid_ms": await _median_ms(call(at, mid), reps),
                    "latest_ms": await _median_ms(call(at, head), reps),
                    "load_ms": await _median_ms(latest, reps),
                    "replay_all_ms": await _median_ms(whole_history, max(reps // 4, 1)),
                    "fork_mid_ms": await _median_ms(call(fork, mid), reps),
                    "fork_latest_ms": await _median_ms(call(fork, head), reps),
                }
                stored = await _stored_bytes(kind, path, client, prefix, thread_id)
                results.append(
                    {
                        "workload": "time travel",
                        "store": kind,
                        "shape": shape,
                        "steps": head,
                        "state_bytes": len(msgspec.msgpack.encode(state)),
                        **figures,
                        **stored,
                    }
                )
    finally:
        if client is not None:
            await client.aclose()
    return results


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the workload's markdown table."""
    headers = [
        "store / thread",
        "steps",
        "state B",
        "get_state(version=) at 1 / mid / latest (ms)",
        "get_state() (ms)",
        "replay of the whole history (ms)",
        "fork at mid / latest (ms)",
        "steps + latest full B",
        "+ kept full records B (count)",
    ]
    rows = []
    for r in results:
        held = r["steps_bytes"] + r["full_bytes"]
        rows.append(
            [
                f"{r['store']} / {r['shape']}",
                r["steps"],
                f"{r['state_bytes']:,}",
                f"{r['v1_ms']:.2f} / {r['mid_ms']:.2f} / {r['latest_ms']:.2f}",
                f"{r['load_ms']:.2f}",
                f"{r['replay_all_ms']:.1f}",
                f"{r['fork_mid_ms']:.2f} / {r['fork_latest_ms']:.2f}",
                f"{held:,}",
                f"+{r['kept_bytes']:,} ({r['kept_count']}; +{r['kept_bytes'] / held:.0%})",
            ]
        )
    return headers, rows
