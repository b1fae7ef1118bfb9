"""ActorSystem: turns, steps, mailbox, limits at the door, streams, state access."""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
import structlog

from threadline.actors import (
    AgentState,
    AIMessage,
    Command,
    HumanMessage,
    InvalidContextError,
    InvalidMessageError,
    InvalidThreadIdError,
    InvalidUpdateError,
    MailboxFullError,
    MessageTooLargeError,
    SystemClosedError,
    ThreadNotFoundError,
    ToolCall,
    ToolMessage,
    TurnFailedError,
)
from threadline.runtime import (
    ActorSystem,
    Agent,
    ModelRequest,
    ScriptedModel,
    ToolRuntime,
    tool,
)

pytestmark = pytest.mark.anyio


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


def calls(*names: str, **args: Any) -> AIMessage:
    return AIMessage(
        "", tool_calls=[ToolCall(id=f"c{i}", name=n, args=args) for i, n in enumerate(names)]
    )


def after_tools(request: ModelRequest[Any]) -> str | AIMessage:
    """Ask for the tools named in the human message, then summarize their results."""
    last = request.messages[-1]
    if isinstance(last, HumanMessage) and last.content.startswith("use "):
        return calls(*last.content.removeprefix("use ").split(","))
    results = [m.content for m in request.messages if isinstance(m, ToolMessage)]
    return "results: " + " | ".join(results)


async def test_ask_commits_input_and_model_steps() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
        result = await system.ask("t1", "hello")
        assert result.text == "echo: hello"
        assert result.version == 2
        assert [m.type for m in result.messages] == ["human", "ai"]
        history = await system.history("t1")
        assert [(s.version, s.kind) for s in history] == [(1, "input"), (2, "model")]
        assert history[0].turn is not None and history[0].turn.next == "model"
        assert history[1].turn is None  # the turn is over
        again = await system.ask("t1", {"role": "user", "content": "more"})
        assert [m.content for m in again.messages] == ["hello", "echo: hello", "more", "echo: more"]


async def test_tool_turn_runs_calls_concurrently_and_commits_each_step() -> None:
    first, second = anyio.Event(), anyio.Event()

    async def ping() -> str:
        """Set one event and wait for the other (deadlocks if tools ran one by one)."""
        first.set()
        await second.wait()
        return "ping"

    async def pong() -> str:
        """The other half."""
        second.set()
        await first.wait()
        return "pong"

    agent = Agent(model=ScriptedModel(after_tools), tools=[ping, pong])
    async with ActorSystem(agent) as system:
        with anyio.fail_after(5):
            result = await system.ask("t", "use ping,pong")
        assert result.text == "results: ping | pong"
        kinds = [s.kind for s in await system.history("t")]
        assert kinds == ["input", "model", "tools", "model"]


async def test_failing_and_unknown_tools_become_error_tool_messages() -> None:
    def explode() -> str:
        """Always fails."""
        raise RuntimeError("kaboom")

    agent = Agent(model=ScriptedModel(after_tools), tools=[explode])
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "use explode,missing")
        tool_messages = [m for m in result.messages if isinstance(m, ToolMessage)]
        assert [m.status for m in tool_messages] == ["error", "error"]
        assert "kaboom" in tool_messages[0].content
        assert "unknown tool 'missing'" in tool_messages[1].content
        assert (await system.ask("t", "still alive?")).text == "results: " + " | ".join(
            m.content for m in tool_messages
        )


class UserState(AgentState):
    user_id: str = ""
    user_name: str | None = None


