"""What a thread is: messages, state and reducers, the actor and its mailbox."""

from ._envelope import Envelope as Envelope
from ._errors import CallLimitExceededError as CallLimitExceededError
from ._errors import ConflictError as ConflictError
from ._errors import FencedError as FencedError
from ._errors import InvalidContextError as InvalidContextError
from ._errors import InvalidInputError as InvalidInputError
from ._errors import InvalidMessageError as InvalidMessageError
from ._errors import InvalidThreadIdError as InvalidThreadIdError
from ._errors import InvalidToolError as InvalidToolError
from ._errors import InvalidUpdateError as InvalidUpdateError
from ._errors import ItemCorruptError as ItemCorruptError
from ._errors import MailboxFullError as MailboxFullError
from ._errors import MessageTooLargeError as MessageTooLargeError
from ._errors import ModelCallLimitExceededError as ModelCallLimitExceededError
from ._errors import ModelConnectionError as ModelConnectionError
from ._errors import ModelError as ModelError
from ._errors import ModelHTTPError as ModelHTTPError
from ._errors import ModelResponseError as ModelResponseError
from ._errors import ModelTimeoutError as ModelTimeoutError
from ._errors import OverloadedError as OverloadedError
from ._errors import PersistenceError as PersistenceError
from ._errors import SnapshotCorruptError as SnapshotCorruptError
from ._errors import SnapshotFormatError as SnapshotFormatError
from ._errors import StoreUnavailableError as StoreUnavailableError
from ._errors import SystemClosedError as SystemClosedError
from ._errors import ThreadExistsError as ThreadExistsError
from ._errors import ThreadInterruptedError as ThreadInterruptedError
from ._errors import ThreadlineError as ThreadlineError
from ._errors import ThreadNotFoundError as ThreadNotFoundError
from ._errors import ToolCallLimitExceededError as ToolCallLimitExceededError
from ._errors import TurnFailedError as TurnFailedError
from ._errors import VersionNotFoundError as VersionNotFoundError
from ._messages import REMOVE_ALL_MESSAGES as REMOVE_ALL_MESSAGES
from ._messages import AIMessage as AIMessage
from ._messages import AnyMessage as AnyMessage
from ._messages import BaseMessage as BaseMessage
from ._messages import HumanMessage as HumanMessage
from ._messages import MessageLike as MessageLike
from ._messages import RemoveMessage as RemoveMessage
from ._messages import SystemMessage as SystemMessage
from ._messages import ToolCall as ToolCall
from ._messages import ToolMessage as ToolMessage
from ._messages import coerce_message as coerce_message
from ._messages import coerce_messages as coerce_messages
from ._messages import to_openai as to_openai
from ._records import Interrupt as Interrupt
from ._state import AgentState as AgentState
from ._state import Command as Command
from ._state import add_messages as add_messages
from ._state import apply_update as apply_update
from ._state import normalize_update as normalize_update

__all__ = (
    "AIMessage",
    "AgentState",
    "AnyMessage",
    "BaseMessage",
    "CallLimitExceededError",
    "Command",
    "ConflictError",
    "Envelope",
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
    "MailboxFullError",
    "MessageLike",
    "MessageTooLargeError",
    "ModelCallLimitExceededError",
    "ModelConnectionError",
    "ModelError",
    "ModelHTTPError",
    "ModelResponseError",
    "ModelTimeoutError",
    "OverloadedError",
    "PersistenceError",
    "REMOVE_ALL_MESSAGES",
    "RemoveMessage",
    "SnapshotCorruptError",
    "SnapshotFormatError",
    "StoreUnavailableError",
    "SystemClosedError",
    "SystemMessage",
    "ThreadExistsError",
    "ThreadInterruptedError",
    "ThreadNotFoundError",
    "ThreadlineError",
    "ToolCall",
    "ToolCallLimitExceededError",
    "ToolMessage",
    "TurnFailedError",
    "VersionNotFoundError",
    "add_messages",
    "apply_update",
    "coerce_message",
    "coerce_messages",
    "normalize_update",
    "to_openai",
)
