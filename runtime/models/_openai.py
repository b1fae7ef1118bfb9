"""``OpenAIChatModel``: the Chat Completions protocol over ``httpx``.

Speaks to OpenAI and to any OpenAI-compatible server (vLLM, llama.cpp,
Ollama, LiteLLM, ...): ``POST {base_url}/chat/completions``, plain JSON or
server-sent events.

Errors (each a ``ThreadlineError``; inside an ``ActorSystem`` turn they arrive
as the ``__cause__`` of a ``TurnFailedError``)::

    ThreadlineError
    └── ModelError                 a chat model call failed
        ├── ModelHTTPError         the server answered 4xx/5xx (.status_code, .message, .body)
        ├── ModelTimeoutError      an attempt took longer than ``timeout`` seconds
        ├── ModelConnectionError   no answer: connection refused/reset, stream cut short
        └── ModelResponseError     an answer threadline cannot use (bad JSON, bad tool arguments)

``ModelTimeoutError`` is also a ``TimeoutError`` and ``ModelConnectionError`` a
``ConnectionError``, so generic handlers catch them too.

Retries: 429, 5xx and connection errors are retried up to ``max_retries``
times with exponential backoff and jitter (a ``Retry-After`` header wins,
capped at ``retry_after_cap`` seconds). Other 4xx answers, timeouts and
unusable answers are not retried. A streaming attempt that already emitted
text is never retried (its consumers have seen the text).

Streaming: each content delta goes to ``stream(..., mode="messages")``
consumers as a ``MessageChunk``; its ``message_id`` is the id of the
``AIMessage`` the call returns.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import anyio
import httpx
import msgspec

from threadline.actors import (
    AIMessage,
    AnyMessage,
    InvalidMessageError,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelResponseError,
    ModelTimeoutError,
    coerce_message,
    to_openai,
)
from threadline.actors._api import new_id

from ._base import MessageChunk

if TYPE_CHECKING:
    from threadline.actors._api import Emit

    from ..agent import ModelRequest

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"

_TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
_META_KEYS: Final = ("id", "model", "system_fingerprint")


class _Retry(Exception):  # an internal signal, never escapes invoke()
    """Internal: an attempt failed in a way worth another try."""

    def __init__(self, error: ModelError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay  # from Retry-After


@dataclass
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Accumulator:
    """Builds the final message from streamed chunks."""

    message_id: str
    emit: Emit
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _ToolCallParts] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    usage: Any = None
    emitted: int = 0

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, Mapping):
            raise ModelResponseError(f"a stream chunk must be a JSON object, got {chunk!r:.200}")
        if "error" in chunk:
            raise ModelResponseError(f"the stream reported an error: {_error_message(chunk)}")
        for key in _META_KEYS:
            if isinstance(chunk.get(key), str):
                self.meta[key] = chunk[key]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue  # only the first choice becomes the message
            if choice.get("finish_reason"):
                self.meta["finish_reason"] = choice["finish_reason"]
            delta = choice.get("delta") or {}
            if not isinstance(delta, Mapping):
                raise ModelResponseError("a stream chunk's 'delta' must be an object")
            text = delta.get("content")
            if isinstance(text, str) and text:
                self.content.append(text)
                self.emit(
                    "messages",
                    MessageChunk(content=text, message_id=self.message_id, index=self.emitted),
                )
                self.emitted += 1
            if isinstance(delta.get("refusal"), str):
                self.refusal.append(delta["refusal"])
            for position, call in enumerate(delta.get("tool_calls") or ()):
                self._feed_call(position, call)

    def _feed_call(self, position: int, call: Any) -> None:
        if not isinstance(call, Mapping):
            raise ModelResponseError("a streamed tool call must be an object")
        index = call.get("index", position)
        parts = self.calls.setdefault(
            index if isinstance(index, int) else position, _ToolCallParts()
        )
        if isinstance(call.get("id"), str) and call["id"] and not parts.id:
            parts.id = call["id"]
        fn = call.get("function") or {}
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if isinstance(name, str) and name and name != parts.name:
            # OpenAI sends the name once; a few servers repeat it on every delta.
            parts.name = parts.name + name if parts.name else name
        args = fn.get("arguments") if isinstance(fn, Mapping) else None
        if isinstance(args, str):
            parts.arguments.append(args)
        elif isinstance(args, Mapping):  # servers that send whole (decoded) arguments
            parts.arguments.append(msgspec.json.encode(args).decode())

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.calls:
            out["tool_calls"] = [
                {
                    "id": parts.id or None,
                    "type": "function",
                    "function": {"name": parts.name, "arguments": "".join(parts.arguments)},
                }
                for _, parts in sorted(self.calls.items())
            ]
        if self.refusal:
            out["refusal"] = "".join(self.refusal)
        return out


def _error_message(body: Any) -> str:
    """The server's error message from an OpenAI-style (or other common) error body."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    if isinstance(body, str) and body.strip():
        return body.strip()[:1000]
    return msgspec.json.encode(body).decode()[:1000] if body is not None else ""


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds form only)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
        if value >= 0:
            return value
    return None


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, Mapping):
        return None
    figures = {
        "input_tokens": raw.get("prompt_tokens"),
        "output_tokens": raw.get("completion_tokens"),
        "total_tokens": raw.get("total_tokens"),
    }
    usage = {k: v for k, v in figures.items() if isinstance(v, int) and not isinstance(v, bool)}
    if "total_tokens" not in usage and {"input_tokens", "output_tokens"} <= usage.keys():
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    return usage or None


