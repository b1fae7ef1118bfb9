"""The durable inbox: an acknowledged ``tell`` is never lost, parked turns resume.

Real SQLite files and a real redis-server; the crash tests SIGKILL a child
process (``tests/_inbox_worker.py``) in the middle of its tells.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from threadline.actors import HumanMessage
from threadline.actors._api import Envelope
from threadline.persistence import SnapshotStore, encode_envelope
from threadline.persistence._codec import frame
from threadline.persistence._inbox import ENVELOPE
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel

from ._inbox_worker import open_store

WORKER = str(Path(__file__).with_name("_inbox_worker.py"))
PROCESS_KINDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]

pytestmark = pytest.mark.anyio

OpenStore = Callable[..., SnapshotStore]


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


def fast_agent() -> Agent[Any]:
    return Agent(model=ScriptedModel(echo))


def store_spec(kind: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str) -> str:
    if kind == "sqlite":
        return str(tmp_path / "threads.db")
    server = request.getfixturevalue("redis_server")
    return f"{server.url}#{prefix}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Poll ``check`` until it holds (bounded)."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.01)


async def consumed(system: ActorSystem[Any], thread_id: str) -> list[str]:
    """The ids consumed by the thread's input steps, in commit order."""
    return [s.consumed for s in await system.history(thread_id) if s.consumed is not None]


