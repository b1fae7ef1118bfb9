"""OpenAIChatModel against a real OpenAI-compatible HTTP server on loopback.

The server (stdlib ``http.server`` in a thread) answers from a per-test script
of replies and records every request, so the tests see exactly what went over
the wire: no mocking of httpx.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import pytest

from threadline.actors import (
    AgentState,
    AIMessage,
    HumanMessage,
    ThreadlineError,
    ToolCall,
    ToolMessage,
    TurnFailedError,
)
from threadline.runtime import ActorSystem, Agent, ModelRequest, Runtime, tool
from threadline.runtime.models._openai import (
    MessageChunk,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelResponseError,
    ModelTimeoutError,
    OpenAIChatModel,
)

# -- the server -------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer: JSON (``body``), SSE events (``events``) or a hang."""

    status: int = 200
    body: Any = None
    events: list[Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    hang_after_events: bool = False
    event_delay: float = 0.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies: list[Reply] = []
        self.requests: list[Seen] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def next_reply(self, seen: Seen) -> Reply:
        with self.lock:
            self.requests.append(seen)
            if not self.replies:
                return Reply(status=500, body={"error": {"message": "no scripted reply left"}})
            return self.replies.pop(0)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        seen = Seen(
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        reply = self.server.next_reply(seen)
        if reply.hang:
            self.server.release.wait(10)
            self.close_connection = True
            return
        if reply.events is None:
            payload = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in reply.events:
            data = event if isinstance(event, str) else json.dumps(event)
            self._chunk(f"data: {data}\n\n".encode())
            if reply.event_delay:
                time.sleep(reply.event_delay)
        if reply.hang_after_events:
            self.server.release.wait(10)
            self.close_connection = True
            return
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


# -- helpers -----------------------------------------------------------------------


def completion(
    content: str | None = "", *, tool_calls: list[dict[str, Any]] | None = None, usage: bool = True
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    out: dict[str, Any] = {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "model": "gpt-test-0001",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
    }
    if usage:
        out["usage"] = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    return out


def delta(payload: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "model": "gpt-test-0001",
        "choices": [{"index": 0, "delta": payload, "finish_reason": finish}],
    }


def sse_text(*parts: str, usage: tuple[int, int, int] = (5, 4, 9)) -> list[Any]:
    events: list[Any] = [delta({"role": "assistant", "content": ""})]
    events += [delta({"content": p}) for p in parts]
    events.append(delta({}, finish="stop"))
    events.append(
        {
            "id": "chatcmpl-s1",
            "object": "chat.completion.chunk",
            "model": "gpt-test-0001",
            "choices": [],
            "usage": dict(
                zip(("prompt_tokens", "completion_tokens", "total_tokens"), usage, strict=True)
            ),
        }
    )
    events.append("[DONE]")
    return events


def make_request(
    model: OpenAIChatModel,
    messages: list[Any],
    *,
    emitted: list[tuple[str, Any]] | None = None,
    **kw: Any,
) -> ModelRequest[Any]:
    sink = emitted if emitted is not None else []
    runtime: Runtime[Any] = Runtime(
        context=None,
        store=None,
        thread_id="t",
        resources={},
        emit=lambda mode, data: sink.append((mode, data)),
    )
    return ModelRequest(
        model=model,
        messages=messages,
        system_prompt=kw.pop("system_prompt", None),
        tools=kw.pop("tools", []),
        state=AgentState(messages=messages),
        runtime=runtime,
        **kw,
    )


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


# -- plain completions ---------------------------------------------------------------


@pytest.mark.anyio
async def test_plain_completion_sends_prompt_messages_tools_and_settings(
    server: FakeOpenAI,
) -> None:
    server.script(Reply(body=completion("Hello there!")))
    async with OpenAIChatModel(
        "gpt-test", base_url=server.url, api_key="sk-test", stream=False, temperature=0.2
    ) as model:
        agent: Agent[AgentState] = Agent(model=model, tools=[word_count], system_prompt="Be brief.")
        async with ActorSystem(agent) as system:
            result = await system.ask("t1", "hi")

    assert result.text == "Hello there!"
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.body["model"] == "gpt-test"
    assert seen.body["temperature"] == 0.2
    assert seen.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert seen.body["tools"] == [word_count.schema]
    assert seen.body["tools"][0]["function"]["parameters"]["properties"]["text"]["type"] == "string"
    assert "stream" not in seen.body

    answer = result.messages[-1]
    assert isinstance(answer, AIMessage)
    assert answer.usage == {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}
    assert answer.response_metadata == {
        "id": "chatcmpl-123",
        "model": "gpt-test-0001",
        "finish_reason": "stop",
    }
    assert answer.id and answer.id != "chatcmpl-123"


@pytest.mark.anyio
async def test_request_settings_override_model_settings_and_tool_choice_by_name(
    server: FakeOpenAI,
) -> None:
    server.script(Reply(body=completion("ok", usage=False)))
    async with OpenAIChatModel(
        "m", base_url=server.url + "/", api_key="k", stream=False, temperature=0.2, max_tokens=5
    ) as model:
        request = make_request(
            model,
            [HumanMessage("hi", id="h1")],
            tools=[word_count],
            tool_choice="word_count",
            model_settings={"temperature": 0.9, "seed": 7},
        )
        message = await model.invoke(request)

    body = server.requests[0].body
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.9, 5, 7)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "word_count"}}
    assert message.content == "ok"
    assert message.usage is None


