"""``LangChainChatModel``: any langchain-core chat model as a threadline ``ChatModel``.

``LangChainChatModel(ChatAnthropic(...))`` converts the thread's messages to
LangChain messages (``to_langchain``) and the answer back (``from_langchain``),
binds the agent's tools with ``bind_tools`` (a model without tool support is
called without them), and streams with ``astream`` when the model streams:
each text chunk goes to ``stream(..., mode="messages")`` consumers as a
``MessageChunk`` and the chunks are added up (``AIMessageChunk + ...``) into
the answer. ``ModelRequest.model_settings`` are passed as keyword arguments
to ``ainvoke``/``astream``.

The answer gets a fresh threadline id (the one its ``MessageChunk``s carry);
LangChain's own message id, if any, is kept as ``response_metadata["id"]``.
An answer whose tool-call arguments are not valid JSON raises
``ModelResponseError``; the chat model's own exceptions pass through
unchanged (inside a turn: the ``__cause__`` of ``TurnFailedError``).

langchain-core is optional (``pip install 'threadline[langchain]'``): it is
imported only when this module's functions run, so importing
``threadline.runtime`` never needs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import msgspec

from threadline.actors import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    InvalidMessageError,
    ModelResponseError,
    SystemMessage,
    ToolCall,
    ToolMessage,
    coerce_message,
)
from threadline.actors._api import new_id

from ._base import MessageChunk

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage, UsageMetadata
    from langchain_core.runnables import Runnable

    from threadline.actors._api import Emit

    from ..agent import ModelRequest

MISSING_LANGCHAIN: Final = (
    "LangChainChatModel needs langchain-core: pip install 'threadline[langchain]'"
)

_DETAILS: Final = ("input_token_details", "output_token_details")


def _require() -> None:
    try:
        import langchain_core.language_models
        import langchain_core.messages  # noqa: F401
    except ImportError as exc:
        raise ImportError(MISSING_LANGCHAIN) from exc


def _text(content: Any) -> str:
    """The text of LangChain content: a str, or the text parts of a block list."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def _builtins(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Metadata as plain builtins (thread state must be storable); None if empty."""
    if not value:
        return None
    out: dict[str, Any] = msgspec.to_builtins(dict(value), enc_hook=repr, str_keys=True)
    return out


def _to_usage_metadata(usage: Mapping[str, int] | None) -> UsageMetadata | None:
    if not usage or not {"input_tokens", "output_tokens", "total_tokens"} <= usage.keys():
        return None
    out: dict[str, Any] = {
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "total_tokens": usage["total_tokens"],
    }
    for key, value in usage.items():
        group, dot, name = key.partition(".")
        if dot and group in _DETAILS:
            out.setdefault(group, {})[name] = value
    return cast("UsageMetadata", out)


