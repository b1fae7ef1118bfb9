"""The agent loop: model and tool steps through the middleware chain."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import msgspec

from threadline.actors import (
    AgentState,
    AIMessage,
    Command,
    Interrupt,
    InvalidUpdateError,
    ToolMessage,
    apply_update,
    normalize_update,
)
from threadline.actors._api import (
    Emit,
    StepOutcome,
    TurnCursor,
    check_message,
    new_id,
    pending_tool_calls,
    schema_info,
)

from ..models import ChatModel
from ._middleware import (
    NODE_HOOKS,
    WRAP_HOOKS,
    AgentMiddleware,
    HookResult,
    ModelHandler,
    ToolHandler,
    maybe_await,
)
from ._requests import (
    _CURRENT,
    ContextCodec,
    GraphInterrupt,
    ModelRequest,
    Runtime,
    ToolCallRequest,
    ToolRuntime,
    _Interrupts,
)
from ._tools import Tool, as_tool

S = TypeVar("S", bound=AgentState)

_GOTO = ("model", "tools", "end")


def _merge_schema(
    base: type[AgentState], middleware: Sequence[AgentMiddleware]
) -> type[AgentState]:
    """The user's schema plus the fields middleware schemas add.

    A new Struct subclassing ``base`` (so states stay instances of the user's
    class); Structs with fields cannot be combined by multiple inheritance.
    """
    have = set(base.__struct_fields__)
    extra: list[Any] = []
    for schema in (m.state_schema for m in middleware if m.state_schema is not None):
        for f in msgspec.structs.fields(schema):
            if f.name in have:
                continue
            have.add(f.name)
            if f.default is not msgspec.NODEFAULT:
                extra.append((f.name, f.type, msgspec.field(default=f.default)))
            elif f.default_factory is not msgspec.NODEFAULT:
                extra.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
            else:
                extra.append((f.name, f.type))
    if not extra:
        return base
    return cast(
        type[AgentState],
        msgspec.defstruct(
            base.__name__, extra, bases=(base,), kw_only=True, module=base.__module__
        ),
    )


class Agent(Generic[S]):
    """A model, its tools, a system prompt and middleware, for a state schema.

    ``Agent(model=..., tools=[fn, ...], system_prompt=..., middleware=[...],
    state_schema=MyState, context_schema=MyContext)``.
    """

    def __init__(
        self,
        *,
        model: ChatModel,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        system_prompt: str | None = None,
        middleware: Sequence[AgentMiddleware] = (),
        state_schema: type[S] = AgentState,  # type: ignore[assignment]
        context_schema: Any = None,
    ) -> None:
        if not callable(getattr(model, "invoke", None)):
            raise TypeError("model must have an async invoke(request) method")
        self.model = model
        self.system_prompt = system_prompt
        self.middleware = tuple(middleware)
        names: set[str] = set()
        for m in self.middleware:
            if not isinstance(m, AgentMiddleware):
                raise TypeError(f"middleware must be AgentMiddleware instances, got {m!r}")
            if m.name in names:
                raise ValueError(
                    f"two middleware are named {m.name!r}; each would run (and count) twice"
                )
            names.add(m.name)
        all_tools = [as_tool(t) for t in tools]
        for m in self.middleware:
            all_tools.extend(as_tool(t) for t in m.tools)
        self.tools: dict[str, Tool] = {}
        for t in all_tools:
            if t.name in self.tools:
                raise ValueError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t
        self._schema = cast(type[S], _merge_schema(state_schema, self.middleware))
        schema_info(self._schema)  # validate the schema now
        self.context = ContextCodec(context_schema)
        self._hooks = {
            hook: [m for m in self.middleware if m.overrides(hook)]
            for hook in (*NODE_HOOKS, *WRAP_HOOKS)
        }
        self._model_chain = self._chain_model()
        self._tool_chain = self._chain_tools()

    @property
    def state_schema(self) -> type[S]:
        return self._schema

    @property
    def first_step(self) -> str:
        return "model"

    # -- chains ------------------------------------------------------------------

    def _chain_model(self) -> ModelHandler:
        async def call_model(request: ModelRequest[Any]) -> AIMessage:
            message = await request.model.invoke(request)
            if not isinstance(message, AIMessage):
                raise TypeError(f"the model returned {type(message).__name__}, not an AIMessage")
            return message

        handler: ModelHandler = call_model
        for m in reversed(self._hooks["wrap_model_call"]):
            handler = self._wrap(m, "wrap_model_call", handler)
        return handler

    def _chain_tools(self) -> ToolHandler:
        handler: ToolHandler = self._execute_tool
        for m in reversed(self._hooks["wrap_tool_call"]):
            handler = self._wrap(m, "wrap_tool_call", handler)
        return handler

    @staticmethod
    def _wrap(m: AgentMiddleware, hook: str, inner: Any) -> Any:
        method = getattr(m, hook)

        async def wrapped(request: Any) -> Any:
            return await maybe_await(method(request, inner))

        return wrapped

    @staticmethod
    async def _execute_tool(request: ToolCallRequest[Any]) -> ToolMessage | Command:
        call = request.tool_call
        if request.tool is None:
            return ToolMessage(
                f"Error: unknown tool {call.name!r}",
                tool_call_id=call.id,
                name=call.name,
                status="error",
            )
        try:
            result = await request.tool.ainvoke(call.args, request.runtime)
            if isinstance(result, (Command, ToolMessage)):
                return result
            content = result if isinstance(result, str) else msgspec.json.encode(result).decode()
            message = ToolMessage(content, tool_call_id=call.id, name=call.name)
            # A result that cannot be stored (an object JSON cannot hold, a
            # lone surrogate) is the tool's failure, told to the model like
            # any other, not a turn that fails at every resume.
            check_message(message)
        except Exception as exc:
            # A failing tool is information for the model, not a crashed thread.
            return ToolMessage(
                f"Error: {type(exc).__name__}: {exc}",
                tool_call_id=call.id,
                name=call.name,
                status="error",
            )
        return message

    # -- steps -------------------------------------------------------------------

    def bind(
        self, *, store: Any = None, resources: Mapping[str, Any] | None = None
    ) -> BoundAgent[S]:
        """This agent with one system's store and resources (the agent itself
        stays shareable between systems)."""
        return BoundAgent(self, store, dict(resources or {}))

    async def step(
        self,
        thread_id: str,
        state: S,
        turn: TurnCursor,
        emit: Emit,
        *,
        store: Any = None,
        resources: Mapping[str, Any] | None = None,
    ) -> StepOutcome[S]:
        runtime: Runtime[Any] = Runtime(
            context=self.context.load(turn.context),
            store=store,
            thread_id=thread_id,
            resources=resources or {},
            emit=emit,
        )
        if turn.next == "model":
            return await self._model_step(state, turn, runtime)
        if turn.next == "tools":
            return await self._tools_step(state, turn, runtime)
        raise ValueError(f"unknown step {turn.next!r}")

    async def _run_hooks(
        self, hook: str, step: _Step[S], runtime: Runtime[Any], *, reverse: bool = False
    ) -> str | None:
        hooks = self._hooks[hook]
        for m in reversed(hooks) if reverse else hooks:
            result = await maybe_await(getattr(m, hook)(step.state, runtime))
            goto = step.apply_result(result, f"{m.name}.{hook}")
            if goto is not None:
                return goto
        return None

    async def _model_step(
        self, state: S, turn: TurnCursor, runtime: Runtime[Any]
    ) -> StepOutcome[S]:
        step = _Step(self._schema, state)
        goto = None
        if turn.model_calls == 0 and turn.tool_calls == 0:
            goto = await self._run_hooks("before_agent", step, runtime)
        if goto is None:
            goto = await self._run_hooks("before_model", step, runtime)
        called = False
        if goto is None:
            request: ModelRequest[Any] = ModelRequest(
                model=self.model,
                messages=list(step.state.messages),
                system_prompt=self.system_prompt,
                tools=list(self.tools.values()),
                state=step.state,
                runtime=runtime,
            )
            message = await self._model_chain(request)
            if not message.id:
                message = msgspec.structs.replace(message, id=new_id())
            step.apply({"messages": [message]}, "model")
            called = True
            goto = await self._run_hooks("after_model", step, runtime, reverse=True)
            if goto is None:
                goto = self._route(step.state)
        if goto == "model" and not called:
            goto = "end"  # a before-hook jumping to the model it precedes would loop
        nxt = None
        if goto == "end":
            await self._run_hooks("after_agent", step, runtime, reverse=True)
        else:
            nxt = msgspec.structs.replace(turn, next=goto, model_calls=turn.model_calls + called)
        return StepOutcome("model", step.updates, step.state, nxt)

    def _route(self, state: AgentState) -> str:
        if pending_tool_calls(state.messages):
            return "tools"
        # Hooks may have answered every call themselves: the model has not seen
        # those results yet.
        last = state.messages[-1] if state.messages else None
        return "model" if isinstance(last, ToolMessage) else "end"

    async def _tools_step(
        self, state: S, turn: TurnCursor, runtime: Runtime[Any]
    ) -> StepOutcome[S]:
        calls = pending_tool_calls(state.messages)
        results: list[ToolMessage | Command | None] = [None] * len(calls)
        errors: list[BaseException] = []
        asked: list[Interrupt | None] = [None] * len(calls)

        async def run(index: int) -> None:
            call = calls[index]
            interrupts = _Interrupts(call.id, turn.resumed)
            _CURRENT.set(interrupts)  # (this task's own context)
            request: ToolCallRequest[Any] = ToolCallRequest(
                tool_call=call,
                tool=self.tools.get(call.name),
                state=state,
                runtime=ToolRuntime(
                    state=state,
                    context=runtime.context,
                    store=runtime.store,
                    tool_call_id=call.id,
                    thread_id=runtime.thread_id,
                    resources=runtime.resources,
                    emit=runtime.emit,
                    interrupts=interrupts,
                ),
            )
            try:
                results[index] = await self._tool_chain(request)
            except GraphInterrupt as signal:  # parks the turn once the siblings finish
                asked[index] = signal.interrupt
            except Exception as exc:  # a wrap_tool_call hook failed: fails the turn
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(len(calls)):
                tg.start_soon(run, i)
        if errors:
            raise errors[0]
        step = _Step(self._schema, state)
        goto: str | None = None
        pending = tuple(a for a in asked if a is not None)
        for call, result in zip(calls, results, strict=True):
            source = f"tool {call.name!r}"
            if result is None and pending:
                continue  # interrupted: it runs again on resume
            if isinstance(result, ToolMessage):
                step.apply({"messages": [result]}, source)
                continue
            if not isinstance(result, Command):
                raise TypeError(f"{source} returned {type(result).__name__}")
            update = result.update or {}
            answers = update.get("messages") or []
            if not any(
                isinstance(m, ToolMessage) and m.tool_call_id == call.id
                for m in (answers if isinstance(answers, list) else [answers])
            ):
                raise InvalidUpdateError(
                    f"{source} returned a Command without a ToolMessage for its call {call.id!r}; "
                    "add ToolMessage(..., tool_call_id=runtime.tool_call_id) to update['messages']"
                )
            goto = step.apply_result(result, source) or goto
        if pending:
            # The finished siblings' results are committed with the step; the
            # turn waits at "tools" for the answers (only the unanswered calls
            # run then: ``pending_tool_calls``).
            parked = msgspec.structs.replace(turn, next="tools", interrupts=pending)
            return StepOutcome("tools", step.updates, step.state, parked)
        direct = all(
            self.tools.get(c.name) is not None and self.tools[c.name].return_direct for c in calls
        )
        if goto is None:
            goto = "end" if calls and direct else "model"
        nxt = None
        if goto == "end":
            await self._run_hooks("after_agent", step, runtime, reverse=True)
        else:
            nxt = msgspec.structs.replace(
                turn, next=goto, tool_calls=turn.tool_calls + len(calls), resumed={}
            )
        return StepOutcome("tools", step.updates, step.state, nxt)


class BoundAgent(Generic[S]):
    """An agent bound to one system's store and resources: the actors' behavior."""

    __slots__ = ("agent", "resources", "store")

    def __init__(self, agent: Agent[S], store: Any, resources: Mapping[str, Any]) -> None:
        self.agent = agent
        self.store = store
        self.resources = resources

    @property
    def state_schema(self) -> type[S]:
        return self.agent.state_schema

    @property
    def first_step(self) -> str:
        return self.agent.first_step

    async def step(self, thread_id: str, state: S, turn: TurnCursor, emit: Emit) -> StepOutcome[S]:
        return await self.agent.step(
            thread_id, state, turn, emit, store=self.store, resources=self.resources
        )


class _Step(Generic[S]):
    """The updates of one step, applied as they come so later hooks see them."""

    __slots__ = ("schema", "state", "updates")

    def __init__(self, schema: type[S], state: S) -> None:
        self.schema = schema
        self.state = state
        self.updates: list[dict[str, Any]] = []

    def apply(self, update: Mapping[str, Any], source: str) -> None:
        normalized = normalize_update(self.schema, update, source=source)
        self.state = apply_update(self.state, normalized)
        self.updates.append(normalized)

    def apply_result(self, result: HookResult, source: str) -> str | None:
        if result is None:
            return None
        if isinstance(result, Command):
            if result.update:
                self.apply(result.update, source)
            if result.goto is not None and result.goto not in _GOTO:
                raise InvalidUpdateError(f"{source}: Command.goto must be one of {_GOTO}")
            return result.goto
        if isinstance(result, Mapping):
            self.apply(result, source)
            return None
        raise InvalidUpdateError(
            f"{source} returned {type(result).__name__}; a hook returns None, a dict or a Command"
        )
