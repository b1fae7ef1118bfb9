"""What hooks, tools and models see of the running thread."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from threadline.actors import (
    AgentState,
    AnyMessage,
    Interrupt,
    InvalidContextError,
    InvalidUpdateError,
    ToolCall,
)
from threadline.actors._api import MAX_NESTING, Emit, too_deep

if TYPE_CHECKING:
    from ..models import ChatModel
    from ._tools import Tool

C = TypeVar("C")
S = TypeVar("S", bound=AgentState)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Runtime(Generic[C]):
    """The run's environment: static ``context``, the cross-conversation
    ``store``, a ``stream_writer`` for custom stream events, the ``thread_id``
    and the system's ``resources`` (never persisted)."""

    context: C
    store: Any
    thread_id: str
    resources: Mapping[str, Any]
    emit: Emit = dataclasses.field(repr=False)

    def stream_writer(self, data: Any) -> None:
        """Send ``data`` to ``stream(..., mode="custom")`` consumers."""
        self.emit("custom", data)


class GraphInterrupt(BaseException):
    """How ``interrupt()`` leaves a tool: caught by the tools step, which parks
    the turn. A ``BaseException`` (like ``CancelledError``), so that a tool's or
    a wrapper's ``except Exception`` does not swallow it."""

    def __init__(self, interrupt: Interrupt) -> None:
        super().__init__(interrupt.id)
        self.interrupt = interrupt


class _Interrupts:
    """One tool call's interrupt bookkeeping: answers by id, and a counter that
    gives the n-th ``interrupt()`` of the call the same id on every run."""

    __slots__ = ("count", "resumed", "tool_call_id")

    def __init__(self, tool_call_id: str, resumed: Mapping[str, Any]) -> None:
        self.tool_call_id = tool_call_id
        self.resumed = resumed
        self.count = 0

    def ask(self, value: Any) -> Any:
        interrupt_id = f"{self.tool_call_id}:{self.count}"
        self.count += 1
        if interrupt_id in self.resumed:
            return self.resumed[interrupt_id]
        try:
            # Stored with the turn: only what reads back as it was.
            stored = _ANY.decode(_ENCODER.encode(value))
        except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidUpdateError(f"interrupt value cannot be stored: {exc}") from exc
        raise GraphInterrupt(
            Interrupt(id=interrupt_id, value=stored, tool_call_id=self.tool_call_id)
        )


_CURRENT: contextvars.ContextVar[_Interrupts] = contextvars.ContextVar("threadline_interrupts")


def interrupt(value: Any) -> Any:
    """Ask a human: park the turn with ``value`` as a pending interrupt; when the
    thread is resumed with ``Command(resume=answer)``, the tool call runs again
    and this returns ``answer``. Callable from a tool (or a ``wrap_tool_call``
    hook) while it runs; ``runtime.interrupt(value)`` is the same."""
    current = _CURRENT.get(None)
    if current is None:
        raise RuntimeError("interrupt() is callable only while a tool call runs")
    return current.ask(value)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ToolRuntime(Generic[C, S]):
    """Injected into a tool parameter annotated ``ToolRuntime`` (hidden from the model)."""

    state: S
    context: C
    store: Any
    tool_call_id: str
    thread_id: str
    resources: Mapping[str, Any]
    emit: Emit = dataclasses.field(repr=False)
    interrupts: _Interrupts | None = dataclasses.field(default=None, repr=False)

    def stream_writer(self, data: Any) -> None:
        self.emit("custom", data)

    def interrupt(self, value: Any) -> Any:
        """See ``threadline.interrupt``."""
        if self.interrupts is None:
            raise RuntimeError("this runtime's tool call cannot be interrupted")
        return self.interrupts.ask(value)


@dataclasses.dataclass(slots=True, kw_only=True)
class ModelRequest(Generic[S]):
    """One model call: what hooks may change (for this call only) before it goes out."""

    model: ChatModel
    messages: list[AnyMessage]
    system_prompt: str | None
    tools: Sequence[Tool]
    state: S
    runtime: Runtime[Any]
    tool_choice: Any = None
    model_settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def override(self, **changes: Any) -> ModelRequest[S]:
        """A copy with ``changes`` (the stored history is never touched)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(slots=True, kw_only=True)
class ToolCallRequest(Generic[S]):
    """One tool call as seen by ``wrap_tool_call`` hooks."""

    tool_call: ToolCall
    tool: Tool | None
    state: S
    runtime: ToolRuntime[Any, S]

    def override(self, **changes: Any) -> ToolCallRequest[S]:
        return dataclasses.replace(self, **changes)


_ENCODER = msgspec.msgpack.Encoder()
_ANY = msgspec.msgpack.Decoder()


class ContextCodec:
    """Validates static context at the door and rebuilds it for each step.

    Context travels with the message as plain builtins (persisted with the
    turn), so a resumed turn sees the same context; each step gets a fresh
    object, so a hook that mutates it cannot leak into another step.
    """

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self._pydantic = callable(getattr(schema, "model_validate", None))

    def dump(self, context: Any) -> Any:
        if context is None:
            if self.schema is None:
                return None
            raise InvalidContextError(f"this agent needs a context of type {self._name()}")
        # Bounded before anything recurses into it (see MAX_NESTING); a
        # pydantic model's nesting shows only in its dump.
        deep = f"context nests deeper than {MAX_NESTING} levels"
        if too_deep(context):
            raise InvalidContextError(deep)
        dump = getattr(context, "model_dump", None)
        try:
            raw = dump(mode="json") if callable(dump) else msgspec.to_builtins(context)
        except RecursionError as exc:
            raise InvalidContextError(deep) from exc
        except Exception as exc:  # (msgspec's and a pydantic model_dump's errors alike)
            raise InvalidContextError(f"context cannot be stored: {exc}") from exc
        if callable(dump) and too_deep(raw):
            raise InvalidContextError(deep)
        try:
            # Stored with the turn and read back as Any by every later step:
            # accept only what reads back (no lone surrogates, no huge ints),
            # and hand on what was read, so a live turn sees what a resumed
            # one will.
            raw = _ANY.decode(_ENCODER.encode(raw))
        except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidContextError(f"context cannot be stored: {exc}") from exc
        self.load(raw)  # validate now, at the door, not in the middle of a turn
        return raw

    def load(self, raw: Any) -> Any:
        if self.schema is None:
            return MappingProxyType(raw) if isinstance(raw, dict) else raw
        try:
            if self._pydantic:
                return self.schema.model_validate(raw)
            value = msgspec.convert(raw, self.schema)
        except Exception as exc:
            raise InvalidContextError(f"context does not match {self._name()}: {exc}") from exc
        return MappingProxyType(value) if isinstance(value, dict) else value

    def _name(self) -> str:
        return getattr(self.schema, "__name__", repr(self.schema))
