"""``ActorSystem``: routes messages to thread actors and owns every task."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

from threadline.actors import (
    AgentState,
    MailboxFullError,
    PersistenceError,
    SystemClosedError,
)
from threadline.actors._api import (
    ActorContext,
    Envelope,
    MailboxStatistics,
    StepInfo,
    StreamPart,
    ThreadActor,
    ThreadSnapshot,
    TurnResult,
    new_id,
)
from threadline.persistence import (
    Codec,
    RecoverableThread,
    SnapshotStore,
    Store,
    ThreadJournal,
    decode_envelope,
    encode_envelope,
    open_snapshot_store,
)

from ._client import LocalClient
from ._door import Door, Input
from .agent import Agent

S = TypeVar("S", bound=AgentState)


class ActorSystem(Generic[S]):
    """Runs one actor per thread in this process, durable after every step.

    ``async with ActorSystem(agent, snapshots="threads.db") as system:`` then
    ``await system.ask("thread-1", "hello")``. ``store`` is the cross-conversation
    memory that hooks and tools reach as ``runtime.store``; ``resources`` are
    per-system objects (clients, pools) they reach as ``runtime.resources``,
    never persisted. The system enters (opens) and leaves both stores.

    The system owns every actor task in its task group; leaving the block
    finishes in-flight turns (for up to ``shutdown_timeout`` seconds) and then
    cancels what is left, which stays durably parked at its last committed
    step and resumes on next activation. Each resume commits a ``resumed``
    step first; a turn found parked at the same step after ``max_resumes``
    resumes (its process stopped each time before the step completed: a tool
    that crashes it, say) is aborted instead (an ``abort`` step), so it cannot
    take every start down with it.

    ``tell`` returns once its message is in the snapshot store's inbox. On
    entering, the system recovers in the background (``recover=True``): every
    thread with a turn parked mid-way resumes it, and every message told but
    not consumed before a crash or a shutdown is delivered, in the order it
    was told, before any message sent to that thread after the restart. An
    inbox entry that no longer decodes is moved to the store's dead letters
    (and logged); its thread goes on. Recovery takes over every such thread
    of the store: with several systems sharing one store, only one of them
    should recover (``recover=False`` for the others).
    """

    def __init__(
        self,
        agent: Agent[S],
        *,
        snapshots: SnapshotStore | str | os.PathLike[str] | None = None,
        store: Store | None = None,
        resources: Mapping[str, Any] | None = None,
        mailbox_capacity: int = 1000,
        max_message_bytes: int = 1 << 20,
        max_thread_id_length: int = 256,
        passivate_after: float = 300.0,
        keep_consumed: int = 128,
        shutdown_timeout: float = 30.0,
        recover: bool = True,
        max_resumes: int = 5,
    ) -> None:
        if mailbox_capacity < 1 or max_message_bytes < 1 or keep_consumed < 1:
            raise ValueError("mailbox_capacity, max_message_bytes and keep_consumed must be >= 1")
        if isinstance(max_resumes, bool) or not isinstance(max_resumes, int) or max_resumes < 0:
            raise ValueError(f"max_resumes must be an int >= 0, got {max_resumes!r}")
        self.agent = agent
        self.snapshots = open_snapshot_store(snapshots)
        self.store = store
        self.codec: Codec[S] = Codec(agent.state_schema)
        self.door: Door[S] = Door(
            agent.state_schema,
            agent.context,
            max_message_bytes=max_message_bytes,
            max_thread_id_length=max_thread_id_length,
        )
        self._passivate_after = passivate_after
        self._shutdown_timeout = shutdown_timeout
        # Insertion-ordered by last delivery (a plain dict is smaller than an OrderedDict).
        self._actors: dict[str, ThreadActor[S]] = {}
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closing = False
        self._busy = 0  # actors with a drain task
        self._drained: anyio.Event | None = None
        # (thread_id, message_id) of messages in the store's inbox that this
        # system delivered and that were not consumed yet: the journal removes
        # the entry with the step that consumes it, ``_acknowledge`` one that
        # turned out to be a duplicate.
        self._inboxed: set[tuple[str, str]] = set()
        self._recover = recover
        # While recovery runs: ``_scanned`` is set once the threads to recover
        # are known, and each of them has an event in ``_held`` until its
        # messages are in its mailbox; senders wait for both (``admit``).
        self.recovering = False
        self._scanned = anyio.Event()
        self._held: dict[str, anyio.Event] = {}
        self._context: ActorContext[S] = ActorContext(
            behavior=agent.bind(store=store, resources=resources),
            spawn=self._spawn,
            capacity=mailbox_capacity,
            keep_consumed=keep_consumed,
            acknowledge=self._acknowledge,
            max_resumes=max_resumes,
        )
        self.client: LocalClient[S] = LocalClient(self)

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this ActorSystem is already running")
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.snapshots)
            if self.store is not None:
                await stack.enter_async_context(self.store)
            tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(self._passivate_idle, name="threadline passivation")
            self._tg, self._closing = tg, False
            self._scanned = anyio.Event()
            if self._recover:
                self.recovering = True
                tg.start_soon(self._recover_threads, name="threadline recovery")
            else:
                self._scanned.set()
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None and self._tg is not None
        self._closing = True
        stack, tg = self._stack, self._tg
        try:
            if exc_type is None and self._busy:
                self._drained = anyio.Event()
                with anyio.move_on_after(self._shutdown_timeout):
                    await self._drained.wait()
            tg.cancel_scope.cancel()
        finally:
            self._stack = self._tg = None
            self._actors.clear()
            self._inboxed.clear()
            self._open_gates()
            # Not handing the body's exception to the task group keeps it from
            # being wrapped in an ExceptionGroup: callers catch what they raised.
            await stack.__aexit__(None, None, None)

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        if self._tg is None:
            # A sender woken for mailbox room after the system stopped.
            raise SystemClosedError("the ActorSystem is not running")
        self._busy += 1
        self._tg.start_soon(self._run_actor, fn, name=name)

    async def _run_actor(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await fn()
        finally:
            self._busy -= 1
            if not self._busy and self._drained is not None:
                self._drained.set()

    async def _passivate_idle(self) -> None:
        """Drop idle actors from memory; their state is durable, so this is free.

        Actors stamp their activity with the shared clock this loop ticks, so
        a stamp is up to one interval old: the horizon allows for that.
        """
        interval = max(min(self._passivate_after / 4, 5.0), 0.01)
        log = self._context.log
        while True:
            await anyio.sleep(interval)
            horizon = self._context.tick() - self._passivate_after - interval
            expired = []
            for thread_id, actor in self._actors.items():
                if actor.last_active > horizon:
                    break  # ordered by last delivery: the rest are newer
                if actor.idle:
                    expired.append(thread_id)
            for thread_id in expired:
                actor = self._actors.pop(thread_id)
                log.debug("thread.passivated", thread_id=thread_id, version=actor.version)

    # -- the durable inbox -------------------------------------------------------

    async def enqueue(self, envelope: Envelope) -> None:
        """Write a told message to the store's inbox; returns once it is durable."""
        if self._tg is None or self._closing:
            raise SystemClosedError("the ActorSystem is not running")
        key = (envelope.thread_id, envelope.message_id)
        await self.snapshots.enqueue(key[0], key[1], encode_envelope(envelope))
        self._inboxed.add(key)

    async def deliver(self, envelope: Envelope) -> None:
        """Put an enqueued message in its thread's mailbox (waiting for room).

        The message is durable already: a sender cancelled while waiting for
        room leaves it to a task of the system, which delivers it anyway.
        """
        try:
            await self.route(envelope.thread_id).put(envelope, None)
        except anyio.get_cancelled_exc_class():
            if self._tg is not None and not self._closing:
                self._tg.start_soon(self._deliver_later, [envelope], None)
            raise

    async def _deliver_later(self, envelopes: list[Envelope], held: anyio.Event | None) -> None:
        try:
            for envelope in envelopes:
                await self.route(envelope.thread_id).put(envelope, None)
        except SystemClosedError:
            pass  # still in the inbox: the next start delivers it
        finally:
            if held is not None:
                self._release(envelopes[0].thread_id, held)

    async def _acknowledge(self, envelope: Envelope) -> None:
        """Called by an actor once a message is done with; removes an inbox entry
        that its consuming step did not (the message was a duplicate)."""
        key = (envelope.thread_id, envelope.message_id)
        if key not in self._inboxed:
            return
        self._inboxed.discard(key)
        try:
            await self.snapshots.dequeue(*key)
        except PersistenceError as exc:
            # It stays in the inbox: the next start delivers it again, and the
            # thread answers it as a duplicate again.
            self._context.log.warning("inbox.dequeue_failed", message_id=key[1], error=str(exc))

    async def admit(self, thread_id: str) -> None:
        """Wait until recovery has queued what was told to ``thread_id`` before the start."""
        await self._scanned.wait()
        held = self._held.get(thread_id)
        if held is not None:
            await held.wait()

    def _release(self, thread_id: str, held: anyio.Event) -> None:
        if self._held.get(thread_id) is held:
            del self._held[thread_id]
        held.set()
        if self._scanned.is_set() and not self._held:
            self.recovering = False

    def _open_gates(self) -> None:
        self._scanned.set()
        for held in self._held.values():
            held.set()
        self._held.clear()
        self.recovering = False

    async def _recover_threads(self) -> None:
        """Deliver what the store says was left undone: told messages, parked turns."""
        log = self._context.log
        try:
            try:
                found = await self.snapshots.recoverable_threads()
            except PersistenceError as exc:
                log.warning("recovery.failed", error=str(exc))
                return
            except Exception:  # a store that breaks its protocol must not stop the system
                log.exception("recovery.failed")
                return
            for thread in found:
                self._held[thread.thread_id] = anyio.Event()
            self._scanned.set()
            for thread in found:
                held = self._held.get(thread.thread_id)
                if held is None:
                    continue
                try:
                    await self._recover_thread(thread, held)
                except (PersistenceError, SystemClosedError) as exc:
                    self._release(thread.thread_id, held)
                    log.warning(
                        "recovery.thread_failed", thread_id=thread.thread_id, error=str(exc)
                    )
                except Exception:
                    self._release(thread.thread_id, held)
                    log.exception("recovery.thread_failed", thread_id=thread.thread_id)
            if found:
                log.info("recovery.queued", threads=len(found))
        finally:
            self._scanned.set()
            if not self._held:
                self.recovering = False

    async def _recover_thread(self, thread: RecoverableThread, held: anyio.Event) -> None:
        log = self._context.log
        envelopes: list[Envelope] = []
        for entry in await self.snapshots.pending(thread.thread_id):
            try:
                envelope = decode_envelope(
                    entry.envelope,
                    self.agent.state_schema,
                    thread_id=thread.thread_id,
                    message_id=entry.message_id,
                )
            except Exception as exc:  # whatever it is, it must not hold the thread up
                reason = f"{type(exc).__name__}: {exc}"[:2000]
                log.warning(
                    "inbox.dead_letter",
                    thread_id=thread.thread_id,
                    message_id=entry.message_id,
                    reason=reason,
                )
                try:
                    await self.snapshots.dead_letter(thread.thread_id, entry.message_id, reason)
                except PersistenceError as failure:  # it stays; the next start tries again
                    log.warning(
                        "inbox.dead_letter_failed",
                        thread_id=thread.thread_id,
                        message_id=entry.message_id,
                        error=str(failure),
                    )
                continue
            self._inboxed.add((thread.thread_id, entry.message_id))
            envelopes.append(envelope)
        if thread.turn is not None:
            # The wake first: it activates the thread, which counts the resume
            # of its parked turn (``max_resumes``) before anything else runs.
            envelopes.insert(0, self._wake_up(thread.thread_id))
        # What fits goes in now; the rest waits for room in a task of its own,
        # holding back only this thread's new messages.
        actor = self.route(thread.thread_id)
        for i, envelope in enumerate(envelopes):
            try:
                actor.offer(envelope, None)
            except MailboxFullError:
                assert self._tg is not None
                self._tg.start_soon(self._deliver_later, envelopes[i:], held)
                return
        self._release(thread.thread_id, held)

    @staticmethod
    def _wake_up(thread_id: str) -> Envelope:
        """A message that makes the thread's actor activate (which resumes its
        parked turn) and nothing more."""
        return Envelope(kind="wake", message_id=new_id(), thread_id=thread_id)

    # -- routing -----------------------------------------------------------------

    def route(self, thread_id: str) -> ThreadActor[S]:
        """The actor of ``thread_id`` (made if it is not in memory), for a delivery."""
        if self._tg is None or self._closing:
            raise SystemClosedError("the ActorSystem is not running")
        actor = self._actors.get(thread_id)
        if actor is None:
            actor = ThreadActor(
                thread_id,
                context=self._context,
                journal=ThreadJournal(self.snapshots, self.codec, thread_id, self._inboxed),
            )
        else:
            del self._actors[thread_id]  # re-inserted below: moves it to the end
        self._actors[thread_id] = actor
        return actor

    def live_thread_ids(self) -> list[str]:
        """The ids of the threads whose actors are in memory."""
        return list(self._actors)

    def live_actor(self, thread_id: str) -> ThreadActor[S] | None:
        """The actor of ``thread_id`` if it is in memory."""
        return self._actors.get(thread_id)

    # -- the client interface, in process ------------------------------------------

    async def ask(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> TurnResult[S]:
        """Send a message and wait for the turn's result (durable when returned).

        A timeout or cancellation stops the waiting, never the accepted message.
        """
        return await self.client.ask(
            thread_id, input, context=context, message_id=message_id, timeout=timeout
        )

    async def tell(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Send a message without waiting for its turn; returns its message id.

        Returns once the message is durably in the store's inbox (one group
        commit for many tells) and in the thread's mailbox (waiting for room).
        An acknowledged message is never lost: a crash before its turn starts
        leaves it in the inbox, and the next start delivers it. If ``tell``
        raises (the store failed, the system closed), the message may or may
        not be in the inbox: tell it again with the same ``message_id``, which
        is applied once.
        """
        return await self.client.tell(thread_id, input, context=context, message_id=message_id)

    def tell_nowait(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Enqueue a message or raise ``MailboxFullError``; returns its message id.

        Not durable: it cannot wait for a write, so the message lives only in
        the mailbox until its input step commits, and a crash before that
        loses it (``await tell(...)`` is the durable way). It does not wait
        for recovery either: just after a start it may overtake messages told
        to the same thread before the restart.
        """
        return self.client.tell_nowait(thread_id, input, context=context, message_id=message_id)

    def stream(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        mode: str | Sequence[str] = "updates",
    ) -> AsyncIterator[StreamPart]:
        """Send a message and yield the turn's events as its steps commit.

        Modes: ``"updates"``, ``"values"``, ``"custom"``, ``"messages"`` (or
        several). Ends when the turn ends; raises the turn's error, if any.
        """
        return self.client.stream(
            thread_id, input, context=context, message_id=message_id, mode=mode
        )

    async def get_state(self, thread_id: str, *, version: int | None = None) -> ThreadSnapshot[S]:
        """The thread's last committed state; ``ThreadNotFoundError`` if it has none.

        With ``version``, the state as it was after that step
        (``VersionNotFoundError`` if there is no such step), rebuilt from the
        nearest full record at or before it: the cost of a few states' worth
        of steps at most, not of the whole history.
        """
        return await self.client.get_state(thread_id, version=version)

    async def update_state(
        self,
        thread_id: str,
        update: Mapping[str, Any],
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        """Apply ``update`` through the reducers as one committed step (in mailbox order).

        With ``at``, the update applies to the state of version ``at``: the new
        step makes the state that one plus ``update`` (appended; nothing is
        rewritten). ``at`` must end a turn (``InvalidUpdateError`` if it is in
        the middle of one).
        """
        return await self.client.update_state(thread_id, update, at=at, timeout=timeout)

    async def revert(
        self, thread_id: str, *, to: int, timeout: float | None = None
    ) -> ThreadSnapshot[S]:
        """Make the state what it was after step ``to``, as one new ``revert`` step.

        In mailbox order: a turn already running finishes first (and is
        reverted too). ``to`` must end a turn.
        """
        return await self.client.revert(thread_id, to=to, timeout=timeout)

    async def fork(
        self,
        thread_id: str,
        new_thread_id: str,
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        """Start ``new_thread_id`` as a copy of version ``at`` (None: the latest) of
        ``thread_id``: one step holding that state; the threads are independent
        afterwards. ``ThreadExistsError`` if ``new_thread_id`` has state."""
        return await self.client.fork(thread_id, new_thread_id, at=at, timeout=timeout)

    async def history(
        self,
        thread_id: str,
        *,
        start: int = 1,
        stop: int | None = None,
        limit: int | None = None,
        before: int | None = None,
    ) -> list[StepInfo]:
        """The thread's committed steps (oldest first): kind, updates, turn cursor.

        With ``limit``/``before``, one page backwards, newest first: the
        ``limit`` (default 100) steps below version ``before`` (None: from the
        latest); the next page is ``before=page[-1].version``.
        """
        return await self.client.history(
            thread_id, start=start, stop=stop, limit=limit, before=before
        )

    async def threads(self) -> list[str]:
        """Ids of every thread with committed state in the snapshot store."""
        return await self.client.threads()

    async def delete(self, thread_id: str) -> bool:
        """Delete the thread's durable records (in mailbox order); True if it existed."""
        return await self.client.delete(thread_id)

    def mailbox_statistics(self, thread_id: str) -> MailboxStatistics | None:
        """Mailbox figures of a live thread actor (None if it is not in memory)."""
        actor = self._actors.get(thread_id)
        return None if actor is None else actor.mailbox_statistics()

    @property
    def live_threads(self) -> int:
        """How many thread actors are in memory."""
        return len(self._actors)
