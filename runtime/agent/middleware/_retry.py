"""Model and tool retries with exponential backoff."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import anyio

from threadline.actors import (
    AIMessage,
    Command,
    ToolMessage,
)

from .._middleware import AgentMiddleware, ModelHandler, ToolHandler
from .._requests import ModelRequest, ToolCallRequest
from .._tools import Tool
from ._common import _check_choice, _check_int, _check_number

_sleep = anyio.sleep  # the backoff sleep (tests replace it)


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
