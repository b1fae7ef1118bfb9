"""``Worker``: runs thread actors for a share of the partitions of a Redis deployment.

Threads hash to P fixed partitions (``crc32(thread_id) % P``). Each partition
has one inbox (a Redis stream) and one lease with a fencing epoch; a worker
reads the inboxes of the partitions it leases and runs their threads in an
``ActorSystem`` over the Redis snapshot store. Every tick it renews its
leases, heartbeats its membership and follows the placement plan (rendezvous
hashing with bounded loads over the live workers): it acquires the
partitions it should own and hands back, at a step boundary, those it should
not. A crashed worker's partitions are acquired by others once its leases
expire; entries it had read but not acknowledged are claimed first, in
stream order, so per-thread order survives the takeover.

An entry is acknowledged (``XACK`` + ``XDEL``) only once the step that consumed
it is committed. A worker that dies between the commit and the acknowledgement
leaves the entry pending; its next owner redelivers it, and the thread's
record of recently consumed message ids answers it as a duplicate: applied
once. Two workers that briefly both run a thread (a paused owner waking after
its lease expired) cannot fork it: activating a thread bumps its fencing
epoch, so the older owner's next commit fails with ``FencedError``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from threadline.actors import (
    AgentState,
    FencedError,
    InvalidInputError,
    PersistenceError,
    SystemClosedError,
    ThreadlineError,
    TurnFailedError,
    normalize_update,
)
from threadline.actors._api import Envelope, Reply, get_logger, new_id
from threadline.persistence import (
    KeyLayout,
    Lease,
    Membership,
    PartitionLeases,
    RedisInbox,
    RedisSnapshotStore,
    StreamEntry,
    ThreadJournal,
    deployment_layout,
    open_redis,
    plan_partitions,
    read_envelope,
)

from ._system import ActorSystem
from ._wire import ReplyEvent, encode_event, error_event
from .agent import Agent

S = TypeVar("S", bound=AgentState)


Outbound = tuple[str, str, int, str, bytes]
"""What the worker's outbound task does, in order: ``("event", reply key, 0, "",
payload)`` appends a reply event; ``("ack", "", partition, entry id, b"")``
acknowledges an inbox entry; ``("redeliver", "", partition, entry id, b"")``
hands the partition back (its entry was left pending): acquired again, its
pending entries are claimed and dispatched again, in stream order;
``("flush", key, 0, "", b"")`` sets the event ``_flushes[key]`` once what was
queued before it is done (a lease is released only after its acks went out)."""


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class InboxReply(Reply):
    """The reply of an envelope read from a partition inbox.

    Stream parts and the outcome become ``ReplyEvent`` records on the reply
    stream the sender named (if it named one). Once the turn is over (its last
    step committed, or the turn aborted and the abort committed) the inbox
    entry is acknowledged, after the final event. An entry whose turn did not
    end (the store failed, the worker stopped) stays pending: its partition's
    next owner redelivers it, the thread resumes the parked turn on activation
    and answers the redelivered id as a duplicate, which replies with the state
    the turn ended in. ``done`` is called when the reply is settled, once,
    whichever way (it gives back the message's share of ``max_active_turns``).
    """

    __slots__ = ("_done_with", "_entry", "_key", "_queue", "_stall")

    def __init__(
        self,
        key: str | None,
        queue: MemoryObjectSendStream[Outbound],
        modes: frozenset[str],
        entry: tuple[int, str],
        stall: Callable[[], None],
        done: Callable[[], None],
    ) -> None:
        super().__init__(modes=modes)
        self._key = key
        self._queue = queue
        self._entry = entry
        self._stall = stall
        self._done_with = done

    @property
    def listening(self) -> bool:
        return self._key is not None and bool(self.modes)

    def _out(self, item: Outbound) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._queue.send_nowait(item)

    def _send(self, event: ReplyEvent) -> None:
        if self._key is not None:
            self._out(("event", self._key, 0, "", encode_event(event)))

    def _ack(self) -> None:
        self._out(("ack", "", self._entry[0], self._entry[1], b""))

    def emit(self, mode: str, part: Any) -> None:
        if mode in self.modes:
            self._send(ReplyEvent(event=mode, data=part.data, version=part.version))

    def resolve(self, value: Any) -> None:
        if self.settled:
            return
        self._send(ReplyEvent(event="end", data=value))
        self._ack()
        super().resolve(value)
        self._done_with()

    def fail(self, error: BaseException) -> None:
        if self.settled:
            return
        super().fail(error)
        # A turn that failed has its abort committed: done with. A message the
        # store, a fence or the shutdown cut short is not: it stays pending, and
        # its redelivery replies on the same stream. An error event now would
        # tell the sender it failed (and a retry with the same id would read it
        # again).
        if not isinstance(error, (PersistenceError, SystemClosedError)):
            self._send(error_event(error))
            self._ack()
        else:
            # Nothing of this thread may be applied before the redelivery:
            # what is queued behind it goes back to the inbox too.
            self._stall()
            self._out(("redeliver", "", self._entry[0], self._entry[1], b""))
        self._done_with()


class _Once:
    """Calls ``fn`` the first time it is called, never again."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _Turn:
    """One thread's share of a worker's ``max_active_turns``: held while any
    message of the thread the worker dispatched is not settled yet."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages = 0


class Worker(Generic[S]):
    """Serves ``agent``'s threads from a Redis deployment, with other workers.

    ``async with Worker(agent, "redis://...") as worker: await worker.serve()``
    (or ``threadline worker --redis URL --app module:agent``). Options:

    * ``partitions``: the partition count, fixed when the deployment is first
      used (default 64) and read from it afterwards.
    * ``lease_ttl`` (seconds, default 10): how long a crashed worker's
      partitions wait for a new owner.
    * ``max_active_turns`` (default 256): the most threads this worker has work
      dispatched to at once, i.e. turns running or about to (an ``update`` or a
      ``delete`` counts as one too). A thread holds one share from the first
      inbox message the worker hands it until the last one it was handed is
      settled (answered, failed, dead-lettered, or handed back to the inbox);
      messages queued behind its turn take no other share, so a hot thread
      never starves the others. At the cap the partition readers stop reading
      until a share comes back. ``worker.saturated`` is logged (a warning) when
      a reader first has to wait, ``worker.unsaturated`` once a share is left
      free again: once per saturation, however many messages waited.
      ``active_turns`` is the current count, ``in_flight`` the messages,
      ``saturated`` whether a reader waits.
    * ``max_deliveries`` (default 5): how many times an entry may be delivered
      (its owner dying or stopping each time) before it is dead-lettered as
      poison and a turn it left parked is aborted.
    * ``handoff_timeout`` (seconds, default 30): how long a partition being
      handed to another worker waits for its turns in flight; after it the
      lease goes anyway (and the next owner redoes the step in flight).

    Other keyword arguments go to the worker's ``ActorSystem``
    (``mailbox_capacity``, ``shutdown_timeout``, ...). A bad value raises
    ``ValueError``.
    """

    def __init__(
        self,
        agent: Agent[S],
        url: str,
        *,
        prefix: str = "tl",
        partitions: int | None = None,
        lease_ttl: float = 10.0,
        max_active_turns: int = 256,
        max_deliveries: int = 5,
        handoff_timeout: float = 30.0,
        worker_id: str | None = None,
        **system_options: Any,
    ) -> None:
        _check_positive("lease_ttl", lease_ttl)
        _check_count("max_active_turns", max_active_turns)
        _check_count("max_deliveries", max_deliveries)
        _check_positive("handoff_timeout", handoff_timeout)
        self.agent = agent
        self.url = url
        self.prefix = prefix
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.max_active_turns = max_active_turns
        self.max_deliveries = max_deliveries
        self.handoff_timeout = handoff_timeout
        self._partitions = partitions
        self._ttl_ms = max(int(lease_ttl * 1000), 50)
        self._system_options = system_options
        self._stack: contextlib.AsyncExitStack | None = None
        self._leases: dict[int, Lease] = {}
        self._readers: dict[int, anyio.CancelScope] = {}
        self._stalled: set[str] = set()
        self._handing_off: set[int] = set()
        self._flushes: dict[str, anyio.Event] = {}  # flush key -> set once done
        self._keeping: anyio.CancelScope | None = None
        self._active: dict[str, _Turn] = {}
        self._shares = anyio.CapacityLimiter(max_active_turns)
        # A saturation: from the first dispatch that waits for a share to the
        # first share left over; ``_waits`` counts the dispatches that waited.
        self._saturated_since: float | None = None
        self._waits = 0
        self._log: Any = get_logger().bind(worker=self.worker_id)
        self.layout: KeyLayout | None = None

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(open_redis(self.url, "Worker"))
            # Blocking inbox reads hold a connection each: a pool of their own.
            readers = await stack.enter_async_context(
                open_redis(self.url, "Worker inbox reads", max_connections=1024)
            )
            self.layout = await deployment_layout(client, self.prefix, self._partitions)
            self._inbox = RedisInbox(client, self.layout)
            self._reads = RedisInbox(readers, self.layout)
            self._lease_table = PartitionLeases(client, layout=self.layout, ttl_ms=self._ttl_ms)
            self._membership = Membership(client, layout=self.layout, ttl_ms=self._ttl_ms)
            self._active.clear()
            self._shares = anyio.CapacityLimiter(self.max_active_turns)
            self._saturated_since = None
            self._waits = 0
            send, receive = anyio.create_memory_object_stream[Outbound](math.inf)
            self._outbound_queue = send
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg = tg
            tg.start_soon(self._outbound, receive, name="threadline worker outbound")
            # Exit order (last in, first out): the system finishes its in-flight
            # steps (their replies are queued), then the leases go back and the
            # publisher drains the queue, then the connections close.
            stack.push_async_callback(self._leave)
            # Every activation, commit and delete checks this worker's lease of
            # the thread's partition in the same script: a worker that lost it
            # writes nothing, even before the next owner touches the thread.
            store = RedisSnapshotStore(client, prefix=self.prefix, lease_token=self._token)
            # Recovery is per partition here (the inbox's pending entries), not
            # of the whole store, which other workers share.
            self.system: ActorSystem[S] = ActorSystem(
                self.agent, snapshots=store, recover=False, **self._system_options
            )
            await stack.enter_async_context(self.system)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        # The system finishes its in-flight steps first: the leases must outlive
        # them, or another worker takes a partition over and redoes the step.
        self._keeping = anyio.CancelScope()
        self._tg.start_soon(self._keep_leases, self._keeping, name="threadline worker keep leases")
        await stack.__aexit__(exc_type, exc, tb)

    async def _keep_leases(self, scope: anyio.CancelScope) -> None:
        """Renew the leases held, every tick, until :meth:`_leave` hands them back."""
        with scope:
            while True:
                await anyio.sleep(self._ttl_ms / 5000)
                for partition, lease in list(self._leases.items()):
                    try:
                        renewed = await self._lease_table.renew(lease)
                    except PersistenceError:
                        continue  # fenced or unreachable: _leave's release settles it
                    if renewed is None:
                        self._leases.pop(partition, None)
                    elif partition in self._leases:
                        self._leases[partition] = renewed

    async def _leave(self) -> None:
        """Hand every partition back (after the system finished its steps)."""
        if self._keeping is not None:
            self._keeping.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for scope in self._readers.values():
                scope.cancel()
            await self._flush_outbound()
            for lease in list(self._leases.values()):
                with contextlib.suppress(PersistenceError):
                    await self._lease_table.release(lease)
            self._leases.clear()
            with contextlib.suppress(PersistenceError):
                await self._membership.leave(self.worker_id)
            self._outbound_queue.close()
            self._log.info("worker.left")

    async def serve(self) -> None:
        """Own partitions and run their threads until cancelled."""
        assert self.layout is not None, "use 'async with Worker(...)' first"
        tick = self._ttl_ms / 5000
        async with anyio.create_task_group() as tg:
            self._serving = tg
            while True:
                try:
                    await self._tick(tg)
                except PersistenceError as exc:
                    self._log.warning("worker.tick_failed", error=str(exc))
                await anyio.sleep(tick)

    def _token(self, partition: int) -> str | None:
        lease = self._leases.get(partition)
        return None if lease is None else lease.token

    @property
    def partitions(self) -> list[int]:
        """The partitions this worker holds leases for."""
        return sorted(self._leases)

    @property
    def active_turns(self) -> int:
        """Threads with a message this worker dispatched and has not settled yet
        (what ``max_active_turns`` caps)."""
        return len(self._active)

    @property
    def in_flight(self) -> int:
        """Inbox messages this worker dispatched and has not settled yet."""
        return sum(turn.messages for turn in self._active.values())

    @property
    def saturated(self) -> bool:
        """Whether a partition reader is waiting for a share of ``max_active_turns``."""
        return self._shares.statistics().tasks_waiting > 0

    # -- leases and placement ------------------------------------------------------

    async def _tick(self, tg: TaskGroup) -> None:
        assert self.layout is not None
        await self._membership.heartbeat(self.worker_id)
        for partition, lease in list(self._leases.items()):
            try:
                renewed = await self._lease_table.renew(lease)
            except FencedError:
                renewed = None
            if renewed is None:
                self._lost(partition, "renew refused")
            else:
                self._leases[partition] = renewed
        workers = await self._membership.live_workers()
        plan = plan_partitions(
            set(self._leases), self.layout.partitions, workers, self.worker_id, limit=16
        )
        for partition in plan.release:
            if partition not in self._handing_off:
                self._handing_off.add(partition)
                tg.start_soon(self._release, partition, name=f"threadline handoff {partition}")
        for partition in plan.acquire:
            granted = await self._lease_table.acquire(partition, self.worker_id)
            if granted is not None:
                self._leases[partition] = granted
                self._forget(partition)
                self._log.info("lease.acquired", partition=partition, epoch=granted.epoch)
                tg.start_soon(self._read, partition, granted, name=f"threadline inbox {partition}")

    def _forget(self, partition: int) -> None:
        """Make the partition's threads still in memory reload on their next message.

        They are left from an earlier lease of the partition: its owners since
        may have moved them on, and a stale actor's commits would be fenced
        (its message then left pending until the partition moves again).
        """
        assert self.layout is not None
        self._stalled = {t for t in self._stalled if self.layout.partition_of(t) != partition}
        for thread_id in self.system.live_thread_ids():
            actor = self.system.live_actor(thread_id)
            if actor is not None and self.layout.partition_of(thread_id) == partition:
                actor.ready = False

    async def _give_up(self, partition: int, epoch: int) -> None:
        """Drop the lease of ``epoch`` on ``partition`` (if still held) and its reader."""
        current = self._leases.get(partition)
        if current is None or current.epoch != epoch or partition in self._handing_off:
            return
        del self._leases[partition]
        scope = self._readers.pop(partition, None)
        if scope is not None:
            scope.cancel()
        with contextlib.suppress(PersistenceError):
            await self._lease_table.release(current)

    def _lost(self, partition: int, why: str) -> None:
        self._leases.pop(partition, None)
        scope = self._readers.pop(partition, None)
        if scope is not None:
            scope.cancel()
        self._log.warning("lease.lost", partition=partition, reason=why)

    async def _release(self, partition: int) -> None:
        """Hand a partition over at a turn boundary.

        Its reader stops; its threads' queued messages go back to the inbox
        (they stay pending, and the next owner claims them in order); the lease
        is kept, and renewed by the tick, until the turns in flight have ended
        (at most ``handoff_timeout``), so the next owner never redoes a step
        this worker is still running.
        """
        assert self.layout is not None
        try:
            scope = self._readers.pop(partition, None)
            if scope is not None:
                scope.cancel()
            threads = [
                t for t in self.system.live_thread_ids() if self.layout.partition_of(t) == partition
            ]
            for thread_id in threads:
                self._stall(thread_id)
            # A "wake" queued behind each turn in flight is answered when it ends.
            ends = []
            for thread_id in threads:
                actor = self.system.live_actor(thread_id)
                if actor is not None and actor.running:
                    end = Reply()
                    actor.offer(
                        Envelope(kind="wake", message_id=new_id(), thread_id=thread_id), end
                    )
                    ends.append(end)
            with anyio.move_on_after(self.handoff_timeout):
                for end in ends:
                    with contextlib.suppress(ThreadlineError):
                        await end.wait()
            await self._flush_outbound()
            lease = self._leases.pop(partition, None)
            if lease is not None:
                with contextlib.suppress(PersistenceError):
                    await self._lease_table.release(lease)
                self._log.info("partition.moved", partition=partition, epoch=lease.epoch)
        finally:
            self._handing_off.discard(partition)

    # -- the inbox of one partition ---------------------------------------------------

    async def _read(self, partition: int, lease: Lease) -> None:
        """Feed the partition's inbox to its threads while the lease is held.

        Every read is fenced by the lease's token: a worker that lost the
        lease (paused past the TTL, cut off) cannot pull entries into its
        pending list behind the new owner's back. When a read finds nothing it
        blocks on the inbox's doorbell (``wait``: a plain ``XREAD BLOCK``, no
        polling) until an entry comes; the tick cancels it when the lease is
        lost or the partition moves.
        """
        with anyio.CancelScope() as scope:
            self._readers[partition] = scope
            try:
                await self._reads.ensure_group(partition)
                # What a previous owner read and did not acknowledge comes first.
                for entry in await self._reads.claim(partition, self.worker_id, lease.token):
                    await self._dispatch(partition, entry)
                while self._leases.get(partition) is not None:
                    batch = await self._reads.read(partition, self.worker_id, lease.token)
                    for entry in batch.entries:
                        await self._dispatch(partition, entry)
                    # Nothing new: wait for the next append. A quiet wait changes
                    # nothing, so waiting again needs no fenced read in between.
                    while not batch.entries and self._leases.get(partition) is not None:
                        if await self._reads.wait(partition, batch.after):
                            break
            except FencedError as exc:
                # The lease is gone (expired, or another worker took the partition):
                # nothing was read into our pending list. Stop reading; the tick
                # acquires the partition again if the placement still says so.
                if self._readers.get(partition) is scope:
                    del self._readers[partition]
                current = self._leases.get(partition)
                if (
                    current is not None
                    and current.epoch == lease.epoch
                    and partition not in self._handing_off
                ):
                    self._lost(partition, f"inbox fenced: {exc}")
                else:
                    self._log.warning("inbox.fenced", partition=partition, error=str(exc))
            except PersistenceError as exc:
                self._log.warning("inbox.read_failed", partition=partition, error=str(exc))
                # Hand the partition back: the tick acquires it again (a new
                # epoch) and reads again from the claim step. The tick may have
                # renewed the lease meanwhile (a new Lease value, the same epoch).
                if self._readers.get(partition) is scope:
                    del self._readers[partition]
                await self._give_up(partition, lease.epoch)
        if self._readers.get(partition) is scope:
            del self._readers[partition]

    async def _dispatch(self, partition: int, entry: StreamEntry) -> None:
        """Hand an entry to its thread, unless it is poison.

        Poison goes to the partition's dead letters with its reason: an entry
        that does not decode or validate at once; an entry delivered more than
        ``max_deliveries`` times (each owner died or stopped holding it) when it
        is the first of its thread this worker sees (the ones queued behind it
        were delivered as often through no fault of theirs). Its sender's reply
        stream gets an ``error`` event, and a turn it left parked is aborted
        (an ``abort`` step), so the thread serves its next message instead of
        resuming the turn that keeps killing its workers.

        A thread with nothing in flight here first waits for a share of
        ``max_active_turns`` (the reader waits with it: nothing behind the
        entry is dispatched meanwhile). The share comes back when the thread's
        last message is settled, however that happens; an entry that does not
        decode takes none (it never reaches a thread).
        """
        try:
            envelope = read_envelope(entry.payload, what=f"inbox entry {entry.entry_id}")
        except PersistenceError as exc:
            await self._dead_letter(partition, entry, str(exc))
            return
        thread_id = envelope.thread_id
        if thread_id in self._stalled:
            return  # left pending: redelivered in order once the partition is claimed again
        done = await self._occupy(thread_id)
        handed = False
        try:
            if thread_id in self._stalled:  # while it waited for a share
                return
            reply = InboxReply(
                envelope.reply_to,
                self._outbound_queue,
                frozenset(envelope.modes),
                (partition, entry.entry_id),
                functools.partial(self._stall, thread_id),
                done,
            )
            blamed = entry.deliveries > 1 and self._first_redelivered(envelope.thread_id)
            if blamed and entry.deliveries > self.max_deliveries:
                await self._poisoned(partition, entry, envelope, reply)
                return
            try:
                envelope = self._validate(envelope)
            except InvalidInputError as exc:
                await self._dead_letter(partition, entry, f"invalid: {exc}")
                reply.fail(exc)
                return
            await self.system.route(envelope.thread_id).put(envelope, reply)
            handed = True  # the thread settles the reply, on every path
            if thread_id in self._stalled:
                # Stalled while this waited for room in the mailbox (the drain
                # made the room): back to the inbox with the rest, before the
                # thread runs it ahead of the messages handed back.
                self._stall(thread_id)
        finally:
            if not handed:
                done()  # a no-op if the reply was settled here

    async def _occupy(self, thread_id: str) -> Callable[[], None]:
        """Count one more dispatched message of ``thread_id``; if the thread has
        none in flight, wait for a share of ``max_active_turns`` first. Returns
        what gives the message back (once, however often it is called)."""
        turn = self._active.get(thread_id)
        if turn is None:
            turn = _Turn()
            try:
                self._shares.acquire_on_behalf_of_nowait(turn)
            except anyio.WouldBlock:
                self._waits += 1
                if self._saturated_since is None:
                    self._saturated_since = anyio.current_time()
                    self._log.warning(
                        "worker.saturated",
                        active_turns=len(self._active),
                        max_active_turns=self.max_active_turns,
                    )
                await self._shares.acquire_on_behalf_of(turn)
            held = self._active.get(thread_id)
            if held is None:
                self._active[thread_id] = turn
            else:  # another dispatch of the thread got a share while this one waited
                self._shares.release_on_behalf_of(turn)
                turn = held
        turn.messages += 1
        return _Once(functools.partial(self._vacate, thread_id, turn))

    def _vacate(self, thread_id: str, turn: _Turn) -> None:
        """One message of ``thread_id`` is settled: its last gives the share back."""
        turn.messages -= 1
        if turn.messages:
            return
        if self._active.get(thread_id) is turn:
            del self._active[thread_id]
        self._shares.release_on_behalf_of(turn)  # to the next reader waiting, if any
        if self._saturated_since is not None and self._shares.available_tokens > 0:
            # A share is left over: the cap no longer binds. (A share that went
            # straight to a waiting reader does not end the saturation.)
            self._log.info(
                "worker.unsaturated",
                seconds=round(anyio.current_time() - self._saturated_since, 3),
                waits=self._waits,
                max_active_turns=self.max_active_turns,
            )
            self._saturated_since = None
            self._waits = 0

    def _stall(self, thread_id: str) -> None:
        """Hold a thread's messages back until its failed one is redelivered.

        An entry left pending by a store error is redelivered by claiming the
        partition again; until then nothing of its thread may be applied (that
        would reorder it): the thread's queued messages are dropped from its
        mailbox (they stay pending in the inbox, redelivered in order behind
        it) and the reader skips the thread's new entries the same way.
        """
        self._stalled.add(thread_id)
        actor = self.system.live_actor(thread_id)
        if actor is None:
            return
        held = SystemClosedError(
            f"thread {thread_id!r}: held back until an earlier message is redelivered"
        )
        for _, reply in actor.mailbox.drain():
            if reply is not None:
                reply.fail(held)

    _redelivered: set[str] | None = None

    def _first_redelivered(self, thread_id: str) -> bool:
        """Whether this is the first redelivered entry of ``thread_id`` this worker
        dispatches: the oldest pending one of the thread, whose turn was running
        when its owner died (only that one is blamed for repeated deliveries)."""
        if self._redelivered is None:
            self._redelivered = set()
        if thread_id in self._redelivered:
            return False
        self._redelivered.add(thread_id)
        return True

    async def _poisoned(
        self, partition: int, entry: StreamEntry, envelope: Envelope, reply: InboxReply
    ) -> None:
        reason = (
            f"poison: delivered {entry.deliveries} times (max_deliveries "
            f"{self.max_deliveries}); its owner died or stopped holding it each time"
        )
        step = await self._abort_parked_turn(envelope, reason)
        await self._dead_letter(partition, entry, reason)
        what = f", its turn aborted at step {step!r}" if step else ""
        reply.fail(
            TurnFailedError(
                f"thread {envelope.thread_id!r}: message {envelope.message_id!r} was "
                f"dead-lettered ({reason}){what}",
                thread_id=envelope.thread_id,
                step=step or "input",
            )
        )

    async def _abort_parked_turn(self, envelope: Envelope, reason: str) -> str | None:
        """Commit an ``abort`` step if the thread's parked turn is this message's;
        the step it was parked at (None: nothing to abort, or the thread is live here)."""
        if self.system.live_actor(envelope.thread_id) is not None:
            return None
        journal = ThreadJournal(self.system.snapshots, self.system.codec, envelope.thread_id)
        recovered = await journal.open(int(self._system_options.get("keep_consumed", 128)))
        turn = recovered.turn
        if turn is None or turn.message_id != envelope.message_id or recovered.state is None:
            return None
        await journal.commit(
            kind="abort",
            updates=[],
            state=recovered.state,
            turn=None,
            recent=recovered.consumed,
            error=reason[:2000],
        )
        self._log.warning(
            "turn.aborted_poison",
            thread_id=envelope.thread_id,
            message_id=envelope.message_id,
            step=turn.next,
        )
        return turn.next

    def _validate(self, envelope: Envelope) -> Envelope:
        """The worker's own door: the update arrived as builtins."""
        self.system.door.thread_id(envelope.thread_id)
        if envelope.source is not None:
            self.system.door.thread_id(envelope.source)
        if envelope.kind in ("delete", "resume"):  # (a resume's value is checked by the actor)
            return envelope
        schema = self.agent.state_schema
        update = normalize_update(
            schema, envelope.update, source="inbox", first_id=envelope.message_id
        )
        context = self.agent.context.dump(envelope.context) if envelope.kind == "input" else None
        return msgspec.structs.replace(envelope, update=update, context=context)

    async def _dead_letter(self, partition: int, entry: StreamEntry, reason: str) -> None:
        """Dead-letter ``entry`` under the partition's lease (``FencedError`` if it is
        lost meanwhile); without the lease, leave it pending for the next owner."""
        lease = self._leases.get(partition)
        if lease is None:
            self._log.warning(
                "message.dead_letter_skipped",
                partition=partition,
                entry=entry.entry_id,
                reason=reason,
                why="lease not held: left pending for the partition's next owner",
            )
            return
        await self._inbox.dead_letter(partition, entry.entry_id, reason, lease.token)
        self._log.warning(
            "message.dead_lettered", partition=partition, entry=entry.entry_id, reason=reason
        )

    async def _publish(self, reply_key: str, payloads: list[bytes]) -> None:
        try:
            await self._inbox.publish(reply_key, payloads)
        except PersistenceError as exc:
            self._log.warning("reply.publish_failed", key=reply_key, error=str(exc))

    async def _ack(self, partition: int, entry_ids: list[str]) -> None:
        # Without the lease (lost, or handed back), or fenced: the entries stay
        # pending, the partition's next owner redelivers them and their threads
        # answer them as duplicates.
        lease = self._leases.get(partition)
        if lease is None:
            self._log.warning(
                "inbox.ack_skipped",
                partition=partition,
                entries=len(entry_ids),
                why="lease not held: left pending for the partition's next owner",
            )
            return
        try:
            await self._inbox.ack(partition, entry_ids, lease.token)
        except FencedError as exc:
            self._log.warning(
                "inbox.ack_fenced", partition=partition, entries=len(entry_ids), error=str(exc)
            )
        except PersistenceError as exc:
            # Pending still: redelivered later, answered as a duplicate.
            self._log.warning("inbox.ack_failed", partition=partition, error=str(exc))

    async def _flush_outbound(self) -> None:
        """Wait until what is queued for the outbound task now (acks included) is done."""
        done = anyio.Event()
        key = new_id()
        self._flushes[key] = done
        try:
            self._outbound_queue.send_nowait(("flush", key, 0, "", b""))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        await done.wait()

    async def _outbound(self, receive: MemoryObjectReceiveStream[Outbound]) -> None:
        """Append reply events and acknowledge entries, in the order they came.

        What is queued together goes together: the events of each reply stream
        in one script call, then the acknowledgements of each partition in one.
        An entry is acknowledged only after the events before it are appended.
        """
        async with receive:
            async for item in receive:
                batch = [item]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):  # EndOfStream: closed by _leave
                        break
                events: dict[str, list[bytes]] = {}
                acks: dict[int, list[str]] = {}
                redeliver: set[int] = set()
                flushed: list[str] = []
                for kind, key, partition, entry_id, payload in batch:
                    if kind == "event":
                        events.setdefault(key, []).append(payload)
                    elif kind == "ack":
                        acks.setdefault(partition, []).append(entry_id)
                    elif kind == "flush":
                        flushed.append(key)
                    else:
                        redeliver.add(partition)
                # Each call waits for an fsync: the batch's calls go out together
                # (events first; an entry is acknowledged after its final event).
                async with anyio.create_task_group() as tg:
                    for reply_key, payloads in events.items():
                        tg.start_soon(self._publish, reply_key, payloads)
                async with anyio.create_task_group() as tg:
                    for partition, entry_ids in acks.items():
                        tg.start_soon(self._ack, partition, entry_ids)
                for key in flushed:
                    self._flushes.pop(key).set()
                for partition in sorted(redeliver):
                    # Left pending while the partition is ours, an entry would wait
                    # for the partition's next owner: be that owner, from the claim.
                    held = self._leases.get(partition)
                    if held is not None:
                        self._log.info("inbox.redeliver", partition=partition)
                        await self._give_up(partition, held.epoch)
