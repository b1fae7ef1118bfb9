"""The offline demo model of ``threadline chat`` and the examples."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from threadline.actors import AIMessage, HumanMessage, ToolCall, ToolMessage

from ._scripted import ScriptedModel

if TYPE_CHECKING:
    from ..agent import ModelRequest


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
