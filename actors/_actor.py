"""The thread actor: one mailbox, one turn at a time, every step durable.

A turn is a sequence of steps: ``input`` (apply the message), then whatever
the behavior runs (model, tools, model, ...). Each step is committed to the
journal before the next starts, and the caller's reply is sent only after the
last commit. The committed cursor says which step comes next, so whoever
activates the thread after a crash resumes the turn there.

An actor holds no task while idle: a message arriving at an idle actor
spawns a drain task (in the system's task group) that runs until the mailbox
is empty. An idle actor is therefore just its state and a few slots.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import structlog

from ._envelope import Envelope, Reply
from ._errors import (
    FencedError,
    InvalidInputError,
    InvalidUpdateError,
    PersistenceError,
    SystemClosedError,
    ThreadExistsError,
    ThreadInterruptedError,
    ThreadlineError,
    TurnFailedError,
)
from ._logging import get_logger
from ._mailbox import Mailbox, MailboxStatistics
from ._messages import REMOVE_ALL_MESSAGES, AIMessage, AnyMessage, RemoveMessage
from ._records import Interrupt, Recovered, TurnCursor
from ._state import AgentState, apply_update, initial_state

S = TypeVar("S", bound=AgentState)


class StreamPart(msgspec.Struct, frozen=True, kw_only=True):
    """One event of ``ActorSystem.stream``: its ``mode`` and ``data``.

    ``updates``: ``{step_kind: [update, ...]}`` after each committed step, and
    ``{"__interrupt__": [Interrupt, ...]}`` when the turn parks on interrupts;
    ``values``: the whole state after each committed step; ``custom``: what
    tools and hooks wrote with their ``stream_writer``; ``messages``: model
    output chunks (from models that stream).
    """

    mode: str
    data: Any
    thread_id: str
    version: int


class TurnResult(msgspec.Struct, Generic[S], frozen=True, kw_only=True):
    """The reply to ``ask``: the durable state after the turn's last step."""

    thread_id: str
    message_id: str
    version: int
    state: S
    duplicate: bool = False
    """True when the message id had already been consumed: nothing was applied."""
    interrupts: tuple[Interrupt, ...] = ()
    """The pending interrupts when the turn parked on them (answer them with
    ``Command(resume=...)``); empty when the turn ended."""

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    @property
    def messages(self) -> list[AnyMessage]:
        return self.state.messages

    @property
    def text(self) -> str:
        """The content of the last AI message ("" if there is none)."""
        for message in reversed(self.state.messages):
            if isinstance(message, AIMessage):
                return message.content
        return ""


class ThreadSnapshot(msgspec.Struct, Generic[S], frozen=True, kw_only=True):
    """A thread's committed state, its version and its unfinished step, if any."""

    thread_id: str
    version: int
    state: S
    next: str | None = None
    interrupts: tuple[Interrupt, ...] = ()
    """The interrupts the thread's turn waits on (``status == "interrupted"``)."""

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    @property
    def values(self) -> S:
        return self.state

    @property
    def status(self) -> str:
        """``"interrupted"`` (a turn waits on ``interrupts``), ``"busy"`` (a turn
        is in flight) or ``"idle"``."""
        if self.interrupts:
            return "interrupted"
        return "idle" if self.next is None else "busy"


class StepOutcome(Generic[S]):
    """What a behavior step produced: updates (normalized), the resulting state
    and the cursor of the next step (None ends the turn)."""

    __slots__ = ("kind", "next", "state", "updates")

    def __init__(
        self, kind: str, updates: list[dict[str, Any]], state: S, next: TurnCursor | None
    ) -> None:
        self.kind = kind
        self.updates = updates
        self.state = state
        self.next = next


Emit = Callable[[str, Any], None]


class Behavior(Protocol[S]):
    """What a thread does with a turn (the runtime's agent loop implements it)."""

    @property
    def state_schema(self) -> type[S]: ...

    @property
    def first_step(self) -> str: ...

    async def step(self, thread_id: str, state: S, turn: TurnCursor, emit: Emit) -> StepOutcome[S]:
        """Run the step ``turn.next`` and say what it changed; must not commit."""
        ...


