"""threadline's exceptions: one root, a shallow tree.

::

    ThreadlineError
    ├── InvalidInputError            bad input at the door (user's fault, nothing was accepted)
    │   ├── InvalidMessageError      a message that is not a str / OpenAI dict / message object
    │   ├── InvalidThreadIdError     empty, too long, control characters, not a str
    │   ├── MessageTooLargeError     bigger than the system's max_message_bytes
    │   ├── InvalidUpdateError       unknown state key, wrong type, RemoveMessage of an unknown id
    │   └── InvalidContextError      context that does not match the agent's context_schema
    ├── MailboxFullError             tell_nowait on a full mailbox
    ├── SystemClosedError            the ActorSystem is not running (or is shutting down)
    ├── TurnFailedError              a model, tool-chain or hook failed; the turn was aborted
    ├── PersistenceError             anything the durable store says
    │   ├── ConflictError            the stored version is not the one the writer built on
    │   ├── FencedError              a newer owner (epoch) holds the thread
    │   ├── SnapshotCorruptError     checksum mismatch, undecodable record or state
    │   ├── SnapshotFormatError      a record written by a newer threadline
    │   └── StoreUnavailableError    the backend failed (I/O error, connection refused, ...)
    └── ThreadNotFoundError          no such thread

The tree lives in ``threadline.actors`` because everything else imports it; the
runtime and persistence packages re-export the members that concern them.
"""

from __future__ import annotations


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


class MailboxFullError(ThreadlineError):
    """The thread's mailbox is at capacity (raised by ``tell_nowait``)."""


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
    """A stored record fails its checksum or cannot be decoded."""


class SnapshotFormatError(PersistenceError):
    """A stored record was written in a newer format than this version understands."""


class StoreUnavailableError(PersistenceError):
    """The backing store failed; the outcome of an in-flight commit is unknown."""


class ThreadNotFoundError(ThreadlineError, LookupError):
    """No thread with this id exists."""
