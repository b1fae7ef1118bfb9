"""W1 history growth: one thread, N turns; per-turn latency and bytes must stay flat.

Bytes written per turn are the payload bytes handed to the store during the
turn, counted the same way for both systems: threadline's step records plus
any full record (``CountingStore``); LangGraph's checkpoint blobs, metadata
and pending-write blobs (``_peer.CountingSerde``). The SQLite file growth
(database file after close, when SQLite has checkpointed the WAL into it,
minus its size with the schema alone) is reported for both as well.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from threadline.persistence import RedisSnapshotStore, SqliteSnapshotStore
from threadline.runtime import ActorSystem, Agent

from ._common import (
    CountingStore,
    FakeModel,
    Progress,
    median_window,
    sqlite_files_size,
    temp_dir,
    user_message,
)

CHECKPOINTS = (1, 50, 100, 250, 500)


async def _drive(
    label: str, turns: int, ask: Callable[[int], Awaitable[Any]], written: Callable[[], int]
) -> tuple[list[float], list[float], Any]:
    latencies: list[float] = []
    per_turn: list[float] = []
    progress = Progress(label, turns)
    result = None
    for turn in range(1, turns + 1):
        before, start = written(), time.perf_counter()
        result = await ask(turn)
        latencies.append(time.perf_counter() - start)
        per_turn.append(written() - before)
        progress.step()
    return latencies, per_turn, result


def _figures(
    system: str, kind: str, turns: int, latencies: list[float], per_turn: list[float]
) -> dict[str, Any]:
    checkpoints = [t for t in CHECKPOINTS if t <= turns]
    if not checkpoints or checkpoints[-1] != turns:
        checkpoints.append(turns)
    rows = [
        {
            "turn": t,
            "latency_ms": median_window(latencies, t) * 1000,
            "bytes": median_window(per_turn, t),
        }
        for t in checkpoints
    ]
    return {
        "workload": "W1 history growth",
        "system": system,
        "store": kind,
        "turns": turns,
        "checkpoints": rows,
        "latency_ratio": rows[-1]["latency_ms"] / rows[0]["latency_ms"],
        "bytes_ratio": rows[-1]["bytes"] / rows[0]["bytes"],
        "bytes_mean_per_turn": sum(per_turn) / len(per_turn),
        "total_seconds": sum(latencies),
    }


async def run(kind: str, turns: int, *, redis_url: str | None = None) -> dict[str, Any]:
    """Run W1 for threadline on ``kind`` ("sqlite" or "redis")."""
    path: Path | None = None
    if kind == "sqlite":
        path = temp_dir() / "w1.db"
        inner: Any = SqliteSnapshotStore(path, synchronous="FULL")
        async with SqliteSnapshotStore(path):
            pass  # the schema alone: the baseline of the file growth
    else:
        assert redis_url is not None
        inner = RedisSnapshotStore.from_url(redis_url, prefix=f"w1-{time.time_ns()}")
    store = CountingStore(inner)
    opened = sqlite_files_size(path) if path else 0
    async with ActorSystem[Any](Agent(model=FakeModel()), snapshots=store) as system:
        latencies, per_turn, result = await _drive(
            f"W1 threadline/{kind}",
            turns,
            lambda turn: system.ask("w1", user_message(turn)),
            lambda: store.bytes,
        )
        state_size = len(msgspec.msgpack.encode(result.state))
        loaded = await store.load("w1")
        assert loaded is not None
        assert len(result.state.messages) == 2 * turns
        stored = sum(map(len, await store.read_steps("w1"))) + len(loaded.full or b"")
    out = _figures("threadline", kind, turns, latencies, per_turn)
    out.update(
        state_bytes=state_size,
        stored_bytes=stored,
        store_over_state=stored / state_size,
        commits=store.commits,
        file_bytes=sqlite_files_size(path) if path else None,
        file_growth=sqlite_files_size(path) - opened if path else None,
    )
    return out


async def run_peer(kind: str, turns: int) -> dict[str, Any]:
    """Run W1 for LangGraph with ``kind`` "sqlite" (AsyncSqliteSaver) or "memory"."""
    from . import _peer

    path = temp_dir() / "w1-langgraph.db" if kind == "sqlite" else None
    if path:
        async with _peer.peer(kind, path):
            pass  # the schema alone: the baseline of the file growth
    opened = sqlite_files_size(path) if path else 0
    async with _peer.peer(kind, path) as p:
        latencies, per_turn, result = await _drive(
            f"W1 langgraph/{kind}",
            turns,
            lambda turn: p.ask("w1", user_message(turn)),
            lambda: p.bytes,
        )
        assert len(result["messages"]) == 2 * turns
        state_size = p.state_bytes(result["messages"])
        stored = p.bytes  # every checkpoint and write is kept
        commits = p.commits
    out = _figures("langgraph", kind, turns, latencies, per_turn)
    out.update(
        state_bytes=state_size,
        stored_bytes=stored,
        store_over_state=stored / state_size,
        commits=commits,
        file_bytes=sqlite_files_size(path) if path else None,
        file_growth=sqlite_files_size(path) - opened if path else None,
    )
    return out
