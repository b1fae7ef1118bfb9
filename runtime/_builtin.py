"""Built-in middleware: summarization, call limits, retries, fallbacks and
context editing, after LangChain's middleware of the same names."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import anyio
import msgspec

from threadline.actors import (
    REMOVE_ALL_MESSAGES,
    AgentState,
    AIMessage,
    AnyMessage,
    Command,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ThreadlineError,
    ToolCall,
    ToolMessage,
)
from threadline.actors._messages import new_id

from ._context import ModelRequest, Runtime, ToolCallRequest
from ._middleware import AgentMiddleware, HookResult, ModelHandler, ToolHandler
from ._models import ChatModel
from ._tools import Tool
from ._trim import TokenCounter, count_tokens_approximately, safe_cut, trim_messages

_sleep = anyio.sleep  # the backoff sleep (tests replace it)

# -- errors ------------------------------------------------------------------------------


def _limits_text(
    thread_count: int, run_count: int, thread_limit: int | None, run_limit: int | None
) -> str:
    parts = []
    if thread_limit is not None and thread_count >= thread_limit:
        parts.append(f"thread limit ({thread_count}/{thread_limit})")
    if run_limit is not None and run_count >= run_limit:
        parts.append(f"run limit ({run_count}/{run_limit})")
    return ", ".join(parts)


class ModelCallLimitExceededError(ThreadlineError):
    """``ModelCallLimitMiddleware(exit_behavior="error")``: a limit was reached."""

    def __init__(
        self, *, thread_count: int, run_count: int, thread_limit: int | None, run_limit: int | None
    ) -> None:
        super().__init__(
            "Model call limits exceeded: "
            + _limits_text(thread_count, run_count, thread_limit, run_limit)
        )
        self.thread_count = thread_count
        self.run_count = run_count
        self.thread_limit = thread_limit
        self.run_limit = run_limit


class ToolCallLimitExceededError(ThreadlineError):
    """``ToolCallLimitMiddleware(exit_behavior="error")``: a limit was reached."""

    def __init__(
        self,
        *,
        tool_name: str | None,
        thread_count: int,
        run_count: int,
        thread_limit: int | None,
        run_limit: int | None,
    ) -> None:
        what = f"Tool call limits for {tool_name!r}" if tool_name else "Tool call limits"
        super().__init__(
            f"{what} exceeded: " + _limits_text(thread_count, run_count, thread_limit, run_limit)
        )
        self.tool_name = tool_name
        self.thread_count = thread_count
        self.run_count = run_count
        self.thread_limit = thread_limit
        self.run_limit = run_limit


# -- shared helpers --------------------------------------------------------------------


def _check_int(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _answered_by(messages: Sequence[AnyMessage], index: int, call_id: str) -> int | None:
    """The index of the AIMessage before ``index`` that made the call ``call_id``."""
    for j in range(index - 1, -1, -1):
        m = messages[j]
        if isinstance(m, AIMessage) and any(c.id == call_id for c in m.tool_calls):
            return j
    return None


def _pending_calls(messages: Sequence[AnyMessage]) -> list[ToolCall]:
    """Tool calls of the last AI message that have no ToolMessage yet."""
    answered: set[str] = set()
    for message in reversed(messages):
        if isinstance(message, ToolMessage):
            answered.add(message.tool_call_id)
        elif isinstance(message, AIMessage):
            return [c for c in message.tool_calls if c.id not in answered]
    return []


# -- summarization ---------------------------------------------------------------------

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


# -- call limits -------------------------------------------------------------------------


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
        pending = _pending_calls(state.messages)
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
        limits = _limits_text(
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


# -- retries and fallbacks -----------------------------------------------------------

RetryOn: TypeAlias = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
OnFailure: TypeAlias = Literal["raise", "continue"] | Callable[[Exception], str]


class _Backoff:
    """Retry settings shared by the retry middleware."""

    def __init__(
        self,
        *,
        max_retries: int,
        retry_on: RetryOn,
        on_failure: OnFailure,
        backoff_factor: float,
        initial_delay: float,
        max_delay: float,
        jitter: bool,
    ) -> None:
        _check_int("max_retries", max_retries, minimum=0)
        self.max_retries = max_retries
        self.backoff_factor = _check_number("backoff_factor", backoff_factor)
        self.initial_delay = _check_number("initial_delay", initial_delay)
        self.max_delay = _check_number("max_delay", max_delay)
        self.jitter = bool(jitter)
        if isinstance(retry_on, type) and issubclass(retry_on, Exception):
            retry_on = (retry_on,)
        self.should_retry: Callable[[Exception], bool]
        if isinstance(retry_on, tuple):
            if not retry_on or not all(
                isinstance(t, type) and issubclass(t, Exception) for t in retry_on
            ):
                raise ValueError("retry_on must be exception classes or a predicate")
            classes: tuple[type[Exception], ...] = retry_on
            self.should_retry = lambda exc: isinstance(exc, classes)
        elif callable(retry_on) and not isinstance(retry_on, type):
            self.should_retry = retry_on
        else:
            raise TypeError("retry_on must be exception classes or a predicate")
        if not callable(on_failure):
            _check_choice("on_failure", on_failure, ("raise", "continue"))
        self.on_failure = on_failure

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first)."""
        delay = self.initial_delay * (self.backoff_factor**retry if self.backoff_factor else 1.0)
        delay = min(delay, self.max_delay)
        if self.jitter and delay > 0:
            delay *= 1 + random.uniform(-0.25, 0.25)
        return max(0.0, delay)

    def failure_text(self, exc: Exception, attempts: int, what: str) -> str:
        if callable(self.on_failure):
            return self.on_failure(exc)
        plural = "attempt" if attempts == 1 else "attempts"
        return f"{what} failed after {attempts} {plural}: {type(exc).__name__}: {exc}"


