"""``ActorSystem``: routes messages to thread actors and owns every task."""

from __future__ import annotations

import contextlib
import math
import os
import unicodedata
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup

from threadline.actors import (
    AgentState,
    AnyMessage,
    BaseMessage,
    InvalidInputError,
    InvalidThreadIdError,
    MessageTooLargeError,
    SystemClosedError,
    ThreadNotFoundError,
    coerce_messages,
    normalize_update,
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
    stream_modes,
)
from threadline.persistence import (
    Codec,
    SnapshotStore,
    Store,
    ThreadJournal,
    load_thread,
    open_snapshot_store,
    read_history,
)

from .agent import Agent

S = TypeVar("S", bound=AgentState)

Input = str | Mapping[str, Any] | AnyMessage | Sequence[Any]


def check_thread_id(thread_id: object, max_length: int) -> str:
    if not isinstance(thread_id, str):
        raise InvalidThreadIdError(f"a thread id must be a str, got {type(thread_id).__name__}")
    if not thread_id:
        raise InvalidThreadIdError("a thread id must not be empty")
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
    ) -> None:
        if mailbox_capacity < 1 or max_message_bytes < 1 or keep_consumed < 1:
            raise ValueError("mailbox_capacity, max_message_bytes and keep_consumed must be >= 1")
        self.agent = agent
        self.snapshots = open_snapshot_store(snapshots)
        self.store = store
        self._codec: Codec[S] = Codec(agent.state_schema)
        self._max_bytes = max_message_bytes
        self._max_id = max_thread_id_length
        self._passivate_after = passivate_after
        self._shutdown_timeout = shutdown_timeout
        # Insertion-ordered by last delivery (a plain dict is smaller than an OrderedDict).
        self._actors: dict[str, ThreadActor[S]] = {}
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closing = False
        self._busy = 0  # actors with a drain task
        self._drained: anyio.Event | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._context: ActorContext[S] = ActorContext(
            behavior=agent.bind(store=store, resources=resources),
            spawn=self._spawn,
            capacity=mailbox_capacity,
            keep_consumed=keep_consumed,
        )

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
        assert self._tg is not None
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

    def _actor(self, thread_id: str) -> ThreadActor[S]:
        if self._tg is None or self._closing:
            raise SystemClosedError("the ActorSystem is not running")
        actor = self._actors.get(thread_id)
        if actor is None:
            actor = ThreadActor(
                thread_id,
                context=self._context,
                journal=ThreadJournal(self.snapshots, self._codec, thread_id),
            )
        else:
            del self._actors[thread_id]  # re-inserted below: moves it to the end
        self._actors[thread_id] = actor
        return actor

    def _envelope(
        self,
        thread_id: str,
        input: Input,
        context: Any,
        message_id: str | None,
        **kw: Any,
    ) -> Envelope:
        check_thread_id(thread_id, self._max_id)
        if message_id is None:
            message_id = new_id()
        elif not isinstance(message_id, str) or not message_id or len(message_id) > 256:
            raise InvalidInputError("message_id must be a non-empty str of at most 256 characters")
        update = self._input_update(input, message_id)
        raw_context = self.agent.context.dump(context)
        size = len(self._encoder.encode(update)) + len(self._encoder.encode(raw_context))
        if size > self._max_bytes:
            raise MessageTooLargeError(
                f"message for thread {thread_id!r} is {size} bytes; the limit is {self._max_bytes}"
            )
        return Envelope("input", message_id, update, raw_context, **kw)

    def _input_update(self, input: Input, message_id: str) -> dict[str, Any]:
        """A plain message, a list of them, or a state update dict with 'messages'."""
        schema = self.agent.state_schema
        if isinstance(input, (str, BaseMessage, list, tuple)) or (
            isinstance(input, Mapping) and ("role" in input or "type" in input)
        ):
            return {"messages": coerce_messages(input, first_id=message_id)}
        return normalize_update(schema, input, source="input", first_id=message_id)

    # -- messaging ---------------------------------------------------------------

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
        envelope = self._envelope(thread_id, input, context, message_id)
        if timeout is None:  # (a cancel scope per ask is measurable at thousands/s)
            await self._actor(thread_id).put(envelope)
            return await envelope.wait()  # type: ignore[no-any-return]
        with anyio.fail_after(timeout):
            await self._actor(thread_id).put(envelope)
            result: TurnResult[S] = await envelope.wait()
        return result

    async def tell(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Enqueue a message (waiting for mailbox room); returns its message id."""
        envelope = self._envelope(thread_id, input, context, message_id)
        await self._actor(thread_id).put(envelope)
        return envelope.message_id

    def tell_nowait(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Enqueue a message or raise ``MailboxFullError``; returns its message id."""
        envelope = self._envelope(thread_id, input, context, message_id)
        self._actor(thread_id).offer(envelope)
        return envelope.message_id

    async def stream(
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
        modes = stream_modes(mode)
        send, receive = anyio.create_memory_object_stream[StreamPart](math.inf)
        envelope = self._envelope(thread_id, input, context, message_id, sink=send, modes=modes)
        with receive:
            await self._actor(thread_id).put(envelope)
            async for part in receive:
                yield part
        envelope.outcome()

    # -- state -------------------------------------------------------------------

    async def get_state(self, thread_id: str) -> ThreadSnapshot[S]:
        """The thread's last committed state; ``ThreadNotFoundError`` if it has none."""
        check_thread_id(thread_id, self._max_id)
        actor = self._actors.get(thread_id)
        if actor is not None and actor.ready and actor.state is not None:
            state, version, turn = actor.state, actor.version, actor.turn
        else:
            recovered = await load_thread(self.snapshots, self._codec, thread_id)
            if recovered.state is None:
                raise ThreadNotFoundError(f"thread {thread_id!r} has no state")
            state, version, turn = recovered.state, recovered.version, recovered.turn
        return ThreadSnapshot(
            thread_id=thread_id,
            version=version,
            state=state,
            next=None if turn is None else turn.next,
        )

    async def update_state(
        self, thread_id: str, update: Mapping[str, Any], *, timeout: float | None = None
    ) -> ThreadSnapshot[S]:
        """Apply ``update`` through the reducers as one committed step (in mailbox order)."""
        check_thread_id(thread_id, self._max_id)
        normalized = normalize_update(self.agent.state_schema, update, source="update_state")
        envelope = Envelope("update", new_id(), normalized)
        with anyio.fail_after(timeout):
            await self._actor(thread_id).put(envelope)
            snapshot: ThreadSnapshot[S] = await envelope.wait()
        return snapshot

    async def history(
        self, thread_id: str, *, start: int = 1, stop: int | None = None
    ) -> list[StepInfo]:
        """The thread's committed steps (oldest first): kind, updates, turn cursor."""
        check_thread_id(thread_id, self._max_id)
        return await read_history(self.snapshots, self._codec, thread_id, start, stop)

    async def threads(self) -> list[str]:
        """Ids of every thread with committed state in the snapshot store."""
        return await self.snapshots.threads()

    async def delete(self, thread_id: str) -> bool:
        """Delete the thread's durable records (in mailbox order); True if it existed."""
        check_thread_id(thread_id, self._max_id)
        envelope = Envelope("delete", new_id())
        await self._actor(thread_id).put(envelope)
        existed: bool = await envelope.wait()
        return existed

    def mailbox_statistics(self, thread_id: str) -> MailboxStatistics | None:
        """Mailbox figures of a live thread actor (None if it is not in memory)."""
        actor = self._actors.get(thread_id)
        return None if actor is None else actor.mailbox_statistics()

    @property
    def live_threads(self) -> int:
        """How many thread actors are in memory."""
        return len(self._actors)