async def test_tools_read_state_and_write_it_with_command() -> None:
    @tool
    def update_user_info(runtime: ToolRuntime[None, UserState]) -> Command:
        """Look up and update user info."""
        name = "John Smith" if runtime.state["user_id"] == "user_123" else "Unknown user"
        return Command(
            update={
                "user_name": name,
                "messages": [ToolMessage("looked up", tool_call_id=runtime.tool_call_id)],
            }
        )

    assert update_user_info.parameters["properties"] == {}  # runtime is hidden from the model
    agent = Agent(
        model=ScriptedModel(after_tools), tools=[update_user_info], state_schema=UserState
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", {"messages": "use update_user_info", "user_id": "user_123"})
        assert result.state.user_name == "John Smith"
        assert result["user_id"] == "user_123"


async def test_command_without_tool_message_fails_the_turn_clearly() -> None:
    @tool
    def sloppy() -> Command:
        """Forgets its ToolMessage."""
        return Command(update={"user_name": "x"})

    agent = Agent(model=ScriptedModel(after_tools), tools=[sloppy], state_schema=UserState)
    async with ActorSystem(agent) as system:
        with pytest.raises(TurnFailedError, match="without a ToolMessage") as info:
            await system.ask("t", "use sloppy")
        assert isinstance(info.value.__cause__, InvalidUpdateError)
        snapshot = await system.get_state("t")
        assert snapshot.state.user_name is None  # the failed step changed nothing


def test_tool_schema_from_signature_and_docstring() -> None:
    @tool
    async def search(query: str, limit: int = 5, runtime: ToolRuntime | None = None) -> list[str]:
        """Search the web.

        Args:
            query: what to look for.
            limit: how many results.
        """
        return []

    schema = search.schema["function"]
    assert schema["name"] == "search"
    assert schema["description"] == "Search the web."
    params = schema["parameters"]
    assert params["required"] == ["query"]
    assert params["properties"]["query"] == {"type": "string", "description": "what to look for."}
    assert params["properties"]["limit"]["default"] == 5
    assert "runtime" not in params["properties"]


async def test_tool_arguments_are_validated() -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    def script(request: ModelRequest[Any]) -> AIMessage | str:
        if isinstance(request.messages[-1], HumanMessage):
            return AIMessage("", tool_calls=[ToolCall(id="1", name="add", args={"a": "x", "b": 2})])
        return request.messages[-1].content

    async with ActorSystem(Agent(model=ScriptedModel(script), tools=[add])) as system:
        result = await system.ask("t", "add")
        assert "invalid arguments for tool 'add'" in result.text
        assert "`int`" in result.text


async def test_model_failure_fails_the_turn_and_the_thread_goes_on() -> None:
    def flaky(request: ModelRequest[Any]) -> str:
        if request.messages[-1].content == "boom":
            raise ValueError("model is down")
        return "fine"

    async with ActorSystem(Agent(model=ScriptedModel(flaky))) as system:
        await system.ask("t", "hi")
        with pytest.raises(TurnFailedError, match="model is down") as info:
            await system.ask("t", "boom")
        assert isinstance(info.value.__cause__, ValueError)
        assert info.value.step == "model"
        history = await system.history("t")
        assert [s.kind for s in history] == ["input", "model", "input", "abort"]
        assert history[-1].error == "ValueError: model is down"
        snapshot = await system.get_state("t")
        assert snapshot.next is None  # the abort ended the turn: it will not be resumed
        assert (await system.ask("t", "again")).text == "fine"


class Ctx(msgspec.Struct, frozen=True):
    user_name: str


async def test_context_is_validated_at_the_door_and_reaches_the_model() -> None:
    def greet(request: ModelRequest[Any]) -> str:
        return f"hello {request.runtime.context.user_name}"

    async with ActorSystem(Agent(model=ScriptedModel(greet), context_schema=Ctx)) as system:
        assert (await system.ask("t", "hi", context=Ctx("Ann"))).text == "hello Ann"
        assert (await system.ask("t", "hi", context={"user_name": "Bo"})).text == "hello Bo"
        with pytest.raises(InvalidContextError):
            await system.ask("t", "hi", context={"user_name": 3})
        with pytest.raises(InvalidContextError):
            await system.ask("t", "hi")
        assert (await system.get_state("t")).version == 4  # rejected messages left no trace


@pytest.mark.parametrize(
    "thread_id",
    ["", " ", "\t \u3000", "x" * 257, "a\x00b", "line\nbreak", "\x7f", 42, "bad\ud800"],
)
async def test_bad_thread_ids_are_rejected(thread_id: Any) -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
        with pytest.raises(InvalidThreadIdError):
            await system.ask(thread_id, "hi")


@pytest.mark.parametrize("thread_id", ["{braces}", "a:b/c d", "ünïcødé ✓", "%7B", "x" * 256])
async def test_odd_thread_ids_work(thread_id: str) -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
        await system.ask(thread_id, "hi")
        assert await system.threads() == [thread_id]


async def test_oversized_and_malformed_messages_are_rejected_and_others_keep_working() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo)), max_message_bytes=1000) as system:
        await system.ask("good", "hi")
        with pytest.raises(MessageTooLargeError, match="limit is 1000"):
            await system.ask("big", "x" * 2000)
        with pytest.raises(InvalidMessageError):
            await system.ask("good", {"role": "user", "content": object()})
        with pytest.raises(InvalidUpdateError, match="unknown state key"):
            await system.ask("good", {"mesages": "typo"})
        assert (await system.ask("good", "still here")).version == 4
        assert await system.threads() == ["good"]


