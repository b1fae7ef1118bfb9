"""The partition inbox fenced by the lease, and its doorbell (``RedisInbox.wait``).

Every writing call of the partition's owner (``claim``, ``read``, ``ack``,
``dead_letter``) checks the lease token in its script: a worker that lost
its lease cannot pull entries into its pending list, acknowledge them or
dead-letter them. Between reads that find nothing, a reader blocks in a plain
``XREAD BLOCK`` after the group's last-delivered id: woken by the next append
(even one made between the read and the wait), not by entries it already
holds. All against real redis-server processes, under a unique key prefix.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio
import structlog

from threadline import Agent, AgentState, Client, FencedError, ModelRequest, ScriptedModel, Worker
from threadline.persistence import (
    KeyLayout,
    Lease,
    PartitionLeases,
    RedisInbox,
    StreamEntry,
    deployment_layout,
    open_redis,
)
from threadline.persistence._inbox_redis import GROUP

from .conftest import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PARTITIONS = 8
P = 3


@contextlib.asynccontextmanager
async def inbox_and_leases(
    url: str, prefix: str, **options: Any
) -> AsyncIterator[tuple[RedisInbox, PartitionLeases, redis.asyncio.Redis]]:
    """An inbox (its group made) and the lease table on one client, and the raw client.

    The client reads without a socket timeout: its waits block as long as asked.
    """
    async with open_redis(url, "test", socket_timeout=None) as client:
        layout = KeyLayout(prefix=prefix, partitions=PARTITIONS)
        inbox = RedisInbox(client, layout, **options)
        await inbox.ensure_group(P)
        yield inbox, PartitionLeases(client, layout=layout, ttl_ms=60_000), client


def thread_in(layout: KeyLayout, partition: int, stem: str = "t") -> str:
    for i in range(10_000):
        if layout.partition_of(candidate := f"{stem}-{i}") == partition:
            return candidate
    raise AssertionError("unreachable")


async def acquired(leases: PartitionLeases, worker: str) -> Lease:
    lease = await leases.acquire(P, worker)
    assert lease is not None
    return lease


async def pel(client: redis.asyncio.Redis, inbox: RedisInbox) -> dict[str, int]:
    """Consumer -> pending entries, as XPENDING reports it (only consumers with some)."""
    summary: Any = await client.xpending(inbox.keys(P).inbox, GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in summary["consumers"]}


async def blocked_on_xread(client: redis.asyncio.Redis, name: str) -> bool:
    """Whether the connection named ``name`` is blocked in an XREAD right now."""
    for entry in await client.client_list():
        if entry.get("name") == name and entry.get("cmd") == "xread" and "b" in entry["flags"]:
            return True
    return False


async def readers_waiting(client: redis.asyncio.Redis, n: int = PARTITIONS) -> None:
    """Until ``n`` inbox readers are blocked in their doorbell XREAD (past their reads:
    a lease stolen now is noticed by the next entry, not by a read already under way)."""
    with anyio.fail_after(10):
        while (
            sum(e.get("cmd") == "xread" and "b" in e["flags"] for e in await client.client_list())
            < n
        ):
            await anyio.sleep(0.01)


# -- the fence ------------------------------------------------------------------------


async def test_a_stale_token_is_refused_by_every_owner_call_and_moves_nothing(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with inbox_and_leases(redis_server.url, redis_prefix) as (inbox, leases, client):
        thread = thread_in(inbox.layout, P)
        ids = [await inbox.enqueue(thread, f"m{i}", f"{i}".encode()) for i in range(3)]
        old = await acquired(leases, "w-old")
        [first] = (await inbox.read(P, "w-old", old.token, count=1)).entries
        assert first.entry_id == ids[0]
        # w-old's lease ends (here: handed back) and w-new takes the partition.
        assert await leases.release(old)
        # Nobody holds it: refused too.
        with pytest.raises(FencedError, match=f"partition {P}: inbox read refused"):
            await inbox.read(P, "w-old", old.token)
        new = await acquired(leases, "w-new")
        for call in (
            lambda: inbox.read(P, "w-old", old.token),
            lambda: inbox.claim(P, "w-old", old.token),
            lambda: inbox.ack(P, [ids[0]], old.token),
            lambda: inbox.dead_letter(P, ids[0], "stale", old.token),
        ):
            with pytest.raises(FencedError, match=f"partition {P}: .* no longer held by '1:w-old'"):
                await call()
        # Nothing moved: the entry w-old read is still its (for w-new to claim), the
        # two it did not read are still unread, nothing acknowledged or dead-lettered.
        assert await pel(client, inbox) == {"w-old": 1}
        assert await inbox.backlog(P) == 3 and await inbox.queued(thread) == 3
        assert await inbox.dead_letters(P) == []
        # A fresh consumer name is not even created by a fenced read.
        with pytest.raises(FencedError):
            await inbox.read(P, "w-ghost", old.token)
        consumers = await client.xinfo_consumers(inbox.keys(P).inbox, GROUP)
        assert sorted(c["name"].decode() for c in consumers) == ["w-old"]
        # The new owner claims what w-old held, reads the rest, and finishes them.
        claimed = await inbox.claim(P, "w-new", new.token)
        assert [(e.entry_id, e.deliveries) for e in claimed] == [(ids[0], 2)]
        rest = await inbox.read(P, "w-new", new.token)
        assert [e.entry_id for e in rest.entries] == ids[1:]
        assert await pel(client, inbox) == {"w-new": 3}
        await inbox.dead_letter(P, ids[0], "bad", new.token)
        await inbox.ack(P, ids[1:], new.token)
        assert await inbox.backlog(P) == 0 and await inbox.queued(thread) == 0
        assert await pel(client, inbox) == {}


async def test_an_expired_lease_fences_its_holder(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with inbox_and_leases(redis_server.url, redis_prefix) as (inbox, _, client):
        short = PartitionLeases(client, layout=inbox.layout, ttl_ms=50)
        lease = await short.acquire(P, "w-paused")
        assert lease is not None
        await inbox.enqueue(thread_in(inbox.layout, P), "m", b"x")
        with anyio.fail_after(10):
            while await short.holder(P) is not None:  # Redis's clock expires it
                await anyio.sleep(0.01)
        with pytest.raises(FencedError):
            await inbox.read(P, "w-paused", lease.token)
        assert await pel(client, inbox) == {}


# -- the doorbell -----------------------------------------------------------------------


async def test_wait_wakes_at_once_on_an_append_from_another_connection(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with (
        inbox_and_leases(redis_server.url, redis_prefix) as (inbox, leases, client),
        open_redis(
            redis_server.url, "test waiter", client_name="waiter", socket_timeout=None
        ) as waiter_client,
    ):
        lease = await acquired(leases, "w")
        empty = await inbox.read(P, "w", lease.token)
        assert empty.entries == [] and empty.after == "0-0"
        waiter = RedisInbox(waiter_client, inbox.layout)
        woke: list[bool] = []
        elapsed: list[float] = []

        async def wait() -> None:
            start = anyio.current_time()
            woke.append(await waiter.wait(P, empty.after, block_ms=60_000))
            elapsed.append(anyio.current_time() - start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            with anyio.fail_after(10):
                while not await blocked_on_xread(client, "waiter"):
                    await anyio.sleep(0.01)
            entry = await inbox.enqueue(thread_in(inbox.layout, P), "m", b"x")
            with anyio.fail_after(5):  # not the 60 s block
                while not woke:
                    await anyio.sleep(0.01)
        assert waiter.max_wait_ms is None
        assert woke == [True] and elapsed[0] < 5
        # The wait read nothing on the group's behalf: the entry is still new.
        assert await pel(client, inbox) == {}
        assert [e.entry_id for e in (await inbox.read(P, "w", lease.token)).entries] == [entry]


async def test_wait_returns_false_when_nothing_comes(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with inbox_and_leases(redis_server.url, redis_prefix, timeout=5.0) as (inbox, leases, _):
        lease = await acquired(leases, "w")
        empty = await inbox.read(P, "w", lease.token)
        start = anyio.current_time()
        assert await inbox.wait(P, empty.after, block_ms=300) is False
        assert 0.25 <= anyio.current_time() - start < 5
        with pytest.raises(ValueError, match="block_ms"):
            await inbox.wait(P, empty.after, block_ms=0)  # XREAD would block forever


async def test_wait_blocks_less_than_the_socket_timeout(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A quiet wait longer than the client's socket timeout would be cut as a failure
    (redis-py: "Timeout reading from ..."): it blocks a second less instead."""
    layout = KeyLayout(prefix=redis_prefix, partitions=PARTITIONS)
    async with open_redis(redis_server.url, "test") as client:
        # Without one given, the connection class's default (redis-py 8: 5 s).
        connection = await client.connection_pool.get_connection()
        try:
            default = connection.socket_timeout
        finally:
            await client.connection_pool.release(connection)
        expected = None if not default else max(int(default * 1000) - 1000, int(default * 500))
        assert RedisInbox(client, layout).max_wait_ms == expected
    for options, longest in [
        ({"socket_timeout": None}, None),
        ({"socket_timeout": 30.0}, 29_000),
        ({"socket_timeout": 1.2}, 600),
    ]:
        async with open_redis(redis_server.url, "test", **options) as client:
            assert RedisInbox(client, layout).max_wait_ms == longest, options
    async with open_redis(redis_server.url, "test", socket_timeout=1.2) as client:
        inbox = RedisInbox(client, layout, timeout=5.0)
        await inbox.ensure_group(P)
        start = anyio.current_time()
        assert await inbox.wait(P, "0-0", block_ms=60_000) is False  # not unavailable
        assert 0.5 <= anyio.current_time() - start < 1.2