@pytest.mark.anyio
async def test_base_url_and_key_come_from_the_environment(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.script(Reply(body=completion("a")), Reply(body=completion("b")))
    async with OpenAIChatModel("m", stream=False) as model:
        await model.invoke(make_request(model, [HumanMessage("x")]))
    assert "authorization" not in server.requests[0].headers

    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    async with OpenAIChatModel("m", stream=False) as model:
        await model.invoke(make_request(model, [HumanMessage("x")]))
    assert server.requests[1].headers["authorization"] == "Bearer sk-env"


# -- streaming ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sse_chunks_reach_stream_messages_and_add_up_to_the_answer(
    server: FakeOpenAI,
) -> None:
    server.script(Reply(events=sse_text("Hel", "lo", " wor", "ld"), event_delay=0.02))
    parts = []
    model = OpenAIChatModel("m", base_url=server.url)
    agent: Agent[AgentState] = Agent(model=model, system_prompt="sys")
    async with model, ActorSystem(agent) as system:
        async for part in system.stream("t1", "say hello", mode=["messages", "updates"]):
            parts.append(part)
        state = (await system.get_state("t1")).state

    chunks = [p.data for p in parts if p.mode == "messages"]
    assert all(isinstance(c, MessageChunk) for c in chunks)
    assert [c.content for c in chunks] == ["Hel", "lo", " wor", "ld"]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    answer = state.messages[-1]
    assert isinstance(answer, AIMessage)
    assert answer.content == "Hello world" == "".join(c.content for c in chunks)
    assert {c.message_id for c in chunks} == {answer.id}
    assert answer.usage == {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9}
    assert answer.response_metadata is not None
    assert answer.response_metadata["finish_reason"] == "stop"
    # The chunks arrive while the model step runs, before it commits.
    model_update = next(i for i, p in enumerate(parts) if p.mode == "updates" and "model" in p.data)
    assert max(i for i, p in enumerate(parts) if p.mode == "messages") < model_update

    body = server.requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert server.requests[0].headers["accept"] == "text/event-stream"


