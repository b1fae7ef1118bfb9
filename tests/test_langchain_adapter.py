"""LangChainChatModel with langchain-core's fake chat models (and one of our own)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langchain_core import messages as lc
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import (
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable

from threadline.actors import (
    AgentState,
    AIMessage,
    HumanMessage,
    InvalidMessageError,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from threadline.runtime import (
    ActorSystem,
    Agent,
    LangChainChatModel,
    ModelRequest,
    Runtime,
    from_langchain,
    to_langchain,
    tool,
)
from threadline.runtime.models._openai import MessageChunk, ModelResponseError

calls: list[str] = []


@tool
def word_count(text: str) -> int:
    """Count the words in a text.

    Args:
        text: the text to count words in.
    """
    calls.append(text)
    return len(text.split())


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def make_request(model: Any, messages: list[Any], **kw: Any) -> ModelRequest[Any]:
    runtime: Runtime[Any] = Runtime(
        context=None, store=None, thread_id="t", resources={}, emit=lambda mode, data: None
    )
    return ModelRequest(
        model=model,
        messages=messages,
        system_prompt=None,
        tools=kw.pop("tools", []),
        state=AgentState(messages=messages),
        runtime=runtime,
        **kw,
    )


class ScriptedStreamer(BaseChatModel):
    """Streams scripted chunks (text and tool-call fragments); records what it saw."""

    script: list[list[lc.AIMessageChunk]]
    seen: list[list[lc.BaseMessage]] = []
    bound: list[dict[str, Any]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted-streamer"

    def bind_tools(
        self, tools: Any, *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[Any, lc.AIMessage]:
        self.bound.append({"tools": list(tools), "tool_choice": tool_choice})
        return self.bind(tools=list(tools), **kwargs)

    def _generate(
        self,
        messages: list[lc.BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise AssertionError("the adapter should stream this model")

    def _stream(
        self,
        messages: list[lc.BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        raise AssertionError("the adapter should use the async stream")

    async def _astream(
        self,
        messages: list[lc.BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        self.seen.append(list(messages))
        for chunk in self.script.pop(0):
            yield ChatGenerationChunk(message=chunk)


class NoStreamRecorder(BaseChatModel):
    """Answers with ``ainvoke`` only; records the messages and kwargs it got."""

    answer: lc.AIMessage
    seen: list[tuple[list[lc.BaseMessage], dict[str, Any]]] = []

    @property
    def _llm_type(self) -> str:
        return "no-stream-recorder"

    def _generate(
        self,
        messages: list[lc.BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.seen.append((list(messages), {"stop": stop, **kwargs}))
        return ChatResult(generations=[ChatGeneration(message=self.answer)])


# -- conversions ----------------------------------------------------------------------


def history() -> list[Any]:
    return [
        SystemMessage("be brief", id="s1"),
        HumanMessage("count words in a b", id="h1", name="ann"),
        AIMessage(
            "",
            id="a1",
            tool_calls=[ToolCall(id="c1", name="word_count", args={"text": "a b"})],
            usage={
                "input_tokens": 10,
                "output_tokens": 3,
                "total_tokens": 13,
                "input_token_details.cache_read": 4,
            },
            response_metadata={"model_name": "fake-1", "finish_reason": "tool_calls"},
        ),
        ToolMessage("2", id="t1", tool_call_id="c1", name="word_count", status="error"),
        AIMessage("two words", id="a2"),
    ]


def test_threadline_to_langchain_and_back_preserves_everything() -> None:
    original = history()
    converted = to_langchain(original)

    assert [type(m) for m in converted] == [
        lc.SystemMessage,
        lc.HumanMessage,
        lc.AIMessage,
        lc.ToolMessage,
        lc.AIMessage,
    ]
    assert [m.id for m in converted] == ["s1", "h1", "a1", "t1", "a2"]
    assert converted[1].name == "ann"
    ai = converted[2]
    assert isinstance(ai, lc.AIMessage)
    assert ai.tool_calls == [
        {"name": "word_count", "args": {"text": "a b"}, "id": "c1", "type": "tool_call"}
    ]
    assert ai.usage_metadata == {
        "input_tokens": 10,
        "output_tokens": 3,
        "total_tokens": 13,
        "input_token_details": {"cache_read": 4},
    }
    tool_message = converted[3]
    assert isinstance(tool_message, lc.ToolMessage)
    assert (tool_message.tool_call_id, tool_message.status) == ("c1", "error")

    assert [from_langchain(m) for m in converted] == original


def test_from_langchain_reads_content_blocks_chunks_and_missing_ids() -> None:
    message = lc.AIMessage(
        content=[{"type": "text", "text": "Hello "}, {"type": "image", "url": "x"}, "world"],
        tool_calls=[{"name": "word_count", "args": {"text": "x"}, "id": None}],
    )
    converted = from_langchain(message)
    assert isinstance(converted, AIMessage)
    assert converted.content == "Hello world"
    assert converted.id == ""
    assert converted.tool_calls[0].name == "word_count"
    assert converted.tool_calls[0].id  # a fresh id, so a ToolMessage can answer it

    chunk = lc.AIMessageChunk(
        content="", tool_call_chunks=[lc.ToolCallChunk(name="f", args='{"a": 1}', id="c9", index=0)]
    )
    assert from_langchain(chunk) == AIMessage(
        "", tool_calls=[ToolCall(id="c9", name="f", args={"a": 1})]
    )

    assert from_langchain(lc.ChatMessage(role="user", content="hi", id="x")) == HumanMessage(
        "hi", id="x"
    )


def test_from_langchain_rejects_broken_streamed_arguments() -> None:
    # LangChain's own lenient parse would turn this into {} and run the tool.
    chunk = lc.AIMessageChunk(
        content="", tool_call_chunks=[lc.ToolCallChunk(name="f", args='{"a": ', id="c1", index=0)]
    )
    with pytest.raises(InvalidMessageError, match="not valid JSON"):
        from_langchain(chunk)


# -- the adapter -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_streaming_chunks_reach_stream_messages() -> None:
    fake = GenericFakeChatModel(messages=iter(["Hello big world"]))
    model = LangChainChatModel(fake)
    assert model.streams()
    parts = []
    agent: Agent[AgentState] = Agent(model=model)
    async with ActorSystem(agent) as system:
        async for part in system.stream("t1", "hi", mode=["messages", "updates"]):
            parts.append(part)
        state = (await system.get_state("t1")).state

    chunks = [p.data for p in parts if p.mode == "messages"]
    assert all(isinstance(c, MessageChunk) for c in chunks)
    assert [c.content for c in chunks] == ["Hello", " ", "big", " ", "world"]
    assert [c.index for c in chunks] == list(range(5))
    answer = state.messages[-1]
    assert isinstance(answer, AIMessage)
    assert answer.content == "Hello big world"
    assert {c.message_id for c in chunks} == {answer.id}
    model_update = next(i for i, p in enumerate(parts) if p.mode == "updates" and "model" in p.data)
    assert max(i for i, p in enumerate(parts) if p.mode == "messages") < model_update


@pytest.mark.anyio
async def test_fake_model_tool_calls_drive_a_tool_step() -> None:
    fake = FakeMessagesListChatModel(
        responses=[
            lc.AIMessage(
                content="",
                tool_calls=[{"name": "word_count", "args": {"text": "a b c"}, "id": "call_9"}],
                usage_metadata={"input_tokens": 8, "output_tokens": 5, "total_tokens": 13},
            ),
            lc.AIMessage(content="That is 3 words."),
        ]
    )
    model = LangChainChatModel(fake)
    assert not model.streams()  # FakeMessagesListChatModel cannot stream: ainvoke
    agent: Agent[AgentState] = Agent(model=model, tools=[word_count])
    async with ActorSystem(agent) as system:
        result = await system.ask("t1", "count words in a b c")

    assert calls == ["a b c"]
    assert result.text == "That is 3 words."
    human, ask_tool, answer, final = result.messages
    assert isinstance(human, HumanMessage)
    assert isinstance(ask_tool, AIMessage)
    assert ask_tool.tool_calls == [ToolCall(id="call_9", name="word_count", args={"text": "a b c"})]
    assert ask_tool.usage == {"input_tokens": 8, "output_tokens": 5, "total_tokens": 13}
    assert isinstance(answer, ToolMessage)
    assert (answer.tool_call_id, answer.content) == ("call_9", "3")
    assert isinstance(final, AIMessage)
    assert len({m.id for m in result.messages}) == 4


@pytest.mark.anyio
async def test_tools_are_bound_and_streamed_tool_call_chunks_add_up() -> None:
    streamer = ScriptedStreamer(
        script=[
            [
                lc.AIMessageChunk(
                    content="",
                    tool_call_chunks=[
                        lc.ToolCallChunk(name="word_count", args='{"te', id="call_1", index=0)
                    ],
                ),
                lc.AIMessageChunk(
                    content="",
                    tool_call_chunks=[
                        lc.ToolCallChunk(name=None, args='xt": "x y"}', id=None, index=0)
                    ],
                    usage_metadata={"input_tokens": 4, "output_tokens": 2, "total_tokens": 6},
                ),
            ],
            [lc.AIMessageChunk(content="Two "), lc.AIMessageChunk(content="words.")],
        ]
    )
    parts = []
    agent: Agent[AgentState] = Agent(
        model=LangChainChatModel(streamer), tools=[word_count], system_prompt="Count."
    )
    async with ActorSystem(agent) as system:
        async for part in system.stream("t1", "count words in x y", mode="messages"):
            parts.append(part)
        state = (await system.get_state("t1")).state

    assert [b["tools"] for b in streamer.bound] == [[word_count.schema]] * 2
    assert calls == ["x y"]
    assert [p.data.content for p in parts] == ["Two ", "words."]
    ask_tool = state.messages[1]
    assert isinstance(ask_tool, AIMessage)
    assert ask_tool.tool_calls == [ToolCall(id="call_1", name="word_count", args={"text": "x y"})]
    assert ask_tool.usage == {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}
    assert state.messages[-1].content == "Two words."

    first, second = streamer.seen
    assert [type(m) for m in first] == [lc.SystemMessage, lc.HumanMessage]
    assert first[0].content == "Count."
    assert [type(m) for m in second] == [
        lc.SystemMessage,
        lc.HumanMessage,
        lc.AIMessage,
        lc.ToolMessage,
    ]
    assert isinstance(second[2], lc.AIMessage)
    assert second[2].tool_calls[0]["id"] == "call_1"
    assert isinstance(second[3], lc.ToolMessage)
    assert (second[3].tool_call_id, second[3].content) == ("call_1", "2")


@pytest.mark.anyio
async def test_broken_streamed_arguments_are_a_model_error() -> None:
    streamer = ScriptedStreamer(
        script=[
            [
                lc.AIMessageChunk(
                    content="",
                    tool_call_chunks=[
                        lc.ToolCallChunk(name="word_count", args="{", id="c", index=0)
                    ],
                )
            ]
        ]
    )
    model = LangChainChatModel(streamer)
    with pytest.raises(ModelResponseError, match="not valid JSON"):
        await model.invoke(make_request(model, [HumanMessage("x")], tools=[word_count]))


@pytest.mark.anyio
async def test_model_settings_and_tool_choice_are_passed_on() -> None:
    recorder = NoStreamRecorder(answer=lc.AIMessage(content="ok", id="lc-1"))
    model = LangChainChatModel(recorder)
    message = await model.invoke(
        make_request(model, [HumanMessage("x", id="h")], model_settings={"stop": ["END"]})
    )
    assert message.content == "ok"
    assert message.id and message.id != "lc-1"
    assert message.response_metadata is not None
    assert message.response_metadata["id"] == "lc-1"
    ((seen_messages, seen_kwargs),) = recorder.seen
    assert seen_kwargs["stop"] == ["END"]
    assert [m.id for m in seen_messages] == ["h"]

    streamer = ScriptedStreamer(script=[[lc.AIMessageChunk(content="fine")]])
    model = LangChainChatModel(streamer)
    await model.invoke(
        make_request(model, [HumanMessage("x")], tools=[word_count], tool_choice="word_count")
    )
    assert streamer.bound == [{"tools": [word_count.schema], "tool_choice": "word_count"}]


def test_only_chat_models_are_wrapped() -> None:
    with pytest.raises(TypeError, match="BaseChatModel"):
        LangChainChatModel(object())  # type: ignore[arg-type]


# -- without the optional extra ------------------------------------------------------------


def test_without_langchain_core_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("langchain_core", "langchain_core.messages", "langchain_core.language_models"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"threadline\[langchain\]") as info:
        LangChainChatModel(object())  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(ImportError, match=r"pip install 'threadline\[langchain\]'"):
        to_langchain([HumanMessage("x")])


def test_importing_the_runtime_does_not_import_langchain() -> None:
    code = (
        "import sys, threadline.runtime, threadline.runtime.models._langchain; "
        "assert 'langchain_core' not in sys.modules, 'langchain_core was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
