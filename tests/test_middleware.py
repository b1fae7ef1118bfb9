"""Hooks: order, wrappers, jumps, state-schema extension, errors naming the hook."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from threadline.actors import (
    AgentState,
    AIMessage,
    Command,
    HumanMessage,
    InvalidUpdateError,
    RemoveMessage,
    ToolCall,
    ToolMessage,
    TurnFailedError,
)
from threadline.runtime import (
    ActorSystem,
    Agent,
    AgentMiddleware,
    ModelRequest,
    Runtime,
    ScriptedModel,
    ToolCallRequest,
    after_agent,
    after_model,
    before_agent,
    before_model,
    dynamic_prompt,
    wrap_model_call,
    wrap_tool_call,
)

pytestmark = pytest.mark.anyio


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


class Recorder(AgentMiddleware):
    """Records every hook call as (name, hook)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self._name, self.log = name, log

    @property
    def name(self) -> str:
        return self._name

    def before_agent(self, state: Any, runtime: Runtime[Any]) -> None:
        self.log.append(f"{self._name}.before_agent")

    async def before_model(self, state: Any, runtime: Runtime[Any]) -> None:
        self.log.append(f"{self._name}.before_model")

    def after_model(self, state: Any, runtime: Runtime[Any]) -> None:
        self.log.append(f"{self._name}.after_model")

    async def after_agent(self, state: Any, runtime: Runtime[Any]) -> None:
        self.log.append(f"{self._name}.after_agent")

    async def wrap_model_call(self, request: ModelRequest[Any], handler: Any) -> AIMessage:
        self.log.append(f"{self._name}.wrap_model>")
        result: AIMessage = await handler(request)
        self.log.append(f"{self._name}.wrap_model<")
        return result

    async def wrap_tool_call(self, request: ToolCallRequest[Any], handler: Any) -> Any:
        self.log.append(f"{self._name}.wrap_tool>")
        result = await handler(request)
        self.log.append(f"{self._name}.wrap_tool<")
        return result


def with_tool(request: ModelRequest[Any]) -> AIMessage | str:
    if isinstance(request.messages[-1], HumanMessage):
        return AIMessage("", tool_calls=[ToolCall(id="1", name="noop", args={})])
    return "done"


def noop() -> str:
    """Does nothing."""
    return "ok"


async def test_hook_order_before_first_to_last_after_last_to_first_wrappers_nest() -> None:
    log: list[str] = []
    agent = Agent(
        model=ScriptedModel(with_tool),
        tools=[noop],
        middleware=[Recorder("A", log), Recorder("B", log)],
    )
    async with ActorSystem(agent) as system:
        await system.ask("t", "go")
    assert log == [
        # first model step
        "A.before_agent", "B.before_agent",
        "A.before_model", "B.before_model",
        "A.wrap_model>", "B.wrap_model>", "B.wrap_model<", "A.wrap_model<",
        "B.after_model", "A.after_model",
        # tools step
        "A.wrap_tool>", "B.wrap_tool>", "B.wrap_tool<", "A.wrap_tool<",
        # second model step: before_agent runs once per turn
        "A.before_model", "B.before_model",
        "A.wrap_model>", "B.wrap_model>", "B.wrap_model<", "A.wrap_model<",
        "B.after_model", "A.after_model",
        "B.after_agent", "A.after_agent",
    ]  # fmt: skip


async def test_hook_updates_are_part_of_the_committed_step() -> None:
    class Counted(AgentState):
        calls: int = 0

    @before_model(state_schema=Counted)
    def count(state: Counted, runtime: Runtime[Any]) -> dict[str, Any]:
        return {"calls": state.calls + 1}

    agent = Agent(model=ScriptedModel(echo), middleware=[count])
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "hi")
        assert result["calls"] == 1
        history = await system.history("t")
        assert history[1].kind == "model"
        assert history[1].updates[0] == {"calls": 1}  # the hook's update, then the AI message
        assert [m.type for m in history[1].updates[1]["messages"]] == ["ai"]
        await system.ask("t", "again")
        assert (await system.get_state("t")).state["calls"] == 2


async def test_wrap_model_call_changes_the_request_not_the_history() -> None:
    seen: list[list[str]] = []

    def spy(request: ModelRequest[Any]) -> str:
        seen.append([m.content for m in request.messages])
        return "ok"

    @wrap_model_call
    async def only_last(request: ModelRequest[Any], handler: Any) -> AIMessage:
        return await handler(request.override(messages=request.messages[-1:]))  # type: ignore[no-any-return]

    async with ActorSystem(Agent(model=ScriptedModel(spy), middleware=[only_last])) as system:
        await system.ask("t", "one")
        result = await system.ask("t", "two")
    assert seen == [["one"], ["two"]]
    assert [m.content for m in result.messages] == ["one", "ok", "two", "ok"]


async def test_wrap_model_call_may_retry_or_answer_itself() -> None:
    attempts = 0

    def flaky(request: ModelRequest[Any]) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("blip")
        return "second time lucky"

    @wrap_model_call
    async def retry(request: ModelRequest[Any], handler: Any) -> AIMessage:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ConnectionError:
            return await handler(request)  # type: ignore[no-any-return]

    @wrap_model_call
    def cached(request: ModelRequest[Any], handler: Any) -> Any:
        if request.messages[-1].content == "cached?":
            return AIMessage("from cache")
        return handler(request)  # a sync wrapper may hand back the handler's awaitable

    agent = Agent(model=ScriptedModel(flaky), middleware=[retry, cached])
    async with ActorSystem(agent) as system:
        assert (await system.ask("t", "hi")).text == "second time lucky"
        assert (await system.ask("t", "cached?")).text == "from cache"
    assert attempts == 2


