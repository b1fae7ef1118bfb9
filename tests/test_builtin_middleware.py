"""Built-in middleware through real ActorSystem turns."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

import threadline.runtime.agent.middleware._retry as builtin
from threadline.actors import (
    REMOVE_ALL_MESSAGES,
    AIMessage,
    AnyMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    TurnFailedError,
)
from threadline.runtime import (
    ActorSystem,
    Agent,
    CallLimitState,
    ContextEditingMiddleware,
    ModelCallLimitExceededError,
    ModelCallLimitMiddleware,
    ModelFallbackMiddleware,
    ModelRequest,
    ModelRetryMiddleware,
    ScriptedModel,
    SummarizationMiddleware,
    ToolCallLimitExceededError,
    ToolCallLimitMiddleware,
    ToolRetryMiddleware,
    count_tokens_approximately,
    tool,
)

pytestmark = pytest.mark.anyio

_ids = itertools.count()


def call(name: str, **args: Any) -> ToolCall:
    return ToolCall(id=f"call_{next(_ids)}", name=name, args=args)


def calls_ai(*calls: ToolCall) -> AIMessage:
    return AIMessage("", tool_calls=list(calls))


class Recorder:
    """A model that records the messages of every request and answers ``fn(request)``."""

    def __init__(self, fn: Callable[[ModelRequest[Any]], str | AIMessage]) -> None:
        self.requests: list[list[AnyMessage]] = []
        self.fn = fn

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        self.requests.append(list(request.messages))
        answer = self.fn(request)
        return AIMessage(answer) if isinstance(answer, str) else answer


def assert_valid_history(messages: list[AnyMessage]) -> None:
    """Each AIMessage with tool calls is followed by one ToolMessage per call; no orphans."""
    i = 0
    while i < len(messages):
        m = messages[i]
        assert not isinstance(m, ToolMessage), f"orphan ToolMessage at {i}"
        if isinstance(m, AIMessage) and m.tool_calls:
            answers = messages[i + 1 : i + 1 + len(m.tool_calls)]
            assert all(isinstance(a, ToolMessage) for a in answers)
            assert sorted(a.tool_call_id for a in answers) == sorted(  # type: ignore[union-attr]
                c.id for c in m.tool_calls
            )
            i += len(answers)
        i += 1


def types(messages: list[AnyMessage]) -> list[str]:
    return [m.type for m in messages]


# -- summarization ------------------------------------------------------------------------


async def test_summarization_end_to_end_replaces_old_messages_with_one_summary() -> None:
    summarizer = Recorder(lambda r: "Bob likes cats.")
    agent = Agent(
        model=ScriptedModel(["a0", "a1", "a2", "a3"]),
        middleware=[
            SummarizationMiddleware(summarizer, trigger=("messages", 6), keep=("messages", 2))
        ],
    )
    async with ActorSystem(agent) as system:
        for i in range(3):
            await system.ask("t1", f"m{i}")
        before = (await system.get_state("t1")).state.messages
        assert len(before) == 6 and summarizer.requests == []  # 5 < 6 before each model call
        result = await system.ask("t1", "m3")
        state = (await system.get_state("t1")).state
        history = await system.history("t1")

    # before the 4th model call: m0 a0 m1 a1 m2 a2 m3 -> summarize 5, keep [a2, m3]
    assert len(summarizer.requests) == 1
    (prompt,) = summarizer.requests[0]
    assert isinstance(prompt, HumanMessage)
    for text in ("m0", "a0", "m1", "a1", "m2"):
        assert f": {text}" in prompt.content
    assert ": m3" not in prompt.content and ": a2" not in prompt.content
    assert "{messages}" not in prompt.content

    messages = state.messages
    assert result.messages == messages
    assert types(messages) == ["human", "ai", "human", "ai"]
    summary = messages[0]
    assert summary.content == "Here is a summary of the conversation to date:\n\nBob likes cats."
    assert [m.content for m in messages[1:]] == ["a2", "m3", "a3"]
    assert messages[1].id == before[5].id  # kept messages keep their ids

    # the rewrite is part of the committed model step, before the model's answer
    last = history[-1]
    assert last.kind == "model"
    rewrite, answer = last.updates
    assert rewrite["messages"][0] == RemoveMessage(id=REMOVE_ALL_MESSAGES)
    assert [m.content for m in rewrite["messages"][1:]] == [summary.content, "a2", "m3"]
    assert answer["messages"][0].content == "a3"


async def test_summarization_keeps_tool_groups_whole_and_resummarizes() -> None:
    def main(request: ModelRequest[Any]) -> str | AIMessage:
        last = request.messages[-1]
        if isinstance(last, HumanMessage):
            return calls_ai(call("lookup", key=last.content))
        return f"done {last.content}"

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return f"value-{key}"

    summarizer = Recorder(lambda r: f"summary#{len(r.messages[0].content)}")
    agent = Agent(
        model=ScriptedModel(main),
        tools=[lookup],
        middleware=[
            SummarizationMiddleware(summarizer, trigger=("messages", 4), keep=("messages", 1))
        ],
    )
    async with ActorSystem(agent) as system:
        first = await system.ask("t", "k1")
        # turn 1: [h, ai(call), tool] at the 2nd model call -> below 4, nothing to do
        assert types(first.messages) == ["human", "ai", "tool", "ai"]
        second = await system.ask("t", "k2")

    # turn 2, 1st call: [h ai tool ai h] -> keep 1: [h k2]
    # turn 2, 2nd call: [summary h ai(call) tool] -> keep 1 would split the group: keep ai+tool
    assert len(summarizer.requests) == 2
    assert "Here is a summary of the conversation to date:" in summarizer.requests[1][0].content
    messages = second.messages
    assert_valid_history(messages)
    assert types(messages) == ["human", "ai", "tool", "ai"]
    assert messages[0].content.startswith("Here is a summary")
    assert isinstance(messages[1], AIMessage) and messages[1].tool_calls[0].args == {"key": "k2"}
    assert messages[2].content == "value-k2"
    assert messages[3].content == "done value-k2"


async def test_summarization_keeps_leading_system_messages() -> None:
    agent = Agent(
        model=ScriptedModel(["a"]),
        middleware=[
            SummarizationMiddleware(
                ScriptedModel(["S"]), trigger=("messages", 4), keep=("messages", 1)
            )
        ],
    )
    async with ActorSystem(agent) as system:
        await system.ask("t", [SystemMessage("be brief"), HumanMessage("one")])
        result = await system.ask("t", "two")
    assert types(result.messages) == ["system", "human", "human", "ai"]
    assert result.messages[0].content == "be brief"
    assert result.messages[1].content.endswith("\n\nS")
    assert result.messages[2].content == "two"


async def test_summarization_by_tokens_and_fraction() -> None:
    m = SummarizationMiddleware(
        ScriptedModel(["S"]),
        trigger=[("tokens", 1000), ("fraction", 0.5)],
        keep=("tokens", 10),
        context_window=40,
    )
    small = [HumanMessage("hi")]
    assert count_tokens_approximately(small) < 20 and not m.should_summarize(small)
    big = [HumanMessage("x" * 80)]  # ~24 tokens >= 0.5 * 40
    assert m.should_summarize(big)
    history: list[AnyMessage] = [
        HumanMessage("x" * 100, id="h1"),
        AIMessage("y" * 100, id="a1"),
        HumanMessage("q", id="h2"),
    ]
    head, old, kept = m.partition(history)
    assert head == [] and [x.id for x in old] == ["h1", "a1"] and [x.id for x in kept] == ["h2"]
    # even when the last message alone is over the budget it is kept
    head, old, kept = m.partition([*history[:2], HumanMessage("z" * 400, id="h3")])
    assert [x.id for x in kept] == ["h3"]


async def test_summary_model_failure_fails_the_turn_and_keeps_history() -> None:
    class Broken:
        async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
            raise ConnectionError("summarizer down")

    agent = Agent(
        model=ScriptedModel(["a"]),
        middleware=[
            SummarizationMiddleware(Broken(), trigger=("messages", 3), keep=("messages", 1))
        ],
    )
    async with ActorSystem(agent) as system:
        await system.ask("t", "one")
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t", "two")
        assert isinstance(info.value.__cause__, ConnectionError)
        state = (await system.get_state("t")).state
    assert [m.content for m in state.messages] == ["one", "a", "two"]


def test_summarization_config_errors() -> None:
    model = ScriptedModel(["S"])
    with pytest.raises(ValueError, match="context_window"):
        SummarizationMiddleware(model, trigger=("fraction", 0.8))
    with pytest.raises(ValueError, match="kind"):
        SummarizationMiddleware(model, trigger=("turns", 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trigger messages"):
        SummarizationMiddleware(model, trigger=("messages", 0))
    with pytest.raises(ValueError, match="fraction"):
        SummarizationMiddleware(model, trigger=("fraction", 1.5), context_window=100)
    with pytest.raises(ValueError, match="keep tokens"):
        SummarizationMiddleware(model, keep=("tokens", -1))
    with pytest.raises(ValueError, match="placeholder"):
        SummarizationMiddleware(model, summary_prompt="Summarize please")
    with pytest.raises(TypeError):
        SummarizationMiddleware("gpt-4")  # type: ignore[arg-type]


# -- context editing ---------------------------------------------------------------------


def _tool_loop(n: int) -> Callable[[ModelRequest[Any]], str | AIMessage]:
    """Call ``fetch`` n times (one call per model step), then answer."""

    def fn(request: ModelRequest[Any]) -> str | AIMessage:
        done = sum(isinstance(m, ToolMessage) for m in request.messages)
        if done < n:
            return calls_ai(call("fetch", page=done))
        return "finished"

    return fn


@tool
def fetch(page: int) -> str:
    """Fetch a page."""
    return f"page {page} " + "lorem ipsum " * 20


async def test_context_editing_clears_old_tool_results_in_the_request_only() -> None:
    model = Recorder(_tool_loop(4))
    agent = Agent(
        model=model,
        tools=[fetch],
        middleware=[ContextEditingMiddleware(trigger_tokens=50, keep=1, clear_tool_inputs=True)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "read")
        stored = (await system.get_state("t")).state.messages

    last_request = model.requests[-1]
    tool_results = [m for m in last_request if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_results[:-1]] == ["[cleared]"] * 3
    assert tool_results[-1].content.startswith("page 3 ")
    ai_calls = [m for m in last_request if isinstance(m, AIMessage) and m.tool_calls]
    assert [c.tool_calls[0].args for c in ai_calls] == [{}, {}, {}, {"page": 3}]
    assert_valid_history(last_request)

    # the thread's history has every result and argument
    assert result.messages == stored
    assert [m.content.split(" lorem")[0] for m in stored if isinstance(m, ToolMessage)] == [
        "page 0",
        "page 1",
        "page 2",
        "page 3",
    ]
    stored_calls = [m for m in stored if isinstance(m, AIMessage) and m.tool_calls]
    assert [c.tool_calls[0].args for c in stored_calls] == [{"page": i} for i in range(4)]
    # the first request (under the trigger) went out untouched
    assert model.requests[0] == stored[:1]


async def test_context_editing_below_trigger_and_excluded_tools() -> None:
    m = ContextEditingMiddleware(trigger_tokens=10_000, keep=0)
    ai = calls_ai(call("fetch", page=1))
    msgs: list[AnyMessage] = [
        HumanMessage("x"),
        ai,
        ToolMessage("r" * 100, tool_call_id=ai.tool_calls[0].id, name="fetch"),
    ]
    assert m.edit(msgs) is msgs  # under the trigger: the very same list
    m = ContextEditingMiddleware(trigger_tokens=0, keep=0, exclude_tools=["fetch"])
    assert m.edit(msgs) is msgs
    m = ContextEditingMiddleware(trigger_tokens=0, keep=0, placeholder="<gone>")
    edited = m.edit(msgs)
    assert edited[2].content == "<gone>" and msgs[2].content == "r" * 100
    # the system prompt counts toward the trigger
    m = ContextEditingMiddleware(trigger_tokens=count_tokens_approximately(msgs), keep=0)
    assert m.edit(msgs) is msgs
    assert m.edit(msgs, system_prompt="a long system prompt")[2].content == "[cleared]"


# -- retries -------------------------------------------------------------------------------


class Flaky:
    """Fails ``failures`` times with ``error``, then answers."""

    def __init__(self, failures: int, error: Exception, answer: str = "ok") -> None:
        self.failures = failures
        self.error = error
        self.answer = answer
        self.calls = 0

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return AIMessage(self.answer)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(builtin, "_sleep", fake_sleep)
    return recorded


async def test_model_retry_recovers_with_exponential_backoff(sleeps: list[float]) -> None:
    model = Flaky(2, ConnectionError("blip"))
    agent = Agent(
        model=model,
        middleware=[ModelRetryMiddleware(max_retries=2, initial_delay=1.0, jitter=False)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "hi")
    assert result.text == "ok"
    assert model.calls == 3
    assert sleeps == [1.0, 2.0]


async def test_model_retry_gives_up_and_raises(sleeps: list[float]) -> None:
    model = Flaky(10, ConnectionError("down"))
    agent = Agent(
        model=model,
        middleware=[
            ModelRetryMiddleware(max_retries=3, initial_delay=2.0, max_delay=5.0, jitter=False)
        ],
    )
    async with ActorSystem(agent) as system:
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t", "hi")
    assert isinstance(info.value.__cause__, ConnectionError)
    assert model.calls == 4
    assert sleeps == [2.0, 4.0, 5.0]  # capped by max_delay


async def test_model_retry_on_failure_continue_and_retry_on(sleeps: list[float]) -> None:
    model = Flaky(10, ConnectionError("down"))
    agent = Agent(
        model=model,
        middleware=[ModelRetryMiddleware(max_retries=1, initial_delay=0, on_failure="continue")],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "hi")
    assert result.text == "Model call failed after 2 attempts: ConnectionError: down"
    assert model.calls == 2

    # not retryable: one call, then on_failure applies
    model = Flaky(10, ValueError("bad request"))
    agent = Agent(
        model=model,
        middleware=[
            ModelRetryMiddleware(
                retry_on=(ConnectionError,), on_failure=lambda exc: f"sorry: {exc}"
            )
        ],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "hi")
    assert result.text == "sorry: bad request"
    assert model.calls == 1

    model = Flaky(1, ValueError("transient"))
    retry = ModelRetryMiddleware(retry_on=lambda exc: "transient" in str(exc), initial_delay=0)
    async with ActorSystem(Agent(model=model, middleware=[retry])) as system:
        assert (await system.ask("t", "hi")).text == "ok"
    assert model.calls == 2


def test_backoff_delay_and_jitter() -> None:
    retry = ModelRetryMiddleware(initial_delay=1.0, backoff_factor=3.0, max_delay=20.0)
    for n, base in enumerate([1.0, 3.0, 9.0, 20.0]):
        for _ in range(20):
            assert base * 0.75 <= retry.backoff.delay(n) <= base * 1.25
    constant = ModelRetryMiddleware(initial_delay=0.5, backoff_factor=0, jitter=False)
    assert [constant.backoff.delay(n) for n in range(3)] == [0.5, 0.5, 0.5]


def test_retry_config_errors() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        ModelRetryMiddleware(max_retries=-1)
    with pytest.raises(ValueError, match="initial_delay"):
        ModelRetryMiddleware(initial_delay=-1)
    with pytest.raises(ValueError, match="on_failure"):
        ModelRetryMiddleware(on_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_on"):
        ToolRetryMiddleware(retry_on=())
    with pytest.raises(ValueError, match="tools"):
        ToolRetryMiddleware(tools=[3])  # type: ignore[list-item]


def _one_tool_call(name: str) -> Callable[[ModelRequest[Any]], str | AIMessage]:
    def fn(request: ModelRequest[Any]) -> str | AIMessage:
        last = request.messages[-1]
        if isinstance(last, HumanMessage):
            return calls_ai(call(name))
        return f"model saw: {last.content}"

    return fn


def _flaky_tool(failures: int, error: Exception, name: str = "flaky") -> tuple[Any, list[int]]:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) <= failures:
            raise error
        return "tool ok"

    flaky.__name__ = name
    return tool(flaky), attempts


async def test_tool_retry_retries_a_raising_tool(sleeps: list[float]) -> None:
    flaky, attempts = _flaky_tool(2, ConnectionError("blip"))
    agent = Agent(
        model=ScriptedModel(_one_tool_call("flaky")),
        tools=[flaky],
        middleware=[ToolRetryMiddleware(max_retries=2, initial_delay=0.5, jitter=False)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert len(attempts) == 3
    assert sleeps == [0.5, 1.0]
    (answer,) = [m for m in result.messages if isinstance(m, ToolMessage)]
    assert answer.content == "tool ok" and answer.status == "success"
    assert result.text == "model saw: tool ok"


async def test_tool_retry_gives_up_with_an_error_message(sleeps: list[float]) -> None:
    flaky, attempts = _flaky_tool(10, ConnectionError("down"))
    agent = Agent(
        model=ScriptedModel(_one_tool_call("flaky")),
        tools=[flaky],
        middleware=[ToolRetryMiddleware(max_retries=2, initial_delay=0)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert len(attempts) == 3
    (answer,) = [m for m in result.messages if isinstance(m, ToolMessage)]
    assert answer.status == "error"
    assert answer.content == "Tool 'flaky' failed after 3 attempts: ConnectionError: down"
    assert_valid_history(result.messages)


async def test_tool_retry_filters_by_exception_and_tool(sleeps: list[float]) -> None:
    # retry_on sees the tool's own exception, not just "an error message"
    flaky, attempts = _flaky_tool(10, ValueError("bad args"))
    agent = Agent(
        model=ScriptedModel(_one_tool_call("flaky")),
        tools=[flaky],
        middleware=[ToolRetryMiddleware(retry_on=(ConnectionError,), initial_delay=0)],
    )
    async with ActorSystem(agent) as system:
        await system.ask("t", "go")
    assert len(attempts) == 1

    flaky, attempts = _flaky_tool(10, ConnectionError("down"))
    agent = Agent(
        model=ScriptedModel(_one_tool_call("flaky")),
        tools=[flaky],
        middleware=[ToolRetryMiddleware(tools=["other"], initial_delay=0)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert len(attempts) == 1
    assert "Error: ConnectionError: down" in result.text

    # unknown tools are not retried
    agent = Agent(
        model=ScriptedModel(_one_tool_call("missing")),
        middleware=[ToolRetryMiddleware(initial_delay=0)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert sleeps == []
    assert "unknown tool 'missing'" in result.text


async def test_tool_retry_raise_fails_the_turn(sleeps: list[float]) -> None:
    flaky, attempts = _flaky_tool(10, ConnectionError("down"))
    agent = Agent(
        model=ScriptedModel(_one_tool_call("flaky")),
        tools=[flaky],
        middleware=[ToolRetryMiddleware(max_retries=1, initial_delay=0, on_failure="raise")],
    )
    async with ActorSystem(agent) as system:
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t", "go")
        state = (await system.get_state("t")).state
    assert isinstance(info.value.__cause__, ConnectionError)
    assert len(attempts) == 2
    # the tools step was not committed: the call is still pending in the model step's output
    assert types(state.messages) == ["human", "ai"]


async def test_tool_retry_on_an_error_message_the_tool_returns(sleeps: list[float]) -> None:
    attempts: list[int] = []

    @tool
    def picky(runtime: Any) -> ToolMessage:
        """Answers with an error the first time."""
        attempts.append(1)
        status = "error" if len(attempts) == 1 else "success"
        return ToolMessage(f"try {len(attempts)}", tool_call_id=runtime.tool_call_id, status=status)

    agent = Agent(
        model=ScriptedModel(_one_tool_call("picky")),
        tools=[picky],
        middleware=[ToolRetryMiddleware(initial_delay=0)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert len(attempts) == 2
    assert result.text == "model saw: try 2"


# -- fallback ------------------------------------------------------------------------------


class Named:
    def __init__(self, name: str, log: list[str], fail: bool) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        return AIMessage(f"from {self.name}")


async def test_fallback_tries_models_in_order() -> None:
    log: list[str] = []
    agent = Agent(
        model=Named("primary", log, True),
        middleware=[
            ModelFallbackMiddleware(
                Named("fb1", log, True), Named("fb2", log, False), Named("fb3", log, False)
            )
        ],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "hi")
    assert result.text == "from fb2"
    assert log == ["primary", "fb1", "fb2"]


async def test_fallback_not_used_on_success_and_last_error_raised() -> None:
    log: list[str] = []
    agent = Agent(
        model=Named("primary", log, False),
        middleware=[ModelFallbackMiddleware(Named("fb1", log, False))],
    )
    async with ActorSystem(agent) as system:
        assert (await system.ask("t", "hi")).text == "from primary"
    assert log == ["primary"]

    log.clear()
    agent = Agent(
        model=Named("primary", log, True),
        middleware=[ModelFallbackMiddleware(Named("fb1", log, True), Named("fb2", log, True))],
    )
    async with ActorSystem(agent) as system:
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t", "hi")
    assert str(info.value.__cause__) == "fb2 failed"
    assert log == ["primary", "fb1", "fb2"]
    with pytest.raises(TypeError):
        ModelFallbackMiddleware("gpt-4o")  # type: ignore[arg-type]


# -- call limits --------------------------------------------------------------------------


def _always_tool(name: str, **args: Any) -> Callable[[ModelRequest[Any]], str | AIMessage]:
    return lambda request: calls_ai(call(name, **args))


async def test_model_call_limit_run_limit_ends_the_turn() -> None:
    counter: list[int] = []

    @tool
    def ping() -> str:
        """Ping."""
        counter.append(1)
        return "pong"

    model = ScriptedModel(_always_tool("ping"))
    agent = Agent(
        model=model,
        tools=[ping],
        middleware=[ModelCallLimitMiddleware(run_limit=2)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "loop")
        assert model.calls == 2 and len(counter) == 2
        assert_valid_history(result.messages)
        assert result.text == "Model call limits exceeded: run limit (2/2)"
        assert result.state.run_model_call_count == 2
        assert result.state.thread_model_call_count == 2
        # the run count restarts with the next turn; the thread count does not
        result = await system.ask("t", "again")
        assert model.calls == 4
        assert result.state.run_model_call_count == 2
        assert result.state.thread_model_call_count == 4


async def test_model_call_limit_thread_limit_and_error() -> None:
    model = ScriptedModel(["a"])
    agent = Agent(
        model=model,
        middleware=[ModelCallLimitMiddleware(thread_limit=2, exit_behavior="error")],
    )
    async with ActorSystem(agent) as system:
        await system.ask("t", "1")
        await system.ask("t", "2")
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t", "3")
        state = (await system.get_state("t")).state
    error = info.value.__cause__
    assert isinstance(error, ModelCallLimitExceededError)
    assert (error.thread_count, error.thread_limit) == (2, 2)
    assert model.calls == 2
    assert state.thread_model_call_count == 2
    assert [m.content for m in state.messages] == ["1", "a", "2", "a", "3"]


def test_limit_config_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ModelCallLimitMiddleware()
    with pytest.raises(ValueError, match="run_limit"):
        ModelCallLimitMiddleware(run_limit=-1)
    with pytest.raises(ValueError, match="exit_behavior"):
        ModelCallLimitMiddleware(run_limit=1, exit_behavior="continue")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exit_behavior"):
        ToolCallLimitMiddleware(run_limit=1, exit_behavior="stop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tool_name"):
        ToolCallLimitMiddleware(tool_name="", run_limit=1)


def _counting_tools() -> tuple[list[Any], list[str]]:
    ran: list[str] = []

    @tool
    def search(q: str) -> str:
        """Search."""
        ran.append(f"search:{q}")
        return f"found {q}"

    @tool
    def calc(x: int) -> str:
        """Calculate."""
        ran.append(f"calc:{x}")
        return str(x * 2)

    return [search, calc], ran


async def test_tool_call_limit_continue_blocks_calls_over_the_limit() -> None:
    tools, ran = _counting_tools()
    model = Recorder(
        lambda r: (
            calls_ai(call("search", q="a"), call("search", q="b"), call("calc", x=2))
            if isinstance(r.messages[-1], HumanMessage)
            else "done"
        )
    )
    agent = Agent(
        model=model,
        tools=tools,
        middleware=[ToolCallLimitMiddleware(tool_name="search", run_limit=1)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert sorted(ran) == ["calc:2", "search:a"]
    assert_valid_history(result.messages)
    blocked = [m for m in result.messages if isinstance(m, ToolMessage) and m.status == "error"]
    assert len(blocked) == 1
    assert blocked[0].content == "Tool call limit exceeded. Do not call 'search' again."
    assert result.text == "done"
    assert result.state.thread_tool_call_count == {"search": 1}
    assert result.state.run_tool_call_count == {"search": 2}  # blocked calls count for the run


async def test_tool_call_limit_all_blocked_goes_back_to_the_model() -> None:
    tools, ran = _counting_tools()
    model = Recorder(
        lambda r: (
            calls_ai(call("search", q=str(len(r.messages))))
            if not any(isinstance(m, ToolMessage) and m.status == "error" for m in r.messages)
            else "gave up searching"
        )
    )
    agent = Agent(
        model=model,
        tools=tools,
        middleware=[ToolCallLimitMiddleware(thread_limit=2)],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert len(ran) == 2
    assert result.text == "gave up searching"
    assert len(model.requests) == 4  # 2 allowed, 1 blocked, then the model sees the error
    assert isinstance(model.requests[-1][-1], ToolMessage)
    assert model.requests[-1][-1].status == "error"
    assert_valid_history(result.messages)
    assert result.state.thread_tool_call_count == {"__all__": 2}


async def test_tool_call_limit_end_answers_every_pending_call_and_ends() -> None:
    tools, ran = _counting_tools()
    model = ScriptedModel(
        lambda r: calls_ai(call("search", q="a"), call("calc", x=1), call("search", q="b"))
    )
    agent = Agent(
        model=model,
        tools=tools,
        middleware=[ToolCallLimitMiddleware(tool_name="search", run_limit=1, exit_behavior="end")],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert ran == []  # the turn ended before the tools step
    assert model.calls == 1
    assert_valid_history(result.messages)
    assert types(result.messages) == ["human", "ai", "tool", "tool", "tool", "ai"]
    assert all(m.status == "error" for m in result.messages if isinstance(m, ToolMessage))
    assert result.text.startswith("'search' tool call limit reached: run limit")
    assert result.state.thread_tool_call_count == {"search": 0}


async def test_tool_call_limit_error_and_thread_limit_across_turns() -> None:
    tools, ran = _counting_tools()
    model = ScriptedModel(
        lambda r: calls_ai(call("calc", x=1)) if isinstance(r.messages[-1], HumanMessage) else "ok"
    )
    agent = Agent(
        model=model,
        tools=tools,
        middleware=[
            ToolCallLimitMiddleware(tool_name="calc", thread_limit=2, exit_behavior="error")
        ],
    )
    async with ActorSystem(agent) as system:
        await system.ask("t", "1")
        await system.ask("t", "2")
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t", "3")
        state = (await system.get_state("t")).state
    error = info.value.__cause__
    assert isinstance(error, ToolCallLimitExceededError)
    assert error.tool_name == "calc" and error.thread_limit == 2
    assert ran == ["calc:1", "calc:1"]
    assert state.thread_tool_call_count == {"calc": 2}
    assert types(state.messages)[-1] == "human"  # the failed model step was not committed


async def test_limits_with_an_explicit_state_schema() -> None:
    class MyState(CallLimitState):
        user: str = "anon"

    tools, ran = _counting_tools()
    agent = Agent(
        model=ScriptedModel(_always_tool("calc", x=1)),
        tools=tools,
        state_schema=MyState,
        middleware=[
            ModelCallLimitMiddleware(run_limit=3),
            ToolCallLimitMiddleware(tool_name="calc", run_limit=5),
        ],
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "go")
    assert isinstance(result.state, MyState)
    assert len(ran) == 3
    assert result.state.run_model_call_count == 3
    assert result.state.run_tool_call_count == {"calc": 3}


async def test_limit_state_is_added_without_an_explicit_schema() -> None:
    tools, ran = _counting_tools()
    agent = Agent(
        model=ScriptedModel(_always_tool("calc", x=1)),
        tools=tools,
        middleware=[
            ModelCallLimitMiddleware(run_limit=2),
            ToolCallLimitMiddleware(tool_name="calc", thread_limit=10),
        ],
    )
    assert {"run_model_call_count", "thread_tool_call_count"} <= set(
        agent.state_schema.__struct_fields__
    )
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "hi")
        state = (await system.get_state("t")).state
    assert len(ran) == 2
    assert state.run_model_call_count == 2
    assert state.thread_tool_call_count == {"calc": 2}
    assert result.text == "Model call limits exceeded: run limit (2/2)"
