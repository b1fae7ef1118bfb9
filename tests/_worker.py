"""A separate process for the crash and race tests (run as a script).

    python tests/_worker.py crash  STORE THREAD MARKER   # hangs in the tools step
    python tests/_worker.py resume STORE THREAD         # sends "after", prints the result
    python tests/_worker.py race   STORE THREAD TAG N START  # N asks from time START
    python tests/_worker.py crashloop STORE THREAD LOG MAX_RESUMES  # its tool kills it

STORE is a path (SQLite) or ``redis://host:port/0#prefix``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from threadline.actors import AIMessage, HumanMessage, PersistenceError, ToolCall, ToolMessage
from threadline.persistence import RedisSnapshotStore, SnapshotStore, SqliteSnapshotStore
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel


def open_store(spec: str) -> SnapshotStore:
    if spec.startswith("redis://"):
        url, _, prefix = spec.partition("#")
        return RedisSnapshotStore.from_url(url, prefix=prefix)
    return SqliteSnapshotStore(spec)


def script(request: ModelRequest[Any]) -> AIMessage | str:
    """Deterministic from the conversation, so a resumed turn answers the same."""
    last = request.messages[-1]
    if isinstance(last, HumanMessage) and last.content.startswith("tool"):
        return AIMessage("", tool_calls=[ToolCall(id=f"call-{last.id}", name="work", args={})])
    if isinstance(last, ToolMessage):
        return f"tool said {last.content}"
    return f"reply to {last.content}"


def make_agent(marker: Path | None, log: Path | None, *, lethal: bool = False) -> Agent[Any]:
    async def work() -> str:
        """Does the work (and records that it ran)."""
        if log is not None:
            with log.open("a") as f:
                f.write(f"{os.getpid()}\n")
        if lethal:
            os._exit(3)  # the process dies inside the tool, every time
        if marker is not None:
            marker.write_text("in tools")
            await anyio.sleep_forever()
        return "worked"

    return Agent(model=ScriptedModel(script), tools=[work])


async def main(argv: list[str]) -> None:
    mode, spec, thread = argv[0], argv[1], argv[2]
    store = open_store(spec)
    if mode == "crash":
        marker = Path(argv[3])
        async with ActorSystem(
            make_agent(marker, marker.with_suffix(".log")), snapshots=store
        ) as system:
            await system.ask(thread, "tool please")
    elif mode == "resume":
        log = Path(argv[3]) if len(argv) > 3 else None
        async with ActorSystem(make_agent(None, log), snapshots=store) as system:
            result = await system.ask(thread, "after")
            print(json.dumps({"version": result.version, "text": result.text}))
    elif mode == "crashloop":
        # Tells a tool turn (first run) or asks "after" (later runs: recovery
        # resumes the parked turn first); the tool kills the process.
        log, max_resumes = Path(argv[3]), int(argv[4])
        agent = make_agent(None, log, lethal=True)
        async with ActorSystem(agent, snapshots=store, max_resumes=max_resumes) as system:
            if not log.exists():
                await system.tell(thread, "tool please")
                await anyio.sleep_forever()
            result = await system.ask(thread, "after")
            print(json.dumps({"version": result.version, "text": result.text}))
    elif mode == "race":
        tag, n, start = argv[3], int(argv[4]), float(argv[5])
        outcomes: dict[str, str] = {}
        async with ActorSystem(make_agent(None, None), snapshots=store) as system:
            await anyio.sleep(max(0.0, start - time.time()))  # both processes start together
            for i in range(n):
                message_id = f"{tag}-{i}"
                try:
                    await system.ask(thread, f"{tag} {i}", message_id=message_id)
                    outcomes[message_id] = "ok"
                except PersistenceError as exc:
                    outcomes[message_id] = type(exc).__name__
        print(json.dumps(outcomes))


if __name__ == "__main__":
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    anyio.run(main, sys.argv[1:])
