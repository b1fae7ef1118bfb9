"""What a thread writes down: one record per step, a full record now and then.

These are the types; ``threadline.persistence`` frames them (format version,
checksum) and stores them.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from ._state import AgentState

S = TypeVar("S", bound=AgentState)
P = TypeVar("P")


class Interrupt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A pending question to a human, raised by ``interrupt(value)`` in a tool.

    ``id`` names it in ``Command(resume={id: answer})``; ``value`` is what the
    tool asked (plain builtins: it is stored with the turn); ``tool_call_id``
    is the call that asked, the only one that runs again on resume.
    """

    id: str
    value: Any = None
    tool_call_id: str | None = None


class TurnCursor(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A turn in flight: which message started it and which step comes next.

    Stored with every step, so whoever activates the thread after a crash
    resumes the turn from ``next``. ``context`` is the static runtime context in
    plain builtins: it travels with the turn.
    """

    message_id: str
    next: str
    context: Any = None
    model_calls: int = 0
    tool_calls: int = 0
    resumes: int = 0
    """How many times the turn was resumed at ``next`` since its last completed
    step (each resume commits a ``resumed`` step first, so a crash loop is
    counted; a completed step starts the count again)."""
    interrupts: tuple[Interrupt, ...] = ()
    """Pending interrupts: the turn is parked until a ``Command(resume=...)``
    answers them (a plain message is refused meanwhile)."""
    resumed: dict[str, Any] = {}
    """Answers to this step's interrupts by id, handed back by ``interrupt()``
    when the interrupted calls run again (dropped when the step completes).
    Both are empty, and so not written at all, on turns without interrupts."""


class StepRecord(msgspec.Struct, Generic[P], frozen=True, kw_only=True, array_like=True):
    """One committed step: the updates it applied through the reducers.

    ``version`` is the thread's version after the step. ``turn`` is the turn
    still in flight after it (None once the turn is over). ``consumed`` is the
    id of the message this step consumed (input steps), for de-duplication.

    ``at`` is the version whose state the step started from instead of the
    previous one (``revert``, ``update_state(at=)``, ``fork``), and ``parent``
    the thread it was taken from when that is another thread (``fork``). Such
    a step's first update replaces the whole state (every field, and the
    messages after a ``RemoveMessage(REMOVE_ALL_MESSAGES)``), so replaying
    the step through the reducers gives that state exactly. (Both are
    trailing fields: records written before them decode with None.)
    """

    version: int
    kind: str
    updates: list[P]
    ts: float
    turn: TurnCursor | None = None
    consumed: str | None = None
    error: str | None = None
    at: int | None = None
    parent: str | None = None


class FullRecord(msgspec.Struct, Generic[S], frozen=True, kw_only=True, array_like=True):
    """The whole state at ``version``; replay of later steps starts from here.

    ``ts`` is the ``ts`` of the step record of the same version (written in
    the same commit), which lets a reader check that the two belong together.
    ``span`` is the journal's bookkeeping for which full records to keep (the
    step bytes since the last full record kept before this one); None in
    records written before it existed.
    """

    version: int
    state: S
    consumed: list[str]
    ts: float
    turn: TurnCursor | None = None
    span: int | None = None


class Recovered(msgspec.Struct, Generic[S], kw_only=True):
    """A thread as loaded: state (None for a new thread) and where its turn is."""

    state: S | None
    version: int
    consumed: list[str]
    turn: TurnCursor | None


class StepInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a thread's history (``at``, ``parent``: see ``StepRecord``)."""

    version: int
    kind: str
    updates: list[dict[str, Any]]
    ts: float
    turn: TurnCursor | None = None
    consumed: str | None = None
    error: str | None = None
    at: int | None = None
    parent: str | None = None
