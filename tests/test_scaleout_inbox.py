"""Issue 10 on the Worker/Client slice: backpressure, poison, F9-F13, ``threadline workers``.

Every test runs against real redis-server processes (the session server, a
private one for the outage test, the 3-node cluster for F13) under a unique
key prefix; workers run in process (``async with Worker(...)`` + ``serve``)
except for the poison turn, whose tool kills its worker process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster

from threadline import (
    Agent,
    AgentState,
    AIMessage,
    Client,
    FencedError,
    HumanMessage,
    MailboxFullError,
    ModelRequest,
    OverloadedError,
    ScriptedModel,
    StoreUnavailableError,
    ToolCall,
    TurnFailedError,
    Worker,
    tool,
)
from threadline.actors import Envelope, InvalidUpdateError
from threadline.persistence import (
    DEFAULT_PARTITIONS,
    KeyLayout,
    PartitionLeases,
    RedisInbox,
    deployment_layout,
    encode_envelope,
    open_redis,
)

from ._cluster import RedisClusterProcesses
from .conftest import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PARTITIONS = 8


def thread_in(layout: KeyLayout, partition: int, stem: str) -> str:
    """A thread id (``stem-N``) that lives in ``partition``."""
    for i in range(10_000):
        if layout.partition_of(candidate := f"{stem}-{i}") == partition:
            return candidate
    raise AssertionError("unreachable")


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


@contextlib.asynccontextmanager
async def serving(
    agent: Agent[Any], url: str, prefix: str, **options: Any
) -> AsyncIterator[tuple[Worker[Any], Client[Any]]]:
    """An in-process worker serving ``agent`` and a client, on ``url`` under ``prefix``."""
    options.setdefault("shutdown_timeout", 2.0)
    async with (
        Worker(agent, url, prefix=prefix, partitions=PARTITIONS, lease_ttl=1.0, **options) as w,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(w.serve)
        async with Client(url, prefix=prefix) as client:
            yield w, client
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def raw_inbox(url: str, prefix: str, **options: Any) -> AsyncIterator[RedisInbox]:
    async with open_redis(url, "test") as client:
        yield RedisInbox(client, KeyLayout(prefix=prefix, partitions=PARTITIONS), **options)


async def lease_token(inbox: RedisInbox, partition: int, worker: str) -> str:
    """The token of a fresh lease of ``partition`` for ``worker`` (what fences the inbox)."""
    lease = await PartitionLeases(inbox._client, layout=inbox.layout).acquire(partition, worker)
    assert lease is not None
    return lease.token


async def create_deployment(url: str, prefix: str) -> None:
    async with open_redis(url, "test") as client:
        await deployment_layout(client, prefix, PARTITIONS)


async def consumed_ids(client: Client[Any], thread_id: str) -> list[str]:
    return [s.consumed for s in await client.history(thread_id) if s.consumed is not None]


# -- backpressure ------------------------------------------------------------------


async def test_per_thread_queue_cap_refuses_without_appending(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with raw_inbox(redis_server.url, redis_prefix, max_queued=3) as inbox:
        ids = [await inbox.enqueue("hot", f"m{i}", b"x") for i in range(3)]
        with pytest.raises(MailboxFullError, match="'hot' has 3 messages waiting"):
            await inbox.enqueue("hot", "m3", b"x")
        partition = inbox.layout.partition_of("hot")
        assert await inbox.backlog(partition) == 3 and await inbox.queued("hot") == 3
        # A retry of an accepted message still answers its entry id (idempotent).
        assert await inbox.enqueue("hot", "m1", b"x") == ids[1]
        # Another thread is not affected, even in the same partition.
        other = thread_in(inbox.layout, partition, "cold")
        await inbox.enqueue(other, "c0", b"x")
        assert await inbox.queued(other) == 1
        # Acknowledging (and dead-lettering) makes room, once per entry.
        await inbox.ensure_group(partition)
        token = await lease_token(inbox, partition, "c")
        read = (await inbox.read(partition, "c", token)).entries
        assert [e.thread_id for e in read] == ["hot", "hot", "hot", other]
        await inbox.ack(partition, [ids[0], ids[0]], token)
        assert await inbox.queued("hot") == 2
        await inbox.dead_letter(partition, ids[1], "test", token)
        await inbox.dead_letter(partition, ids[1], "test again", token)  # gone: counts nothing
        assert await inbox.queued("hot") == 1
        await inbox.enqueue("hot", "m3", b"x")
        await inbox.enqueue("hot", "m4", b"x")
        with pytest.raises(MailboxFullError):
            await inbox.enqueue("hot", "m5", b"x")
        await inbox.ack(partition, [e.entry_id for e in read] + [ids[2]], token)
        assert await inbox.queued(other) == 0
        raw = inbox._client
        assert not await raw.hexists(inbox.queued_key(inbox.keys(partition)), other)


async def test_partition_backlog_cap_is_overloaded(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with raw_inbox(redis_server.url, redis_prefix, max_backlog=4, max_queued=0) as inbox:
        layout = inbox.layout
        threads = [thread_in(layout, 3, f"t{i}") for i in range(5)]
        for i, thread in enumerate(threads[:4]):
            await inbox.enqueue(thread, f"m{i}", b"x")
        with pytest.raises(OverloadedError):
            await inbox.enqueue(threads[4], "m4", b"x")
        assert await inbox.backlog(3) == 4
        await inbox.enqueue(thread_in(layout, 4, "elsewhere"), "m5", b"x")  # other partition


async def test_f11_a_hot_thread_gets_backpressure_while_others_answer(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    gate = anyio.Event()

    async def model(request: ModelRequest[Any]) -> str:
        last = request.messages[-1].content
        if str(last).startswith("hot"):
            await gate.wait()  # the hot thread's first turn never ends during the test
        return f"echo: {last}"

    agent: Agent[AgentState] = Agent(model=ScriptedModel(model))
    layout = KeyLayout(prefix=redis_prefix, partitions=PARTITIONS)
    hot = "hot"
    same = thread_in(layout, layout.partition_of(hot), "cold-same-partition")
    other = thread_in(layout, (layout.partition_of(hot) + 1) % PARTITIONS, "cold-other")
    async with serving(agent, redis_server.url, redis_prefix) as (_, client):
        await client.ask(same, "warm up", timeout=30)
        accepted = refused = 0
        latencies: list[float] = []
        done = anyio.Event()

        async def flood() -> None:
            nonlocal accepted, refused
            for i in range(1500):
                try:
                    await client.tell(hot, f"hot {i}", message_id=f"hot-{i}")
                    accepted += 1
                except MailboxFullError:
                    refused += 1
            done.set()

        async def cold(thread_id: str) -> None:
            n = 0
            while not done.is_set() or n < 5:
                start = time.perf_counter()
                result = await client.ask(thread_id, f"q{n}", timeout=30)
                latencies.append(time.perf_counter() - start)
                assert result.text == f"echo: q{n}"
                n += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            tg.start_soon(cold, same)
            tg.start_soon(cold, other)
        assert (accepted, refused) == (1000, 500)
        assert await client._inbox.queued(hot) == 1000
        latencies.sort()
        print(
            f"\nF11: hot thread 1000 accepted, 500 MailboxFullError; {len(latencies)} cold "
            f"asks meanwhile: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms"
        )
        assert len(await consumed_ids(client, same)) >= 6


# -- poison ----------------------------------------------------------------------------


async def test_undecodable_and_invalid_entries_are_dead_lettered_at_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    agent: Agent[AgentState] = Agent(model=ScriptedModel(echo))
    async with serving(agent, redis_server.url, redis_prefix) as (_, client):
        inbox = client._inbox
        keys = inbox.layout.for_thread("t")
        raw = inbox._client
        await raw.xadd(keys.inbox, {"e": b"\x00garbage", "t": "t"})
        await raw.hincrby(inbox.queued_key(keys), "t", 1)
        reply_key = keys.reply("run-bad")
        bad = Envelope(
            kind="input",
            message_id="bad",
            thread_id="t",
            update={"no_such_key": 1},
            run_id="run-bad",
            reply_to=reply_key,
        )
        await inbox.enqueue("t", "bad", encode_envelope(bad), always=True)
        # The thread goes on with its next message.
        assert (await client.ask("t", "after", timeout=30)).text == "echo: after"
        with pytest.raises(InvalidUpdateError):
            async for _ in client.join("t", "run-bad"):
                pass
        letters = await inbox.dead_letters(keys.partition)
        reasons = [reason for _, _, reason in letters]
        assert len(reasons) == 2
        assert "inbox entry" in reasons[0] and reasons[1].startswith("invalid:")
        assert letters[1][1] == encode_envelope(bad)
        assert len(await consumed_ids(client, "t")) == 1  # "after" only
        assert await inbox.queued("t") == 0 and await inbox.backlog(keys.partition) == 0


async def test_f10_an_entry_delivered_too_often_is_dead_lettered(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Its owner 'died' five times holding it (claims by other consumers): the sixth
    delivery dead-letters it with its reason and answers its sender with an error;
    the entry queued behind it (delivered as often, through no fault of its own)
    and the thread's next message are served."""
    agent: Agent[AgentState] = Agent(model=ScriptedModel(echo))
    layout = KeyLayout(prefix=redis_prefix, partitions=PARTITIONS)
    keys = layout.for_thread("t")
    await create_deployment(redis_server.url, redis_prefix)
    async with (
        Client(redis_server.url, prefix=redis_prefix) as client,
        anyio.create_task_group() as tg,
    ):
        failed: list[BaseException] = []

        async def ask_poison() -> None:
            try:
                await client.ask("t", "poison", message_id="poison", timeout=60)
            except TurnFailedError as exc:
                failed.append(exc)

        tg.start_soon(ask_poison)
        raw = client._inbox._client
        with anyio.fail_after(10):
            while await raw.xlen(keys.inbox) < 1:
                await anyio.sleep(0.01)
        await client.tell("t", "behind", message_id="behind")
        await client._inbox.ensure_group(keys.partition)
        entries = await raw.xreadgroup("w", "dead-0", {keys.inbox: ">"})
        ids = [i for i, _ in entries[0][1]]
        for n in range(1, 5):
            await raw.xclaim(keys.inbox, "w", f"dead-{n}", 0, ids)
        pending = await raw.xpending_range(keys.inbox, "w", "-", "+", 10)
        assert [p["times_delivered"] for p in pending] == [5, 5]
        agent_worker = Worker(
            agent, redis_server.url, prefix=redis_prefix, partitions=PARTITIONS, lease_ttl=1.0
        )
        async with agent_worker as worker:
            tg.start_soon(worker.serve)
            assert (await client.ask("t", "next", timeout=30)).text == "echo: next"
            tg.cancel_scope.cancel()
    assert len(failed) == 1 and "dead-lettered (poison: delivered 6 times" in str(failed[0])
    async with Client(redis_server.url, prefix=redis_prefix) as client:
        consumed = await consumed_ids(client, "t")
        assert len(consumed) == 2 and consumed[0] == "behind"  # then "next"; never "poison"
        [(entry, payload, reason)] = await client._inbox.dead_letters(keys.partition)
        assert entry == ids[0].decode() and b"poison" in payload
        assert reason.startswith("poison: delivered 6 times")


