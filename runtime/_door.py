"""Validation at the door: what a sender hands in becomes an ``Envelope`` or a typed error.

Everything a thread will store passes here first (thread id, message shape,
state fields, context, size), so nothing that cannot be read back is ever
accepted, and a refusal costs the thread nothing: it never reaches a mailbox.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import msgspec

from threadline.actors import (
    AgentState,
    AnyMessage,
    BaseMessage,
    Command,
    InvalidInputError,
    InvalidThreadIdError,
    MessageTooLargeError,
    coerce_messages,
    normalize_update,
)
from threadline.actors._api import MAX_NESTING, Envelope, new_id, too_deep

from .agent._requests import ContextCodec

S = TypeVar("S", bound=AgentState)

Input = str | Mapping[str, Any] | AnyMessage | Command | Sequence[Any]
"""What ``ask``/``tell``/``stream`` take: a message (str, OpenAI-style dict or
message object), a list of them, a state update dict with ``messages``, or
``Command(resume=...)`` (the answer to a thread's pending interrupts)."""


def check_thread_id(thread_id: object, max_length: int) -> str:
    if not isinstance(thread_id, str):
        raise InvalidThreadIdError(f"a thread id must be a str, got {type(thread_id).__name__}")
    if not thread_id.strip():
        raise InvalidThreadIdError(
            "a thread id must not be empty or only whitespace"
            + (f" (got {thread_id!r})" if thread_id else "")
        )
    if len(thread_id) > max_length:
        raise InvalidThreadIdError(
            f"a thread id must be at most {max_length} characters, got {len(thread_id)}"
        )
    for ch in thread_id:
        category = unicodedata.category(ch)
        if category == "Cc":
            raise InvalidThreadIdError(f"a thread id must not contain control characters ({ch!r})")
        if category == "Cs":
            raise InvalidThreadIdError("a thread id must be valid Unicode (lone surrogate)")
    return thread_id


def check_message_id(message_id: object) -> str:
    if not isinstance(message_id, str) or not message_id.strip() or len(message_id) > 256:
        raise InvalidInputError(
            "message_id must be a non-blank str of at most 256 characters, "
            f"got {type(message_id).__name__} {str(message_id)[:40]!r}"
        )
    return message_id


def check_version(version: object, name: str = "version") -> int:
    """A version number: an int (not a bool) that fits in 64 bits. Whether the
    thread has it is the store's to say (``VersionNotFoundError``)."""
    if isinstance(version, bool) or not isinstance(version, int) or abs(version) >= 1 << 63:
        raise InvalidInputError(
            f"{name} must be a version number (an int), got {type(version).__name__} "
            f"{str(version)[:40]!r}"
        )
    return version


def check_page(
    start: object, stop: object, limit: object, before: object
) -> tuple[int | None, int | None]:
    """``history``'s arguments: ``start``/``stop`` (oldest first) or
    ``limit``/``before`` (one page backwards), not both. Returns the page's
    ``(limit, before)`` (both None: the ``start .. stop`` form)."""
    if limit is None and before is None:
        check_version(start, "start")
        if stop is not None:
            check_version(stop, "stop")
        return None, None
    if start != 1 or stop is not None:
        raise InvalidInputError(
            "history: give start/stop (oldest first) or limit/before (newest first), not both"
        )
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit < 1 << 63
    ):
        raise InvalidInputError(f"history: limit must be an int >= 1, got {limit!r}"[:120])
    return (
        100 if limit is None else limit,
        None if before is None else check_version(before, "before"),
    )


