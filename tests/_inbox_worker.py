"""A process that tells and gets killed (run as a script by tests/test_inbox.py).

    python tests/_inbox_worker.py STORE N THREADS

Opens an ActorSystem on STORE (a SQLite path or ``redis://host:port/0#prefix``)
whose model never answers, tells N messages (``m00``, ``m01``, ...; message i
goes to thread ``t{i % THREADS}``, each thread's messages one after another,
the threads at once) and prints ``THREAD MESSAGE_ID`` as each ``tell`` returns.
Then it waits to be killed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import anyio
import structlog

from threadline.persistence import RedisSnapshotStore, SnapshotStore, SqliteSnapshotStore
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel


def open_store(spec: str) -> SnapshotStore:
    if spec.startswith("redis://"):
        url, _, prefix = spec.partition("#")
        return RedisSnapshotStore.from_url(url, prefix=prefix)
    return SqliteSnapshotStore(spec)


async def never(request: ModelRequest[Any]) -> str:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def main(spec: str, n: int, threads: int) -> None:
    async with ActorSystem(Agent(model=ScriptedModel(never)), snapshots=open_store(spec)) as system:

        async def tell_all(t: int) -> None:
            for i in range(t, n, threads):
                thread_id = f"t{t}"
                message_id = await system.tell(thread_id, f"msg {i}", message_id=f"m{i:02d}")
                print(thread_id, message_id, flush=True)
                await anyio.sleep(0.01)  # so that a kill lands in the middle

        async with anyio.create_task_group() as tg:
            for t in range(threads):
                tg.start_soon(tell_all, t)
        await anyio.sleep_forever()


if __name__ == "__main__":
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