class ModelRetryMiddleware(AgentMiddleware):
    """Retry failed model calls with exponential backoff.

    Retries up to ``max_retries`` times when ``retry_on`` (exception classes
    or a predicate) accepts the error, waiting ``initial_delay * backoff_factor
    ** n`` seconds (at most ``max_delay``, ±25% with ``jitter``). When the
    calls keep failing, ``on_failure="raise"`` re-raises (the turn fails),
    ``"continue"`` answers with an AIMessage describing the error, a callable
    ``f(exc) -> str`` answers with its text.
    """

    def __init__(
        self,
        *,
        max_retries: int = 2,
        retry_on: RetryOn = (Exception,),
        on_failure: OnFailure = "raise",
        backoff_factor: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        jitter: bool = True,
    ) -> None:
        self.backoff = _Backoff(
            max_retries=max_retries,
            retry_on=retry_on,
            on_failure=on_failure,
            backoff_factor=backoff_factor,
            initial_delay=initial_delay,
            max_delay=max_delay,
            jitter=jitter,
        )

    async def wrap_model_call(self, request: ModelRequest[Any], handler: ModelHandler) -> AIMessage:
        backoff = self.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                return await handler(request)
            except Exception as exc:
                if attempt > backoff.max_retries or not backoff.should_retry(exc):
                    if backoff.on_failure == "raise":
                        raise
                    return AIMessage(backoff.failure_text(exc, attempt, "Model call"))
            await _sleep(backoff.delay(attempt - 1))


class _ObservedTool(Tool):
    """A tool that records the exception it raises (the executor turns it into
    an error ToolMessage; the retry middleware wants the exception)."""

    def __init__(self, inner: Tool, seen: list[Exception]) -> None:
        self.__dict__.update(inner.__dict__)
        self._inner = inner
        self._seen = seen

    async def ainvoke(self, args: dict[str, Any], runtime: Any) -> Any:
        try:
            return await self._inner.ainvoke(args, runtime)
        except Exception as exc:
            self._seen.append(exc)
            raise


class ToolRetryMiddleware(AgentMiddleware):
    """Retry failed tool calls with exponential backoff.

    A call failed when the handler raised, or answered with an error
    ToolMessage (the executor turns a raising tool into one; ``retry_on`` then
    sees the tool's exception, or ``RuntimeError(content)`` for an error
    message the tool returned itself). Unknown tools are not retried.
    ``tools`` (names or ``Tool``s) limits retries to those tools. When the
    calls keep failing, ``on_failure="continue"`` answers with an error
    ToolMessage, ``"raise"`` raises (the turn fails), a callable ``f(exc) ->
    str`` answers with its text. Backoff as ``ModelRetryMiddleware``.
    """

    def __init__(
        self,
        *,
        max_retries: int = 2,
        tools: Sequence[str | Tool] | None = None,
        retry_on: RetryOn = (Exception,),
        on_failure: OnFailure = "continue",
        backoff_factor: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        jitter: bool = True,
    ) -> None:
        self.backoff = _Backoff(
            max_retries=max_retries,
            retry_on=retry_on,
            on_failure=on_failure,
            backoff_factor=backoff_factor,
            initial_delay=initial_delay,
            max_delay=max_delay,
            jitter=jitter,
        )
        self.tool_names: frozenset[str] | None = None
        if tools is not None:
            if isinstance(tools, str):
                raise TypeError("tools must be a list of tool names or Tools")
            names = []
            for t in tools:
                if isinstance(t, Tool):
                    names.append(t.name)
                elif isinstance(t, str) and t:
                    names.append(t)
                else:
                    raise ValueError(f"tools must hold tool names or Tools, got {t!r}")
            self.tool_names = frozenset(names)

    async def wrap_tool_call(
        self, request: ToolCallRequest[Any], handler: ToolHandler
    ) -> ToolMessage | Command:
        call = request.tool_call
        if request.tool is None or (
            self.tool_names is not None and call.name not in self.tool_names
        ):
            return await handler(request)
        backoff = self.backoff
        attempt = 0
        while True:
            attempt += 1
            seen: list[Exception] = []
            observed = request.override(tool=_ObservedTool(request.tool, seen))
            try:
                result = await handler(observed)
            except Exception as exc:
                failure: Exception = exc
            else:
                if not (isinstance(result, ToolMessage) and result.status == "error"):
                    return result
                failure = seen[-1] if seen else RuntimeError(result.content)
            if attempt > backoff.max_retries or not backoff.should_retry(failure):
                break
            await _sleep(backoff.delay(attempt - 1))
        if backoff.on_failure == "raise":
            raise failure
        return ToolMessage(
            backoff.failure_text(failure, attempt, f"Tool {call.name!r}"),
            tool_call_id=call.id,
            name=call.name,
            status="error",
        )


class ModelFallbackMiddleware(AgentMiddleware):
    """When the model call fails, try ``first_fallback``, then each of ``more``,
    in order; the last error is raised if all of them fail."""

    def __init__(self, first_fallback: ChatModel, *more: ChatModel) -> None:
        models = (first_fallback, *more)
        for m in models:
            if not callable(getattr(m, "invoke", None)):
                raise TypeError(f"a fallback must be a ChatModel with async invoke(), got {m!r}")
        self.models: tuple[ChatModel, ...] = models

    async def wrap_model_call(self, request: ModelRequest[Any], handler: ModelHandler) -> AIMessage:
        try:
            return await handler(request)
        except Exception as exc:
            error = exc
        for model in self.models:
            try:
                return await handler(request.override(model=model))
            except Exception as exc:
                error = exc
        raise error


# -- context editing -------------------------------------------------------------------


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