@pytest.mark.anyio
async def test_streamed_tool_call_round_trip_through_a_turn(server: FakeOpenAI) -> None:
    first = [
        delta({"role": "assistant", "content": None}),
        delta(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "word_count", "arguments": ""},
                    }
                ]
            }
        ),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"te'}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": 'xt": "a b c"}'}}]}),
        delta({}, finish="tool_calls"),
        "[DONE]",
    ]
    server.script(Reply(events=first), Reply(events=sse_text("There are ", "3 words.")))
    async with OpenAIChatModel("m", base_url=server.url) as model:
        agent: Agent[AgentState] = Agent(model=model, tools=[word_count], system_prompt="Count.")
        async with ActorSystem(agent) as system:
            result = await system.ask("t1", "count words in a b c")

    assert calls == ["a b c"]
    assert result.text == "There are 3 words."
    human, ask_tool, tool_answer, final = result.messages
    assert human.content == "count words in a b c"
    assert isinstance(human, HumanMessage)
    assert isinstance(ask_tool, AIMessage)
    assert ask_tool.tool_calls == [ToolCall(id="call_1", name="word_count", args={"text": "a b c"})]
    assert ask_tool.response_metadata is not None
    assert ask_tool.response_metadata["finish_reason"] == "tool_calls"
    assert isinstance(tool_answer, ToolMessage)
    assert (tool_answer.tool_call_id, tool_answer.content) == ("call_1", "3")
    assert isinstance(final, AIMessage)
    assert final.id != ask_tool.id

    second = server.requests[1].body["messages"]
    assert second[0] == {"role": "system", "content": "Count."}
    assert second[1] == {"role": "user", "content": "count words in a b c"}
    assert second[2]["role"] == "assistant"
    assert second[2]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "word_count", "arguments": '{"text":"a b c"}'},
        }
    ]
    assert second[3] == {"role": "tool", "content": "3", "tool_call_id": "call_1"}


@pytest.mark.anyio
async def test_undecodable_tool_arguments_are_a_model_error(server: FakeOpenAI) -> None:
    bad = [
        {
            "id": "call_x",
            "type": "function",
            "function": {"name": "word_count", "arguments": '{"text": "unterminated'},
        }
    ]
    server.script(Reply(body=completion("", tool_calls=bad)))
    async with OpenAIChatModel("m", base_url=server.url, stream=False) as model:
        with pytest.raises(ModelResponseError, match="not valid JSON") as info:
            await model.invoke(make_request(model, [HumanMessage("x")]))
    assert isinstance(info.value, ModelError)
    assert isinstance(info.value, ThreadlineError)
    assert len(server.requests) == 1  # not retried


# -- retries and errors -------------------------------------------------------------------


@pytest.mark.anyio
async def test_429_is_retried_after_the_servers_retry_after(server: FakeOpenAI) -> None:
    server.script(
        Reply(
            status=429,
            body={"error": {"message": "Rate limit reached", "type": "requests"}},
            headers={"Retry-After": "0.3"},
        ),
        Reply(body=completion("finally")),
    )
    async with OpenAIChatModel("m", base_url=server.url, stream=False) as model:
        # Our own backoff would wait >= 15 s: only Retry-After can make this fast.
        model.retry_base_delay = 30.0
        with anyio.fail_after(5):
            message = await model.invoke(make_request(model, [HumanMessage("x")]))

    assert message.content == "finally"
    first, second = server.requests
    assert second.at - first.at >= 0.28
    assert first.body == second.body


@pytest.mark.anyio
async def test_400_raises_the_servers_message_without_retrying(server: FakeOpenAI) -> None:
    server.script(
        Reply(
            status=400,
            body={
                "error": {
                    "message": "Invalid 'messages[0].content': string too long.",
                    "type": "invalid_request_error",
                }
            },
        ),
        Reply(body=completion("never used")),
    )
    async with OpenAIChatModel("m", base_url=server.url, stream=True, max_retries=3) as model:
        with pytest.raises(ModelHTTPError) as info:
            await model.invoke(make_request(model, [HumanMessage("x")]))

    error = info.value
    assert error.status_code == 400
    assert error.message == "Invalid 'messages[0].content': string too long."
    assert "string too long" in str(error)
    assert len(server.requests) == 1
    assert len(server.replies) == 1


@pytest.mark.anyio
async def test_500_three_times_fails_after_three_attempts(server: FakeOpenAI) -> None:
    failure = Reply(status=500, body={"error": {"message": "The server had an error"}})
    server.script(failure, failure, failure, Reply(body=completion("too late")))
    async with OpenAIChatModel("m", base_url=server.url, stream=False, max_retries=2) as model:
        model.retry_base_delay = 0.01
        with pytest.raises(ModelHTTPError) as info:
            await model.invoke(make_request(model, [HumanMessage("x")]))

    assert info.value.status_code == 500
    assert info.value.message == "The server had an error"
    assert len(server.requests) == 3


