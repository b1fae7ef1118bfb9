"""The chat model protocol and the deterministic ``ScriptedModel``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from threadline.actors import AIMessage, HumanMessage, ToolCall, ToolMessage
from threadline.actors._messages import new_id

from ._context import ModelRequest


@runtime_checkable
class ChatModel(Protocol):
    """Anything with ``async def invoke(request) -> AIMessage``."""

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage: ...


Response = str | AIMessage
Responder = Callable[[ModelRequest[Any]], Response | Awaitable[Response]]


def _as_ai(value: object) -> AIMessage:
    if isinstance(value, str):
        return AIMessage(value, id=new_id())
    if isinstance(value, AIMessage):
        # Scripts reuse messages; a reused id would *replace* the earlier one.
        return msgspec.structs.replace(value, id=new_id())
    raise TypeError(
        f"a scripted response must be a str or an AIMessage, got {type(value).__name__}"
    )


class ScriptedModel:
    """A deterministic model for tests, examples, benchmarks and the offline demo.

    ``ScriptedModel(["hi", AIMessage("", tool_calls=[...]), ...])`` answers in
    order (cycling when ``cycle``); ``ScriptedModel(fn)`` answers ``fn(request)``
    (sync or async), which can derive the answer from the conversation so that
    it is the same after a crash and a resume.
    """

    def __init__(
        self,
        responses: Sequence[Response] | Responder,
        *,
        cycle: bool = True,
        name: str = "scripted",
    ) -> None:
        self._responder: Responder | None = None
        self._responses: list[Response] = []
        if callable(responses):
            self._responder = responses
        else:
            self._responses = list(responses)
            if not self._responses:
                raise ValueError("ScriptedModel needs at least one response")
        self._cycle = cycle
        self.name = name
        self.calls = 0

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        index = self.calls
        self.calls += 1
        if self._responder is not None:
            value = self._responder(request)
            if inspect.isawaitable(value):
                value = await value
            return _as_ai(value)
        if index >= len(self._responses) and not self._cycle:
            raise RuntimeError(f"ScriptedModel ran out of responses after {index} calls")
        return _as_ai(self._responses[index % len(self._responses)])


_NAME = re.compile(r"\b(?:my name is|i am|i'm|call me)\s+([A-Za-z][\w-]*)", re.IGNORECASE)
_COUNT = re.compile(r"\bcount (?:the )?words in\s+(.+)", re.IGNORECASE | re.DOTALL)


def _demo(request: ModelRequest[Any]) -> AIMessage:
    messages = request.messages
    last = messages[-1] if messages else None
    if isinstance(last, ToolMessage):
        return AIMessage(f"The tool says: {last.content}.")
    text = last.content if isinstance(last, HumanMessage) else ""
    humans = [m for m in messages if isinstance(m, HumanMessage)]
    if (match := _COUNT.search(text)) is not None:
        call = ToolCall(id=f"call_{len(messages)}", name="word_count", args={"text": match[1]})
        return AIMessage("", tool_calls=[call])
    if "my name" in text.lower() and "?" in text:
        for message in reversed(humans[:-1]):
            if (found := _NAME.search(message.content)) is not None:
                return AIMessage(f"Your name is {found[1].capitalize()}.")
        return AIMessage("You haven't told me your name yet.")
    if (found := _NAME.search(text)) is not None:
        return AIMessage(f"Nice to meet you, {found[1].capitalize()}!")
    return AIMessage(
        f"You said {text!r}. That is message {len(humans)} of yours in this thread. "
        "(Offline demo model: try 'my name is ...', 'what's my name?' or 'count words in ...'.)"
    )


def word_count(text: str) -> int:
    """Count the words in a text.

    Args:
        text: the text to count words in.
    """
    return len(text.split())


def demo_model() -> ScriptedModel:
    """The offline model of ``threadline chat``: remembers names, counts words
    with the ``word_count`` tool, echoes the rest. Deterministic."""
    return ScriptedModel(_demo, name="demo")
