"""How a caller talks to threads: the ``ThreadClient`` protocol and its in-process implementation.

``ThreadClient`` is the small interface every way of reaching threads
implements: ``LocalClient`` (the threads run in this process, in an
``ActorSystem``) here; a client over Redis, reaching workers in other
processes, is a second implementation of the same protocol, and one test suite
runs against each.

``tell`` returns once its message is durably appended to the store's inbox.
``tell_nowait`` is not part of the protocol: it answers without awaiting
anything, which only an in-process mailbox can do, and is therefore not
durable.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import anyio

from threadline.actors import AgentState, InvalidInputError, ThreadNotFoundError
from threadline.actors._api import (
    Envelope,
    Reply,
    StepInfo,
    StreamPart,
    ThreadSnapshot,
    TurnResult,
    stream_modes,
)
from threadline.persistence import Codec, SnapshotStore, load_thread, load_version, read_history

from ._door import Input, check_page, check_version

if TYPE_CHECKING:
    from ._system import ActorSystem

S = TypeVar("S", bound=AgentState)


@runtime_checkable
class ThreadClient(Protocol[S]):
    """Send messages to thread actors and read their durable state.

    A reply means durable: ``ask`` returns (and ``stream`` ends) only after the
    turn's last step is committed; ``tell`` returns once the message is
    durably accepted (the message id is its receipt: sending the same id again
    is applied once).
    """

    async def ask(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> TurnResult[S]:
        """Send a message and wait for the turn's result."""
        ...

    async def tell(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Send a message without waiting for its turn; returns its message id once
        the message is durable (a crash after that does not lose it)."""
        ...

    def stream(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        mode: str | Sequence[str] = "updates",
    ) -> AsyncIterator[StreamPart]:
        """Send a message and yield the turn's events as its steps commit."""
        ...

    async def get_state(self, thread_id: str, *, version: int | None = None) -> ThreadSnapshot[S]:
        """The thread's last committed state (``ThreadNotFoundError`` if none); with
        ``version``, the state as it was after that step (``VersionNotFoundError``
        if the thread has no such version), rebuilt from the nearest full record
        at or before it."""
        ...

    async def update_state(
        self,
        thread_id: str,
        update: Mapping[str, Any],
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        """Apply ``update`` through the reducers as one committed step; with ``at``,
        to the state of version ``at`` (the new step makes the thread's state
        that one plus ``update``; nothing before it is rewritten)."""
        ...

    async def revert(
        self, thread_id: str, *, to: int, timeout: float | None = None
    ) -> ThreadSnapshot[S]:
        """Make the thread's state what it was after step ``to``, as one new step."""
        ...

    async def fork(
        self,
        thread_id: str,
        new_thread_id: str,
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        """Start ``new_thread_id`` from version ``at`` (None: the latest) of ``thread_id``
        (``ThreadExistsError`` if it has state); the two are independent afterwards."""
        ...

    async def history(
        self,
        thread_id: str,
        *,
        start: int = 1,
        stop: int | None = None,
        limit: int | None = None,
        before: int | None = None,
    ) -> list[StepInfo]:
        """The thread's committed steps ``start .. stop``, oldest first; or, with
        ``limit``/``before``, one page backwards: the ``limit`` (default 100)
        steps below version ``before`` (None: from the latest), newest first.
        The next page is ``before=page[-1].version``."""
        ...

    async def threads(self) -> list[str]:
        """Ids of every thread with committed state."""
        ...

    async def delete(self, thread_id: str) -> bool:
        """Delete the thread's durable records; True if it existed."""
        ...


async def stored_state(
    snapshots: SnapshotStore, codec: Codec[S], thread_id: str, version: int | None = None
) -> ThreadSnapshot[S]:
    """A thread's last committed state (or that of ``version``) as the store has it
    (``ThreadNotFoundError``, ``VersionNotFoundError``)."""
    if version is None:
        recovered = await load_thread(snapshots, codec, thread_id)
    else:
        recovered = await load_version(snapshots, codec, thread_id, version)
    if recovered.state is None:
        raise ThreadNotFoundError(f"thread {thread_id!r} has no state")
    turn = recovered.turn
    return ThreadSnapshot(
        thread_id=thread_id,
        version=recovered.version,
        state=recovered.state,
        next=None if turn is None else turn.next,
        interrupts=() if turn is None else turn.interrupts,
    )


class LocalClient(Generic[S]):
    """``ThreadClient`` for threads that run in this process, in ``system``."""

    __slots__ = ("_door", "_system")

    def __init__(self, system: ActorSystem[S]) -> None:
        self._system = system
        self._door = system.door

    async def _put(self, envelope: Envelope, reply: Reply | None) -> None:
        """Into the thread's mailbox (after what recovery queues for it, if it runs)."""
        system = self._system
        if system.recovering:
            await system.admit(envelope.thread_id)
        await system.route(envelope.thread_id).put(envelope, reply)

    async def ask(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> TurnResult[S]:
        """A timeout or cancellation stops the waiting, never the accepted message."""
        envelope = self._door.input(thread_id, input, context=context, message_id=message_id)
        reply = Reply()
        if timeout is None:  # (a cancel scope per ask is measurable at thousands/s)
            await self._put(envelope, reply)
            return await reply.wait()  # type: ignore[no-any-return]
        with anyio.fail_after(timeout):
            await self._put(envelope, reply)
            result: TurnResult[S] = await reply.wait()
        return result

    async def tell(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        envelope = self._door.input(thread_id, input, context=context, message_id=message_id)
        if envelope.kind == "resume":
            # The in-process durable inbox holds inputs only: a resume is
            # delivered (and made durable by its step) through ask or stream.
            raise InvalidInputError("in process, resume with ask or stream, not tell")
        system = self._system
        if system.recovering:
            await system.admit(thread_id)
        await system.enqueue(envelope)  # durable from here on
        await system.deliver(envelope)
        return envelope.message_id

    def tell_nowait(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Enqueue a message or raise ``MailboxFullError``; returns its message id.

        Not durable: the message is only in the mailbox until its input step
        commits (see ``ActorSystem.tell_nowait``).
        """
        envelope = self._door.input(thread_id, input, context=context, message_id=message_id)
        self._system.route(thread_id).offer(envelope, None)
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
        modes = stream_modes(mode)
        envelope = self._door.input(
            thread_id, input, context=context, message_id=message_id, modes=tuple(sorted(modes))
        )
        send, receive = anyio.create_memory_object_stream[StreamPart](math.inf)
        reply = Reply(sink=send, modes=modes)
        with receive:
            await self._put(envelope, reply)
            async for part in receive:
                yield part
        reply.outcome()

    async def get_state(self, thread_id: str, *, version: int | None = None) -> ThreadSnapshot[S]:
        self._door.thread_id(thread_id)
        system = self._system
        if version is not None:
            check_version(version)
            return await stored_state(system.snapshots, system.codec, thread_id, version)
        actor = system.live_actor(thread_id)
        if actor is not None and actor.ready and actor.state is not None:
            state, version, turn = actor.state, actor.version, actor.turn
        else:
            return await stored_state(system.snapshots, system.codec, thread_id)
        return ThreadSnapshot(
            thread_id=thread_id,
            version=version,
            state=state,
            next=None if turn is None else turn.next,
            interrupts=() if turn is None else turn.interrupts,
        )

    async def update_state(
        self,
        thread_id: str,
        update: Mapping[str, Any],
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        return await self._write(self._door.update(thread_id, update, at=at), timeout)

    async def revert(
        self, thread_id: str, *, to: int, timeout: float | None = None
    ) -> ThreadSnapshot[S]:
        return await self._write(self._door.revert(thread_id, to), timeout)

    async def fork(
        self,
        thread_id: str,
        new_thread_id: str,
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        return await self._write(self._door.fork(thread_id, new_thread_id, at), timeout)

    async def _write(self, envelope: Envelope, timeout: float | None) -> ThreadSnapshot[S]:
        """Through the thread's actor, in mailbox order; the snapshot after the step."""
        reply = Reply()
        with anyio.fail_after(timeout):
            await self._put(envelope, reply)
            snapshot: ThreadSnapshot[S] = await reply.wait()
        return snapshot

    async def history(
        self,
        thread_id: str,
        *,
        start: int = 1,
        stop: int | None = None,
        limit: int | None = None,
        before: int | None = None,
    ) -> list[StepInfo]:
        self._door.thread_id(thread_id)
        limit, before = check_page(start, stop, limit, before)
        return await read_history(
            self._system.snapshots,
            self._system.codec,
            thread_id,
            start,
            stop,
            limit=limit,
            before=before,
        )

    async def threads(self) -> list[str]:
        return await self._system.snapshots.threads()

    async def delete(self, thread_id: str) -> bool:
        envelope = self._door.delete(thread_id)
        reply = Reply()
        await self._put(envelope, reply)
        existed: bool = await reply.wait()
        return existed
