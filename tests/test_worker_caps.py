"""The caps of the scale-out slice: a worker's active turns, its poison and
handoff settings, and the client's per-thread and per-partition enqueue caps.

Every test runs against the session's real redis-server under a unique key
prefix; workers run in process (``async with Worker(...)`` + ``serve``), except
the one that checks the ``threadline worker`` command line end to end.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from threadline import (
    Agent,
    AgentState,
    AIMessage,
    Client,
    MailboxFullError,
    ModelRequest,
    OverloadedError,
    ScriptedModel,
    ToolCall,
    ToolMessage,
    TurnFailedError,
    Worker,
)
from threadline.actors import Envelope, InvalidUpdateError
from threadline.persistence import (
    KeyLayout,
    RedisInbox,
    deployment_layout,
    encode_envelope,
    open_redis,
)
from threadline.runtime.cli._main import _parser, demo_agent, main, make_worker

from .conftest import RedisServer
from .test_scaleout_inbox import serving

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PARTITIONS = 8


def thread_in(layout: KeyLayout, partition: int, stem: str, count: int = 1) -> list[str]:
    """``count`` thread ids (``stem-N``) that live in ``partition``."""
    found: list[str] = []
    for i in range(100_000):
        if layout.partition_of(candidate := f"{stem}-{i}") == partition:
            found.append(candidate)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


class Holds:
    """A tool that blocks until the test opens its key's gate, and who called it."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)

    def open(self, *keys: str) -> None:
        for key in keys:
            self.gates[key].set()

    def agent(self) -> Agent[AgentState]:
        started, gates = self.started, self.gates

        async def hold(key: str) -> str:
            """Wait until the test lets this key go."""
            started.append(key)
            await gates[key].wait()
            return key

        def respond(request: ModelRequest[Any]) -> str | AIMessage:
            last = request.messages[-1]
            if isinstance(last, ToolMessage):
                return f"held {last.content}"
            text = str(last.content)
            if text.startswith("hold "):
                call = ToolCall(id="c1", name="hold", args={"key": text[5:]})
                return AIMessage("", tool_calls=[call])
            if text == "fail":
                raise RuntimeError("the model broke")
            return f"echo: {text}"

        return Agent(model=ScriptedModel(respond), tools=[hold])


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until ``predicate()`` holds (checked every 10 ms)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def waiting_readers(worker: Worker[Any]) -> int:
    """Partition readers waiting for a share of ``max_active_turns``."""
    return worker._shares.statistics().tasks_waiting


async def create_deployment(url: str, prefix: str) -> KeyLayout:
    async with open_redis(url, "test") as client:
        return await deployment_layout(client, prefix, PARTITIONS)


# -- the cap holds -------------------------------------------------------------------


