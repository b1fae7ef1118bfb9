"""W3 rehydration: load a long thread in a fresh process and run one more turn.

The parent builds one thread of N turns, then starts ``python -m
benchmarks._rehydrate child ...`` (a fresh interpreter: nothing of the thread
in memory, only the OS page cache is warm) several times. The child times,
after its imports:

* ``open``: the store or checkpointer (connect, schema check);
* ``load`` (the cold load): threadline ``await system.get_state(tid)`` in a
  fresh ``ActorSystem``; LangGraph ``await graph.aget_state(config)``;
* ``turn``: the next turn, threadline ``ask`` (which activates the actor:
  takes ownership, loads and replays, then two durable steps); LangGraph
  ``ainvoke``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from ._common import FakeModel, Progress, quiet_logs, temp_dir, user_message

ROOT = Path(__file__).resolve().parent.parent
THREAD = "w3"


async def _build_ours(store: Any, turns: int) -> None:
    from threadline.runtime import ActorSystem, Agent

    progress = Progress("W3 build threadline thread", turns)
    async with ActorSystem[Any](Agent(model=FakeModel()), snapshots=store) as system:
        for turn in range(1, turns + 1):
            await system.ask(THREAD, user_message(turn))
            progress.step()


async def _children(args: list[str], reps: int) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        proc = await anyio.run_process(
            [sys.executable, "-m", "benchmarks._rehydrate", "child", *args], cwd=ROOT, check=False
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"W3 child {args} failed:\n{proc.stderr.decode(errors='replace')}")
        run = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        run["process_ms"] = wall * 1000
        runs.append(run)
    return {
        key: statistics.median(r[key] for r in runs)
        for key in ("open_ms", "load_ms", "turn_ms", "process_ms")
    } | {"runs": runs, "reps": reps}


async def run(kind: str, turns: int, reps: int, *, redis_url: str | None = None) -> dict[str, Any]:
    """W3 for threadline on ``kind`` ("sqlite" or "redis")."""
    from threadline.persistence import RedisSnapshotStore, SqliteSnapshotStore

    if kind == "sqlite":
        path = temp_dir() / "w3.db"
        await _build_ours(SqliteSnapshotStore(path, synchronous="FULL"), turns)
        args = ["threadline", "sqlite", str(path)]
    else:
        assert redis_url is not None
        prefix = f"w3-{time.time_ns()}"
        await _build_ours(RedisSnapshotStore.from_url(redis_url, prefix=prefix), turns)
        args = ["threadline", "redis", redis_url, prefix]
    out = await _children([*args, str(2 * turns)], reps)
    out.update(workload="W3 rehydration", system="threadline", store=kind, turns=turns)
    return out


async def run_peer(turns: int, reps: int) -> dict[str, Any]:
    """W3 for LangGraph on AsyncSqliteSaver."""
    from . import _peer

    path = temp_dir() / "w3-langgraph.db"
    progress = Progress("W3 build langgraph thread", turns)
    async with _peer.peer("sqlite", path) as p:
        for turn in range(1, turns + 1):
            await p.ask(THREAD, user_message(turn))
            progress.step()
    out = await _children(["langgraph", "sqlite", str(path), str(2 * turns)], reps)
    out.update(workload="W3 rehydration", system="langgraph", store="sqlite", turns=turns)
    return out


# -- the child -----------------------------------------------------------------


async def _child_ours(kind: str, target: str, prefix: str | None, messages: int) -> dict[str, Any]:
    from threadline.persistence import RedisSnapshotStore, SqliteSnapshotStore
    from threadline.runtime import ActorSystem, Agent

    t0 = time.perf_counter()
    store: Any = (
        SqliteSnapshotStore(target, synchronous="FULL")
        if kind == "sqlite"
        else RedisSnapshotStore.from_url(target, prefix=prefix or "")
    )
    async with ActorSystem[Any](Agent(model=FakeModel()), snapshots=store) as system:
        t1 = time.perf_counter()
        snapshot = await system.get_state(THREAD)
        t2 = time.perf_counter()
        result = await system.ask(THREAD, user_message(0))
        t3 = time.perf_counter()
    assert len(snapshot.state.messages) >= messages, len(snapshot.state.messages)
    assert len(result.state.messages) == len(snapshot.state.messages) + 2
    return {"open_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "turn_ms": (t3 - t2) * 1e3}


async def _child_peer(path: str, messages: int) -> dict[str, Any]:
    import aiosqlite

    from . import _peer

    config = {"configurable": {"thread_id": THREAD}}
    t0 = time.perf_counter()
    async with aiosqlite.connect(path) as conn:
        graph = _peer.build_graph(await _peer.open_sqlite_saver(conn))
        t1 = time.perf_counter()
        snapshot = await graph.aget_state(config)
        t2 = time.perf_counter()
        result = await graph.ainvoke({"messages": [("user", user_message(0))]}, config)
        t3 = time.perf_counter()
    assert len(snapshot.values["messages"]) >= messages, len(snapshot.values["messages"])
    assert len(result["messages"]) == len(snapshot.values["messages"]) + 2
    return {"open_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "turn_ms": (t3 - t2) * 1e3}


def _child(argv: list[str]) -> None:
    quiet_logs()
    system, kind, target, *rest = argv
    messages = int(rest[-1])
    if system == "threadline":
        prefix = rest[0] if kind == "redis" else None
        figures = anyio.run(_child_ours, kind, target, prefix, messages)
    else:
        figures = anyio.run(_child_peer, target, messages)
    print(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("usage: python -m benchmarks._rehydrate child SYSTEM KIND TARGET ...")
    _child(sys.argv[2:])