async def test_mailbox_capacity_and_arrival_order() -> None:
    gate = anyio.Event()

    async def slow(request: ModelRequest[Any]) -> str:
        await gate.wait()
        return "ok"

    async with ActorSystem(Agent(model=ScriptedModel(slow)), mailbox_capacity=3) as system:
        ids = [system.tell_nowait("t", f"m{i}") for i in range(3)]
        await anyio.sleep(0.01)  # the first message is taken: room for one more
        ids.append(system.tell_nowait("t", "m3"))
        with pytest.raises(MailboxFullError, match="'t'"):
            system.tell_nowait("t", "m4")
        stats = system.mailbox_statistics("t")
        assert stats is not None and stats.size == 3 and stats.capacity == 3
        gate.set()
        result = await system.ask("t", "last")
        humans = [m.content for m in result.messages if isinstance(m, HumanMessage)]
        assert humans == ["m0", "m1", "m2", "m3", "last"]
        assert len(set(ids)) == 4


async def test_a_duplicate_queued_behind_a_slow_turn_never_drops_the_next_sender() -> None:
    """The drain that answers a duplicate without awaiting anything wakes a sender
    waiting for room and may end before that sender runs: the sender must still
    find the mailbox it waited on (it used to put into a discarded one and hang)."""
    gate = anyio.Event()
    started = anyio.Event()

    async def slow(request: ModelRequest[Any]) -> str:
        if request.messages[-1].content == "slow":
            started.set()
            await gate.wait()
        return "ok"

    async with ActorSystem(Agent(model=ScriptedModel(slow)), mailbox_capacity=1) as system:
        await system.ask("t", "first", message_id="m0")
        results: dict[str, Any] = {}

        async def ask(key: str, text: str, message_id: str | None = None) -> None:
            results[key] = await system.ask("t", text, message_id=message_id)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, "slow", "slow")
                await started.wait()  # the slow turn is running: the mailbox is empty
                tg.start_soon(ask, "dup", "first", "m0")  # queued (capacity 1)
                await wait_until(lambda: system.mailbox_statistics("t").size == 1)  # type: ignore[union-attr]
                tg.start_soon(ask, "next", "next")  # waits for room
                await wait_until(
                    lambda: system.mailbox_statistics("t").waiting_senders == 1  # type: ignore[union-attr]
                )
                gate.set()
        assert results["dup"].duplicate
        assert [m.content for m in results["next"].messages][-2:] == ["next", "ok"]


async def test_a_storm_of_retried_duplicates_loses_no_accepted_message() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo)), mailbox_capacity=2) as system:
        await system.ask("t", "once", message_id="dup")
        told: list[str] = []

        async def retry() -> None:
            for _ in range(20):
                await system.ask("t", "once", message_id="dup")

        async def tell(i: int) -> None:
            told.append(await system.tell("t", f"m{i}"))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(retry)
                for i in range(30):
                    tg.start_soon(tell, i)
            final = await system.ask("t", "end")
        applied = {m.id for m in final.messages if isinstance(m, HumanMessage)}
        assert set(told) <= applied  # every accepted tell was applied
        history = await system.history("t")
        consumed = [s.consumed for s in history if s.kind == "input"]
        assert len(consumed) == len(set(consumed)) == 32  # "once", 30 tells and "end", each once


async def wait_until(predicate: Any) -> None:
    """Let the other tasks run until ``predicate()`` holds (no wall-clock sleeps)."""
    while not predicate():
        await anyio.lowlevel.checkpoint()


