"""W1 history growth: one thread, N turns; per-turn latency and bytes must stay flat."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
from threadline.persistence import RedisSnapshotStore, SqliteSnapshotStore
from threadline.runtime import ActorSystem, Agent

from ._common import CountingStore, FakeModel, median_window, temp_dir, user_message

CHECKPOINTS = (1, 50, 100, 250, 500)


async def run(kind: str, turns: int, *, redis_url: str | None = None) -> dict[str, Any]:
    """Run W1 on ``kind`` ("sqlite" or "redis"); figures per checkpoint turn."""
    directory: Path | None = None
    if kind == "sqlite":
        directory = temp_dir()
        inner: Any = SqliteSnapshotStore(directory / "w1.db")  # synchronous=FULL
    else:
        assert redis_url is not None
        inner = RedisSnapshotStore.from_url(redis_url, prefix=f"w1-{time.time_ns()}")
    store = CountingStore(inner)
    latencies: list[float] = []
    written: list[float] = []
    async with ActorSystem(Agent(model=FakeModel()), snapshots=store) as system:
        for turn in range(1, turns + 1):
            before, start = store.bytes, time.perf_counter()
            result = await system.ask("w1", user_message(turn))
            latencies.append(time.perf_counter() - start)
            written.append(store.bytes - before)
        state_size = len(msgspec.msgpack.encode(result.state))
        loaded = await store.load("w1")
        assert loaded is not None
        stored = sum(map(len, await store.read_steps("w1"))) + len(loaded.full or b"")
    checkpoints = [t for t in CHECKPOINTS if t <= turns] or [turns]
    rows = [
        {
            "turn": t,
            "latency_ms": median_window(latencies, t) * 1000,
            "bytes": median_window(written, t),
        }
        for t in checkpoints
    ]
    return {
        "workload": "W1 history growth",
        "store": kind,
        "turns": turns,
        "checkpoints": rows,
        "latency_ratio": rows[-1]["latency_ms"] / rows[0]["latency_ms"],
        "bytes_ratio": rows[-1]["bytes"] / rows[0]["bytes"],
        "state_bytes": state_size,
        "stored_record_bytes": stored,
        "store_over_state": stored / state_size,
        "sqlite_file_bytes": _sqlite_size(directory) if directory else None,
    }


def _sqlite_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())
