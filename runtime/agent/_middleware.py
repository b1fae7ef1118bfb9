"""Middleware: node-style hooks around the agent and the model, wrappers around
model and tool calls.

Order: ``before_*`` hooks run first to last, ``after_*`` hooks last to first,
and wrappers nest with the first middleware outermost. Hooks may be sync or
async; a hook returns None, a state update dict, or a ``Command`` (update and/or
``goto`` "model", "tools" or "end"). Their updates go through the reducers and
are part of the step that is committed.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, overload

from threadline.actors import AgentState, AIMessage, Command, ToolMessage

from ._requests import ModelRequest, Runtime, ToolCallRequest

HookResult = dict[str, Any] | Command | None
ModelHandler = Callable[[ModelRequest[Any]], Awaitable[AIMessage]]
ToolHandler = Callable[[ToolCallRequest[Any]], Awaitable[ToolMessage | Command]]

NODE_HOOKS = ("before_agent", "before_model", "after_model", "after_agent")
WRAP_HOOKS = ("wrap_model_call", "wrap_tool_call")


class AgentMiddleware:
    """Base class: override the hooks you need (sync or async).

    ``state_schema`` may name an ``AgentState`` subclass whose fields are added
    to the agent's state; ``tools`` are added to the agent's tools.
    """

    state_schema: ClassVar[type[AgentState] | None] = None
    tools: ClassVar[tuple[Any, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_agent(self, state: Any, runtime: Runtime[Any]) -> HookResult | Awaitable[HookResult]:
        return None

    def before_model(self, state: Any, runtime: Runtime[Any]) -> HookResult | Awaitable[HookResult]:
        return None

    def after_model(self, state: Any, runtime: Runtime[Any]) -> HookResult | Awaitable[HookResult]:
        return None

    def after_agent(self, state: Any, runtime: Runtime[Any]) -> HookResult | Awaitable[HookResult]:
        return None

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> AIMessage | Awaitable[AIMessage]:
        return handler(request)

    def wrap_tool_call(
        self, request: ToolCallRequest[Any], handler: ToolHandler
    ) -> ToolMessage | Command | Awaitable[ToolMessage | Command]:
        return handler(request)

    def overrides(self, hook: str) -> bool:
        """Whether this middleware implements ``hook`` (others are skipped, for speed)."""
        return getattr(type(self), hook) is not getattr(AgentMiddleware, hook)


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _function_middleware(
    hook: str, fn: Callable[..., Any], state_schema: type[AgentState] | None, name: str | None
) -> AgentMiddleware:
    def method(self: AgentMiddleware, *args: Any) -> Any:
        return fn(*args)

    cls = type(
        str(name or getattr(fn, "__name__", hook)),
        (AgentMiddleware,),
        {hook: method, "state_schema": state_schema, "__doc__": fn.__doc__},
    )
    return cls()  # type: ignore[no-any-return]


def _decorator(hook: str) -> Any:
    @overload
    def deco(fn: Callable[..., Any], /) -> AgentMiddleware: ...

    @overload
    def deco(
        *, state_schema: type[AgentState] | None = None, name: str | None = None
    ) -> Callable[[Callable[..., Any]], AgentMiddleware]: ...

    def deco(
        fn: Callable[..., Any] | None = None,
        /,
        *,
        state_schema: type[AgentState] | None = None,
        name: str | None = None,
    ) -> AgentMiddleware | Callable[[Callable[..., Any]], AgentMiddleware]:
        if fn is not None:
            return _function_middleware(hook, fn, state_schema, name)
        return lambda f: _function_middleware(hook, f, state_schema, name)

    deco.__name__ = hook
    deco.__doc__ = f"Make a middleware whose ``{hook}`` hook is the decorated function."
    return deco


before_agent = _decorator("before_agent")
before_model = _decorator("before_model")
after_model = _decorator("after_model")
after_agent = _decorator("after_agent")
wrap_model_call = _decorator("wrap_model_call")
wrap_tool_call = _decorator("wrap_tool_call")


def dynamic_prompt(fn: Callable[[ModelRequest[Any]], str | Awaitable[str]]) -> AgentMiddleware:
    """Set the system prompt of each model call from ``fn(request)``."""

    async def wrap(request: ModelRequest[Any], handler: ModelHandler) -> AIMessage:
        prompt = await maybe_await(fn(request))
        return await handler(request.override(system_prompt=prompt))

    return _function_middleware("wrap_model_call", wrap, None, getattr(fn, "__name__", None))