async def test_entries_held_but_not_acknowledged_do_not_wake_the_wait(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """No busy loop: the reader's pending entries are at or below the last-delivered id."""
    async with inbox_and_leases(redis_server.url, redis_prefix) as (inbox, leases, client):
        lease = await acquired(leases, "w")
        thread = thread_in(inbox.layout, P)
        ids = [await inbox.enqueue(thread, f"m{i}", b"x") for i in range(3)]
        read = await inbox.read(P, "w", lease.token)
        assert [e.entry_id for e in read.entries] == ids and read.after == ids[-1]
        await inbox.ack(P, ids[:1], lease.token)  # one done, two still held (turns running)
        empty = await inbox.read(P, "w", lease.token)
        assert empty.entries == [] and empty.after == ids[-1]
        assert await pel(client, inbox) == {"w": 2}
        # Waiting after an older id (the first pending one) would return at once, and
        # the reader would spin: read nothing, wait nothing, read nothing...
        assert await inbox.wait(P, ids[0], block_ms=60_000) is True
        before = (await client.info("commandstats")).get("cmdstat_xread", {}).get("calls", 0)
        start = anyio.current_time()
        assert await inbox.wait(P, empty.after, block_ms=400) is False
        assert anyio.current_time() - start >= 0.35
        after = (await client.info("commandstats"))["cmdstat_xread"]["calls"]
        assert after - before == 1


async def test_an_append_between_the_read_and_the_wait_is_not_lost(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with (
        inbox_and_leases(redis_server.url, redis_prefix) as (inbox, leases, _),
        open_redis(redis_server.url, "test sender") as sender_client,
    ):
        lease = await acquired(leases, "w")
        thread = thread_in(inbox.layout, P)
        first = await inbox.enqueue(thread, "m0", b"x")
        assert [e.entry_id for e in (await inbox.read(P, "w", lease.token)).entries] == [first]
        empty = await inbox.read(P, "w", lease.token)
        assert empty.entries == [] and empty.after == first
        # Appended by someone else after the read found nothing, before the wait began.
        sender = RedisInbox(sender_client, inbox.layout)
        second = await sender.enqueue(thread, "m1", b"y")
        start = anyio.current_time()
        assert inbox.max_wait_ms is None  # the wait below could block 60 s
        assert await inbox.wait(P, empty.after, block_ms=60_000) is True
        assert anyio.current_time() - start < 5
        assert [e.entry_id for e in (await inbox.read(P, "w", lease.token)).entries] == [second]


# -- the worker ---------------------------------------------------------------------------


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


@contextlib.asynccontextmanager
async def serving(
    agent: Agent[Any], url: str, prefix: str
) -> AsyncIterator[tuple[Worker[Any], Client[Any]]]:
    """A worker whose tick (every lease_ttl / 5 = 12 s) does not run again during the
    test: whatever it notices, its reader noticed."""
    async with open_redis(url, "test") as admin:
        await deployment_layout(admin, prefix, PARTITIONS)
    async with (
        Worker(agent, url, prefix=prefix, partitions=PARTITIONS, lease_ttl=60.0) as worker,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(worker.serve)
        with anyio.fail_after(10):
            while len(worker.partitions) < PARTITIONS:
                await anyio.sleep(0.01)
        async with Client(url, prefix=prefix) as client:
            yield worker, client
        tg.cancel_scope.cancel()


async def steal(client: redis.asyncio.Redis, layout: KeyLayout) -> None:
    """What another worker taking the partition over after our lease expired does."""
    await client.set(layout.partition(P).lease, "999:thief", px=60_000)


async def test_a_worker_whose_lease_is_gone_reads_nothing_more_and_gives_the_partition_up(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    agent: Agent[AgentState] = Agent(model=ScriptedModel(echo))
    with structlog.testing.capture_logs() as logs:
        async with (
            serving(agent, redis_server.url, redis_prefix) as (worker, client),
            open_redis(redis_server.url, "test") as raw,
        ):
            layout = client._inbox.layout
            thread = thread_in(layout, P)
            inbox = layout.partition(P).inbox
            assert (await client.ask(thread, "before", timeout=30)).text == "echo: before"
            with anyio.fail_after(10):  # acknowledged (after the reply): the reader waits
                while await raw.xlen(inbox):
                    await anyio.sleep(0.01)
            await readers_waiting(raw)
            await steal(raw, layout)
            await client.tell(thread, "after", message_id="after")  # rings the reader's bell
            with anyio.fail_after(10):
                while P in worker.partitions:
                    await anyio.sleep(0.01)
            summary: Any = await raw.xpending(inbox, GROUP)
            assert summary["pending"] == 0  # not read into the stale worker's pending list
            assert await raw.xlen(inbox) == 1  # there for the thief to read
            assert sorted(worker.partitions) == [p for p in range(PARTITIONS) if p != P]
    [lost] = [e for e in logs if e["event"] == "lease.lost"]
    assert lost["partition"] == P and lost["reason"].startswith("inbox fenced: partition 3")


async def test_a_worker_whose_lease_is_gone_leaves_its_entries_pending_for_the_next_owner(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The worker's acknowledgement and dead-lettering, called with the lease stolen
    (fenced) and then given up (skipped): the entry stays pending either way.

    (Called directly: with the lease-checked store, a turn whose lease is stolen
    commits nothing, so its entry is never acknowledged in the first place; the
    window this covers is a lease lost between a turn's last commit and its ack.)
    """
    gate = anyio.Event()

    async def model(request: ModelRequest[Any]) -> str:
        await gate.wait()
        return "done"

    agent: Agent[AgentState] = Agent(model=ScriptedModel(model))
    with structlog.testing.capture_logs() as logs:
        async with (
            serving(agent, redis_server.url, redis_prefix) as (worker, client),
            open_redis(redis_server.url, "test") as raw,
        ):
            layout = client._inbox.layout
            thread = thread_in(layout, P)
            inbox = layout.partition(P).inbox
            await client.tell(thread, "slow", message_id="slow")
            with anyio.fail_after(10):
                while (await raw.xpending(inbox, GROUP))["pending"] < 1:
                    await anyio.sleep(0.01)
            [(entry_id, fields)] = await raw.xrange(inbox)
            entry = StreamEntry(entry_id.decode(), fields[b"e"], 1, thread)
            await readers_waiting(raw)
            await steal(raw, layout)
            # Still held as far as the worker knows: refused by the scripts' fence.
            await worker._ack(P, [entry.entry_id])
            with pytest.raises(FencedError, match="no longer held by"):
                await worker._dead_letter(P, entry, "test")
            # The reader finds out (the next entry rings its bell) and gives P up.
            await client.tell(thread, "next", message_id="next")
            with anyio.fail_after(10):
                while P in worker.partitions:
                    await anyio.sleep(0.01)
            await worker._ack(P, [entry.entry_id])  # skipped: not held
            await worker._dead_letter(P, entry, "test")
            pending: Any = await raw.xpending(inbox, GROUP)
            assert pending["pending"] == 1 and pending["consumers"][0]["pending"] == 1
            assert await raw.xlen(inbox) == 2 and await raw.xlen(layout.partition(P).dlq) == 0
            gate.set()
    events = [e["event"] for e in logs if e.get("partition") == P]
    assert events.count("inbox.ack_fenced") == 1 and events.count("inbox.ack_skipped") == 1
    assert events.count("message.dead_letter_skipped") == 1
    assert "message.dead_lettered" not in events
    [fenced] = [e for e in logs if e["event"] == "inbox.ack_fenced"]
    assert fenced["entries"] == 1 and "no longer held by" in fenced["error"]


@pytest.fixture
def quiet_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own: nobody else's commands in its stats."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found")
    server = RedisServer(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def command_calls(client: redis.asyncio.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_an_idle_worker_blocks_on_the_doorbell_instead_of_polling(
    quiet_redis: RedisServer, redis_prefix: str
) -> None:
    agent: Agent[AgentState] = Agent(model=ScriptedModel(echo))
    async with (
        serving(agent, quiet_redis.url, redis_prefix) as (_, client),
        open_redis(quiet_redis.url, "test") as raw,
    ):
        for p in range(PARTITIONS):  # every reader past its claim and first read
            thread = thread_in(client._inbox.layout, p)
            assert (await client.ask(thread, "hi", timeout=30)).text == "echo: hi"
        await readers_waiting(raw)
        before = await command_calls(raw)
        await anyio.sleep(1.5)  # the window measured (the tick runs every 12 s)
        after = await command_calls(raw)
    calls = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    calls.pop("info", None)
    calls.pop("client|list", None)
    # Polling (XREADGROUP BLOCK 500 per partition) would make about 24 calls here.
    # Blocked readers make none, but for a wait that ran out (at most one each,
    # the block being seconds long) and waits again without reading.
    assert set(calls) <= {"xread"} and calls.get("xread", 0) <= PARTITIONS, calls