async def test_at_most_max_active_turns_start_across_partitions(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """N + k threads, spread over the partitions, each told a message whose tool
    blocks: N turns start; every reader with an entry left waits for a share;
    each turn let go lets exactly one more start."""
    n, k = 3, 5
    holds = Holds()
    threads = [f"cap-{i}" for i in range(n + k)]
    async with serving(holds.agent(), redis_server.url, redis_prefix, max_active_turns=n) as (
        worker,
        client,
    ):
        layout = client.layout
        assert layout is not None
        assert len({layout.partition_of(t) for t in threads}) > 2  # several readers

        def settled_at(count: int) -> Callable[[], bool]:
            """``count`` turns started, and every reader with an entry left waits."""

            def check() -> bool:
                left = {layout.partition_of(t) for t in threads if t not in holds.started}
                return len(holds.started) == count and waiting_readers(worker) == len(left)

            return check

        for t in threads:
            await client.tell(t, f"hold {t}", message_id=f"m-{t}")
        await until(settled_at(n))
        assert worker.active_turns == worker.in_flight == n and worker.saturated
        for count in range(n + 1, n + k + 1):
            holds.open(holds.started[count - n - 1])  # the oldest still held
            await until(settled_at(count))
            assert worker.active_turns == n  # one ended, one started
        holds.open(*threads)
        for t in threads:  # after its held turn, in order: all of them are done
            assert (await client.ask(t, "after", timeout=30)).text == "echo: after"
        assert sorted(holds.started) == sorted(threads)
        assert worker.active_turns == worker.in_flight == 0 and not worker.saturated


async def test_saturation_is_logged_once_per_episode_not_per_message(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """One partition, one reader: with a cap of 2 and 6 threads, four dispatches
    wait for a share, each as soon as a turn ends; that is one saturation (one
    warning), over once a share is left free."""
    n, k = 2, 4
    holds = Holds()
    layout = await create_deployment(redis_server.url, redis_prefix)
    threads = thread_in(layout, 5, "one-partition", n + k)
    with structlog.testing.capture_logs() as logs:
        async with serving(holds.agent(), redis_server.url, redis_prefix, max_active_turns=n) as (
            worker,
            client,
        ):
            for t in threads:
                await client.tell(t, f"hold {t}", message_id=f"m-{t}")
            await until(lambda: len(holds.started) == n and worker.saturated)
            for count in range(n + 1, n + k + 1):
                holds.open(holds.started[count - n - 1])
                await until(
                    lambda c=count: len(holds.started) == c and (worker.saturated or c == n + k)
                )
                assert worker.active_turns == n
            holds.open(*threads)
            await until(lambda: worker.active_turns == 0)
            for t in threads:
                assert (await client.ask(t, "after", timeout=30)).text == "echo: after"
    saturated = [e for e in logs if e["event"] == "worker.saturated"]
    unsaturated = [e for e in logs if e["event"] == "worker.unsaturated"]
    assert len(saturated) == 1 and saturated[0]["max_active_turns"] == n
    assert len(unsaturated) == 1 and unsaturated[0]["waits"] == k
    assert saturated[0]["log_level"] == "warning"


async def test_a_hot_thread_takes_one_share_however_many_messages_it_has(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Messages queued behind a thread's turn take no share of their own: a hot
    thread whose turn hangs cannot starve the worker's other threads (a cap on
    messages would: 256 of them, and no other thread is served)."""
    holds = Holds()
    async with serving(holds.agent(), redis_server.url, redis_prefix, max_active_turns=2) as (
        worker,
        client,
    ):
        await client.tell("hot", "hold hot", message_id="hot-0")
        for i in range(1, 8):
            await client.tell("hot", f"more {i}", message_id=f"hot-{i}")
        await until(lambda: worker.in_flight == 8)
        assert worker.active_turns == 1
        for i in range(5):
            result = await client.ask(f"cold-{i}", "hi", timeout=30)
            assert result.text == "echo: hi"
        assert worker.active_turns == 1 and worker.in_flight == 8
        holds.open("hot")
        assert (await client.ask("hot", "last", timeout=30)).text == "echo: last"
        assert worker.active_turns == worker.in_flight == 0


# -- the share comes back on every path -------------------------------------------------


async def test_the_share_comes_back_when_a_turn_fails_or_its_entry_is_dead_lettered(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """With a cap of one, each path is followed by a turn of another thread:
    it would wait forever for a share that did not come back."""
    holds = Holds()
    async with serving(holds.agent(), redis_server.url, redis_prefix, max_active_turns=1) as (
        worker,
        client,
    ):
        # A turn that fails.
        with pytest.raises(TurnFailedError, match="the model broke"):
            await client.ask("failing", "fail", timeout=30)
        assert worker.active_turns == worker.in_flight == 0
        assert (await client.ask("next-1", "hi", timeout=30)).text == "echo: hi"
        # An entry that does not validate: dead-lettered at the worker's door.
        inbox = client._inbox
        keys = inbox.layout.for_thread("invalid")
        bad = Envelope(
            kind="input",
            message_id="bad",
            thread_id="invalid",
            update={"no_such_key": 1},
            run_id="run-bad",
            reply_to=keys.reply("run-bad"),
        )
        await inbox.enqueue("invalid", "bad", encode_envelope(bad), always=True)
        with pytest.raises(InvalidUpdateError):
            async for _ in client.join("invalid", "run-bad"):
                pass
        # An entry that does not decode (it never reaches a thread: no share).
        await inbox._client.xadd(keys.inbox, {"e": b"\x00garbage", "t": "invalid"})
        assert (await client.ask("next-2", "hi", timeout=30)).text == "echo: hi"
        assert worker.active_turns == worker.in_flight == 0
        letters = await inbox.dead_letters(keys.partition)
        assert len(letters) == 2 and letters[0][2].startswith("invalid:")


async def test_the_share_comes_back_when_a_poison_entry_is_dead_lettered(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """``max_deliveries=1``: an entry another consumer had read (delivered once)
    is poison when this worker claims it (twice). Its turn never runs; the
    share it took comes back, and the one turn the cap allows is served."""
    layout = await create_deployment(redis_server.url, redis_prefix)
    keys = layout.for_thread("poisoned")
    async with Client(redis_server.url, prefix=redis_prefix) as client:
        await client.tell("poisoned", "hi", message_id="poison")
        raw = client._inbox._client
        await client._inbox.ensure_group(keys.partition)
        await raw.xreadgroup("w", "dead-0", {keys.inbox: ">"})  # its owner 'died'
    holds = Holds()
    async with serving(
        holds.agent(), redis_server.url, redis_prefix, max_active_turns=1, max_deliveries=1
    ) as (worker, client):
        with anyio.fail_after(20):
            while not await client._inbox.dead_letters(keys.partition):
                await anyio.sleep(0.01)
        assert (await client.ask("next", "hi", timeout=30)).text == "echo: hi"
        [(_, _, reason)] = await client._inbox.dead_letters(keys.partition)
        assert reason.startswith("poison: delivered 2 times (max_deliveries 1)")
        assert (await client.ask("poisoned", "again", timeout=30)).text == "echo: again"
        assert worker.active_turns == worker.in_flight == 0


@pytest.mark.parametrize("mailbox_capacity", [1000, 1])
async def test_the_shares_come_back_when_a_thread_is_stalled(
    redis_server: RedisServer, redis_prefix: str, mailbox_capacity: int
) -> None:
    """A fenced commit stalls the thread: the messages queued behind its turn
    are handed back to the inbox (each gives its count back once), the
    partition is claimed again and all of them are served in order. With a
    mailbox of one, the third message waits for room in the mailbox when the
    thread stalls: it must go back to the inbox too, not run before the
    second."""
    holds = Holds()
    thread = "stalled"
    async with serving(
        holds.agent(),
        redis_server.url,
        redis_prefix,
        max_active_turns=1,
        mailbox_capacity=mailbox_capacity,
    ) as (worker, client):
        await client.tell(thread, f"hold {thread}", message_id="s-0")
        await client.tell(thread, "one", message_id="s-1")
        await client.tell(thread, "two", message_id="s-2")
        await until(lambda: holds.started == [thread] and worker.in_flight == 3)
        assert worker.active_turns == 1
        await client.snapshots.acquire(thread)  # another owner: the next commit is fenced
        with structlog.testing.capture_logs() as logs:
            holds.open(thread)
            result = await client.ask(thread, "three", timeout=30)
        assert result.text == "echo: three"
        # Fenced once; activated again only once the partition was claimed again
        # (the third message, run ahead, activated the thread in between).
        seen = [
            e["event"] for e in logs if e["event"] in ("thread.store_error", "thread.activated")
        ]
        assert seen == ["thread.store_error", "thread.activated"], logs
        consumed = [s.consumed for s in await client.history(thread) if s.consumed]
        assert consumed == ["s-0", "s-1", "s-2", result.message_id]
        assert worker.active_turns == worker.in_flight == 0
        assert (await client.ask("other", "hi", timeout=30)).text == "echo: hi"


async def test_a_partition_handed_over_gives_its_shares_back(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Worker A is at its cap: 8 threads, one per partition, each turn held,
    one message queued behind it (a mailbox of one) and one more that the
    partition's reader waits to put. B joins and about half the partitions
    move. For each moving one A stops the reader (the put it waited in is
    cancelled: its count comes back), hands the queued message back, and
    waits for the held turn's end with a wake (not an inbox message: it needs
    no share, or the handoff would wait on the cap); every message is served
    once, in order, by A or B."""
    holds = Holds()
    layout = await create_deployment(redis_server.url, redis_prefix)
    threads = [thread_in(layout, p, "moving")[0] for p in range(PARTITIONS)]
    url, prefix = redis_server.url, redis_prefix
    async with serving(
        holds.agent(), url, prefix, max_active_turns=PARTITIONS, mailbox_capacity=1
    ) as (a, client):
        for t in threads:
            await client.tell(t, f"hold {t}", message_id=f"{t}-0")
            await client.tell(t, "queued", message_id=f"{t}-1")
            await client.tell(t, "waiting", message_id=f"{t}-2")
        await until(lambda: len(holds.started) == PARTITIONS and a.in_flight == 3 * PARTITIONS)
        assert a.active_turns == PARTITIONS
        async with (
            Worker(holds.agent(), url, prefix=prefix, lease_ttl=1.0, shutdown_timeout=2.0) as b,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(b.serve)
            # The moving partitions' waiting and queued messages come back at once.
            await until(lambda: bool(a._handing_off) and a.in_flight < 3 * PARTITIONS)
            await until(lambda: a.in_flight == 3 * PARTITIONS - 2 * len(a._handing_off))
            holds.open(*threads)
            await until(
                lambda: len(a.partitions) + len(b.partitions) == PARTITIONS > len(a.partitions)
            )
            for t in threads:
                assert (await client.ask(t, "after", timeout=30)).text == "echo: after"
                consumed = [s.consumed for s in await client.history(t) if s.consumed]
                assert consumed[:3] == [f"{t}-0", f"{t}-1", f"{t}-2"] and len(consumed) == 4
            assert a.active_turns == a.in_flight == b.active_turns == b.in_flight == 0
            tg.cancel_scope.cancel()


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_active_turns", 0),
        ("max_active_turns", -1),
        ("max_active_turns", 2.5),
        ("max_active_turns", True),
        ("max_active_turns", "4"),
        ("max_deliveries", 0),
        ("max_deliveries", 1.0),
        ("handoff_timeout", 0),
        ("handoff_timeout", -1.0),
        ("handoff_timeout", math.nan),
        ("handoff_timeout", math.inf),
        ("handoff_timeout", "30"),
        ("lease_ttl", 0),
        ("lease_ttl", math.nan),
        ("lease_ttl", math.inf),
    ],
)
def test_worker_options_are_checked(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        Worker(demo_agent(), "redis://127.0.0.1:1/0", **{option: value})


def test_worker_options_default_and_set() -> None:
    worker = Worker(demo_agent(), "redis://127.0.0.1:1/0")
    assert (worker.max_active_turns, worker.max_deliveries, worker.handoff_timeout) == (
        256,
        5,
        30.0,
    )
    assert worker.active_turns == worker.in_flight == 0 and not worker.saturated
    worker = Worker(
        demo_agent(),
        "redis://127.0.0.1:1/0",
        max_active_turns=7,
        max_deliveries=2,
        handoff_timeout=0.5,
    )
    assert (worker.max_active_turns, worker.max_deliveries, worker.handoff_timeout) == (
        7,
        2,
        0.5,
    )


def test_the_worker_command_passes_its_options_on() -> None:
    parse = _parser().parse_args
    default = make_worker(parse(["worker", "--redis", "redis://x:1/0"]), demo_agent())
    assert (default.max_active_turns, default.max_deliveries, default.handoff_timeout) == (
        256,
        5,
        30.0,
    )
    args = parse(
        [
            "worker",
            "--redis",
            "redis://x:1/0",
            "--max-active-turns",
            "3",
            "--max-deliveries",
            "2",
            "--handoff-timeout",
            "1.5",
            "--lease-ttl",
            "4",
        ]
    )
    worker = make_worker(args, demo_agent())
    assert (worker.max_active_turns, worker.max_deliveries, worker.handoff_timeout) == (3, 2, 1.5)
    assert worker._ttl_ms == 4000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-active-turns", "0"], "argument --max-active-turns: must be at least 1, got 0"),
        (["--max-active-turns", "x"], "argument --max-active-turns: not a whole number: 'x'"),
        (["--max-deliveries", "-1"], "argument --max-deliveries: must be at least 1, got -1"),
        (["--handoff-timeout", "0"], "argument --handoff-timeout: must be a positive number"),
        (["--handoff-timeout", "inf"], "argument --handoff-timeout: must be a positive number"),
        (["--lease-ttl", "nan"], "argument --lease-ttl: must be a positive number"),
    ],
)
def test_bad_worker_options_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["worker", "--redis", "redis://127.0.0.1:1/0", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: threadline worker")
    assert err.splitlines()[-1].startswith(f"threadline: error: {message}"), err


@pytest.mark.slow
async def test_threadline_worker_runs_with_its_cap(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """The command, in its own process: the cap reaches the worker it runs."""
    exe = shutil.which("threadline")
    command = [exe] if exe else [sys.executable, "-m", "threadline.runtime.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    argv = [
        *command,
        "worker",
        "--redis",
        redis_server.url,
        "--prefix",
        redis_prefix,
        "--partitions",
        str(PARTITIONS),
        "--max-active-turns",
        "3",
    ]
    errors = tmp_path / "worker.err"
    with errors.open("wb") as err:
        proc = await anyio.open_process(argv, env=env, stderr=err)
    async with proc:
        assert proc.stdout is not None
        said = b""
        with anyio.fail_after(30):
            while b"\n" not in said:
                said += await proc.stdout.receive()
        assert b"(8 partitions, at most 3 active turns)" in said, said
        async with Client(redis_server.url, prefix=redis_prefix) as client:
            result = await client.ask("cli", "my name is Ann", timeout=30)
        assert result.messages[-1].content
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            code = await proc.wait()
    assert code == 0, errors.read_text()


# -- the client's caps -----------------------------------------------------------------


async def test_the_clients_caps_refuse_with_the_configured_numbers(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    layout = await create_deployment(redis_server.url, redis_prefix)
    async with Client(redis_server.url, prefix=redis_prefix, max_queued=2) as client:
        await client.tell("busy", "one")
        await client.tell("busy", "two")
        with pytest.raises(MailboxFullError, match="'busy' has 2 messages waiting"):
            await client.tell("busy", "three")
        with pytest.raises(MailboxFullError):
            await client.ask("busy", "three", timeout=5)
        await client.tell("idle", "one")  # another thread has its own count
    same = thread_in(layout, 6, "crowded", 4)
    async with Client.from_url(
        redis_server.url, prefix=redis_prefix, max_backlog=3, max_queued=0
    ) as client:
        for t in same[:3]:
            await client.tell(t, "hi")
        with pytest.raises(OverloadedError, match=r"partition 6 .* has 3 unprocessed messages"):
            await client.tell(same[3], "hi")
        assert await client._inbox.backlog(6) == 3  # refused: nothing appended
        await client.tell(thread_in(layout, 2, "elsewhere")[0], "hi")
    # 0: no cap. The third message of "busy" is accepted now.
    async with Client(redis_server.url, prefix=redis_prefix, max_queued=0) as client:
        await client.tell("busy", "three")
        assert await client._inbox.queued("busy") == 3


async def test_the_clients_defaults_are_the_inboxs(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    await create_deployment(redis_server.url, redis_prefix)
    async with (
        Client(redis_server.url, prefix=redis_prefix) as client,
        open_redis(redis_server.url, "test") as raw,
    ):
        assert client.layout is not None
        inbox = RedisInbox(raw, client.layout)
        mine = client._inbox
        assert (mine.max_queued, mine.max_backlog, mine.timeout) == (
            inbox.max_queued,
            inbox.max_backlog,
            inbox.timeout,
        )
    async with Client.from_url(redis_server.url, prefix=redis_prefix, redis_timeout=None) as c:
        assert c._inbox.timeout is None
    async with Client(redis_server.url, prefix=redis_prefix, redis_timeout=2.5) as c:
        assert c._inbox.timeout == 2.5


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_queued", -1),
        ("max_queued", 1.5),
        ("max_queued", True),
        ("max_backlog", -5),
        ("max_backlog", "10"),
        ("redis_timeout", 0),
        ("redis_timeout", -1.0),
        ("redis_timeout", math.nan),
        ("redis_timeout", False),
    ],
)
def test_client_options_are_checked(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        Client("redis://127.0.0.1:1/0", **{option: value})
    with pytest.raises(ValueError, match=option):
        Client.from_url("redis://127.0.0.1:1/0", **{option: value})