def tell_and_kill(spec: str, n: int, threads: int, kill_after: int) -> dict[str, list[str]]:
    """Run the worker, SIGKILL it after ``kill_after`` acknowledgements; every
    id it printed (acknowledged), per thread, in the order told."""
    child = subprocess.Popen(
        [sys.executable, WORKER, spec, str(n), str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: dict[str, list[str]] = {}
    count = 0
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while count < kill_after:
            line = child.stdout.readline()
            assert line, f"the worker ended early: {child.communicate()[1]}"
            thread_id, message_id = line.split()
            acked.setdefault(thread_id, []).append(message_id)
            count += 1
            assert time.monotonic() < deadline, "the worker is too slow"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        rest, _ = child.communicate()  # printed before the kill: acknowledged too
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == -signal.SIGKILL
    for line in rest.splitlines():
        thread_id, message_id = line.split()
        acked.setdefault(thread_id, []).append(message_id)
    assert sum(map(len, acked.values())) < n, "the kill landed after every tell"
    return acked


def told_order(thread_id: str, n: int, threads: int) -> list[str]:
    t = int(thread_id[1:])
    return [f"m{i:02d}" for i in range(t, n, threads)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_every_acknowledged_tell_survives_a_sigkill(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    spec = store_spec(kind, tmp_path, request, redis_prefix)
    n, threads = 50, 3
    acked = tell_and_kill(spec, n, threads, kill_after=20)
    assert set(acked) == {f"t{t}" for t in range(threads)}

    async def check() -> None:
        async with ActorSystem(fast_agent(), snapshots=open_store(spec)) as system:
            # Sent right after the start: must come after what was told before.
            for thread_id in acked:
                await system.tell(thread_id, "after the restart", message_id=f"{thread_id}-after")

            async def done() -> bool:
                for thread_id in acked:
                    ids = await consumed(system, thread_id)
                    if f"{thread_id}-after" not in ids:
                        return False
                    if (await system.get_state(thread_id)).next is not None:
                        return False
                return True

            await eventually(done)
            for thread_id, acks in acked.items():
                ids = await consumed(system, thread_id)
                assert len(ids) == len(set(ids)), ids  # each exactly once
                assert ids[-1] == f"{thread_id}-after"
                # In tell order: the ids consumed are a prefix of what was told
                # (tells the kill interrupted after their write may be there too),
                # and every acknowledged one is among them.
                assert ids[:-1] == told_order(thread_id, n, threads)[: len(ids) - 1]
                assert set(acks) <= set(ids), (thread_id, acks, ids)
                # The thread's first message was parked in its model step when
                # the worker died: that turn resumed and ended too.
                state = await system.get_state(thread_id)
                humans = [m for m in state.state.messages if isinstance(m, HumanMessage)]
                assert len(state.state.messages) == 2 * len(humans)
                assert await system.snapshots.pending(thread_id) == []
            assert await system.snapshots.recoverable_threads() == []

    anyio.run(check)


@pytest.mark.slow
@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_retrying_tells_after_a_sigkill_applies_each_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    spec = store_spec(kind, tmp_path, request, redis_prefix)
    n, threads = 30, 2
    acked = tell_and_kill(spec, n, threads, kill_after=10)

    async def check() -> None:
        async with ActorSystem(fast_agent(), snapshots=open_store(spec)) as system:
            # The sender does not know what got through: it tells everything
            # again, with the same ids (some are still in the inbox, some were
            # consumed, some never arrived).
            async def retry(t: int) -> None:
                for i in range(t, n, threads):
                    await system.tell(f"t{t}", f"msg {i}", message_id=f"m{i:02d}")

            async with anyio.create_task_group() as tg:
                for t in range(threads):
                    tg.start_soon(retry, t)

            async def done() -> bool:
                for t in range(threads):
                    thread_id = f"t{t}"
                    if len(set(await consumed(system, thread_id))) < len(
                        told_order(thread_id, n, threads)
                    ):
                        return False
                    if await system.snapshots.pending(thread_id):
                        return False
                    if (await system.get_state(thread_id)).next is not None:
                        return False
                return True

            await eventually(done)
            for t in range(threads):
                thread_id = f"t{t}"
                ids = await consumed(system, thread_id)
                assert ids == told_order(thread_id, n, threads)  # each once, in order
                assert set(acked[thread_id]) <= set(ids)
            assert await system.snapshots.recoverable_threads() == []

    anyio.run(check)


# -- in one process -----------------------------------------------------------------


def blocked_agent(started: anyio.Event | None = None) -> Agent[Any]:
    async def never(request: ModelRequest[Any]) -> str:
        if started is not None:
            started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return Agent(model=ScriptedModel(never))


async def test_a_turn_parked_by_the_shutdown_timeout_resumes_on_restart(
    store_kind: str, open_store: OpenStore
) -> None:
    store = open_store(store_kind)
    started = anyio.Event()
    async with ActorSystem(blocked_agent(started), snapshots=store, shutdown_timeout=0.05) as s:
        await s.tell("t", "hello", message_id="m1")
        with anyio.fail_after(10):
            await started.wait()  # the input step is committed, the model is running
        assert [r.thread_id for r in await s.snapshots.recoverable_threads()] == ["t"]
    # Parked at the model step; nothing else is sent.
    async with ActorSystem(fast_agent(), snapshots=store) as system:

        async def resumed() -> bool:
            kinds = [s.kind for s in await system.history("t")]
            # (The live actor takes the last commit's state a moment after the
            # store has it: wait for both.)
            live = await system.get_state("t")
            return kinds == ["input", "resumed", "model"] and live.version == 3

        await eventually(resumed)
        snapshot = await system.get_state("t")
        assert snapshot.next is None
        assert snapshot.state.messages[-1].content == "echo: hello"
        assert await system.snapshots.recoverable_threads() == []


async def test_told_messages_left_in_the_mailbox_at_shutdown_run_on_restart(
    store_kind: str, open_store: OpenStore
) -> None:
    store = open_store(store_kind)
    started = anyio.Event()
    async with ActorSystem(blocked_agent(started), snapshots=store, shutdown_timeout=0.05) as s:
        for i in range(5):
            await s.tell("t", f"msg {i}", message_id=f"m{i}")
        await s.tell("u", "other thread", message_id="u0")
        with anyio.fail_after(10):
            await started.wait()
    async with ActorSystem(fast_agent(), snapshots=store) as system:
        await system.tell("t", "new", message_id="new")

        async def all_done() -> bool:
            if (await consumed(system, "t"))[-1:] != ["new"] or not await consumed(system, "u"):
                return False
            return (await system.get_state("t")).next is None  # its turn ended too

        await eventually(all_done)
        assert await consumed(system, "t") == ["m0", "m1", "m2", "m3", "m4", "new"]
        assert await consumed(system, "u") == ["u0"]
        kinds = [s.kind for s in await system.history("t")]
        assert kinds == ["input", "resumed", "model"] + ["input", "model"] * 5


async def test_an_undecodable_inbox_entry_is_dead_lettered_and_the_thread_goes_on(
    store_kind: str, open_store: OpenStore
) -> None:
    store = open_store(store_kind)
    system = ActorSystem(fast_agent(), snapshots=store)
    good = system.door.input("t", "good one", message_id="good")
    async with store:
        await store.enqueue("t", "garbage", b"not an envelope at all")
        damaged = bytearray(encode_envelope(system.door.input("t", "x", message_id="crc")))
        damaged[-1] ^= 0xFF
        await store.enqueue("t", "crc", bytes(damaged))
        wrong = Envelope(kind="input", message_id="schema", thread_id="t", update={"nope": 1})
        await store.enqueue("t", "schema", encode_envelope(wrong))
        elsewhere = system.door.input("other", "misfiled", message_id="misfiled")
        await store.enqueue("t", "misfiled", encode_envelope(elsewhere))
        await store.enqueue("t", "deep", _nested_too_deep("t", "deep"))
        await store.enqueue("t", "good", encode_envelope(good))
        async with system:
            await eventually(lambda: _consumed_is(system, "t", ["good"]))
            dead = {d.message_id: d.reason for d in await store.dead_letters("t")}
            assert set(dead) == {"garbage", "crc", "schema", "misfiled", "deep"}
            assert "checksum" in dead["crc"]
            assert "nope" in dead["schema"]
            assert "other" in dead["misfiled"]
            assert await store.pending("t") == []
            result = await system.ask("t", "and the next one")
            assert result.text == "echo: and the next one"
            assert await consumed(system, "t") == ["good", result.message_id]


def _nested_too_deep(thread_id: str, message_id: str) -> bytes:
    """An intact entry whose update nests 100,000 lists deep."""
    sentinel = "SENTINEL-0123456789"
    payload = msgspec.msgpack.encode(
        {
            "kind": "input",
            "message_id": message_id,
            "thread_id": thread_id,
            "update": {"messages": sentinel},
        }
    )
    deep = b"\x91" * 100_000 + b"\xc0"  # [[[...[None]...]]]
    return frame(ENVELOPE, payload.replace(msgspec.msgpack.encode(sentinel), deep))


async def _consumed_is(system: ActorSystem[Any], thread_id: str, ids: list[str]) -> bool:
    return await consumed(system, thread_id) == ids


async def test_an_inbox_entry_consumed_before_is_answered_as_a_duplicate(
    store_kind: str, open_store: OpenStore
) -> None:
    store = open_store(store_kind)
    async with ActorSystem(fast_agent(), snapshots=store) as system:
        await system.ask("t", "once", message_id="once")
        # ask leaves nothing in the inbox and no turn in flight.
        assert await store.recoverable_threads() == []
        again = system.door.input("t", "once", message_id="once")
    async with store:
        await store.enqueue("t", "once", encode_envelope(again))  # a retry that raced a crash
        async with ActorSystem(fast_agent(), snapshots=store) as system:
            await eventually(lambda: _inbox_empty(store, "t"))
            await system.ask("t", "next", message_id="next")
            assert await consumed(system, "t") == ["once", "next"]


async def _inbox_empty(store: SnapshotStore, thread_id: str) -> bool:
    return await store.pending(thread_id) == []


async def test_tell_is_durable_when_it_returns(store_kind: str, open_store: OpenStore) -> None:
    store = open_store(store_kind)
    async with ActorSystem(blocked_agent(), snapshots=store, shutdown_timeout=0.05) as system:
        for i in range(3):
            await system.tell("t", f"msg {i}", message_id=f"m{i}")
            # Either in the inbox or consumed by a committed input step (the
            # inbox is read first: an entry consumed meanwhile is in both).
            pending = {e.message_id for e in await store.pending("t")}
            assert pending | set(await consumed(system, "t")) == {f"m{j}" for j in range(i + 1)}


async def test_recover_false_leaves_the_inbox_alone(store_kind: str, open_store: OpenStore) -> None:
    store = open_store(store_kind)
    async with ActorSystem(blocked_agent(), snapshots=store, shutdown_timeout=0.05) as system:
        await system.tell("t", "hello", message_id="m0")
        await system.tell("t", "again", message_id="m1")
    async with ActorSystem(fast_agent(), snapshots=store, recover=False) as system:
        await system.ask("u", "unrelated")
        assert [e.message_id for e in await store.pending("t")] == ["m1"]
        assert [r.thread_id for r in await store.recoverable_threads()] == ["t"]
