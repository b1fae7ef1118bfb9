"""Chat messages: a msgspec tagged union, every message with a stable id."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, cast

import msgspec

from ._errors import InvalidMessageError
from ._nesting import MAX_NESTING, too_deep

REMOVE_ALL_MESSAGES: Final = "__remove_all__"
"""``RemoveMessage(id=REMOVE_ALL_MESSAGES)`` drops every message before it."""


def new_id() -> str:
    """A fresh message id: 96 random bits, 16 URL-safe characters.

    Shorter than a uuid4 hex string (65 bytes in memory instead of 81, on
    every message of every live thread) and cheaper to make.
    """
    return base64.urlsafe_b64encode(os.urandom(12)).decode("ascii")


class ToolCall(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A tool call requested by the model."""

    id: str
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        # LangChain code reads tool calls as dicts (call["name"], call["args"]).
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class _Content(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    # Only ``content`` is positional, so ``ToolMessage("done", tool_call_id=...)``
    # reads like LangChain; everything after it is keyword-only.
    content: str = ""


class BaseMessage(_Content, frozen=True, kw_only=True, omit_defaults=True):
    id: str = ""
    name: str | None = None

    @property
    def type(self) -> str:
        """``"system"``, ``"human"``, ``"ai"``, ``"tool"`` or ``"remove"``."""
        return _TAGS[type(self)]

    @property
    def text(self) -> str:
        return self.content

    def pretty_repr(self) -> str:
        title = f" {self.type.capitalize()} Message "
        return f"{title:=^80}\n\n{self.content}"

    def pretty_print(self) -> None:
        print(self.pretty_repr())  # mirrors LangChain's helper


class SystemMessage(BaseMessage, frozen=True, tag="system", omit_defaults=True):
    """Instructions for the model."""


class HumanMessage(BaseMessage, frozen=True, tag="human", omit_defaults=True):
    """A message from the user."""


class AIMessage(BaseMessage, frozen=True, kw_only=True, tag="ai", omit_defaults=True):
    """A model's answer: text and optionally tool calls."""

    # A shared empty tuple by default: most AI messages call no tool, and an
    # empty list per message costs 56 bytes in every live thread.
    tool_calls: Sequence[ToolCall] = ()

    def __post_init__(self) -> None:
        if not self.tool_calls and self.tool_calls != ():
            # So AIMessage("x", tool_calls=[]) == AIMessage("x").
            msgspec.structs.force_setattr(self, "tool_calls", ())

    usage: dict[str, int] | None = None
    response_metadata: dict[str, Any] | None = None

    def pretty_repr(self) -> str:
        out = super().pretty_repr()
        if self.tool_calls:
            calls = "\n".join(f"  {c.name} ({c.id})\n  Args: {c.args}" for c in self.tool_calls)
            out += f"\nTool Calls:\n{calls}"
        return out


class ToolMessage(BaseMessage, frozen=True, kw_only=True, tag="tool", omit_defaults=True):
    """The result of one tool call."""

    tool_call_id: str
    status: Literal["success", "error"] = "success"


class RemoveMessage(BaseMessage, frozen=True, kw_only=True, tag="remove", omit_defaults=True):
    """Asks the ``add_messages`` reducer to delete the message with this id."""

    id: str


AnyMessage: TypeAlias = SystemMessage | HumanMessage | AIMessage | ToolMessage
"""A message that can live in a thread's history."""

MessageLike: TypeAlias = AnyMessage | RemoveMessage
"""What a ``messages`` update may hold."""

_TAGS: Final[dict[type[Any], str]] = {
    SystemMessage: "system",
    HumanMessage: "human",
    AIMessage: "ai",
    ToolMessage: "tool",
    RemoveMessage: "remove",
}

_ROLES: Final[dict[str, type[BaseMessage]]] = {
    "user": HumanMessage,
    "human": HumanMessage,
    "assistant": AIMessage,
    "ai": AIMessage,
    "system": SystemMessage,
    "developer": SystemMessage,
    "tool": ToolMessage,
}


def _openai_tool_calls(raw: Any) -> list[ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidMessageError("'tool_calls' must be a list")
    calls = []
    for item in raw:
        if isinstance(item, ToolCall):
            calls.append(item)
            continue
        if not isinstance(item, Mapping):
            raise InvalidMessageError(f"a tool call must be a dict, got {type(item).__name__}")
        fn = item.get("function")
        if isinstance(fn, Mapping):  # OpenAI wire shape: {"id", "function": {"name", "arguments"}}
            name, args = fn.get("name"), fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = msgspec.json.decode(args) if args else {}
                except msgspec.DecodeError as exc:
                    raise InvalidMessageError(
                        f"tool call {item.get('id')!r}: arguments are not valid JSON"
                    ) from exc
        else:  # LangChain shape: {"id", "name", "args"}
            name, args = item.get("name"), item.get("args", {})
        if not isinstance(name, str) or not name:
            raise InvalidMessageError("a tool call needs a non-empty 'name'")
        if not isinstance(args, dict):
            raise InvalidMessageError(f"tool call {name!r}: arguments must be an object")
        call_id = item.get("id") or new_id()
        if not isinstance(call_id, str):
            raise InvalidMessageError(f"tool call {name!r}: 'id' must be a string")
        calls.append(ToolCall(id=call_id, name=name, args=args))
    return calls


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise InvalidMessageError("only text content parts are supported")
        return "".join(parts)
    raise InvalidMessageError(f"'content' must be a string, got {type(content).__name__}")


_DICT_KEYS: Final = frozenset(
    {"role", "type", "content", "id", "name", "tool_calls", "tool_call_id", "status"}
)
# Keys of an OpenAI response message (``choice.message.model_dump()``) that
# threadline has no field for: accepted while empty, refused when they carry
# something that would otherwise be dropped without a word.
_EMPTY_KEYS: Final = frozenset({"refusal", "annotations", "audio", "function_call"})


def _check_keys(data: Mapping[str, Any]) -> None:
    for key in data:
        if key in _DICT_KEYS or (key in _EMPTY_KEYS and not data[key]):
            continue
        if key in _EMPTY_KEYS:
            raise InvalidMessageError(f"a message dict with {key!r} is not supported")
        raise InvalidMessageError(
            f"unknown key {key!r} in a message dict (known: {', '.join(sorted(_DICT_KEYS))})"
        )


def _from_dict(data: Mapping[str, Any]) -> MessageLike:
    role = data.get("role", data.get("type"))
    if not isinstance(role, str) or (role not in _ROLES and role != "remove"):
        raise InvalidMessageError(f"a message dict needs 'role' of {sorted(_ROLES)}, got {role!r}")
    _check_keys(data)
    msg_id = data.get("id") or ""
    if not isinstance(msg_id, str):
        raise InvalidMessageError("'id' must be a string")
    if role == "remove":
        if not msg_id:
            raise InvalidMessageError("a remove message needs an 'id'")
        return RemoveMessage(id=msg_id)
    # Only an assistant may say nothing (OpenAI: content is null beside tool calls).
    if data.get("content") is None and _ROLES[role] is not AIMessage:
        raise InvalidMessageError(f"a {role!r} message needs 'content'")
    content = _content_text(data.get("content"))
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidMessageError("'name' must be a string")
    cls = _ROLES[role]
    if cls is AIMessage:
        return AIMessage(
            content, id=msg_id, name=name, tool_calls=_openai_tool_calls(data.get("tool_calls"))
        )
    if cls is ToolMessage:
        call_id = data.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidMessageError("a tool message needs a 'tool_call_id'")
        status = data.get("status", "success")
        if status not in ("success", "error"):
            raise InvalidMessageError("'status' must be 'success' or 'error'")
        return ToolMessage(content, id=msg_id, name=name, tool_call_id=call_id, status=status)
    return cast(MessageLike, cls(content, id=msg_id, name=name))


def coerce_message(value: object) -> MessageLike:
    """Turn a str, an OpenAI-style dict or a message object into a message.

    The result keeps its id if it had one; ``ensure_id`` assigns one.
    """
    message: MessageLike
    if isinstance(value, BaseMessage):
        if not isinstance(value.content, str):
            raise InvalidMessageError("message content must be a string")
        message = cast(MessageLike, value)
    elif isinstance(value, str):
        message = HumanMessage(value)
    elif isinstance(value, Mapping):
        message = _from_dict(value)
    else:
        raise InvalidMessageError(
            "a message must be a str, a dict with 'role' and 'content', or a message object; "
            f"got {type(value).__name__}"
        )
    check_message(message)
    return message


_ENCODER: Final = msgspec.msgpack.Encoder()
# What the journal decodes a stored message as: a message is accepted only if
# it reads back through this, so nothing accepted can brick its thread.
_DECODER: Final = msgspec.msgpack.Decoder(MessageLike)
_STATUSES: Final = ("success", "error")
_AT: Final = re.compile(r"^(?P<what>.*) - at (?P<key>`key` in )?`\$\.?(?P<path>[^`]*)`$", re.DOTALL)


def _plain(message: BaseMessage) -> bool:
    """True for a message of one of our classes whose fields are all of their
    declared types and hold nothing nested: the common case, whose check is
    a type test per field (msgspec does not check types at construction)."""
    if type(message.content) is not str or type(message.id) is not str:
        return False
    if message.name is not None and type(message.name) is not str:
        return False
    cls = type(message)
    if cls is HumanMessage or cls is SystemMessage or cls is RemoveMessage:
        return True
    if cls is ToolMessage:
        tool = cast(ToolMessage, message)
        status: object = tool.status
        return type(tool.tool_call_id) is str and type(status) is str and status in _STATUSES
    if cls is AIMessage:
        ai = cast(AIMessage, message)
        return not ai.tool_calls and ai.usage is None and ai.response_metadata is None
    return False


def _nested_too_deep(message: BaseMessage) -> str | None:
    """The field of an AI message that nests deeper than ``MAX_NESTING``, if any.

    Only fields that hold ``Any`` can nest: a typed field decodes a wrong
    nesting as a type error at its first level (and encoding something
    deeper than the stack allows raises RecursionError, which is mapped).
    """
    if not isinstance(message, AIMessage):
        return None
    calls = message.tool_calls
    for i, call in enumerate(calls if isinstance(calls, (list, tuple)) else ()):
        if isinstance(call, ToolCall) and too_deep(call.args):
            return f"tool_calls[{i}].args"
    if too_deep(message.response_metadata):
        return "response_metadata"
    return None


def check_message(message: BaseMessage) -> None:
    """Raise ``InvalidMessageError`` unless ``message`` can be stored and read back.

    The error names the field. Plain messages are type-checked field by field
    and encoded (a str may hold a lone surrogate, which cannot be stored);
    anything else is round-tripped through the journal's own decoder after a
    nesting check (see ``MAX_NESTING``).
    """
    cls = type(message).__name__
    plain = _plain(message)
    if not plain and (field := _nested_too_deep(message)) is not None:
        raise InvalidMessageError(f"{cls}: {field!r} nests deeper than {MAX_NESTING} levels")
    try:
        data = _ENCODER.encode(message)
        if not plain:
            _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        if match is None:
            raise InvalidMessageError(f"{cls}: {exc}") from exc
        where = f"a key of {match['path']!r}" if match["key"] else f"field {match['path']!r}"
        raise InvalidMessageError(f"{cls}: {where}: {match['what']}") from exc
    except RecursionError as exc:
        raise InvalidMessageError(
            f"{cls}: nests deeper than {MAX_NESTING} levels and cannot be stored"
        ) from exc
    except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidMessageError(f"{cls} cannot be stored: {exc}") from exc


def ensure_id(message: MessageLike) -> MessageLike:
    """The message itself if it has an id, else a copy with a fresh one."""
    if message.id:
        return message
    return msgspec.structs.replace(message, id=new_id())


def coerce_messages(value: object, *, first_id: str | None = None) -> list[MessageLike]:
    """Coerce one message or a list of them, giving each a stable id.

    ``first_id`` is the id for the first message that comes without one (the
    system passes the delivery's message id: one id string per message, not
    two); the others get fresh ids.
    """
    items: Iterable[object]
    if isinstance(value, (str, Mapping, BaseMessage)):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise InvalidMessageError(
            f"'messages' must be a message or a list of messages, got {type(value).__name__}"
        )
    out = []
    for item in items:
        message = coerce_message(item)
        if not message.id and first_id:
            message, first_id = msgspec.structs.replace(message, id=first_id), None
        out.append(ensure_id(message))
    return out


def pending_tool_calls(messages: Sequence[AnyMessage]) -> list[ToolCall]:
    """Tool calls of the last AI message that have no ToolMessage yet."""
    answered: set[str] = set()
    for message in reversed(messages):
        if isinstance(message, ToolMessage):
            answered.add(message.tool_call_id)
        elif isinstance(message, AIMessage):
            return [c for c in message.tool_calls if c.id not in answered]
    return []


def to_openai(message: AnyMessage) -> dict[str, Any]:
    """An OpenAI Chat Completions dict for this message."""
    role = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}[message.type]
    out: dict[str, Any] = {"role": role, "content": message.content}
    if message.name is not None and not isinstance(message, ToolMessage):
        out["name"] = message.name  # (OpenAI rejects 'name' on tool messages)
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": msgspec.json.encode(c.args).decode()},
            }
            for c in message.tool_calls
        ]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out