class Journal(Protocol[S]):
    """A thread's durable log (``threadline.persistence.ThreadJournal``)."""

    version: int
    epoch: int

    async def open(self, keep_consumed: int) -> Recovered[S]: ...

    async def commit(
        self,
        *,
        kind: str,
        updates: Sequence[dict[str, Any]],
        state: S,
        turn: TurnCursor | None,
        consumed: str | None = None,
        recent: Sequence[str] = (),
        error: str | None = None,
        at: int | None = None,
        parent: str | None = None,
    ) -> None: ...

    async def delete(self) -> bool: ...

    async def state_at(self, thread_id: str, version: int | None) -> Recovered[S]:
        """``version`` of a thread as stored (None: its latest); ``ThreadNotFoundError``,
        ``VersionNotFoundError``."""
        ...


Delivery = tuple[Envelope, "Reply | None"]
"""A mailbox item: the envelope and the local reply (None: nobody local waits)."""

Acknowledge = Callable[[Envelope], Awaitable[None]]
"""Called once the step that consumed an envelope is durable (see ``ActorContext``)."""


class ActorContext(Generic[S]):
    """What every actor of one system shares (one object, not a copy per actor:
    idle actors are most of the memory of a busy system), the logger included.

    ``clock`` is a coarse monotonic time the system ticks; actors stamp their
    activity with it, sharing its float object instead of making one each.
    """

    __slots__ = (
        "acknowledge",
        "behavior",
        "capacity",
        "clock",
        "keep_consumed",
        "log",
        "max_resumes",
        "spawn",
    )

    def __init__(
        self,
        *,
        behavior: Behavior[S],
        spawn: Callable[[Callable[[], Coroutine[Any, Any, None]], str], None],
        capacity: int,
        keep_consumed: int,
        acknowledge: Acknowledge | None = None,
        max_resumes: int = 5,
    ) -> None:
        self.behavior = behavior
        self.spawn = spawn
        self.capacity = capacity
        self.keep_consumed = keep_consumed
        self.max_resumes = max_resumes
        # The post-commit acknowledgement: where an envelope came from a durable
        # inbox, this removes it there once its consuming step is committed.
        # None in memory (nothing to remove), so the hot path pays nothing.
        self.acknowledge = acknowledge
        self.clock = time.monotonic()
        # Resolved now (when the application has configured structlog), not at
        # every call: an unresolved proxy re-binds on each log call, which
        # costs more than the commit it reports.
        self.log: Any = get_logger()

    def tick(self) -> float:
        self.clock = time.monotonic()
        return self.clock