def _wire_message(message: AnyMessage) -> dict[str, Any]:
    out = to_openai(message)
    if out["role"] == "tool":
        out.pop("name", None)  # OpenAI rejects 'name' on tool messages
    return out


class OpenAIChatModel:
    """A ``ChatModel`` for OpenAI's Chat Completions API and compatible servers.

    ``OpenAIChatModel("gpt-4o-mini", temperature=0)``; ``base_url`` defaults to
    ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``, ``api_key`` to
    ``$OPENAI_API_KEY`` (without one, no ``Authorization`` header is sent:
    fine for local servers). Extra keyword arguments (``temperature``,
    ``max_tokens``, ...) go into every request body, overridden per call by
    ``ModelRequest.model_settings`` (which may also set ``stream``).

    ``timeout`` bounds each attempt (connect, send, the whole answer, including
    a stream). The model creates its own ``httpx.AsyncClient`` on first use
    and closes it in ``aclose()`` (or ``async with``); an ``http_client``
    passed in is used as is and never closed.
    """

    retry_base_delay: float = 0.5
    """First backoff delay in seconds (doubled per retry, with jitter)."""
    retry_max_delay: float = 8.0
    """Upper bound of a backoff delay."""
    retry_after_cap: float = 60.0
    """Upper bound of a delay requested by the server's ``Retry-After``."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        stream: bool = True,
        http_client: httpx.AsyncClient | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty model name")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        base = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        if httpx.URL(base).scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL, got {base!r}")
        self.model = model
        self.base_url = base.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        self.timeout = timeout
        self.max_retries = max_retries
        self.stream = stream
        self.settings = settings
        self._client = http_client
        self._owns_client = http_client is None

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.model!r}, base_url={self.base_url!r})"

    # -- lifecycle ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client this model created (a client passed in stays open)."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._httpx_timeout())
        return self._client

    def _httpx_timeout(self) -> httpx.Timeout:
        # Generous: the anyio scope around each attempt is the timeout that fires.
        return httpx.Timeout(self.timeout * 2 + 10)

    # -- the request ------------------------------------------------------------------

    def build_body(self, request: ModelRequest[Any]) -> tuple[dict[str, Any], bool]:
        """The JSON body for ``request`` and whether it asks for a stream."""
        settings = {**self.settings, **request.model_settings}
        stream = bool(settings.pop("stream", self.stream))
        settings.pop("stream_options", None)
        messages = [_wire_message(m) for m in request.messages]
        if request.system_prompt:
            messages.insert(0, {"role": "system", "content": request.system_prompt})
        body: dict[str, Any] = {"model": self.model, **settings, "messages": messages}
        if request.tools:
            body["tools"] = [t.schema for t in request.tools]
        choice = request.tool_choice
        if choice is not None:
            names = {t.name for t in request.tools}
            if isinstance(choice, str) and choice not in _TOOL_CHOICES and choice in names:
                choice = {"type": "function", "function": {"name": choice}}
            body["tool_choice"] = choice
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body, stream

    def _headers(self, stream: bool) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        body, stream = self.build_body(request)
        content = msgspec.json.encode(body)
        headers = self._headers(stream)
        message_id = new_id()
        attempt = 0
        while True:
            acc = _Accumulator(message_id, request.runtime.emit)
            try:
                try:
                    with anyio.fail_after(self.timeout):
                        if stream:
                            return await self._stream_attempt(content, headers, acc)
                        return await self._plain_attempt(content, headers, message_id)
                except TimeoutError as exc:
                    raise ModelTimeoutError(
                        f"no complete answer from {self.url} within {self.timeout} s"
                    ) from exc
                except httpx.TimeoutException as exc:
                    raise ModelTimeoutError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
                except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
                    raise ModelConnectionError(f"{self.url}: {exc}") from exc
                except httpx.TransportError as exc:
                    error = ModelConnectionError(
                        f"cannot talk to {self.url}: {type(exc).__name__}: {exc}"
                    )
                    error.__cause__ = exc
                    if acc.emitted:
                        raise error from exc  # consumers saw part of the answer: no retry
                    raise _Retry(error) from exc
            except _Retry as retry:
                if attempt >= self.max_retries:
                    raise retry.error from retry.error.__cause__
                await anyio.sleep(self._delay(attempt, retry.delay))
                attempt += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        delay = min(self.retry_max_delay, self.retry_base_delay * 2.0**attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    async def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        raw = await response.aread()
        try:
            body: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = raw.decode("utf-8", "replace")
        message = _error_message(body) or response.reason_phrase or "error"
        error = ModelHTTPError(response.status_code, message, url=self.url, body=body)
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retry(error, _retry_after(response.headers))
        raise error

    async def _plain_attempt(
        self, content: bytes, headers: dict[str, str], message_id: str
    ) -> AIMessage:
        response = await self._http().post(
            self.url, content=content, headers=headers, timeout=self._httpx_timeout()
        )
        await self._check(response)
        return self._completion(response.content, message_id)

    async def _stream_attempt(
        self, content: bytes, headers: dict[str, str], acc: _Accumulator
    ) -> AIMessage:
        async with self._http().stream(
            "POST", self.url, content=content, headers=headers, timeout=self._httpx_timeout()
        ) as response:
            await self._check(response)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                # A server that ignores "stream": true answers with plain JSON.
                message = self._completion(await response.aread(), acc.message_id)
                if message.content:
                    acc.emit(
                        "messages",
                        MessageChunk(content=message.content, message_id=acc.message_id, index=0),
                    )
                return message
            done = False
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                    continue
                if line or not data:
                    continue  # comments, "event:"/"id:" fields, blank keep-alives
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    done = True
                    break
                acc.feed(self._decode_event(payload))
            if not done and data:  # a last event without its blank line
                payload = "\n".join(data)
                if payload.strip() == "[DONE]":
                    done = True
                else:
                    acc.feed(self._decode_event(payload))
        if not done and "finish_reason" not in acc.meta:
            error = ModelConnectionError(f"the stream from {self.url} ended before [DONE]")
            if acc.emitted:
                raise error
            raise _Retry(error)
        return self._message(acc.message(), acc.message_id, acc.meta, acc.usage)

    def _completion(self, content: bytes, message_id: str) -> AIMessage:
        """The message of a plain (non-streamed) chat completion."""
        try:
            data = msgspec.json.decode(content)
        except msgspec.DecodeError as exc:
            raise ModelResponseError(f"{self.url} answered with invalid JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ModelResponseError(
                f"{self.url} answered with {type(data).__name__}, not an object"
            )
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            raise ModelResponseError(f"{self.url} answered without choices: {data!r:.300}")
        choice = choices[0]
        raw = choice.get("message")
        if not isinstance(raw, Mapping):
            raise ModelResponseError("the answer's choice has no 'message' object")
        meta = {k: data[k] for k in _META_KEYS if isinstance(data.get(k), str)}
        if choice.get("finish_reason"):
            meta["finish_reason"] = choice["finish_reason"]
        return self._message(dict(raw), message_id, meta, data.get("usage"))

    def _decode_event(self, payload: str) -> Any:
        try:
            return msgspec.json.decode(payload)
        except msgspec.DecodeError as exc:
            raise ModelResponseError(
                f"undecodable stream event from {self.url}: {payload!r:.200}"
            ) from exc

    def _message(
        self, raw: dict[str, Any], message_id: str, meta: dict[str, Any], usage: Any
    ) -> AIMessage:
        raw["role"] = "assistant"
        raw.pop("id", None)
        raw.pop("name", None)
        refusal = raw.pop("refusal", None)
        if refusal:
            meta["refusal"] = refusal
        raw = {k: raw[k] for k in ("role", "content", "tool_calls") if k in raw}
        if raw.get("tool_calls") == []:
            raw.pop("tool_calls")
        try:
            message = coerce_message(raw)
        except InvalidMessageError as exc:
            raise ModelResponseError(f"the model's answer is unusable: {exc}") from exc
        assert isinstance(message, AIMessage)
        return msgspec.structs.replace(
            message, id=message_id, usage=_usage(usage), response_metadata=meta or None
        )
