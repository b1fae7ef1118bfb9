"""threadline's exceptions: one root, a shallow tree.

::

    ThreadlineError
    ├── InvalidInputError            bad input at the door (user's fault, nothing was accepted)
    │   ├── InvalidMessageError      a message that is not a str / OpenAI dict / message object
    │   ├── InvalidThreadIdError     empty, too long, control characters, not a str
    │   ├── MessageTooLargeError     bigger than the system's max_message_bytes
    │   ├── InvalidUpdateError       unknown state key, wrong type, RemoveMessage of an unknown id
    │   └── InvalidContextError      context that does not match the agent's context_schema
    ├── InvalidToolError             a function that cannot become a tool (also a TypeError)
    ├── MailboxFullError             tell_nowait on a full mailbox
    ├── OverloadedError              a partition inbox is over its backlog cap (back off)
    ├── SystemClosedError            the ActorSystem is not running (or is shutting down)
    ├── TurnFailedError              a model, tool-chain or hook failed; the turn was aborted
    ├── ModelError                   a chat model call failed
    │   ├── ModelHTTPError           the model server answered with an error status
    │   ├── ModelTimeoutError        an attempt took longer than the model's timeout
    │   ├── ModelConnectionError     the model server could not be reached
    │   └── ModelResponseError       the answer cannot be used (bad JSON, bad tool arguments)
    ├── CallLimitExceededError       a call-limit middleware with exit_behavior="error"
    │   ├── ModelCallLimitExceededError
    │   └── ToolCallLimitExceededError
    ├── PersistenceError             anything the durable store says
    │   ├── ConflictError            the stored version is not the one the writer built on
    │   ├── FencedError              a newer owner (epoch) holds the thread
    │   ├── SnapshotCorruptError     bad checksum, undecodable or too-deep record, a head that
    │   │                            disagrees with its steps, a damaged SQLite file
    │   ├── SnapshotFormatError      a record written by a newer threadline; a Redis key
    │   │                            layout to migrate (threadline migrate) or a newer one
    │   ├── ItemCorruptError         an undecodable store item, a damaged SQLite file
    │   └── StoreUnavailableError    the backend failed (I/O error, connection refused, ...)
    ├── ThreadNotFoundError          no such thread
    │   └── VersionNotFoundError     the thread has no such version (get_state(version=),
    │                                revert, update_state(at=), fork(at=))
    ├── ThreadExistsError            fork onto a thread id that already has state
    └── ThreadInterruptedError       a plain message to a thread whose turn waits on an
                                     interrupt (answer with Command(resume=...))

This module is the one home of the tree; it lives in ``threadline.actors``
because everything else imports that package. ``threadline`` re-exports every
member; ``threadline.runtime`` and ``threadline.persistence`` re-export the
members that concern them.
"""

from __future__ import annotations

from typing import Any


class ThreadlineError(Exception):
    """Root of every error threadline raises on purpose."""


class InvalidInputError(ThreadlineError, ValueError):
    """Input rejected at the door; nothing was accepted or stored."""


class InvalidMessageError(InvalidInputError):
    """A message that threadline cannot interpret."""


class InvalidThreadIdError(InvalidInputError):
    """A thread id that is empty, too long, not a string or holds control characters."""


class MessageTooLargeError(InvalidInputError):
    """A message larger than the configured limit."""


class InvalidUpdateError(InvalidInputError):
    """A state update that does not fit the state schema."""


class InvalidContextError(InvalidInputError):
    """A runtime context that does not fit the agent's ``context_schema``."""


class InvalidToolError(ThreadlineError, TypeError):
    """A function that cannot be made a tool: an annotation that cannot be
    resolved, a type with no JSON schema, ``*args``/``**kwargs``. The message
    names the tool and the parameter."""


class MailboxFullError(ThreadlineError):
    """The thread's mailbox is at capacity (raised by ``tell_nowait``)."""


class OverloadedError(ThreadlineError):
    """A partition's inbox holds more unprocessed messages than its cap.

    Not to be retried at once: the workers are behind; back off, then retry with
    the same ``message_id`` (it is applied once).
    """


class SystemClosedError(ThreadlineError):
    """The actor system is not running, or stopped before the message was handled."""


class TurnFailedError(ThreadlineError):
    """A turn was aborted: the model, a tool chain or a hook raised.

    The thread's durable state stays at its last committed step. The original
    exception is the ``__cause__``; ``step`` names where it happened.
    """

    def __init__(self, message: str, *, thread_id: str, step: str) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.step = step


