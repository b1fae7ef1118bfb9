"""W2 concurrency: T threads x N turns, at most K turns in flight.

Every thread runs its turns one after another (a turn needs the previous
one's reply); the threads run at once, and a capacity limiter admits at most
K turns at a time. Latency is one turn (``ask`` or ``ainvoke``), measured
inside the limiter; throughput is every turn over the wall time. Also
reported: the latencies of first turns (threadline activates the actor then)
and of the other turns apart, and the time the process spent in the garbage
collector.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from threadline.persistence import RedisSnapshotStore, SqliteSnapshotStore
from threadline.runtime import ActorSystem, Agent

from ._common import (
    CountingStore,
    FakeModel,
    GcMonitor,
    Progress,
    percentile,
    temp_dir,
    user_message,
)


async def drive(
    label: str,
    ask: Callable[[str, str], Awaitable[Any]],
    threads: int,
    turns: int,
    inflight: int,
    prefix: str = "w2",
) -> dict[str, Any]:
    """Run the workload through ``ask(thread_id, text)``; throughput and latencies."""
    limiter = anyio.CapacityLimiter(inflight)
    first: list[float] = []
    later: list[float] = []
    progress = Progress(label, threads * turns)

    async def one(i: int) -> None:
        for turn in range(1, turns + 1):
            async with limiter:
                start = time.perf_counter()
                await ask(f"{prefix}-{i}", user_message(turn))
                (first if turn == 1 else later).append(time.perf_counter() - start)
            progress.step()

    with GcMonitor() as gc:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(threads):
                tg.start_soon(one, i)
        elapsed = time.perf_counter() - start
    latencies = first + later
    assert len(latencies) == threads * turns
    return {
        "threads": threads,
        "turns_per_thread": turns,
        "inflight": inflight,
        "seconds": elapsed,
        "turns_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "first_turn_p50_ms": percentile(first, 50) * 1000,
        "first_turn_p99_ms": percentile(first, 99) * 1000,
        "later_p50_ms": percentile(later, 50) * 1000 if later else None,
        "later_p99_ms": percentile(later, 99) * 1000 if later else None,
        **gc.figures(),
    }


async def run(
    kind: str, threads: int, turns: int, inflight: int, *, redis_url: str | None = None
) -> dict[str, Any]:
    """W2 for threadline on ``kind`` ("sqlite" or "redis")."""
    if kind == "sqlite":
        inner: Any = SqliteSnapshotStore(temp_dir() / "w2.db", synchronous="FULL")
    else:
        assert redis_url is not None
        inner = RedisSnapshotStore.from_url(redis_url, prefix=f"w2-{time.time_ns()}")
    store = CountingStore(inner)
    async with ActorSystem[Any](Agent(model=FakeModel()), snapshots=store) as system:
        out = await drive(f"W2 threadline/{kind}", system.ask, threads, turns, inflight)
        state = await system.get_state("w2-0")
        assert len(state.state.messages) == 2 * turns
    out.update(system="threadline", store=kind, commits=store.commits)
    return out


async def run_peer(kind: str, threads: int, turns: int, inflight: int) -> dict[str, Any]:
    """W2 for LangGraph with ``kind`` "sqlite" (AsyncSqliteSaver) or "memory"."""
    from . import _peer

    path = temp_dir() / "w2-langgraph.db" if kind == "sqlite" else None
    async with _peer.peer(kind, path) as p:
        out = await drive(f"W2 langgraph/{kind}", p.ask, threads, turns, inflight)
        snapshot = await p.get_state("w2-0")
        assert len(snapshot.values["messages"]) == 2 * turns
        out.update(system="langgraph", store=kind, commits=p.commits)
    return out
