"""The peer: a LangGraph ``StateGraph`` doing what threadline's agent does here.

``messages: Annotated[list, add_messages]`` and one async model node that
answers with the same 200-character reply as :class:`FakeModel` (an
``AIMessage``; no network, no sleep). One step of the peer is one
``graph.ainvoke({"messages": [("user", text)]}, {"configurable": {"thread_id": ...}})``
with LangGraph's default durability (``"async"``: checkpoint writes overlap
the next step, and ``ainvoke`` returns only once every one of them is written).

Checkpointers: ``AsyncSqliteSaver`` (it sets ``PRAGMA journal_mode=WAL`` in
its ``setup``; we add ``PRAGMA synchronous=FULL`` on its connection, as our
store uses) and ``InMemorySaver`` (a reference, not durable).

Bytes written are counted the same way as threadline's ``CountingStore``:
the payloads handed to the store, here every blob the saver writes
(``serde.dumps_typed`` of checkpoints and of pending writes, plus the JSON
metadata of each checkpoint).

Import this module only when ``_common.peer_unavailable()`` returns None.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import aiosqlite
from langchain_core.messages import AIMessage
from langgraph.checkpoint.base import get_checkpoint_metadata
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from ._common import REPLY


class State(TypedDict):
    messages: Annotated[list[Any], add_messages]


async def model(state: State) -> dict[str, Any]:
    """The same deterministic 200-character reply as FakeModel."""
    return {"messages": [AIMessage(REPLY)]}


def build_graph(checkpointer: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("model", model)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder.compile(checkpointer=checkpointer)


class CountingSerde:
    """Wraps a checkpoint serializer and counts the bytes of what it encodes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes = 0

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        kind, data = self.inner.dumps_typed(obj)
        self.bytes += len(data)
        return kind, data

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self.inner.loads_typed(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _metadata_bytes(config: Any, metadata: Any) -> int:
    # What AsyncSqliteSaver.aput stores in its ``metadata`` column.
    return len(json.dumps(get_checkpoint_metadata(config, metadata), ensure_ascii=False).encode())


class CountingSqliteSaver(AsyncSqliteSaver):
    """AsyncSqliteSaver that counts blob bytes and commits (one per aput/aput_writes)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        super().__init__(conn)
        self.counter = CountingSerde(self.serde)
        self.serde = self.counter
        self.commits = 0

    @property
    def bytes(self) -> int:
        return self.counter.bytes

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        self.commits += 1
        self.counter.bytes += _metadata_bytes(config, metadata)
        return await super().aput(config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self, config: Any, writes: Any, task_id: str, task_path: str = ""
    ) -> None:
        self.commits += 1
        await super().aput_writes(config, writes, task_id, task_path)


class CountingMemorySaver(InMemorySaver):
    """InMemorySaver that counts serialized bytes and puts."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = CountingSerde(self.serde)
        self.serde = self.counter
        self.commits = 0

    @property
    def bytes(self) -> int:
        return self.counter.bytes

    def put(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        self.commits += 1
        self.counter.bytes += _metadata_bytes(config, metadata)
        return super().put(config, checkpoint, metadata, new_versions)

    def put_writes(self, config: Any, writes: Any, task_id: str, task_path: str = "") -> None:
        self.commits += 1
        super().put_writes(config, writes, task_id, task_path)


class Peer:
    """A compiled graph on one checkpointer; ``ask`` is one step."""

    def __init__(self, graph: Any, saver: Any, kind: str, path: Path | None = None) -> None:
        self.graph = graph
        self.saver = saver
        self.kind = kind
        self.path = path

    @property
    def bytes(self) -> int:
        return int(self.saver.bytes)

    @property
    def commits(self) -> int:
        return int(self.saver.commits)

    async def ask(self, thread_id: str, text: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.graph.ainvoke(
            {"messages": [("user", text)]}, {"configurable": {"thread_id": thread_id}}
        )
        return result

    async def get_state(self, thread_id: str) -> Any:
        return await self.graph.aget_state({"configurable": {"thread_id": thread_id}})

    def state_bytes(self, messages: list[Any]) -> int:
        """Serialized size of a message list with the saver's own serializer."""
        return len(self.saver.counter.inner.dumps_typed(messages)[1])


async def open_sqlite_saver(conn: aiosqlite.Connection) -> CountingSqliteSaver:
    saver = CountingSqliteSaver(conn)
    await saver.setup()  # PRAGMA journal_mode=WAL and the tables
    await conn.execute("PRAGMA synchronous=FULL")
    mode = (await (await conn.execute("PRAGMA journal_mode")).fetchone() or ("?",))[0]
    sync = (await (await conn.execute("PRAGMA synchronous")).fetchone() or (-1,))[0]
    if str(mode).lower() != "wal" or int(sync) != 2:
        raise RuntimeError(f"AsyncSqliteSaver connection is journal_mode={mode} synchronous={sync}")
    return saver


@contextlib.asynccontextmanager
async def peer(kind: str, path: Path | None = None) -> AsyncIterator[Peer]:
    """``kind`` is ``"sqlite"`` (AsyncSqliteSaver on ``path``) or ``"memory"``."""
    if kind == "memory":
        saver: Any = CountingMemorySaver()
        yield Peer(build_graph(saver), saver, kind)
        return
    assert path is not None
    async with aiosqlite.connect(path) as conn:
        saver = await open_sqlite_saver(conn)
        yield Peer(build_graph(saver), saver, kind, path)


def versions() -> dict[str, str]:
    out = {}
    for dist in ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out
