"""A message for a thread actor as it travels, and the local reply of whoever waits.

The two are apart on purpose. An ``Envelope`` is plain data (a msgspec
Struct): it can be encoded, appended to a durable inbox, handed to another
process and decoded there. A ``Reply`` is an in-process waiter (an event, the
outcome, an optional stream sink) that stays with the sender; the actor
answers it if the sender is local, and a remote sender is answered through
the envelope's ``reply_to`` address instead.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

EnvelopeKind = Literal["input", "resume", "update", "revert", "fork", "delete", "wake"]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message for one thread actor, serializable.

    ``kind`` is ``"input"`` (start a turn), ``"resume"`` (answer the
    thread's pending interrupts: ``update`` is ``{"resume": value}``),
    ``"update"`` (apply a state update as one step; with ``at``, to the state
    of version ``at``), ``"revert"``
    (one step that makes the state that of version ``at`` again), ``"fork"``
    (create the thread from version ``at`` of thread ``source``),
    ``"delete"``, or ``"wake"`` (activate the thread, which resumes
    a turn parked mid-way, and nothing more). ``update`` holds the validated state update
    (for an input: ``{"messages": [...]}`` plus any other fields); ``context``
    the static runtime context as builtins. ``run_id`` names the run the
    message starts (defaults to the message id); ``modes`` are the stream modes
    the sender listens to; ``reply_to`` is where a remote sender waits for the
    reply and events (None for an in-process sender, whose ``Reply`` is local).
    """

    kind: EnvelopeKind
    message_id: str
    thread_id: str
    update: dict[str, Any] = {}
    context: Any = None
    run_id: str | None = None
    modes: tuple[str, ...] = ()
    reply_to: str | None = None
    at: int | None = None
    source: str | None = None


class Reply:
    """The local side of one envelope: resolved or failed exactly once.

    ``sink`` receives the stream parts of the modes the sender asked for; it is
    closed when the reply is settled, which ends the sender's stream.
    """

    __slots__ = ("_done", "_error", "_value", "modes", "sink")

    def __init__(
        self,
        *,
        sink: MemoryObjectSendStream[Any] | None = None,
        modes: frozenset[str] = frozenset(),
    ) -> None:
        self._done = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.sink = sink
        self.modes = modes

    @property
    def settled(self) -> bool:
        return self._done.is_set()

    @property
    def listening(self) -> bool:
        """Whether anyone takes stream parts (the actor skips building them if not)."""
        return self.sink is not None

    def resolve(self, value: Any) -> None:
        if not self._done.is_set():
            self._value = value
            self._finish()

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    async def wait(self) -> Any:
        await self._done.wait()
        return self.outcome()

    def outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def emit(self, mode: str, part: Any) -> None:
        if self.sink is not None and mode in self.modes:
            try:
                self.sink.send_nowait(part)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.sink = None  # the consumer went away; the turn goes on
