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
    step (each resume commits a ``resume`` step first, so a crash loop is
    counted; a completed step starts the count again)."""


class StepRecord(msgspec.Struct, Generic[P], frozen=True, kw_only=True, array_like=True):
    """One committed step: the updates it applied through the reducers.

    ``version`` is the thread's version after the step. ``turn`` is the turn
    still in flight after it (None once the turn is over). ``consumed`` is the
    id of the message this step consumed (input steps), for de-duplication.
    """

    version: int
    kind: str
    updates: list[P]
    ts: float
    turn: TurnCursor | None = None
    consumed: str | None = None
    error: str | None = None


class FullRecord(msgspec.Struct, Generic[S], frozen=True, kw_only=True, array_like=True):
    """The whole state at ``version``; replay of later steps starts from here."""

    version: int
    state: S
    consumed: list[str]
    ts: float
    turn: TurnCursor | None = None


class Recovered(msgspec.Struct, Generic[S], kw_only=True):
    """A thread as loaded: state (None for a new thread) and where its turn is."""

    state: S | None
    version: int
    consumed: list[str]
    turn: TurnCursor | None


class StepInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a thread's history."""

    version: int
    kind: str
    updates: list[dict[str, Any]]
    ts: float
    turn: TurnCursor | None = None
    consumed: str | None = None
    error: str | None = None