async def test_wrap_tool_call_can_short_circuit() -> None:
    @wrap_tool_call
    async def deny(request: ToolCallRequest[Any], handler: Any) -> ToolMessage:
        return ToolMessage("denied", tool_call_id=request.tool_call.id, status="error")

    agent = Agent(model=ScriptedModel(with_tool), tools=[noop], middleware=[deny])
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    tool_messages = [m for m in result.messages if isinstance(m, ToolMessage)]
    assert [(m.content, m.status) for m in tool_messages] == [("denied", "error")]


async def test_dynamic_prompt_from_context() -> None:
    prompts: list[str | None] = []

    def spy(request: ModelRequest[Any]) -> str:
        prompts.append(request.system_prompt)
        return "ok"

    @dynamic_prompt
    def prompt(request: ModelRequest[Any]) -> str:
        return f"Address the user as {request.runtime.context['user_name']}."

    agent = Agent(model=ScriptedModel(spy), middleware=[prompt], system_prompt="static")
    async with ActorSystem(agent) as system:
        await system.ask("t", "hi", context={"user_name": "John Smith"})
    assert prompts == ["Address the user as John Smith."]


async def test_jump_to_end_from_before_model_skips_the_model() -> None:
    calls = 0

    def model(request: ModelRequest[Any]) -> str:
        nonlocal calls
        calls += 1
        return "answer"

    @before_model
    def guard(state: AgentState, runtime: Runtime[Any]) -> Command | None:
        if "forbidden" in state.messages[-1].content:
            return Command(update={"messages": [AIMessage("I can't help with that.")]}, goto="end")
        return None

    ended: list[int] = []

    @after_agent
    def done(state: AgentState, runtime: Runtime[Any]) -> None:
        ended.append(len(state.messages))

    agent = Agent(model=ScriptedModel(model), middleware=[guard, done])
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "something forbidden")
        assert result.text == "I can't help with that."
        assert calls == 0
        assert (await system.ask("t", "fine")).text == "answer"
    assert ended == [2, 4]


async def test_after_model_can_remove_the_answer_and_jump_back_to_the_model() -> None:
    replies = iter(["my password is hunter2", "I can't share that."])

    def model(request: ModelRequest[Any]) -> str:
        return next(replies)

    @after_model
    def validate(state: AgentState, runtime: Runtime[Any]) -> Command | None:
        last = state.messages[-1]
        if "password" in last.content:
            return Command(update={"messages": [RemoveMessage(id=last.id)]}, goto="model")
        return None

    async with ActorSystem(Agent(model=ScriptedModel(model), middleware=[validate])) as system:
        result = await system.ask("t", "what's the password?")
        kinds = [s.kind for s in await system.history("t")]
    assert [m.content for m in result.messages] == ["what's the password?", "I can't share that."]
    assert kinds == ["input", "model", "model"]


async def test_middleware_class_extends_the_state_schema_and_adds_tools() -> None:
    class Notes(AgentState):
        notes: list[str] = []

    def note(text: str) -> str:
        """Take a note."""
        return text

    class NoteTaker(AgentMiddleware):
        state_schema = Notes
        tools = (note,)

        def after_agent(self, state: Any, runtime: Runtime[Any]) -> dict[str, Any]:
            return {"notes": [*state.notes, state.messages[-1].content]}

    def model(request: ModelRequest[Any]) -> AIMessage | str:
        assert [t.name for t in request.tools] == ["note"]
        return "noted"

    class Mine(AgentState):
        user_id: str = ""

    agent = Agent(model=ScriptedModel(model), middleware=[NoteTaker()], state_schema=Mine)
    assert set(agent.state_schema.__struct_fields__) >= {"notes", "user_id", "messages"}
    async with ActorSystem(agent) as system:
        result = await system.ask("t", {"messages": "hi", "user_id": "u1"})
    assert result["notes"] == ["noted"]
    assert result["user_id"] == "u1"


@pytest.mark.parametrize(
    ("returned", "needle"),
    [
        ({"nope": 1}, "bad_hook.before_model: unknown state key 'nope'"),
        (Command(goto="elsewhere"), "bad_hook.before_model: Command.goto"),  # type: ignore[arg-type]
        ("text", "bad_hook.before_model returned str"),
    ],
)
async def test_bad_hook_results_fail_the_turn_naming_the_hook(returned: Any, needle: str) -> None:
    @before_model
    def bad_hook(state: AgentState, runtime: Runtime[Any]) -> Any:
        return returned if state.messages[-1].content == "trigger" else None

    async with ActorSystem(Agent(model=ScriptedModel(echo), middleware=[bad_hook])) as system:
        await system.ask("t", "fine")
        with pytest.raises(TurnFailedError, match="bad_hook") as info:
            await system.ask("t", "trigger")
        assert isinstance(info.value.__cause__, InvalidUpdateError)
        assert needle in str(info.value.__cause__)
        # The durable state stays at the last committed step and the actor goes on.
        assert (await system.get_state("t")).state.messages[-1].content == "trigger"
        assert (await system.ask("t", "after")).text == "echo: after"


async def test_raising_hook_fails_the_turn_and_the_thread_serves_the_next_message() -> None:
    @before_agent
    async def explode(state: AgentState, runtime: Runtime[Any]) -> None:
        await anyio.lowlevel.checkpoint()
        if state.messages[-1].content == "boom":
            raise RuntimeError("hook failed")

    async with ActorSystem(Agent(model=ScriptedModel(echo), middleware=[explode])) as system:
        with pytest.raises(TurnFailedError, match="hook failed"):
            await system.ask("t", "boom")
        assert (await system.ask("t", "ok")).text == "echo: ok"