class ThreadActor(Generic[S]):
    """Owns one thread's state in memory; single writer of its journal."""

    __slots__ = (
        "_ctx",
        "_current",
        "_journal",
        "_mailbox",
        "_recent",
        "last_active",
        "ready",
        "running",
        "state",
        "thread_id",
        "turn",
    )

    def __init__(self, thread_id: str, *, context: ActorContext[S], journal: Journal[S]) -> None:
        self.thread_id = thread_id
        self._ctx = context
        self._journal = journal
        # Created with the first message and dropped once drained: most live
        # actors are idle, and an empty mailbox would be dead weight.
        self._mailbox: Mailbox[Delivery] | None = None
        self.state: S | None = None
        self.turn: TurnCursor | None = None
        self.ready = False
        self.running = False
        self.last_active = context.clock
        # Recently consumed message ids (a tuple: a list over-allocates).
        self._recent: tuple[str, ...] = ()
        self._current: Reply | None = None

    @property
    def version(self) -> int:
        return self._journal.version

    @property
    def idle(self) -> bool:
        return not self.running and (self._mailbox is None or self._mailbox.unused)

    # -- mailbox -----------------------------------------------------------------

    @property
    def mailbox(self) -> Mailbox[Delivery]:
        if self._mailbox is None:
            self._mailbox = Mailbox(self._ctx.capacity)
        return self._mailbox

    def mailbox_statistics(self) -> MailboxStatistics:
        if self._mailbox is None:
            return MailboxStatistics(size=0, capacity=self._ctx.capacity, waiting_senders=0)
        return self._mailbox.statistics()

    def offer(self, envelope: Envelope, reply: Reply | None) -> None:
        """Enqueue or raise ``MailboxFullError``."""
        self.mailbox.put_nowait((envelope, reply), thread_id=self.thread_id)
        self._kick()

    async def put(self, envelope: Envelope, reply: Reply | None) -> None:
        """Enqueue, waiting for room."""
        await self.mailbox.put((envelope, reply), thread_id=self.thread_id)
        self._kick()

    def _kick(self) -> None:
        self.last_active = self._ctx.clock
        if not self.running:
            self.running = True
            self._ctx.spawn(self._drain, f"threadline actor {self.thread_id!r}")

    async def _drain(self) -> None:
        try:
            with structlog.contextvars.bound_contextvars(thread_id=self.thread_id):
                while (delivery := self.mailbox.get_nowait()) is not None:
                    envelope, self._current = delivery
                    await self._handle(envelope, self._current)
                    self._current = None
        except BaseException:
            # Cancelled (shutdown) or a bug: whatever is accepted but not
            # answered learns it now. The durable state is consistent at the
            # last commit, so the next activation resumes from there.
            closed = SystemClosedError(
                f"thread {self.thread_id!r} stopped before this message was handled "
                "(an unfinished turn resumes when the thread is next activated)"
            )
            if self._current is not None:
                self._current.fail(closed)
                self._current = None
            for _, reply in self._mailbox.drain() if self._mailbox else ():
                if reply is not None:
                    reply.fail(closed)
            self.ready = False
            raise
        finally:
            self.running = False
            self.last_active = self._ctx.clock
            # The mailbox goes only when nobody is inside ``put``: a sender woken
            # for room may not have run yet, and must find this same mailbox
            # (its put then kicks a new drain).
            if self._mailbox is not None and self._mailbox.unused:
                self._mailbox = None

    async def _handle(self, envelope: Envelope, reply: Reply | None) -> None:
        try:
            if not self.ready:
                try:
                    await self._activate(counted=envelope.kind == "wake")
                except PersistenceError:
                    # A delete must work on a thread that no longer loads (say,
                    # a corrupt record): ownership was taken before the load.
                    if envelope.kind != "delete" or not self._journal.epoch:
                        raise
            if envelope.kind == "input":
                await self._input(envelope, reply)
            elif envelope.kind == "resume":
                await self._resume(envelope, reply)
            elif envelope.kind in ("update", "revert"):
                await self._update(envelope, reply)
            elif envelope.kind == "fork":
                await self._fork(envelope, reply)
            elif envelope.kind == "delete":
                await self._delete(envelope, reply)
            elif reply is not None:  # "wake": the activation above was the point
                reply.resolve(None)
        except ThreadlineError as exc:
            if isinstance(exc, PersistenceError):
                # Memory may be ahead of (or behind) the store: reload before
                # the next message. A fenced actor re-acquires then, too.
                self.ready = False
                self._ctx.log.warning(
                    "thread.store_error",
                    error=str(exc),
                    kind=type(exc).__name__,
                    fenced=isinstance(exc, FencedError),
                )
            if reply is not None:
                reply.fail(exc)
        except Exception as exc:
            self.ready = False
            self._ctx.log.exception("thread.error")
            if reply is not None:
                reply.fail(exc)

    async def _activate(self, *, counted: bool = False) -> None:
        """Load the thread and resume a parked turn; ``counted``: a recovery's
        wake (the system starting again), which counts the resume durably."""
        self.ready = False
        recovered = await self._journal.open(self._ctx.keep_consumed)
        self.state, self.turn = recovered.state, recovered.turn
        self._recent = tuple(recovered.consumed)
        self.ready = True
        self._ctx.log.info(
            "thread.activated", version=recovered.version, resume=self.turn is not None
        )
        turn = self.turn
        if turn is None or turn.interrupts:  # (parked on interrupts: waits for an answer)
            return
        if counted:
            turn = await self._count_resume(turn)
            if turn is None:
                return
        # A failure is recorded durably as an abort step and logged; nobody awaits it.
        with contextlib.suppress(TurnFailedError):
            await self._run_turn(turn, None)

    async def _count_resume(self, turn: TurnCursor) -> TurnCursor | None:
        """Commit a ``resumed`` step (the cursor counts it), or, past
        ``max_resumes``, an ``abort`` step (None: nothing to run).

        Counted durably before the turn runs again: a turn that takes its
        process down each time (a tool that crashes it, memory it runs out of)
        would otherwise be resumed, and crash it, at every start. Only a
        recovery's wake counts: a thread taken over by another owner of the
        store (which fences this one) is not a crash.
        """
        assert self.state is not None
        limit = self._ctx.max_resumes
        if turn.resumes >= limit:
            error = (
                f"the turn of message {turn.message_id!r} was resumed {turn.resumes} times at "
                f"step {turn.next!r} and its process stopped each time (max_resumes {limit})"
            )
            self._ctx.log.warning("turn.aborted_resumes", step=turn.next, resumes=turn.resumes)
            await self._commit("abort", [], self.state, None, None, error=error)
            return None
        turn = msgspec.structs.replace(turn, resumes=turn.resumes + 1)
        await self._commit("resumed", [], self.state, turn, None)
        return turn

    # -- steps -------------------------------------------------------------------

    async def _commit(
        self,
        kind: str,
        updates: list[dict[str, Any]],
        state: S,
        turn: TurnCursor | None,
        reply: Reply | None,
        *,
        consumed: str | None = None,
        error: str | None = None,
        at: int | None = None,
        parent: str | None = None,
    ) -> None:
        if consumed is not None:
            self._recent = (*self._recent, consumed)[-self._ctx.keep_consumed :]
        await self._journal.commit(
            kind=kind,
            updates=updates,
            state=state,
            turn=turn,
            consumed=consumed,
            recent=self._recent,
            error=error,
            at=at,
            parent=parent,
        )
        self.state, self.turn = state, turn
        version = self._journal.version
        self._ctx.log.debug("step.committed", version=version, kind=kind)
        if reply is not None and reply.listening:
            tid = self.thread_id
            reply.emit(
                "updates",
                StreamPart(mode="updates", data={kind: updates}, thread_id=tid, version=version),
            )
            reply.emit(
                "values", StreamPart(mode="values", data=state, thread_id=tid, version=version)
            )

    async def _acknowledge(self, envelope: Envelope) -> None:
        if self._ctx.acknowledge is not None:
            await self._ctx.acknowledge(envelope)

    def _result(self, envelope: Envelope, *, duplicate: bool = False) -> TurnResult[S]:
        assert self.state is not None
        return TurnResult(
            thread_id=self.thread_id,
            message_id=envelope.message_id,
            version=self._journal.version,
            state=self.state,
            duplicate=duplicate,
            interrupts=() if self.turn is None else self.turn.interrupts,
        )

    async def _input(self, envelope: Envelope, reply: Reply | None) -> None:
        if envelope.message_id in self._recent:
            self._ctx.log.info("message.duplicate", message_id=envelope.message_id)
            await self._acknowledge(envelope)  # consumed before: nothing left to keep
            if self.state is not None:
                if reply is not None:
                    reply.resolve(self._result(envelope, duplicate=True))
                return
        if self.turn is not None and self.turn.interrupts:
            await self._acknowledge(envelope)  # refused: nothing to keep
            raise ThreadInterruptedError(
                f"thread {self.thread_id!r} is interrupted: its turn waits on "
                f"{[i.id for i in self.turn.interrupts]}; answer with Command(resume=...)"
            )
        schema = self._ctx.behavior.state_schema
        state = (
            initial_state(schema, envelope.update)
            if self.state is None
            else apply_update(self.state, envelope.update)
        )
        turn = TurnCursor(
            message_id=envelope.message_id,
            next=self._ctx.behavior.first_step,
            context=envelope.context,
        )
        await self._commit(
            "input", [envelope.update], state, turn, reply, consumed=envelope.message_id
        )
        await self._acknowledge(envelope)
        await self._run_turn(turn, reply, envelope)

    async def _run_turn(
        self, turn: TurnCursor, reply: Reply | None, envelope: Envelope | None = None
    ) -> None:
        cursor: TurnCursor | None = turn

        def emit(mode: str, data: Any) -> None:
            if reply is not None:
                reply.emit(
                    mode,
                    StreamPart(
                        mode=mode, data=data, thread_id=self.thread_id, version=self.version
                    ),
                )

        while cursor is not None:
            assert self.state is not None
            try:
                outcome = await self._ctx.behavior.step(self.thread_id, self.state, cursor, emit)
            except Exception as exc:
                # Record the abort so no later activation re-runs a turn that
                # fails deterministically; the state itself stays as committed.
                failed = TurnFailedError(
                    f"thread {self.thread_id!r}: step {cursor.next!r} of the turn for message "
                    f"{cursor.message_id!r} failed: {type(exc).__name__}: {exc}",
                    thread_id=self.thread_id,
                    step=cursor.next,
                )
                self._ctx.log.warning("turn.failed", step=cursor.next, error=repr(exc))
                await self._commit(
                    "abort", [], self.state, None, None, error=f"{type(exc).__name__}: {exc}"[:2000]
                )
                if reply is not None:
                    reply.fail(failed)
                raise failed from exc
            cursor = outcome.next
            if cursor is not None and cursor.resumes:
                # A step completed: the turn is not stuck. ``max_resumes`` counts
                # resumes since the last step, what a crash loop never gets past.
                cursor = msgspec.structs.replace(cursor, resumes=0)
            await self._commit(outcome.kind, outcome.updates, outcome.state, cursor, reply)
            if cursor is not None and cursor.interrupts:
                emit("updates", {"__interrupt__": list(cursor.interrupts)})
                break  # parked: a Command(resume=...) continues the turn
        if reply is not None and envelope is not None:
            reply.resolve(self._result(envelope))

    async def _resume(self, envelope: Envelope, reply: Reply | None) -> None:
        """``resume``: answer the pending interrupts (one ``answer`` step, which
        consumes the message id), then run the parked turn on from its step."""
        if envelope.message_id in self._recent:
            self._ctx.log.info("message.duplicate", message_id=envelope.message_id)
            await self._acknowledge(envelope)
            if reply is not None and self.state is not None:
                reply.resolve(self._result(envelope, duplicate=True))
            return
        turn = self.turn
        if turn is None or not turn.interrupts or self.state is None:
            await self._acknowledge(envelope)
            raise InvalidInputError(f"thread {self.thread_id!r} has no pending interrupt to resume")
        answers = _answers(turn.interrupts, envelope.update.get("resume"))
        turn = msgspec.structs.replace(
            turn, interrupts=(), resumed={**turn.resumed, **answers}, resumes=0
        )
        await self._commit("answer", [], self.state, turn, reply, consumed=envelope.message_id)
        await self._acknowledge(envelope)
        await self._run_turn(turn, reply, envelope)

    async def _update(self, envelope: Envelope, reply: Reply | None) -> None:
        """``update``: one step through the reducers. With ``at`` (and for a
        ``revert``), the step starts from the state of version ``at``: its
        first update replaces the whole state with that one, so the history
        stays linear (nothing is rewritten) and replays exactly."""
        if envelope.at is None and envelope.kind == "update":
            schema = self._ctx.behavior.state_schema
            state = (
                initial_state(schema, envelope.update)
                if self.state is None
                else apply_update(self.state, envelope.update)
            )
            await self._commit("update", [envelope.update], state, self.turn, reply)
        else:
            if envelope.at is None:
                raise InvalidUpdateError("revert: the version to revert to is missing")
            base = await self._past(self.thread_id, envelope.at)
            state = apply_update(base, envelope.update)
            updates = [replacement(base)]
            if envelope.update:
                updates.append(envelope.update)
            await self._commit(envelope.kind, updates, state, self.turn, reply, at=envelope.at)
        await self._acknowledge(envelope)
        if reply is not None:
            reply.resolve(self._snapshot())

    async def _fork(self, envelope: Envelope, reply: Reply | None) -> None:
        """``fork``: this (new) thread starts as a copy of version ``at`` of ``source``."""
        if self.state is not None or self._journal.version:
            raise ThreadExistsError(
                f"cannot fork into thread {self.thread_id!r}: it exists (version "
                f"{self._journal.version}); fork into a new thread id"
            )
        source = envelope.source
        if source is None:
            raise InvalidUpdateError("fork: the thread to fork from is missing")
        recovered = await self._journal.state_at(source, envelope.at)
        state = self._settled(source, recovered)
        await self._commit(
            "fork", [replacement(state)], state, None, reply, at=recovered.version, parent=source
        )
        await self._acknowledge(envelope)
        if reply is not None:
            reply.resolve(self._snapshot())

    async def _past(self, thread_id: str, version: int) -> S:
        return self._settled(thread_id, await self._journal.state_at(thread_id, version))

    @staticmethod
    def _settled(thread_id: str, recovered: Recovered[S]) -> S:
        """The state of a past version, which must end a turn: one taken from the
        middle of a turn would carry a half-done step (an AI message whose tool
        calls have no answers)."""
        if recovered.turn is not None:
            raise InvalidUpdateError(
                f"version {recovered.version} of thread {thread_id!r} is in the middle of a "
                f"turn (its next step is {recovered.turn.next!r}); use a version where a turn "
                "had ended"
            )
        assert recovered.state is not None
        return recovered.state

    def _snapshot(self) -> ThreadSnapshot[S]:
        assert self.state is not None
        return ThreadSnapshot(
            thread_id=self.thread_id,
            version=self.version,
            state=self.state,
            next=None if self.turn is None else self.turn.next,
            interrupts=() if self.turn is None else self.turn.interrupts,
        )

    async def _delete(self, envelope: Envelope, reply: Reply | None) -> None:
        existed = await self._journal.delete()
        self.state, self.turn, self._recent = None, None, ()
        self.ready = False  # the tombstone bumped the epoch: re-acquire for new work
        self._ctx.log.info("thread.deleted", existed=existed)
        await self._acknowledge(envelope)
        if reply is not None:
            reply.resolve(existed)


