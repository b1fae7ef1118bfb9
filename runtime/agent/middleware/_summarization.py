"""``SummarizationMiddleware``: replace old messages by a model-written summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import msgspec

from threadline.actors import (
    REMOVE_ALL_MESSAGES,
    AIMessage,
    AnyMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
)
from threadline.actors._api import new_id

from ...models import ChatModel
from .._middleware import AgentMiddleware, HookResult
from .._requests import ModelRequest, Runtime
from .._trim import TokenCounter, count_tokens_approximately, safe_cut, trim_messages
from ._common import _check_int

DEFAULT_SUMMARY_PROMPT = """\
<role>
Context Extraction Assistant
</role>

<primary_objective>
Extract the highest quality, most relevant context from the conversation history below.
</primary_objective>

<instructions>
The conversation history below will be replaced by the context you extract, so record \
everything that matters for continuing the conversation: the user's goals, facts and \
preferences they stated, decisions made, results of actions and tools, and open questions. \
Make sure nothing already done needs to be repeated. Be concise.
Respond ONLY with the extracted context, with no text before or after it.
</instructions>

<messages>
Messages to summarize:
{messages}
</messages>"""

DEFAULT_SUMMARY_PREFIX = "Here is a summary of the conversation to date:"

ContextSize: TypeAlias = tuple[Literal["tokens", "messages", "fraction"], int | float]
"""``("tokens", 4000)``, ``("messages", 20)`` or ``("fraction", 0.8)`` (of ``context_window``)."""

_LABELS = {"system": "System", "human": "Human", "ai": "AI", "tool": "Tool"}


def format_messages(messages: Sequence[AnyMessage]) -> str:
    """A plain-text transcript (``Human: ...``, ``AI: ...``, tool calls as JSON)."""
    lines = []
    for m in messages:
        label = _LABELS[m.type]
        if m.name:
            label += f" ({m.name})"
        text = f"{label}: {m.content}"
        if isinstance(m, AIMessage) and m.tool_calls:
            text += "\nTool calls: " + msgspec.json.encode(m.tool_calls).decode()
        lines.append(text)
    return "\n".join(lines)


def _context_size(
    what: str, value: object, context_window: int | None, *, allow_fraction: bool = True
) -> tuple[str, float]:
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)):
        raise ValueError(
            f"{what} must be a (kind, value) tuple such as ('tokens', 4000), ('messages', 20) "
            f"or ('fraction', 0.8); got {value!r}"
        )
    kind, size = value
    if kind in ("tokens", "messages"):
        _check_int(f"{what} {kind}", size, minimum=1)
    elif kind == "fraction" and allow_fraction:
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size <= 1:
            raise ValueError(f"{what} fraction must be in (0, 1], got {size!r}")
        if context_window is None:
            raise ValueError(f"{what} ('fraction', ...) needs context_window=<max input tokens>")
    else:
        raise ValueError(f"{what} kind must be 'tokens', 'messages' or 'fraction', got {kind!r}")
    return kind, float(size)


class SummarizationMiddleware(AgentMiddleware):
    """Summarize old messages when the history grows past ``trigger``.

    Before each model call, if any ``trigger`` fires (total tokens, number of
    messages, or a fraction of ``context_window`` tokens), the messages before
    the kept tail are summarized with ``model`` and the thread's history
    becomes: leading SystemMessages, one HumanMessage holding
    ``summary_prefix`` and the summary, and the tail chosen by ``keep`` (at
    least that many messages or at most that many tokens, moved earlier so an
    AIMessage with tool calls stays with its ToolMessages). A previous summary
    is summarized again with the rest. The change goes through ``RemoveMessage(
    id=REMOVE_ALL_MESSAGES)`` and is committed with the model step.

    ``model`` is any ``ChatModel``; it gets the ``summary_prompt`` with the
    transcript in place of ``{messages}`` (the last ``trim_tokens_to_summarize``
    tokens of it; None sends all). If it fails, the turn fails and the history
    stays as it was.
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        trigger: ContextSize | Sequence[ContextSize] = ("tokens", 4000),
        keep: ContextSize = ("messages", 20),
        token_counter: TokenCounter = count_tokens_approximately,
        summary_prompt: str = DEFAULT_SUMMARY_PROMPT,
        context_window: int | None = None,
        summary_prefix: str = DEFAULT_SUMMARY_PREFIX,
        trim_tokens_to_summarize: int | None = 4000,
    ) -> None:
        if not callable(getattr(model, "invoke", None)):
            raise TypeError("model must be a ChatModel (with an async invoke(request) method)")
        _check_int("context_window", context_window, minimum=1, optional=True)
        _check_int("trim_tokens_to_summarize", trim_tokens_to_summarize, minimum=1, optional=True)
        if isinstance(trigger, tuple) and trigger and isinstance(trigger[0], str):
            triggers: list[object] = [trigger]
        elif isinstance(trigger, (list, tuple)) and trigger:
            triggers = list(trigger)
        else:
            raise ValueError(
                f"trigger must be a (kind, value) tuple or a list of them: {trigger!r}"
            )
        self.triggers = [_context_size("trigger", t, context_window) for t in triggers]
        self.keep = _context_size("keep", keep, context_window)
        if not callable(token_counter):
            raise TypeError("token_counter must be a callable taking a list of messages")
        if not isinstance(summary_prompt, str) or "{messages}" not in summary_prompt:
            raise ValueError("summary_prompt must be a str with a {messages} placeholder")
        if not isinstance(summary_prefix, str):
            raise TypeError("summary_prefix must be a str")
        self.model = model
        self.token_counter = token_counter
        self.summary_prompt = summary_prompt
        self.context_window = context_window
        self.summary_prefix = summary_prefix
        self.trim_tokens_to_summarize = trim_tokens_to_summarize

    def _limit(self, kind: str, size: float) -> float:
        if kind == "fraction":
            assert self.context_window is not None
            return size * self.context_window
        return size

    def should_summarize(self, messages: Sequence[AnyMessage]) -> bool:
        """Whether any trigger fires for ``messages``."""
        tokens: int | None = None
        for kind, size in self.triggers:
            if kind == "messages":
                if len(messages) >= size:
                    return True
                continue
            if tokens is None:
                tokens = self.token_counter(list(messages))
            if tokens >= self._limit(kind, size):
                return True
        return False

    def partition(
        self, messages: Sequence[AnyMessage]
    ) -> tuple[list[AnyMessage], list[AnyMessage], list[AnyMessage]]:
        """``(leading system messages, messages to summarize, kept tail)``.

        The cut never separates an AIMessage with tool calls from its
        ToolMessages; nothing is to be summarized when no such cut exists.
        """
        msgs = list(messages)
        head = 0
        while head < len(msgs) and isinstance(msgs[head], SystemMessage):
            head += 1
        kind, size = self.keep
        if kind == "messages":
            target = len(msgs) - int(size)
        else:
            budget = self._limit(kind, size)
            lo, hi = head, len(msgs)  # the earliest start whose tail fits the budget
            while lo < hi:
                mid = (lo + hi) // 2
                if self.token_counter(msgs[mid:]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            target = min(lo, len(msgs) - 1)  # always keep the last message
        cut = safe_cut(msgs, max(target, head))
        if cut <= head:
            return msgs[:head], [], msgs[head:]
        return msgs[:head], msgs[head:cut], msgs[cut:]

    async def summarize(
        self, messages: Sequence[AnyMessage], state: Any, runtime: Runtime[Any]
    ) -> str:
        """The summary of ``messages`` from ``model``."""
        selected = list(messages)
        if self.trim_tokens_to_summarize is not None:
            selected = trim_messages(
                selected,
                max_tokens=self.trim_tokens_to_summarize,
                token_counter=self.token_counter,
                strategy="last",
                allow_partial=True,
            )
        transcript = format_messages(selected) if selected else "(too long to include)"
        prompt = self.summary_prompt.replace("{messages}", transcript)
        request: ModelRequest[Any] = ModelRequest(
            model=self.model,
            messages=[HumanMessage(prompt, id=new_id())],
            system_prompt=None,
            tools=[],
            state=state,
            runtime=runtime,
        )
        answer = await self.model.invoke(request)
        if not isinstance(answer, AIMessage):
            raise TypeError(f"the summary model returned {type(answer).__name__}, not an AIMessage")
        return answer.content.strip()

    async def before_model(self, state: Any, runtime: Runtime[Any]) -> HookResult:
        messages: list[AnyMessage] = state.messages
        if not self.should_summarize(messages):
            return None
        head, old, kept = self.partition(messages)
        if not old:
            return None
        summary = await self.summarize(old, state, runtime)
        return {
            "messages": [
                RemoveMessage(id=REMOVE_ALL_MESSAGES),
                *head,
                HumanMessage(f"{self.summary_prefix}\n\n{summary}"),
                *kept,
            ]
        }
