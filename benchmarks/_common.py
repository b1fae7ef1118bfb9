"""Shared pieces: a private redis-server, a byte-counting store, tables, fake model,
progress on stderr, percentiles."""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import logging
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
import structlog

from threadline.actors import AIMessage
from threadline.persistence import (
    CommitRequest,
    DeadLetter,
    InboxEntry,
    RecoverableThread,
    SnapshotStore,
    StoredThread,
    StoredVersion,
)
from threadline.runtime import ModelRequest

REPLY = ("The quick brown fox jumps over the lazy dog. " * 5)[:200]
USER = ("Please tell me something interesting about foxes and dogs. " * 4)[:200]


def user_message(turn: int) -> str:
    """A 200-character user message that differs per turn."""
    return (f"[{turn}] " + USER)[:200]


class FakeModel:
    """No network, no sleep: a deterministic 200-character reply."""

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        return AIMessage(REPLY)


class CountingStore:
    """Wraps a snapshot store and counts the record bytes it is asked to commit."""

    def __init__(self, inner: SnapshotStore) -> None:
        self.inner = inner
        self.bytes = 0
        self.commits = 0

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.inner.__aexit__(et, e, tb)

    async def commit(self, request: CommitRequest) -> None:
        self.bytes += len(request.step) + len(request.full or b"")
        self.commits += 1
        await self.inner.commit(request)

    async def acquire(self, thread_id: str) -> int:
        return await self.inner.acquire(thread_id)

    async def load(self, thread_id: str) -> StoredThread | None:
        return await self.inner.load(thread_id)

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        return await self.inner.read_steps(thread_id, start, stop)

    async def read_steps_before(
        self, thread_id: str, before: int | None, limit: int
    ) -> list[bytes]:
        return await self.inner.read_steps_before(thread_id, before, limit)

    async def load_at(self, thread_id: str, version: int) -> StoredVersion | None:
        return await self.inner.load_at(thread_id, version)

    async def threads(self) -> list[str]:
        return await self.inner.threads()

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        return await self.inner.delete(thread_id, epoch=epoch)

    async def enqueue(self, thread_id: str, message_id: str, envelope: bytes) -> None:
        await self.inner.enqueue(thread_id, message_id, envelope)

    async def pending(self, thread_id: str) -> list[InboxEntry]:
        return await self.inner.pending(thread_id)

    async def dequeue(self, thread_id: str, message_id: str) -> bool:
        return await self.inner.dequeue(thread_id, message_id)

    async def dead_letter(self, thread_id: str, message_id: str, reason: str) -> bool:
        return await self.inner.dead_letter(thread_id, message_id, reason)

    async def dead_letters(self, thread_id: str) -> list[DeadLetter]:
        return await self.inner.dead_letters(thread_id)

    async def recoverable_threads(self) -> list[RecoverableThread]:
        return await self.inner.recoverable_threads()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(url: str | None = None) -> Iterator[str]:
    """A private redis-server (append-only, fsync always) unless ``url`` is given."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: install it or pass --redis-url")
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(500):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.01)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def median_window(values: Sequence[float], turn: int, half: int = 4) -> float:
    """Median of the values of turns ``turn-half .. turn+half`` (1-based, clipped)."""
    lo, hi = max(1, turn - half), min(len(values), turn + half)
    return statistics.median(values[lo - 1 : hi])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in cells[1:]]
    )


_TEMP_DIRS: list[Path] = []


def temp_dir() -> Path:
    """A new temporary directory; ``remove_temp_dirs`` deletes every one made so far."""
    path = Path(tempfile.mkdtemp(prefix="threadline-bench-"))
    _TEMP_DIRS.append(path)
    return path


def remove_temp_dirs() -> None:
    """Delete the directories ``temp_dir`` made (the peer's W1 file alone is ~300 MB)."""
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100, nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def sqlite_files_size(path: Path) -> int:
    """Bytes of a SQLite database and its ``-wal``/``-shm`` files (those that exist)."""
    return sum(
        p.stat().st_size
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
        if p.exists()
    )


class Progress:
    """Reports ``label: 30% (n/total) 1.2 s`` on stderr at every 10% of ``total``
    (from ``quiet_for`` seconds on: short loops stay silent)."""

    quiet_for = 1.0

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._next = 1
        self._start = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        tenth = self.done * 10 // self.total
        if tenth >= self._next:
            self._next = tenth + 1
            elapsed = time.perf_counter() - self._start
            if elapsed < self.quiet_for:
                return
            percent = min(tenth, 10) * 10
            note(f"  {self.label}: {percent}% ({self.done}/{self.total}) {elapsed:.1f} s")


def note(text: str) -> None:
    """A progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


PEER_MODULES = ("langgraph.graph", "langgraph.checkpoint.sqlite.aio", "langchain_core.messages")


def peer_unavailable() -> str | None:
    """Why the LangGraph peer cannot run here (None if it can)."""
    try:
        for name in PEER_MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        return f"langgraph is not importable ({exc}); install it with pip install -e '.[bench]'"
    return None


def peer_redis_status(url: str) -> str:
    """Why LangGraph's Redis checkpointer is not in the tables, checked on the server."""
    client = redis.Redis.from_url(url)
    try:
        version = client.info("server").get("redis_version", "?")
        try:
            modules = sorted(str(m.get(b"name", m.get("name", "?"))) for m in client.module_list())
        except redis.ResponseError:
            modules = []
    finally:
        client.close()
    try:
        installed = importlib.util.find_spec("langgraph.checkpoint.redis") is not None
    except ImportError:  # langgraph itself does not import
        installed = False
    return (
        "not run: LangGraph's Redis checkpointer (langgraph-checkpoint-redis) needs the "
        f"RediSearch and RedisJSON modules; this redis-server {version} has "
        f"{', '.join(modules) if modules else 'no modules'} loaded"
        f" (langgraph-checkpoint-redis {'installed' if installed else 'not installed'})"
    )


STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    """This process's resident set size now, in bytes, from ``/proc/self/statm`` (Linux).

    The second field is resident pages; this is what ``psutil.Process().memory_info().rss``
    reads on Linux, without the extra package.
    """
    try:
        resident_pages = int(STATM.read_text().split()[1])
    except FileNotFoundError:
        raise RuntimeError(
            f"the memory workload reads resident memory from {STATM}, "
            "which this system does not have (Linux only)"
        ) from None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def quiet_logs() -> None:
    """Only warnings and errors from threadline's structlog loggers, on stderr."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


class GcMonitor:
    """Time spent in the cyclic garbage collector while the block runs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.longest = 0.0
        self.collections = 0
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.seconds += pause
            self.longest = max(self.longest, pause)
            self.collections += 1

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def figures(self) -> dict[str, float]:
        return {
            "gc_seconds": self.seconds,
            "gc_longest_ms": self.longest * 1000,
            "gc_collections": self.collections,
        }


@contextlib.contextmanager
def fresh_heap() -> Iterator[None]:
    """Collect, then freeze what is alive (imports, earlier workloads' leftovers) for
    the block: the collector's pauses in a measured run then come from that run's own
    objects only, whichever system ran before it in this process."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