async def test_cancelled_ask_does_not_cancel_the_accepted_message() -> None:
    gate = anyio.Event()

    async def slow(request: ModelRequest[Any]) -> str:
        await gate.wait()
        return "done"

    async with ActorSystem(Agent(model=ScriptedModel(slow))) as system:
        with pytest.raises(TimeoutError):
            await system.ask("t", "first", timeout=0.05)
        with anyio.move_on_after(0.05):
            await system.ask("t", "second")
        gate.set()
        result = await system.ask("t", "third")
        assert [m.content for m in result.messages] == [
            "first",
            "done",
            "second",
            "done",
            "third",
            "done",
        ]


async def test_redelivered_message_id_is_applied_once() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
        first = await system.ask("t", "hi", message_id="msg-1")
        again = await system.ask("t", "hi", message_id="msg-1")
        assert not first.duplicate and again.duplicate
        assert again.version == first.version
        assert [m.content for m in again.messages] == ["hi", "echo: hi"]


async def test_stream_modes() -> None:
    @tool
    def progress(runtime: ToolRuntime) -> str:
        """Reports progress while it works."""
        runtime.stream_writer({"progress": 50})
        return "half"

    agent = Agent(model=ScriptedModel(after_tools), tools=[progress])
    async with ActorSystem(agent) as system:
        parts = [p async for p in system.stream("t", "use progress", mode=["updates", "custom"])]
        assert [(p.mode, next(iter(p.data)) if p.mode == "updates" else p.data) for p in parts] == [
            ("updates", "input"),
            ("updates", "model"),
            ("custom", {"progress": 50}),
            ("updates", "tools"),
            ("updates", "model"),
        ]
        values = [p async for p in system.stream("t", "again", mode="values")]
        assert [len(p.data.messages) for p in values] == [5, 6]
        assert [p.version for p in values] == [5, 6]


async def test_stream_raises_the_turn_error() -> None:
    def broken(request: ModelRequest[Any]) -> str:
        raise RuntimeError("nope")

    async with ActorSystem(Agent(model=ScriptedModel(broken))) as system:
        seen = []
        with pytest.raises(TurnFailedError):
            async for part in system.stream("t", "hi"):
                seen.append(part.data)
        assert [next(iter(d)) for d in seen] == ["input"]


async def test_get_update_state_history_threads_delete() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo), state_schema=UserState)) as system:
        with pytest.raises(ThreadNotFoundError):
            await system.get_state("t")
        await system.ask("t", "hi")
        snapshot = await system.update_state("t", {"user_name": "Ann", "messages": ["note"]})
        assert snapshot.version == 3 and snapshot.state.user_name == "Ann"
        assert (await system.get_state("t")).state.messages[-1].content == "note"
        with pytest.raises(InvalidUpdateError):
            await system.update_state("t", {"user_name": 5})
        assert [s.kind for s in await system.history("t")] == ["input", "model", "update"]
        assert await system.threads() == ["t"]
        assert await system.delete("t") is True
        assert await system.threads() == []
        with pytest.raises(ThreadNotFoundError):
            await system.get_state("t")
        assert await system.delete("t") is False
        fresh = await system.ask("t", "new life")
        assert fresh.version == 2 and [m.content for m in fresh.messages] == [
            "new life",
            "echo: new life",
        ]


async def test_idle_actors_are_passivated_and_reactivated() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo)), passivate_after=0.05) as system:
        await system.ask("a", "one")
        await system.ask("b", "one")
        assert system.live_threads == 2
        with anyio.fail_after(2):
            while system.live_threads:
                await anyio.sleep(0.02)
        result = await system.ask("a", "two")
        assert result.version == 4
        assert [m.content for m in result.messages][-2:] == ["two", "echo: two"]


async def test_logs_bind_thread_id() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            await system.ask("logged", "hi")
    activated = [e for e in logs if e["event"] == "thread.activated"]
    committed = [e for e in logs if e["event"] == "step.committed"]
    assert activated and activated[0]["thread_id"] == "logged"
    assert [e["version"] for e in committed] == [1, 2]
    assert all(e["thread_id"] == "logged" for e in committed)


