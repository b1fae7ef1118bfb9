"""Model and tool call limits per thread and per turn."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from threadline.actors import (
    AgentState,
    AIMessage,
    AnyMessage,
    Command,
    ModelCallLimitExceededError,
    ToolCall,
    ToolCallLimitExceededError,
    ToolMessage,
)
from threadline.actors._api import limits_text, pending_tool_calls

from .._middleware import AgentMiddleware, HookResult
from .._requests import Runtime
from ._common import _check_choice, _check_int


class CallLimitState(AgentState, kw_only=True):
    """State fields of ``ModelCallLimitMiddleware`` and ``ToolCallLimitMiddleware``.

    Tool counts are keyed by tool name (``"__all__"`` for every tool). ``run_*``
    counts restart at each turn.
    """

    thread_model_call_count: int = 0
    run_model_call_count: int = 0
    thread_tool_call_count: dict[str, int] = msgspec.field(default_factory=dict)
    run_tool_call_count: dict[str, int] = msgspec.field(default_factory=dict)


def _check_limits(thread_limit: int | None, run_limit: int | None) -> None:
    _check_int("thread_limit", thread_limit, minimum=0, optional=True)
    _check_int("run_limit", run_limit, minimum=0, optional=True)
    if thread_limit is None and run_limit is None:
        raise ValueError("give at least one of thread_limit and run_limit")


class ModelCallLimitMiddleware(AgentMiddleware):
    """Limit model calls per thread (``thread_limit``) and per turn (``run_limit``).

    Before a model call that would go over a limit, ``exit_behavior="end"``
    ends the turn with an AIMessage saying so; ``"error"`` raises
    ``ModelCallLimitExceededError`` (the turn fails). Counts live in the
    thread's state (``CallLimitState``). Use one instance per agent.
    """

    state_schema = CallLimitState

    def __init__(
        self,
        *,
        thread_limit: int | None = None,
        run_limit: int | None = None,
        exit_behavior: Literal["end", "error"] = "end",
    ) -> None:
        _check_limits(thread_limit, run_limit)
        _check_choice("exit_behavior", exit_behavior, ("end", "error"))
        self.thread_limit = thread_limit
        self.run_limit = run_limit
        self.exit_behavior = exit_behavior

    def before_agent(self, state: Any, runtime: Runtime[Any]) -> HookResult:
        if getattr(state, "run_model_call_count", 0):
            return {"run_model_call_count": 0}
        return None

    def before_model(self, state: Any, runtime: Runtime[Any]) -> HookResult:
        thread_count: int = getattr(state, "thread_model_call_count", 0)
        run_count: int = getattr(state, "run_model_call_count", 0)
        over = (self.thread_limit is not None and thread_count >= self.thread_limit) or (
            self.run_limit is not None and run_count >= self.run_limit
        )
        if not over:
            return None
        error = ModelCallLimitExceededError(
            thread_count=thread_count,
            run_count=run_count,
            thread_limit=self.thread_limit,
            run_limit=self.run_limit,
        )
        if self.exit_behavior == "error":
            raise error
        return Command(goto="end", update={"messages": [AIMessage(str(error))]})

    def after_model(self, state: Any, runtime: Runtime[Any]) -> HookResult:
        return {
            "thread_model_call_count": getattr(state, "thread_model_call_count", 0) + 1,
            "run_model_call_count": getattr(state, "run_model_call_count", 0) + 1,
        }


class ToolCallLimitMiddleware(AgentMiddleware):
    """Limit tool calls (of ``tool_name``, or of every tool) per thread and per turn.

    After each model call, the requested calls that would go over a limit are
    blocked. ``exit_behavior="continue"`` answers each blocked call with an
    error ToolMessage and lets the others run (the model sees the errors);
    ``"end"`` answers every pending call with an error ToolMessage and ends the
    turn with an AIMessage; ``"error"`` raises ``ToolCallLimitExceededError``.
    The thread count counts calls that ran; the run count also counts blocked
    ones. Use one instance per ``tool_name``.
    """

    state_schema = CallLimitState

    def __init__(
        self,
        *,
        tool_name: str | None = None,
        thread_limit: int | None = None,
        run_limit: int | None = None,
        exit_behavior: Literal["continue", "end", "error"] = "continue",
    ) -> None:
        if tool_name is not None and (not isinstance(tool_name, str) or not tool_name):
            raise ValueError("tool_name must be a non-empty str or None")
        _check_limits(thread_limit, run_limit)
        _check_choice("exit_behavior", exit_behavior, ("continue", "end", "error"))
        self.tool_name = tool_name
        self.thread_limit = thread_limit
        self.run_limit = run_limit
        self.exit_behavior = exit_behavior
        self._key = tool_name or "__all__"

    @property
    def name(self) -> str:
        base = type(self).__name__
        return f"{base}[{self.tool_name}]" if self.tool_name else base

    def _blocked_text(self) -> str:
        if self.tool_name:
            return f"Tool call limit exceeded. Do not call {self.tool_name!r} again."
        return "Tool call limit exceeded. Do not make additional tool calls."

    def before_agent(self, state: Any, runtime: Runtime[Any]) -> HookResult:
        counts: dict[str, int] = getattr(state, "run_tool_call_count", {})
        if counts.get(self._key):
            return {"run_tool_call_count": {**counts, self._key: 0}}
        return None

    def after_model(self, state: Any, runtime: Runtime[Any]) -> HookResult:
        pending = pending_tool_calls(state.messages)
        matching = [c for c in pending if self.tool_name is None or c.name == self.tool_name]
        if not matching:
            return None
        thread_counts: dict[str, int] = dict(getattr(state, "thread_tool_call_count", {}))
        run_counts: dict[str, int] = dict(getattr(state, "run_tool_call_count", {}))
        thread_count = thread_counts.get(self._key, 0)
        run_count = run_counts.get(self._key, 0)
        allowed: list[ToolCall] = []
        blocked: list[ToolCall] = []
        for call in matching:
            if (self.thread_limit is not None and thread_count + 1 > self.thread_limit) or (
                self.run_limit is not None and run_count + 1 > self.run_limit
            ):
                blocked.append(call)
            else:
                allowed.append(call)
                thread_count += 1
                run_count += 1
        if not blocked:
            thread_counts[self._key] = thread_count
            run_counts[self._key] = run_count
            return {"thread_tool_call_count": thread_counts, "run_tool_call_count": run_counts}
        run_count += len(blocked)
        if self.exit_behavior == "error":
            raise ToolCallLimitExceededError(
                tool_name=self.tool_name,
                thread_count=thread_count,
                run_count=run_count,
                thread_limit=self.thread_limit,
                run_limit=self.run_limit,
            )
        text = self._blocked_text()
        if self.exit_behavior == "continue":
            thread_counts[self._key] = thread_count
            run_counts[self._key] = run_count
            update: dict[str, Any] = {
                "messages": [
                    ToolMessage(text, tool_call_id=c.id, name=c.name, status="error")
                    for c in blocked
                ],
                "thread_tool_call_count": thread_counts,
                "run_tool_call_count": run_counts,
            }
            if len(blocked) == len(pending):  # nothing left to run: back to the model
                return Command(update=update, goto="model")
            return update
        # "end": nothing more runs in this turn; every pending call gets an answer.
        thread_counts[self._key] = thread_count - len(allowed)  # only calls that ran count
        run_counts[self._key] = run_count
        blocked_ids = {c.id for c in blocked}
        answers: list[AnyMessage] = [
            ToolMessage(
                text
                if c.id in blocked_ids
                else "Not run: the turn ended because a tool call limit was reached.",
                tool_call_id=c.id,
                name=c.name,
                status="error",
            )
            for c in pending
        ]
        what = f"{self.tool_name!r} tool call" if self.tool_name else "Tool call"
        limits = limits_text(
            thread_count + len(blocked), run_count, self.thread_limit, self.run_limit
        )
        answers.append(AIMessage(f"{what} limit reached: {limits}."))
        return Command(
            update={
                "messages": answers,
                "thread_tool_call_count": thread_counts,
                "run_tool_call_count": run_counts,
            },
            goto="end",
        )
