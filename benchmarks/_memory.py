"""Memory: resident memory per live idle thread, in a fresh process.

The child (``python -m benchmarks._memory child N PATH``) opens an
``ActorSystem`` on a SQLite file (so the records live on disk, not in the
process) with passivation off, warms up with a few hundred threads (every
code path has run, the allocator has its pools), then measures RSS (from
``/proc/self/statm``: no extra package; after ``gc.collect()``), activates N
more threads with one short message each (1,000 turns in flight at a time)
and measures RSS again. Every one of those threads stays live and idle in
memory: its state (the message and the 200-character reply) and its actor.

Reported per thread: the RSS delta, the state (msgpack-encoded size of
``TurnResult.state``, i.e. what the actor holds, in its most compact form),
and the RSS delta minus that state size: what a live idle thread costs
beyond its state (actor, mailbox, journal handle, the Python objects around
the state's data; SQLite's page cache is bounded, so it spreads to nothing).
Also reported: the state's size as Python objects (``sys.getsizeof`` over
the objects it reaches), and the RSS delta minus that.

Every thread gets its own message text (``hello <n>``) and its own copy of
the 200-character reply, as with a real model: shared string objects would
make the states look cheaper in memory than they are.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from threadline.actors import AIMessage
from threadline.runtime import ModelRequest

from ._common import REPLY, Progress, quiet_logs, rss_bytes, temp_dir

ROOT = Path(__file__).resolve().parent.parent
WARM = 500
CHUNK = 1000


class FreshReplyModel:
    """FakeModel's reply, as a new string object each time (as a real model's would be)."""

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        return AIMessage("".join(REPLY))


def python_size(root: object) -> int:
    """Bytes of the Python objects reachable from ``root`` (each counted once)."""
    seen: set[int] = set()
    stack = [root]
    size = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type) or obj is None:
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return size


async def run(threads: int) -> dict[str, Any]:
    path = temp_dir() / "memory.db"
    proc = await anyio.run_process(
        [sys.executable, "-m", "benchmarks._memory", "child", str(threads), str(path)],
        cwd=ROOT,
        check=False,
        stderr=None,  # the child's progress goes straight to ours
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child exited with {proc.returncode}")
    figures: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    figures.update(workload="memory", system="threadline", store="sqlite")
    return figures


async def _child(threads: int, path: str) -> dict[str, Any]:
    from threadline.persistence import SqliteSnapshotStore
    from threadline.runtime import ActorSystem, Agent

    rss_bytes()  # fails here, before any work, where there is no /proc/self/statm
    encoder = msgspec.msgpack.Encoder()
    store = SqliteSnapshotStore(path, synchronous="FULL")
    system: ActorSystem[Any] = ActorSystem(
        Agent(model=FreshReplyModel()), snapshots=store, passivate_after=1e9
    )
    totals = {"msgpack": 0, "python": 0, "threads": 0}
    async with system:

        async def activate(first: int, count: int, measure: bool) -> None:
            async def one(i: int) -> None:
                result = await system.ask(f"m-{i}", f"hello {i}")
                if measure:
                    totals["msgpack"] += len(encoder.encode(result.state))
                    totals["python"] += python_size(result.state)
                    totals["threads"] += 1

            async with anyio.create_task_group() as tg:
                for i in range(first, first + count):
                    tg.start_soon(one, i)

        await activate(0, WARM, measure=False)
        await anyio.sleep(0.05)
        gc.collect()
        rss0 = rss_bytes()
        progress = Progress("memory: activating threads", threads)
        start = time.perf_counter()
        for first in range(WARM, WARM + threads, CHUNK):
            count = min(CHUNK, WARM + threads - first)
            await activate(first, count, measure=True)
            progress.step(count)
        elapsed = time.perf_counter() - start
        await anyio.sleep(0.05)
        gc.collect()
        rss1 = rss_bytes()
        live = system.live_threads
    assert live == WARM + threads, live
    assert totals["threads"] == threads
    delta = rss1 - rss0
    return {
        "threads": threads,
        "live_threads": live,
        "rss_before": rss0,
        "rss_after": rss1,
        "rss_per_thread": delta / threads,
        "state_bytes_per_thread": totals["msgpack"] / threads,
        "beyond_state_per_thread": (delta - totals["msgpack"]) / threads,
        "state_python_bytes_per_thread": totals["python"] / threads,
        "beyond_python_state_per_thread": (delta - totals["python"]) / threads,
        "activation_seconds": elapsed,
        "activations_per_s": threads / elapsed,
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("usage: python -m benchmarks._memory child THREADS PATH")
    quiet_logs()
    print(json.dumps(anyio.run(_child, int(sys.argv[2]), sys.argv[3])))