POISON_APP = '''
import os
from threadline import Agent, AIMessage, ScriptedModel, ToolCall, tool

@tool
def die() -> str:
    """Kill the worker process."""
    os._exit(1)

def model(request):
    last = request.messages[-1]
    if getattr(last, "content", "") == "crash":
        return AIMessage("", tool_calls=[ToolCall(id="c1", name="die", args={})])
    return f"echo: {last.content}"

agent = Agent(model=ScriptedModel(model), tools=[die])
'''


def worker_command() -> list[str]:
    exe = shutil.which("threadline")
    return [exe] if exe else [sys.executable, "-m", "threadline.runtime.cli"]


def spawn(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL)


async def test_f10_a_turn_that_kills_its_worker_is_aborted(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """A tool that calls os._exit(1): five real worker processes die resuming the
    turn; the sixth dead-letters the message, commits an abort step, answers the
    sender with TurnFailedError and serves the thread's next message."""
    (tmp_path / "poisonapp.py").write_text(POISON_APP)
    argv = [
        *worker_command(),
        "worker",
        "--redis",
        redis_server.url,
        "--app",
        "poisonapp:agent",
        "--partitions",
        str(PARTITIONS),
        "--lease-ttl",
        "1",
        "--prefix",
        redis_prefix,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    codes: list[int] = []
    started = time.monotonic()
    await create_deployment(redis_server.url, redis_prefix)
    lease = KeyLayout(prefix=redis_prefix, partitions=PARTITIONS).for_thread("t").lease
    async with (
        Client(redis_server.url, prefix=redis_prefix) as client,
        anyio.create_task_group() as tg,
    ):
        outcome: list[BaseException] = []

        async def ask() -> None:
            try:
                await client.ask("t", "crash", message_id="crash", timeout=120)
            except TurnFailedError as exc:
                outcome.append(exc)

        proc = spawn(argv, tmp_path, env)
        tg.start_soon(ask)
        try:
            while not outcome:
                code = proc.poll()
                if code is not None:
                    codes.append(code)
                    assert len(codes) <= 5, codes
                    # What the lease's expiry would do (the worker's leases last 10 s).
                    await client._inbox._client.delete(lease)
                    proc = spawn(argv, tmp_path, env)
                await anyio.sleep(0.05)
            assert (await client.ask("t", "next", timeout=30)).text == "echo: next"
        finally:
            proc.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(proc.wait, 30)
    assert codes == [1] * 5
    assert "its turn aborted at step 'tools'" in str(outcome[0])
    async with Client(redis_server.url, prefix=redis_prefix) as client:
        kinds = [s.kind for s in await client.history("t")]
        assert kinds == ["input", "model", "abort", "input", "model"]
        keys = client._inbox.layout.for_thread("t")
        [(_, _, reason)] = await client._inbox.dead_letters(keys.partition)
        assert reason.startswith("poison: delivered 6 times")
    print(f"\nF10 poison turn: 5 worker deaths, aborted after {time.monotonic() - started:.1f} s")


# -- F9: Redis unreachable for a while -----------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


async def test_f9_redis_down_raises_typed_errors_then_everything_recovers(
    private_redis: RedisServer, redis_prefix: str
) -> None:
    server = private_redis
    agent: Agent[AgentState] = Agent(model=ScriptedModel(echo))
    assert server.proc is not None
    async with serving(agent, server.url, redis_prefix) as (worker, client):
        told = [await client.tell("a", f"a{i}", message_id=f"a{i}") for i in range(3)]
        assert (await client.ask("b", "b0", message_id="b0", timeout=30)).version == 2
        # Stopped (SIGSTOP): connections open, nobody answers. Bounded, typed.
        server.proc.send_signal(signal.SIGSTOP)
        try:
            async with raw_inbox(server.url, redis_prefix, timeout=0.5) as bounded:
                start = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="no answer within"):
                    await bounded.enqueue("c", "during-stop", b"x")  # outcome unknown
                assert time.monotonic() - start < 5
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # Killed: connection refused at once, typed.
        server.kill()
        for call in (
            lambda: client.tell("a", "down", message_id="down"),
            lambda: client.ask("b", "down", timeout=10),
        ):
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await call()
            assert time.monotonic() - start < 5
        with anyio.fail_after(10):  # its reads fail: it drops the partitions, keeps running
            while worker.partitions:
                await anyio.sleep(0.05)
        server.start()
        restarted = time.monotonic()
        told.append(await client.tell("a", "a3", message_id="a3"))
        # The worker serves again once its old leases expire (Redis kept them).
        result = await client.ask("b", "b1", message_id="b1", timeout=60)
        print(f"\nF9: first ask answered {time.monotonic() - restarted:.1f} s after the restart")
        assert result.text == "echo: b1"
        final = await client.ask("a", "a4", message_id="a4", timeout=60)
        expected = [*told, "a4"]
        humans = [str(m.content) for m in final.messages if isinstance(m, HumanMessage)]
        consumed = await consumed_ids(client, "a")
        # Nothing acknowledged is lost, nothing is applied twice.
        assert sorted(consumed) == sorted(humans) == expected
        assert await consumed_ids(client, "b") == ["b0", "b1"]
        with anyio.fail_after(30):  # it serves them all again (as their old leases expire)
            while worker.partitions != list(range(PARTITIONS)):
                await anyio.sleep(0.05)
    # In order too: a message left for redelivery holds its thread's later ones back.
    assert consumed == humans == expected, f"per-thread order broken: {consumed} / {humans}"


# -- F12: a client disconnects mid-stream ------------------------------------------------------


async def test_f12_reconnect_with_the_last_event_id_loses_and_repeats_nothing(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    gate = anyio.Event()

    @tool
    async def slow(text: str) -> str:
        """Wait for the test, then shout."""
        await gate.wait()
        return text.upper()

    def model(request: ModelRequest[Any]) -> str | AIMessage:
        last = request.messages[-1]
        if isinstance(last, HumanMessage):
            return AIMessage("", tool_calls=[ToolCall(id="c1", name="slow", args={"text": "x"})])
        return f"done: {last.content}"

    agent: Agent[AgentState] = Agent(model=ScriptedModel(model), tools=[slow])
    async with serving(agent, redis_server.url, redis_prefix) as _:
        seen: list[tuple[str, str, int]] = []
        async with Client(redis_server.url, prefix=redis_prefix) as first:
            parts = first.stream("t", "go", message_id="run1", mode=["updates", "values"])
            await parts.__anext__()  # the run started
            await parts.aclose()
            async with contextlib.aclosing(first.join("t", "run1")) as events:
                async for event_id, event, _, version in events:
                    seen.append((event_id, event, version))
                    if len(seen) == 4:  # input and model steps: updates + values each
                        break
        # Disconnected; the turn goes on (and ends) while nobody listens.
        gate.set()
        async with Client(redis_server.url, prefix=redis_prefix) as second:
            rest = [(i, e, v) async for i, e, _, v in second.join("t", "run1", after=seen[-1][0])]
            everything = [(i, e, v) async for i, e, _, v in second.join("t", "run1")]
            history = await second.history("t")
    assert seen + rest == everything
    ids = [i for i, _, _ in everything]
    numbers = [tuple(map(int, i.split("-"))) for i in ids]
    assert all(a < b for a, b in itertools.pairwise(numbers))  # none repeated
    versions = [v for _, e, v in everything if e == "values"]
    assert versions == [s.version for s in history] == [1, 2, 3, 4]
    assert [e for _, e, _ in everything][-1] == "end"


# -- F13: every inbox and reply script on a 3-node cluster ----------------------------------


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterProcesses) -> AsyncIterator[RedisCluster]:
    host, port = redis_cluster.startup
    client = RedisCluster(host=host, port=port)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


async def test_f13_inbox_and_reply_scripts_on_a_cluster(
    cluster_client: RedisCluster, redis_prefix: str
) -> None:
    client = cluster_client
    layout = KeyLayout(prefix=redis_prefix, partitions=DEFAULT_PARTITIONS)
    inbox = RedisInbox(client, layout, max_queued=2)
    # A wait blocks less than the cluster client's socket timeout.
    assert inbox.max_wait_ms is not None
    assert inbox.max_wait_ms < 1000 * client.get_connection_kwargs()["socket_timeout"]
    per_node: dict[str, int] = {}
    for p in range(layout.partitions):
        node = client.get_node_from_key(layout.partition(p).inbox)
        assert node is not None
        per_node.setdefault(node.name, p)
    assert len(per_node) == 3
    leases = PartitionLeases(client, layout=layout)
    for partition in per_node.values():
        keys = layout.partition(partition)
        thread = thread_in(layout, partition, "t{x}")
        reply = keys.reply("run{1}")
        script_keys = [
            keys.lease,
            keys.inbox,
            keys.idem("m{1}"),
            inbox.queued_key(keys),
            keys.dlq,
            reply,
        ]
        slots = {await client.cluster_keyslot(key) for key in script_keys}
        assert len(slots) == 1, (partition, slots)
        first = await inbox.enqueue(thread, "m{1}", b"one")
        assert await inbox.enqueue(thread, "m{1}", b"one") == first
        await inbox.enqueue(thread, "m2", b"two")
        with pytest.raises(MailboxFullError):
            await inbox.enqueue(thread, "m3", b"three")
        await inbox.ensure_group(partition)
        await inbox.ensure_group(partition)  # BUSYGROUP is fine
        lease1 = await leases.acquire(partition, "w1")
        assert lease1 is not None
        assert await inbox.claim(partition, "w1", lease1.token) == []
        read = await inbox.read(partition, "w1", lease1.token)
        assert [e.payload for e in read.entries] == [b"one", b"two"]
        assert read.after == read.entries[-1].entry_id
        empty = await inbox.read(partition, "w1", lease1.token)  # the XINFO GROUPS branch
        assert empty.entries == [] and empty.after == read.after
        assert await inbox.wait(partition, empty.after, block_ms=10) is False
        assert await inbox.wait(partition, "0-0", block_ms=10) is True
        # The partition moves to w2: w1's token is refused by every fenced script.
        assert await leases.release(lease1)
        lease2 = await leases.acquire(partition, "w2")
        assert lease2 is not None
        with pytest.raises(FencedError, match=f"partition {partition}: inbox read refused"):
            await inbox.read(partition, "w1", lease1.token)
        with pytest.raises(FencedError, match=f"partition {partition}: inbox claim refused"):
            await inbox.claim(partition, "w1", lease1.token)
        with pytest.raises(FencedError):
            await inbox.ack(partition, [read.entries[0].entry_id], lease1.token)
        with pytest.raises(FencedError):
            await inbox.dead_letter(partition, read.entries[0].entry_id, "x", lease1.token)
        claimed = await inbox.claim(partition, "w2", lease2.token)
        assert [(e.payload, e.deliveries, e.thread_id) for e in claimed] == [
            (b"one", 2, thread),
            (b"two", 2, thread),
        ]
        assert await inbox.pending(partition) == 2
        await inbox.dead_letter(partition, claimed[0].entry_id, "test", lease2.token)
        await inbox.ack(partition, [claimed[1].entry_id], lease2.token)
        assert await inbox.backlog(partition) == 0 and await inbox.queued(thread) == 0
        assert [(p, r) for _, p, r in await inbox.dead_letters(partition)] == [(b"one", "test")]
        await inbox.publish(reply, [b"e1", b"e2"])
        events = await inbox.replies(reply, "0-0", block_ms=10)
        assert [e for _, e in events] == [b"e1", b"e2"]
        assert await inbox.replies(reply, events[-1][0], block_ms=10) == []


# -- observability: threadline workers ---------------------------------------------------------


async def test_threadline_workers_shows_owners_and_backlogs(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    gate = anyio.Event()

    async def model(request: ModelRequest[Any]) -> str:
        await gate.wait()
        return "ok"

    agent: Agent[AgentState] = Agent(model=ScriptedModel(model))
    async with serving(agent, redis_server.url, redis_prefix) as (worker, client):
        for i in range(3):
            await client.tell("busy", f"m{i}", message_id=f"m{i}")
        busy = client._inbox.layout.partition_of("busy")
        with anyio.fail_after(30):
            while len(worker.partitions) < PARTITIONS or await client._inbox.pending(busy) < 3:
                await anyio.sleep(0.05)
        done = await anyio.run_process(
            [*worker_command(), "workers", "--redis", redis_server.url, "--prefix", redis_prefix],
            check=False,
        )
        gate.set()
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert f"{PARTITIONS} partitions, 1 live worker" in out
    assert f"  worker {worker.worker_id}" in out
    rows = {
        int(line.split()[0]): line.split()[1:]
        for line in out.splitlines()
        if line.split() and line.split()[0].isdigit()
    }
    assert sorted(rows) == list(range(PARTITIONS))
    for partition, (owner, epoch, backlog, pending) in rows.items():
        assert owner == worker.worker_id and int(epoch) >= 1
        assert (int(backlog), int(pending)) == ((3, 3) if partition == busy else (0, 0))
    missing = await anyio.run_process(
        [*worker_command(), "workers", "--redis", redis_server.url, "--prefix", "nobody"],
        check=False,
    )
    assert missing.returncode == 1 and b"no deployment" in missing.stderr
    print(textwrap.indent(out, "    "))