@pytest.mark.anyio
async def test_a_hanging_server_times_out_without_retry(server: FakeOpenAI) -> None:
    server.script(Reply(hang=True), Reply(body=completion("too late")))
    async with OpenAIChatModel("m", base_url=server.url, timeout=0.5, max_retries=2) as model:
        started = time.monotonic()
        with pytest.raises(ModelTimeoutError):
            await model.invoke(make_request(model, [HumanMessage("x")]))
        elapsed = time.monotonic() - started

    assert 0.45 <= elapsed < 1.5
    assert len(server.requests) == 1


@pytest.mark.anyio
async def test_a_stream_that_stalls_times_out(server: FakeOpenAI) -> None:
    events = [delta({"role": "assistant", "content": "partial"})]
    server.script(Reply(events=events, hang_after_events=True))
    emitted: list[tuple[str, Any]] = []
    async with OpenAIChatModel("m", base_url=server.url, timeout=0.5) as model:
        with pytest.raises(ModelTimeoutError):
            await model.invoke(make_request(model, [HumanMessage("x")], emitted=emitted))
    assert [d.content for _, d in emitted] == ["partial"]
    assert len(server.requests) == 1


@pytest.mark.anyio
async def test_connection_errors_are_retried_and_a_given_client_stays_open() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    attempts: list[str] = []

    async def count(request: httpx.Request) -> None:
        attempts.append(str(request.url))

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as client:
        model = OpenAIChatModel(
            "m", base_url=f"http://127.0.0.1:{port}/v1", http_client=client, max_retries=2
        )
        model.retry_base_delay = 0.01
        async with model:
            with pytest.raises(ModelConnectionError) as info:
                await model.invoke(make_request(model, [HumanMessage("x")]))
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        assert attempts == [f"http://127.0.0.1:{port}/v1/chat/completions"] * 3
        assert not client.is_closed


# -- inside a turn -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failing_model_fails_the_turn_and_the_thread_keeps_working(
    server: FakeOpenAI,
) -> None:
    server.script(
        Reply(status=401, body={"error": {"message": "Incorrect API key provided: sk-bad."}}),
        Reply(events=sse_text("Back ", "again.")),
    )
    model = OpenAIChatModel("m", base_url=server.url, api_key="sk-bad")
    agent: Agent[AgentState] = Agent(model=model)
    async with model, ActorSystem(agent) as system:
        with pytest.raises(TurnFailedError) as info:
            await system.ask("t1", "first")
        cause = info.value.__cause__
        assert isinstance(cause, ModelHTTPError)
        assert cause.status_code == 401
        assert "Incorrect API key" in cause.message

        result = await system.ask("t1", "second")

    assert result.text == "Back again."
    assert [m.content for m in result.messages] == ["first", "second", "Back again."]
    assert [m["content"] for m in server.requests[1].body["messages"]] == ["first", "second"]
    assert len(server.requests) == 2


@pytest.mark.anyio
async def test_usage_without_a_total_is_summed(server: FakeOpenAI) -> None:
    body = completion("x", usage=False)
    body["usage"] = {"prompt_tokens": 3, "completion_tokens": 2}
    server.script(Reply(body=body))
    async with OpenAIChatModel("m", base_url=server.url, stream=False) as model:
        message = await model.invoke(make_request(model, [HumanMessage("x")]))
    assert message.usage == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}


@pytest.mark.slow
def test_cli_chat_uses_a_real_model_with_base_url(server: FakeOpenAI, tmp_path: Any) -> None:
    import subprocess
    import sys

    server.script(Reply(events=sse_text("Hi from ", "the server")))
    out = subprocess.run(
        [sys.executable, "-m", "threadline.runtime.cli", "chat", "--thread", "t",
         "--db", str(tmp_path / "chat.db"), "--model", "openai:gpt-test", "--base-url", server.url],
        input="hello there\n", capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-test"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ai> Hi from the server" in out.stdout
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "gpt-test"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert [m["role"] for m in seen.body["messages"]] == ["system", "user"]
    assert seen.body["messages"][1]["content"] == "hello there"
    assert seen.body["tools"][0]["function"]["name"] == "word_count"
