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
    SystemClosedError,
)
from threadline.actors._api import (
    Acknowledge,
    ActorContext,
    MailboxStatistics,
    StepInfo,
    StreamPart,
    ThreadActor,
    ThreadSnapshot,
    TurnResult,
)
from threadline.persistence import (
    Codec,
    SnapshotStore,
    Store,
    ThreadJournal,
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
    step and resumes on next activation.

    ``acknowledge`` (for runtimes built on the system, such as a worker reading
    a durable inbox) is awaited with each envelope once the step that consumed
    it is committed.
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
        acknowledge: Acknowledge | None = None,
    ) -> None:
        if mailbox_capacity < 1 or max_message_bytes < 1 or keep_consumed < 1:
            raise ValueError("mailbox_capacity, max_message_bytes and keep_consumed must be >= 1")
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
        self._context: ActorContext[S] = ActorContext(
            behavior=agent.bind(store=store, resources=resources),
            spawn=self._spawn,
            capacity=mailbox_capacity,
            keep_consumed=keep_consumed,
            acknowledge=acknowledge,
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
                journal=ThreadJournal(self.snapshots, self.codec, thread_id),
            )
        else:
            del self._actors[thread_id]  # re-inserted below: moves it to the end
        self._actors[thread_id] = actor
        return actor

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
        """Enqueue a message (waiting for mailbox room); returns its message id."""
        return await self.client.tell(thread_id, input, context=context, message_id=message_id)

    def tell_nowait(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Enqueue a message or raise ``MailboxFullError``; returns its message id."""
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

    async def get_state(self, thread_id: str) -> ThreadSnapshot[S]:
        """The thread's last committed state; ``ThreadNotFoundError`` if it has none."""
        return await self.client.get_state(thread_id)

    async def update_state(
        self, thread_id: str, update: Mapping[str, Any], *, timeout: float | None = None
    ) -> ThreadSnapshot[S]:
        """Apply ``update`` through the reducers as one committed step (in mailbox order)."""
        return await self.client.update_state(thread_id, update, timeout=timeout)

    async def history(
        self, thread_id: str, *, start: int = 1, stop: int | None = None
    ) -> list[StepInfo]:
        """The thread's committed steps (oldest first): kind, updates, turn cursor."""
        return await self.client.history(thread_id, start=start, stop=stop)

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
