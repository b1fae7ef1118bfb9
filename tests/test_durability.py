"""Durability: crash and resume, fencing, corruption, replay, with real stores and processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from threadline.actors import (
    AIMessage,
    FencedError,
    HumanMessage,
    SnapshotCorruptError,
    SnapshotFormatError,
    ToolMessage,
)
from threadline.persistence import FORMAT_VERSION, SnapshotStore
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel

from ._worker import make_agent

WORKER = str(Path(__file__).with_name("_worker.py"))

pytestmark = pytest.mark.anyio


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


def store_spec(kind: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str) -> str:
    if kind == "sqlite":
        return str(tmp_path / "threads.db")
    server = request.getfixturevalue("redis_server")
    return f"{server.url}#{prefix}"


def run_worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout, check=True
    )


PROCESS_KINDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_sigkill_between_steps_then_a_new_process_finishes_the_turn_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    spec = store_spec(kind, tmp_path, request, redis_prefix)
    marker = tmp_path / "marker"
    tool_log = marker.with_suffix(".log")
    child = subprocess.Popen(
        [sys.executable, WORKER, "crash", spec, "thread-1", str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline, "the worker never reached its tools step"
            time.sleep(0.02)
        # Input and model steps are committed; the tools step is running.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL

    out = run_worker("resume", spec, "thread-1", str(tool_log))
    result = json.loads(out.stdout)
    assert result["text"] == "reply to after"
    # input, model, (crash) resume, tools, model (the resumed turn), input, model
    assert result["version"] == 7

    async def check() -> None:
        from ._worker import open_store

        async with ActorSystem(make_agent(None, None), snapshots=open_store(spec)) as system:
            snapshot = await system.get_state("thread-1")
            messages = snapshot.state.messages
            assert [m.type for m in messages] == ["human", "ai", "tool", "ai", "human", "ai"]
            call = messages[1]
            assert isinstance(call, AIMessage)
            answers = [m for m in messages if isinstance(m, ToolMessage)]
            assert [m.tool_call_id for m in answers] == [call.tool_calls[0].id]
            assert messages[3].content == "tool said worked"
            kinds = [s.kind for s in await system.history("thread-1")]
            assert kinds == ["input", "model", "resumed", "tools", "model", "input", "model"]

    anyio.run(check)
    # The tool ran once in the killed process (uncommitted) and once on resume.
    assert len(tool_log.read_text().split()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_turn_that_kills_its_process_at_every_start_is_aborted_after_max_resumes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    """Without the resume count, recovery resumes the turn at every start and its
    tool kills the process again: the thread (and the start) never get past it."""
    spec = store_spec(kind, tmp_path, request, redis_prefix)
    log = tmp_path / "tool.log"
    codes = []
    for _ in range(3):  # the first run, then two resumes
        done = subprocess.run(
            [sys.executable, WORKER, "crashloop", spec, "t", str(log), "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        codes.append(done.returncode)
    assert codes == [3, 3, 3], codes
    out = run_worker("crashloop", spec, "t", str(log), "2")  # aborts the turn, then serves
    result = json.loads(out.stdout)
    assert result["text"] == "reply to after"
    assert len(log.read_text().split()) == 3  # the tool ran three times, not a fourth

    async def check() -> None:
        from ._worker import open_store

        async with ActorSystem(make_agent(None, None), snapshots=open_store(spec)) as system:
            history = await system.history("t")
        kinds = [s.kind for s in history]
        assert kinds == ["input", "model", "resumed", "resumed", "abort", "input", "model"]
        assert [s.turn.resumes for s in history[2:4] if s.turn is not None] == [1, 2]
        error = history[4].error or ""
        assert "resumed 2 times at step 'tools'" in error and "max_resumes 2" in error

    anyio.run(check)


@pytest.mark.slow
@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_two_processes_racing_for_one_thread_never_fork_it(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    spec = store_spec(kind, tmp_path, request, redis_prefix)
    start = str(time.time() + 3)
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "race", spec, "shared", tag, "40", start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    outcomes: dict[str, str] = {}
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr
            outcomes.update(json.loads(stdout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert len(outcomes) == 80
    assert set(outcomes.values()) <= {"ok", "FencedError", "ConflictError"}

    async def check() -> None:
        from ._worker import open_store

        async with ActorSystem(make_agent(None, None), snapshots=open_store(spec)) as system:
            history = await system.history("shared")
            snapshot = await system.get_state("shared")
        assert [s.version for s in history] == list(range(1, len(history) + 1))
        messages = snapshot.state.messages
        humans = [m.content for m in messages if isinstance(m, HumanMessage)]
        # No message applied twice, every acknowledged one applied, each answered once.
        assert len(humans) == len(set(humans))
        for message_id, outcome in outcomes.items():
            if outcome == "ok":
                assert message_id.replace("-", " ") in humans
        assert [m.type for m in messages] == ["human", "ai"] * len(humans)
        for human, ai in zip(messages[::2], messages[1::2], strict=True):
            assert ai.content == f"reply to {human.content}"
        assert sum(s.kind == "input" for s in history) == len(humans)
        assert snapshot.next is None

    anyio.run(check)


async def test_a_second_owner_fences_the_first(store_kind: str, open_store: Any) -> None:
    agent = Agent(model=ScriptedModel(echo))
    async with (
        ActorSystem(agent, snapshots=open_store(store_kind)) as first,
        ActorSystem(agent, snapshots=open_store(store_kind)) as second,
    ):
        await first.ask("t", "one")
        await second.ask("t", "two")  # takes ownership: a newer epoch
        with pytest.raises(FencedError):
            await first.ask("t", "three")
        # The fenced actor re-acquires for its next message: history never forks.
        result = await first.ask("t", "four")
        assert [m.content for m in result.messages if isinstance(m, HumanMessage)] == [
            "one",
            "two",
            "four",
        ]
        history = await second.history("t")
        assert [s.version for s in history] == list(range(1, 7))


async def test_long_history_replays_identically_and_step_cost_stays_flat(
    store_kind: str, open_store: Any
) -> None:
    agent = Agent(model=ScriptedModel(echo))
    async with ActorSystem(agent, snapshots=open_store(store_kind)) as system:
        for i in range(120):
            result = await system.ask("long", f"message {i} " + "x" * 100)
        live = result.state
    store: SnapshotStore = open_store(store_kind)
    async with store:
        steps = await store.read_steps("long")
        loaded = await store.load("long")
    assert loaded is not None and loaded.full is not None
    assert loaded.version == 240
    # Only the steps after the latest full record are replayed.
    assert len(loaded.steps) < 240
    # A step record's size does not depend on how long the thread is.
    first, last = len(steps[0]), len(steps[-2])
    assert abs(last - first) <= 8
    async with ActorSystem(agent, snapshots=open_store(store_kind)) as again:
        assert (await again.get_state("long")).state == live


def flip_sqlite(path: Path, thread_id: str, table: str = "steps") -> None:
    with sqlite3.connect(path) as db:
        (record,) = db.execute(
            f"SELECT record FROM {table} WHERE thread_id = ? ORDER BY version DESC LIMIT 1",
            (thread_id,),
        ).fetchone()
        damaged = bytearray(record)
        damaged[len(damaged) // 2] ^= 0xFF
        db.execute(
            f"UPDATE {table} SET record = ? WHERE thread_id = ? AND record = ?",
            (bytes(damaged), thread_id, record),
        )


def set_format_sqlite(path: Path, thread_id: str, fmt: int) -> None:
    with sqlite3.connect(path) as db:
        (record,) = db.execute(
            "SELECT record FROM steps WHERE thread_id = ? ORDER BY version DESC LIMIT 1",
            (thread_id,),
        ).fetchone()
        db.execute(
            "UPDATE steps SET record = ? WHERE thread_id = ? AND record = ?",
            (record[:2] + bytes([fmt]) + record[3:], thread_id, record),
        )


async def test_corrupt_record_breaks_only_its_thread_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    agent = Agent(model=ScriptedModel(echo))
    async with ActorSystem(agent, snapshots=db) as system:
        for thread in ("bad", "good"):
            await system.ask(thread, "hi")
            await system.ask(thread, "again")
    flip_sqlite(db, "bad")
    before = db.read_bytes()
    async with ActorSystem(agent, snapshots=db) as system:
        with pytest.raises(SnapshotCorruptError, match="checksum"):
            await system.ask("bad", "hello?")
        with pytest.raises(SnapshotCorruptError):
            await system.get_state("bad")
        assert (await system.ask("good", "fine")).version == 6
        with pytest.raises(SnapshotCorruptError):
            await system.ask("bad", "still broken, never overwritten")
        # The damaged thread's records are left as they are for inspection/repair.
        with sqlite3.connect(db) as conn:
            assert conn.execute(
                "SELECT max(version) FROM steps WHERE thread_id = 'bad'"
            ).fetchone() == (4,)
        # Deleting it is the way out, and it works without loading it.
        assert await system.delete("bad") is True
        assert (await system.ask("bad", "fresh")).version == 2
    assert before  # (the file was readable before we changed it)


async def test_record_from_a_newer_format_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    agent = Agent(model=ScriptedModel(echo))
    async with ActorSystem(agent, snapshots=db) as system:
        await system.ask("t", "hi")
        await system.ask("t", "again")
    set_format_sqlite(db, "t", FORMAT_VERSION + 1)
    async with ActorSystem(agent, snapshots=db) as system:
        with pytest.raises(SnapshotFormatError, match="upgrade threadline"):
            await system.ask("t", "hello?")


@pytest.mark.redis
async def test_corrupt_record_breaks_only_its_thread_redis(
    redis_server: Any, redis_prefix: str, open_store: Any
) -> None:
    agent = Agent(model=ScriptedModel(echo))
    async with ActorSystem(agent, snapshots=open_store("redis")) as system:
        for thread in ("bad", "good"):
            await system.ask(thread, "hi")
            await system.ask(thread, "again")
    raw = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        keys = [k for k in raw.scan_iter(match=f"{redis_prefix}*bad*") if raw.type(k) == b"list"]
        assert len(keys) == 1
        record = bytearray(raw.lindex(keys[0], -1))
        record[len(record) // 2] ^= 0xFF
        raw.lset(keys[0], -1, bytes(record))
    finally:
        raw.close()
    async with ActorSystem(agent, snapshots=open_store("redis")) as system:
        with pytest.raises(SnapshotCorruptError):
            await system.ask("bad", "hello?")
        assert (await system.ask("good", "fine")).version == 6


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    async with ActorSystem(Agent(model=ScriptedModel(echo)), snapshots=db) as system:
        await system.ask("t", "hi")
    assert os.stat(db).st_mode & 0o777 == 0o600


@pytest.mark.redis
async def test_redis_down_is_a_typed_error_and_the_thread_continues_after_restart(
    redis_server: Any, open_store: Any
) -> None:
    from threadline.actors import StoreUnavailableError

    agent = Agent(model=ScriptedModel(echo))
    async with ActorSystem(agent, snapshots=open_store("redis")) as system:
        await system.ask("t", "before")
        redis_server.kill()
        try:
            with pytest.raises(StoreUnavailableError):
                await system.ask("t", "while down", timeout=30)
        finally:
            redis_server.start()
        result = await system.ask("t", "after")
    humans = [m.content for m in result.messages if isinstance(m, HumanMessage)]
    # The failed message was never committed (its input step did not land);
    # nothing acknowledged was lost and history did not fork.
    assert humans == ["before", "after"]
    assert result.version == 4
