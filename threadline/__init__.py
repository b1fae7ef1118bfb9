"""threadline: an async actor runtime for conversation threads, durable after every step.

The names a user needs live here::

    from threadline import ActorSystem, Agent, HumanMessage

The three packages behind this face are the homes of the code:
``threadline.actors`` (what a thread is: messages, state, reducers, errors),
``threadline.runtime`` (what runs threads: the system, agents, middleware,
models, the CLI) and ``threadline.persistence`` (what makes them durable:
snapshot stores and the cross-conversation store). Everything here is also
importable from its home package.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from threadline.actors import REMOVE_ALL_MESSAGES as REMOVE_ALL_MESSAGES
from threadline.actors import AgentState as AgentState
from threadline.actors import AIMessage as AIMessage
from threadline.actors import AnyMessage as AnyMessage
from threadline.actors import BaseMessage as BaseMessage
from threadline.actors import CallLimitExceededError as CallLimitExceededError
from threadline.actors import Command as Command
from threadline.actors import ConflictError as ConflictError
from threadline.actors import FencedError as FencedError
from threadline.actors import HumanMessage as HumanMessage
from threadline.actors import Interrupt as Interrupt
from threadline.actors import InvalidContextError as InvalidContextError
from threadline.actors import InvalidInputError as InvalidInputError
from threadline.actors import InvalidMessageError as InvalidMessageError
from threadline.actors import InvalidThreadIdError as InvalidThreadIdError
from threadline.actors import InvalidToolError as InvalidToolError
from threadline.actors import InvalidUpdateError as InvalidUpdateError
from threadline.actors import ItemCorruptError as ItemCorruptError
from threadline.actors import MailboxFullError as MailboxFullError
from threadline.actors import MessageTooLargeError as MessageTooLargeError
from threadline.actors import ModelCallLimitExceededError as ModelCallLimitExceededError
from threadline.actors import ModelConnectionError as ModelConnectionError
from threadline.actors import ModelError as ModelError
from threadline.actors import ModelHTTPError as ModelHTTPError
from threadline.actors import ModelResponseError as ModelResponseError
from threadline.actors import ModelTimeoutError as ModelTimeoutError
from threadline.actors import OverloadedError as OverloadedError
from threadline.actors import PersistenceError as PersistenceError
from threadline.actors import RemoveMessage as RemoveMessage
from threadline.actors import SnapshotCorruptError as SnapshotCorruptError
from threadline.actors import SnapshotFormatError as SnapshotFormatError
from threadline.actors import StoreUnavailableError as StoreUnavailableError
from threadline.actors import SystemClosedError as SystemClosedError
from threadline.actors import SystemMessage as SystemMessage
from threadline.actors import ThreadExistsError as ThreadExistsError
from threadline.actors import ThreadInterruptedError as ThreadInterruptedError
from threadline.actors import ThreadlineError as ThreadlineError
from threadline.actors import ThreadNotFoundError as ThreadNotFoundError
from threadline.actors import ToolCall as ToolCall
from threadline.actors import ToolCallLimitExceededError as ToolCallLimitExceededError
from threadline.actors import ToolMessage as ToolMessage
from threadline.actors import TurnFailedError as TurnFailedError
from threadline.actors import VersionNotFoundError as VersionNotFoundError
from threadline.actors import add_messages as add_messages
from threadline.persistence import MemorySnapshotStore as MemorySnapshotStore
from threadline.persistence import MemoryStore as MemoryStore
from threadline.persistence import RedisSnapshotStore as RedisSnapshotStore
from threadline.persistence import RedisStore as RedisStore
from threadline.persistence import SnapshotStore as SnapshotStore
from threadline.persistence import SqliteSnapshotStore as SqliteSnapshotStore
from threadline.persistence import SqliteStore as SqliteStore
from threadline.persistence import Store as Store
from threadline.persistence import open_snapshot_store as open_snapshot_store
from threadline.runtime import ActorSystem as ActorSystem
from threadline.runtime import Agent as Agent
from threadline.runtime import AgentMiddleware as AgentMiddleware
from threadline.runtime import ChatModel as ChatModel
from threadline.runtime import Client as Client
from threadline.runtime import LocalClient as LocalClient
from threadline.runtime import ModelRequest as ModelRequest
from threadline.runtime import OpenAIChatModel as OpenAIChatModel
from threadline.runtime import Runtime as Runtime
from threadline.runtime import ScriptedModel as ScriptedModel
from threadline.runtime import StepInfo as StepInfo
from threadline.runtime import StreamPart as StreamPart
from threadline.runtime import SummarizationMiddleware as SummarizationMiddleware
from threadline.runtime import ThreadClient as ThreadClient
from threadline.runtime import ThreadSnapshot as ThreadSnapshot
from threadline.runtime import ToolCallRequest as ToolCallRequest
from threadline.runtime import ToolRuntime as ToolRuntime
from threadline.runtime import TurnResult as TurnResult
from threadline.runtime import Worker as Worker
from threadline.runtime import after_agent as after_agent
from threadline.runtime import after_model as after_model
from threadline.runtime import before_agent as before_agent
from threadline.runtime import before_model as before_model
from threadline.runtime import count_tokens_approximately as count_tokens_approximately
from threadline.runtime import dynamic_prompt as dynamic_prompt
from threadline.runtime import tool as tool
from threadline.runtime import trim_messages as trim_messages
from threadline.runtime import wrap_model_call as wrap_model_call
from threadline.runtime import wrap_tool_call as wrap_tool_call
from threadline.runtime.agent import interrupt as interrupt

try:
    __version__: str = _version("threadline")
except _PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = (
    "AIMessage",
    "ActorSystem",
    "Agent",
    "AgentMiddleware",
    "AgentState",
    "AnyMessage",
    "BaseMessage",
    "CallLimitExceededError",
    "ChatModel",
    "Client",
    "Command",
    "ConflictError",
    "FencedError",
    "HumanMessage",
    "Interrupt",
    "InvalidContextError",
    "InvalidInputError",
    "InvalidMessageError",
    "InvalidThreadIdError",
    "InvalidToolError",
    "InvalidUpdateError",
    "ItemCorruptError",
    "LocalClient",
    "MailboxFullError",
    "MemorySnapshotStore",
    "MemoryStore",
    "MessageTooLargeError",
    "ModelCallLimitExceededError",
    "ModelConnectionError",
    "ModelError",
    "ModelHTTPError",
    "ModelRequest",
    "ModelResponseError",
    "ModelTimeoutError",
    "OpenAIChatModel",
    "OverloadedError",
    "PersistenceError",
    "REMOVE_ALL_MESSAGES",
    "RedisSnapshotStore",
    "RedisStore",
    "RemoveMessage",
    "Runtime",
    "ScriptedModel",
    "SnapshotCorruptError",
    "SnapshotFormatError",
    "SnapshotStore",
    "SqliteSnapshotStore",
    "SqliteStore",
    "StepInfo",
    "Store",
    "StoreUnavailableError",
    "StreamPart",
    "SummarizationMiddleware",
    "SystemClosedError",
    "SystemMessage",
    "ThreadClient",
    "ThreadExistsError",
    "ThreadInterruptedError",
    "ThreadNotFoundError",
    "ThreadSnapshot",
    "ThreadlineError",
    "ToolCall",
    "ToolCallLimitExceededError",
    "ToolCallRequest",
    "ToolMessage",
    "ToolRuntime",
    "TurnFailedError",
    "TurnResult",
    "VersionNotFoundError",
    "Worker",
    "add_messages",
    "after_agent",
    "after_model",
    "before_agent",
    "before_model",
    "count_tokens_approximately",
    "dynamic_prompt",
    "interrupt",
    "open_snapshot_store",
    "tool",
    "trim_messages",
    "wrap_model_call",
    "wrap_tool_call",
)