class PersistenceError(ThreadlineError):
    """Raised by a snapshot store."""


class ConflictError(PersistenceError):
    """A conditional commit found a version other than the one it built on."""


class FencedError(PersistenceError):
    """A newer owner (higher fencing epoch) holds the thread; this writer must stop."""


class SnapshotCorruptError(PersistenceError):
    """A thread's stored records cannot be trusted: a checksum mismatch, an undecodable
    or too deeply nested record, a head that disagrees with its step records, or a
    damaged SQLite file. Only that thread is affected; nothing is overwritten."""


class SnapshotFormatError(PersistenceError):
    """A stored record was written in a newer format than this version understands,
    or a Redis deployment's key layout is not the one it reads: a newer one, or the
    old one (format 1), which ``threadline migrate`` moves to the current one."""


class StoreUnavailableError(PersistenceError):
    """The backing store failed; the outcome of an in-flight commit is unknown."""


class ItemCorruptError(PersistenceError):
    """An item of the cross-conversation ``Store`` cannot be decoded, or its SQLite
    file is damaged."""


class ThreadNotFoundError(ThreadlineError, LookupError):
    """No thread with this id exists."""


class VersionNotFoundError(ThreadNotFoundError):
    """The thread exists but has no such version: below 1 or past its latest step."""


class ThreadInterruptedError(ThreadlineError):
    """A plain message sent to a thread whose turn is parked on an interrupt;
    nothing was committed. Answer with ``Command(resume=...)`` instead."""


class ThreadExistsError(ThreadlineError):
    """``fork`` was asked to create a thread whose id already has committed state."""


class ModelError(ThreadlineError):
    """A chat model call failed."""


class ModelHTTPError(ModelError):
    """The model server answered with an error status.

    ``message`` is the server's own error message (OpenAI's
    ``{"error": {"message": ...}}``, or the body text); ``body`` is the
    decoded body (or its text).
    """

    def __init__(self, status_code: int, message: str, *, url: str = "", body: Any = None) -> None:
        super().__init__(f"HTTP {status_code} from {url or 'the model server'}: {message}")
        self.status_code = status_code
        self.message = message
        self.url = url
        self.body = body


class ModelTimeoutError(ModelError, TimeoutError):
    """An attempt took longer than the model's ``timeout``."""


class ModelConnectionError(ModelError, ConnectionError):
    """The model server could not be reached, or the connection broke."""


class ModelResponseError(ModelError):
    """The model's answer cannot be used (undecodable JSON, bad tool-call arguments)."""


def limits_text(
    thread_count: int, run_count: int, thread_limit: int | None, run_limit: int | None
) -> str:
    parts = []
    if thread_limit is not None and thread_count >= thread_limit:
        parts.append(f"thread limit ({thread_count}/{thread_limit})")
    if run_limit is not None and run_count >= run_limit:
        parts.append(f"run limit ({run_count}/{run_limit})")
    return ", ".join(parts)


class CallLimitExceededError(ThreadlineError):
    """A call-limit middleware with ``exit_behavior="error"`` reached a limit."""

    def __init__(
        self,
        what: str,
        *,
        thread_count: int,
        run_count: int,
        thread_limit: int | None,
        run_limit: int | None,
    ) -> None:
        super().__init__(
            f"{what} exceeded: " + limits_text(thread_count, run_count, thread_limit, run_limit)
        )
        self.thread_count = thread_count
        self.run_count = run_count
        self.thread_limit = thread_limit
        self.run_limit = run_limit


class ModelCallLimitExceededError(CallLimitExceededError):
    """``ModelCallLimitMiddleware(exit_behavior="error")``: a limit was reached."""

    def __init__(
        self, *, thread_count: int, run_count: int, thread_limit: int | None, run_limit: int | None
    ) -> None:
        super().__init__(
            "Model call limits",
            thread_count=thread_count,
            run_count=run_count,
            thread_limit=thread_limit,
            run_limit=run_limit,
        )


class ToolCallLimitExceededError(CallLimitExceededError):
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
        super().__init__(
            f"Tool call limits for {tool_name!r}" if tool_name else "Tool call limits",
            thread_count=thread_count,
            run_count=run_count,
            thread_limit=thread_limit,
            run_limit=run_limit,
        )
        self.tool_name = tool_name
