"""``ContextEditingMiddleware``: clear old tool results once the context is large."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from threadline.actors import (
    AIMessage,
    AnyMessage,
    SystemMessage,
    ToolMessage,
)

from .._middleware import AgentMiddleware, ModelHandler
from .._requests import ModelRequest
from .._trim import TokenCounter, count_tokens_approximately
from ._common import _answered_by, _check_int


class ContextEditingMiddleware(AgentMiddleware):
    """Clear old tool results from what the model sees once the context is large.

    When a model request (system prompt and messages) is over
    ``trigger_tokens``, the content of each ToolMessage but the most recent
    ``keep`` is replaced by ``placeholder`` (and, with ``clear_tool_inputs``,
    the arguments of its tool call by ``{}``), oldest first, skipping
    ``exclude_tools``, until at least ``clear_at_least`` tokens were cleared
    (0: clear them all). Only the request changes: the thread's stored history
    is untouched.
    """

    def __init__(
        self,
        *,
        trigger_tokens: int = 100_000,
        keep: int = 3,
        clear_tool_inputs: bool = False,
        placeholder: str = "[cleared]",
        exclude_tools: Sequence[str] = (),
        clear_at_least: int = 0,
        token_counter: TokenCounter = count_tokens_approximately,
    ) -> None:
        _check_int("trigger_tokens", trigger_tokens, minimum=0)
        _check_int("keep", keep, minimum=0)
        _check_int("clear_at_least", clear_at_least, minimum=0)
        if not isinstance(placeholder, str):
            raise TypeError("placeholder must be a str")
        if isinstance(exclude_tools, str):
            raise TypeError("exclude_tools must be a list of tool names")
        if not callable(token_counter):
            raise TypeError("token_counter must be a callable taking a list of messages")
        self.trigger_tokens = trigger_tokens
        self.keep = keep
        self.clear_tool_inputs = clear_tool_inputs
        self.placeholder = placeholder
        self.exclude_tools = frozenset(exclude_tools)
        self.clear_at_least = clear_at_least
        self.token_counter = token_counter

    def _count(self, messages: list[AnyMessage], system_prompt: str | None) -> int:
        if system_prompt:
            return self.token_counter([SystemMessage(system_prompt), *messages])
        return self.token_counter(messages)

    def edit(
        self, messages: Sequence[AnyMessage], system_prompt: str | None = None
    ) -> list[AnyMessage]:
        """``messages`` with old tool results cleared (the same list object if
        nothing was cleared)."""
        msgs = messages if isinstance(messages, list) else list(messages)
        before = self._count(msgs, system_prompt)
        if before <= self.trigger_tokens:
            return msgs
        tool_positions = [i for i, m in enumerate(msgs) if isinstance(m, ToolMessage)]
        candidates = tool_positions[: len(tool_positions) - self.keep]
        out = list(msgs)
        changed = False
        for i in candidates:
            message = out[i]
            assert isinstance(message, ToolMessage)
            if message.content == self.placeholder:
                continue
            owner = _answered_by(out, i, message.tool_call_id)
            if owner is None:
                continue
            ai = out[owner]
            assert isinstance(ai, AIMessage)
            call = next(c for c in ai.tool_calls if c.id == message.tool_call_id)
            if (message.name or call.name) in self.exclude_tools:
                continue
            out[i] = msgspec.structs.replace(message, content=self.placeholder)
            if self.clear_tool_inputs:
                out[owner] = msgspec.structs.replace(
                    ai,
                    tool_calls=[
                        msgspec.structs.replace(c, args={}) if c.id == call.id else c
                        for c in ai.tool_calls
                    ],
                )
            changed = True
            if (
                self.clear_at_least
                and before - self._count(out, system_prompt) >= self.clear_at_least
            ):
                break
        return out if changed else msgs

    async def wrap_model_call(self, request: ModelRequest[Any], handler: ModelHandler) -> AIMessage:
        edited = self.edit(request.messages, request.system_prompt)
        if edited is request.messages:
            return await handler(request)
        return await handler(request.override(messages=edited))