def _from_usage_metadata(meta: Mapping[str, Any] | None) -> dict[str, int] | None:
    """``{"input_tokens", "output_tokens", "total_tokens"}`` plus flattened
    details (``"input_token_details.cache_read"``)."""
    if not meta:
        return None
    usage = {
        k: v
        for k, v in meta.items()
        if k not in _DETAILS and isinstance(v, int) and not isinstance(v, bool)
    }
    for group in _DETAILS:
        for name, value in (meta.get(group) or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                usage[f"{group}.{name}"] = value
    return usage or None


def to_langchain(messages: Iterable[AnyMessage]) -> list[BaseMessage]:
    """LangChain messages for threadline messages (ids, names, tool calls,
    ``tool_call_id``, status, usage and response metadata kept)."""
    _require()
    from langchain_core import messages as lc

    out: list[BaseMessage] = []
    for m in messages:
        common: dict[str, Any] = {"content": m.content, "id": m.id or None, "name": m.name}
        if isinstance(m, SystemMessage):
            out.append(lc.SystemMessage(**common))
        elif isinstance(m, HumanMessage):
            out.append(lc.HumanMessage(**common))
        elif isinstance(m, AIMessage):
            out.append(
                lc.AIMessage(
                    **common,
                    tool_calls=[
                        lc.ToolCall(name=c.name, args=dict(c.args), id=c.id, type="tool_call")
                        for c in m.tool_calls
                    ],
                    usage_metadata=_to_usage_metadata(m.usage),
                    response_metadata=dict(m.response_metadata or {}),
                )
            )
        elif isinstance(m, ToolMessage):
            out.append(lc.ToolMessage(**common, tool_call_id=m.tool_call_id, status=m.status))
        else:
            raise InvalidMessageError(f"cannot convert {type(m).__name__} to a LangChain message")
    return out


def _decode_args(name: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        args = msgspec.json.decode(raw) if raw else {}
    except msgspec.DecodeError as exc:
        raise InvalidMessageError(
            f"tool call {name!r}: arguments are not valid JSON: {raw!r:.200}"
        ) from exc
    if not isinstance(args, dict):
        raise InvalidMessageError(f"tool call {name!r}: arguments must be a JSON object")
    return args


def _tool_calls(message: Any) -> list[ToolCall]:
    from langchain_core.messages import AIMessageChunk

    if isinstance(message, AIMessageChunk) and message.tool_call_chunks:
        # Decode the streamed fragments strictly: LangChain's own parse of
        # chunks is lenient and would turn broken JSON into partial arguments.
        calls = []
        for chunk in message.tool_call_chunks:
            name = chunk.get("name")
            if not name:
                raise InvalidMessageError("a streamed tool call has no name")
            args = _decode_args(name, chunk.get("args"))
            calls.append(ToolCall(id=chunk.get("id") or new_id(), name=name, args=args))
        return calls
    if message.invalid_tool_calls:
        bad = message.invalid_tool_calls[0]
        why = bad.get("error") or "undecodable arguments"
        raise InvalidMessageError(
            f"tool call {bad.get('name')!r} is invalid: {why} (arguments {bad.get('args')!r:.200})"
        )
    return [
        ToolCall(id=c.get("id") or new_id(), name=c["name"], args=dict(c["args"]))
        for c in message.tool_calls
    ]


def from_langchain(message: BaseMessage) -> AnyMessage:
    """The threadline message for a LangChain message (chunks included).

    Text content parts are joined; other content blocks are dropped. Tool
    calls whose arguments are not JSON raise ``InvalidMessageError``.
    """
    _require()
    from langchain_core import messages as lc

    content = _text(message.content)
    msg_id = message.id or ""
    name = message.name
    if isinstance(message, lc.AIMessage):
        return AIMessage(
            content,
            id=msg_id,
            name=name,
            tool_calls=_tool_calls(message),
            usage=_from_usage_metadata(message.usage_metadata),
            response_metadata=_builtins(message.response_metadata),
        )
    if isinstance(message, lc.HumanMessage):
        return HumanMessage(content, id=msg_id, name=name)
    if isinstance(message, lc.SystemMessage):
        return SystemMessage(content, id=msg_id, name=name)
    if isinstance(message, lc.ToolMessage):
        status: Literal["success", "error"] = "error" if message.status == "error" else "success"
        return ToolMessage(
            content, id=msg_id, name=name, tool_call_id=message.tool_call_id, status=status
        )
    if isinstance(message, lc.ChatMessage):
        converted = coerce_message(
            {"role": message.role, "content": content, "id": msg_id, "name": name}
        )
        if isinstance(converted, (SystemMessage, HumanMessage, AIMessage)):
            return converted
    raise InvalidMessageError(f"cannot convert a LangChain {type(message).__name__} to threadline")


class LangChainChatModel:
    """A ``ChatModel`` around a langchain-core ``BaseChatModel``.

    ``streaming``: ``None`` (default) streams when the chat model implements
    streaming and does not disable it; ``True``/``False`` force it.
    """

    def __init__(self, chat_model: BaseChatModel, *, streaming: bool | None = None) -> None:
        _require()
        from langchain_core.language_models import BaseChatModel

        if not isinstance(chat_model, BaseChatModel):
            raise TypeError(
                f"LangChainChatModel wraps a langchain-core BaseChatModel, "
                f"got {type(chat_model).__name__}"
            )
        self.chat_model = chat_model
        self.streaming = streaming

    def __repr__(self) -> str:
        return f"LangChainChatModel({type(self.chat_model).__name__})"

    def streams(self, *, with_tools: bool = False) -> bool:
        """Whether a call goes through ``astream``."""
        if self.streaming is not None:
            return self.streaming
        from langchain_core.language_models import BaseChatModel

        cls = type(self.chat_model)
        if cls._stream is BaseChatModel._stream and cls._astream is BaseChatModel._astream:
            return False
        disabled = self.chat_model.disable_streaming
        return not (disabled is True or (disabled == "tool_calling" and with_tools))

    def _runnable(self, request: ModelRequest[Any]) -> Runnable[Any, Any]:
        if not request.tools:
            return self.chat_model
        options: dict[str, Any] = {}
        if request.tool_choice is not None:
            options["tool_choice"] = request.tool_choice
        try:
            return self.chat_model.bind_tools([t.schema for t in request.tools], **options)
        except NotImplementedError:
            return self.chat_model  # a model without tool calling answers in text

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        history: list[AnyMessage] = list(request.messages)
        if request.system_prompt:
            history.insert(0, SystemMessage(request.system_prompt))
        messages = to_langchain(history)
        runnable = self._runnable(request)
        settings = dict(request.model_settings)
        message_id = new_id()
        if self.streams(with_tools=bool(request.tools)):
            result = await self._astream(
                runnable, messages, settings, message_id, request.runtime.emit
            )
        else:
            result = await runnable.ainvoke(messages, **settings)
        return self._answer(result, message_id)

    @staticmethod
    async def _astream(
        runnable: Runnable[Any, Any],
        messages: list[BaseMessage],
        settings: dict[str, Any],
        message_id: str,
        emit: Emit,
    ) -> Any:
        from langchain_core.messages import AIMessageChunk

        final: Any = None
        index = 0
        async for chunk in runnable.astream(messages, **settings):
            text = _text(getattr(chunk, "content", ""))
            if text:
                emit("messages", MessageChunk(content=text, message_id=message_id, index=index))
                index += 1
            if final is None:
                final = chunk
            elif isinstance(final, AIMessageChunk) and isinstance(chunk, AIMessageChunk):
                final = final + chunk
            else:
                raise ModelResponseError(
                    f"cannot add up streamed {type(final).__name__} and {type(chunk).__name__}"
                )
        if final is None:
            raise ModelResponseError("the chat model streamed nothing")
        return final

    @staticmethod
    def _answer(result: Any, message_id: str) -> AIMessage:
        from langchain_core.messages import AIMessage as LCAIMessage

        if not isinstance(result, LCAIMessage):
            raise ModelResponseError(
                f"the chat model returned {type(result).__name__}, not an AIMessage"
            )
        try:
            message = from_langchain(result)
        except InvalidMessageError as exc:
            raise ModelResponseError(f"the model's answer is unusable: {exc}") from exc
        assert isinstance(message, AIMessage)
        meta = dict(message.response_metadata or {})
        if result.id:
            meta.setdefault("id", result.id)
        return msgspec.structs.replace(message, id=message_id, response_metadata=meta or None)