def _answers(pending: tuple[Interrupt, ...], resume: Any) -> dict[str, Any]:
    """``Command(resume=...)`` as answers by interrupt id: a dict whose keys are
    the pending ids, or one value when a single interrupt is pending."""
    ids = [i.id for i in pending]
    if isinstance(resume, dict) and resume and all(k in ids for k in resume):
        missing = [i for i in ids if i not in resume]
        if missing:
            raise InvalidInputError(f"resume answers no value for the interrupts {missing}")
        return dict(resume)
    if len(ids) == 1:
        return {ids[0]: resume}
    raise InvalidInputError(
        f"{len(ids)} interrupts are pending ({ids}): resume with {{interrupt_id: value, ...}}"
    )


def replacement(state: AgentState) -> dict[str, Any]:
    """An update that, through the reducers, makes any state equal to ``state``:
    every field, and the messages after a ``RemoveMessage(REMOVE_ALL_MESSAGES)``
    (which drops every message before it, including ones added since)."""
    update: dict[str, Any] = {
        name: getattr(state, name) for name in state.__struct_fields__ if name != "messages"
    }
    update["messages"] = [RemoveMessage(id=REMOVE_ALL_MESSAGES), *state.messages]
    return update


def stream_modes(mode: str | Sequence[str]) -> frozenset[str]:
    modes = frozenset([mode] if isinstance(mode, str) else mode)
    unknown = modes - {"values", "updates", "custom", "messages"}
    if unknown or not modes:
        raise ValueError(
            "stream mode must be among 'values', 'updates', 'custom', 'messages'; "
            f"got {sorted(unknown)}"
        )
    return modes