class Door(Generic[S]):
    """Turns what a sender hands in into envelopes for threads of ``state_schema``.

    ``context`` validates static context (the agent's ``context_schema``); a
    sender that does not know the agent passes ``ContextCodec(None)``, and the
    worker that runs the agent validates the context again at its own door.
    """

    def __init__(
        self,
        state_schema: type[S],
        context: ContextCodec,
        *,
        max_message_bytes: int,
        max_thread_id_length: int,
    ) -> None:
        self.state_schema = state_schema
        self.context = context
        self.max_message_bytes = max_message_bytes
        self.max_thread_id_length = max_thread_id_length
        self._encoder = msgspec.msgpack.Encoder()

    def thread_id(self, thread_id: object) -> str:
        return check_thread_id(thread_id, self.max_thread_id_length)

    def input(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        modes: tuple[str, ...] = (),
    ) -> Envelope:
        """An ``input`` envelope: starts a turn (a ``Command(resume=...)``: a
        ``resume`` envelope, which answers the thread's pending interrupts)."""
        self.thread_id(thread_id)
        message_id = new_id() if message_id is None else check_message_id(message_id)
        if isinstance(input, Command):
            return self._resume(thread_id, input, message_id, modes)
        update = self._input_update(input, message_id)
        raw_context = self.context.dump(context)
        size = len(self._encoder.encode(update)) + len(self._encoder.encode(raw_context))
        if size > self.max_message_bytes:
            raise MessageTooLargeError(
                f"message for thread {thread_id!r} is {size} bytes; "
                f"the limit is {self.max_message_bytes}"
            )
        return Envelope(
            kind="input",
            message_id=message_id,
            thread_id=thread_id,
            update=update,
            context=raw_context,
            modes=modes,
        )

    def _resume(
        self, thread_id: str, command: Command, message_id: str, modes: tuple[str, ...]
    ) -> Envelope:
        if command.resume is msgspec.UNSET or command.update is not None or command.goto:
            raise InvalidInputError(
                "a Command as input answers interrupts: Command(resume=value) "
                "(update and goto are for tools and hooks)"
            )
        if too_deep(command.resume):
            raise InvalidInputError(f"resume value nests deeper than {MAX_NESTING} levels")
        try:
            # Stored with the turn: only what reads back as it was.
            resume = msgspec.msgpack.decode(self._encoder.encode(command.resume))
        except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidInputError(f"resume value cannot be stored: {exc}") from exc
        update = {"resume": resume}
        size = len(self._encoder.encode(update))
        if size > self.max_message_bytes:
            raise MessageTooLargeError(
                f"resume for thread {thread_id!r} is {size} bytes; "
                f"the limit is {self.max_message_bytes}"
            )
        return Envelope(
            kind="resume", message_id=message_id, thread_id=thread_id, update=update, modes=modes
        )

    def update(
        self, thread_id: str, update: Mapping[str, Any], *, at: int | None = None
    ) -> Envelope:
        """An ``update`` envelope: one step through the reducers, no turn (with
        ``at``: applied to the state of that version)."""
        self.thread_id(thread_id)
        if at is not None:
            check_version(at, "at")
        normalized = normalize_update(self.state_schema, update, source="update_state")
        size = len(self._encoder.encode(normalized))
        if size > self.max_message_bytes:
            raise MessageTooLargeError(
                f"update for thread {thread_id!r} is {size} bytes; "
                f"the limit is {self.max_message_bytes}"
            )
        return Envelope(
            kind="update", message_id=new_id(), thread_id=thread_id, update=normalized, at=at
        )

    def revert(self, thread_id: str, to: int) -> Envelope:
        """A ``revert`` envelope: one step back to the state of version ``to``."""
        self.thread_id(thread_id)
        return Envelope(
            kind="revert", message_id=new_id(), thread_id=thread_id, at=check_version(to, "to")
        )

    def fork(self, thread_id: str, new_thread_id: str, at: int | None) -> Envelope:
        """A ``fork`` envelope, for the new thread's actor (its single writer)."""
        self.thread_id(thread_id)
        self.thread_id(new_thread_id)
        return Envelope(
            kind="fork",
            message_id=new_id(),
            thread_id=new_thread_id,
            source=thread_id,
            at=None if at is None else check_version(at, "at"),
        )

    def delete(self, thread_id: str) -> Envelope:
        self.thread_id(thread_id)
        return Envelope(kind="delete", message_id=new_id(), thread_id=thread_id)

    def _input_update(self, input: Input, message_id: str) -> dict[str, Any]:
        """A plain message, a list of them, or a state update dict with 'messages'."""
        if isinstance(input, (str, BaseMessage, list, tuple)) or (
            isinstance(input, Mapping) and ("role" in input or "type" in input)
        ):
            return {"messages": coerce_messages(input, first_id=message_id)}
        return normalize_update(self.state_schema, input, source="input", first_id=message_id)