async def test_shutdown_finishes_in_flight_turns_then_refuses_work() -> None:
    async def slowish(request: ModelRequest[Any]) -> str:
        await anyio.sleep(0.05)
        return "done"

    system = ActorSystem(Agent(model=ScriptedModel(slowish)))
    async with system:
        for i in range(5):
            system.tell_nowait(f"t{i}", "hi")
    async with ActorSystem(Agent(model=ScriptedModel(echo)), snapshots=system.snapshots) as again:
        for i in range(5):
            snapshot = await again.get_state(f"t{i}")
            assert snapshot.version == 2 and snapshot.next is None
    with pytest.raises(SystemClosedError):
        await system.ask("t0", "late")


async def test_shutdown_timeout_parks_the_turn_durably_and_it_resumes() -> None:
    async def stuck(request: ModelRequest[Any]) -> str:
        await anyio.sleep(math.inf)
        raise AssertionError

    system = ActorSystem(Agent(model=ScriptedModel(stuck)), shutdown_timeout=0.05)
    async with system:
        system.tell_nowait("t", "hi")
        await anyio.sleep(0.05)  # the turn is now stuck in its model step
    async with ActorSystem(Agent(model=ScriptedModel(echo)), snapshots=system.snapshots) as again:
        parked = await again.get_state("t")
        assert parked.version == 1 and parked.next == "model"
        result = await again.ask("t", "next")
        # The parked turn finished first (once), then the new message ran.
        assert [m.content for m in result.messages] == ["hi", "echo: hi", "next", "echo: next"]


async def test_errors_leave_the_system_block_unwrapped() -> None:
    with pytest.raises(InvalidThreadIdError):
        async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
            await system.ask("", "hi")


async def test_resources_reach_tools_and_context_survives_a_parked_turn() -> None:
    seen: list[tuple[str, str]] = []
    gate = anyio.Event()

    async def whoami(runtime: ToolRuntime[Ctx, AgentState]) -> str:
        """Report the caller."""
        seen.append((runtime.context.user_name, runtime.resources["db"]))
        if len(seen) == 1:
            await gate.wait()  # first process: parked here by a short shutdown
        return runtime.context.user_name

    def script(request: ModelRequest[Any]) -> AIMessage | str:
        if isinstance(request.messages[-1], HumanMessage):
            return AIMessage("", tool_calls=[ToolCall(id="w", name="whoami", args={})])
        return f"you are {request.messages[-1].content}"

    agent = Agent(model=ScriptedModel(script), tools=[whoami], context_schema=Ctx)
    first = ActorSystem(agent, resources={"db": "pool-1"}, shutdown_timeout=0.05)
    async with first:
        first.tell_nowait("t", "who am i?", context=Ctx("Ann"))
        with anyio.fail_after(5):
            while not seen:
                await anyio.sleep(0.01)
    async with ActorSystem(agent, snapshots=first.snapshots, resources={"db": "pool-2"}) as again:
        assert (await again.get_state("t")).next == "tools"
        result = await again.ask("t", "and now?", context=Ctx("Bo"))
    # The parked turn resumed with its own context, on the new system's resources.
    assert seen[:2] == [("Ann", "pool-1"), ("Ann", "pool-2")]
    texts = [m.content for m in result.messages if isinstance(m, AIMessage)]
    assert texts == ["", "you are Ann", "", "you are Bo"]


async def test_delivery_id_names_the_message_unless_it_has_its_own() -> None:
    async with ActorSystem(Agent(model=ScriptedModel(echo))) as system:
        plain = await system.ask("t", "hi")
        assert plain.messages[0].id == plain.message_id
        given = await system.ask("t", "again", message_id="delivery-7")
        assert given.messages[2].id == "delivery-7"
        own = await system.ask("t", HumanMessage("mine", id="my-id"), message_id="delivery-8")
        assert own.messages[4].id == "my-id"
        assert own.message_id == "delivery-8"


async def test_systems_sharing_one_agent_keep_their_own_resources() -> None:
    def which(runtime: ToolRuntime) -> str:
        """Name the pool."""
        return str(runtime.resources["pool"])

    agent = Agent(model=ScriptedModel(after_tools), tools=[which])
    async with (
        ActorSystem(agent, resources={"pool": "one"}) as first,
        ActorSystem(agent, resources={"pool": "two"}) as second,
    ):
        assert (await first.ask("t", "use which")).text == "results: one"
        assert (await second.ask("t", "use which")).text == "results: two"
