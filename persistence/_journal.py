"""A thread's journal: conditional commits of step records, compaction, replay."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from threadline.actors import (
    AgentState,
    InvalidUpdateError,
    SnapshotCorruptError,
    ThreadNotFoundError,
    VersionNotFoundError,
    apply_update,
)
from threadline.actors._api import (
    FullRecord,
    Recovered,
    StepInfo,
    StepRecord,
    TurnCursor,
    initial_state,
    merge_updates,
)

from ._codec import Codec
from ._snapshots import CommitRequest, SnapshotStore, StoredThread, StoredVersion

S = TypeVar("S", bound=AgentState)


def _replay_steps(
    codec: Codec[S],
    thread_id: str,
    steps: Sequence[bytes],
    state: S | None,
    consumed: list[str],
    turn: TurnCursor | None,
    version: int,
) -> tuple[S | None, TurnCursor | None, int, int]:
    """Apply ``steps`` (versions ``version + 1 ..``) to ``state``; ``consumed`` grows
    in place. Returns the state, the turn, the version reached and the bytes read."""
    log_bytes = 0
    updates: list[dict[str, Any]] = []
    first = version + 1
    for data in steps:
        what = f"thread {thread_id!r} step {version + 1}"
        record = codec.decode_step(data, what=what)
        if record.version != version + 1:
            raise SnapshotCorruptError(f"{what}: record says version {record.version}")
        updates.extend(codec.from_patch(patch) for patch in record.updates)
        if record.consumed is not None:
            consumed.append(record.consumed)
        turn = record.turn
        version = record.version
        log_bytes += len(data)
    if updates:
        # One reducer pass for the whole log: applying step by step would cost
        # O(steps x history) in add_messages.
        update = merge_updates(updates)
        try:
            state = (
                initial_state(codec.schema, update)
                if state is None
                else apply_update(state, update)
            )
        except InvalidUpdateError as exc:
            raise SnapshotCorruptError(
                f"thread {thread_id!r} steps {first}..{version}: do not replay: {exc}"
            ) from exc
    return state, turn, version, log_bytes


def replay(
    codec: Codec[S], thread_id: str, stored: StoredThread | None, keep_consumed: int
) -> tuple[Recovered[S], int, int, int | None]:
    """Rebuild a thread from its latest full record and the steps after it.

    Returns the recovered thread, the full record's size, the bytes logged
    since it and its ``span`` (the journal's compaction counters).
    """
    if stored is None:
        return Recovered(state=None, version=0, consumed=[], turn=None), 0, 0, 0
    state: S | None = None
    consumed: list[str] = []
    turn: TurnCursor | None = None
    version = 0
    full_size = 0
    span: int | None = 0
    if stored.full is not None:
        full = codec.decode_full(stored.full, what=f"thread {thread_id!r} full record")
        if full.version != stored.full_version:
            raise SnapshotCorruptError(
                f"thread {thread_id!r}: full record says version {full.version}, "
                f"head says {stored.full_version}"
            )
        state, consumed, turn, version = full.state, list(full.consumed), full.turn, full.version
        full_size, span = len(stored.full), full.span
    state, turn, version, log_bytes = _replay_steps(
        codec, thread_id, stored.steps, state, consumed, turn, version
    )
    if version != stored.version:
        raise SnapshotCorruptError(
            f"thread {thread_id!r}: head is at version {stored.version}, records reach {version}"
        )
    recovered = Recovered(
        state=state, version=version, consumed=consumed[-keep_consumed:], turn=turn
    )
    return recovered, full_size, log_bytes, span


def replay_at(
    codec: Codec[S], thread_id: str, stored: StoredVersion | None, version: int
) -> Recovered[S]:
    """Rebuild ``version`` of a thread from what ``load_at`` read.

    ``ThreadNotFoundError`` if the thread has no steps, ``VersionNotFoundError``
    if ``version`` is not one of them. A full record is used only if the step
    of its version carries the same timestamp (the two are written in one
    commit): a full record left behind by something else is a corrupt thread,
    never a wrong state.
    """
    if stored is None or stored.head == 0:
        raise ThreadNotFoundError(f"thread {thread_id!r} has no state")
    if not 1 <= version <= stored.head:
        raise VersionNotFoundError(
            f"thread {thread_id!r} has versions 1..{stored.head}; there is no version {version}"
        )
    state: S | None = None
    consumed: list[str] = []
    turn: TurnCursor | None = None
    reached = 0
    steps: Sequence[bytes] = stored.steps
    if stored.full_version > 0:
        what = f"thread {thread_id!r} full record of version {stored.full_version}"
        if stored.full is None or not steps:
            raise SnapshotCorruptError(f"{what}: missing, or its step is")
        full = codec.decode_full(stored.full, what=what)
        own = codec.decode_step(steps[0], what=f"thread {thread_id!r} step {stored.full_version}")
        if full.version != stored.full_version or own.version != full.version or own.ts != full.ts:
            raise SnapshotCorruptError(
                f"{what}: says version {full.version}, does not belong with its step "
                f"(version {own.version})"
            )
        state, consumed, turn, reached = full.state, list(full.consumed), full.turn, full.version
        steps = steps[1:]
    state, turn, reached, _ = _replay_steps(codec, thread_id, steps, state, consumed, turn, reached)
    if reached != version or state is None:
        raise SnapshotCorruptError(
            f"thread {thread_id!r}: version {version} asked, the records reach {reached}"
        )
    return Recovered(state=state, version=version, consumed=consumed, turn=turn)


FULL_RECORD_RATIO = 0.5
FULL_RECORD_FLOOR = 8192
CHECKPOINT_RATIO = 4.0


class ThreadJournal(Generic[S]):
    """One owner's handle on one thread's durable log.

    ``open`` takes ownership (a new fencing epoch) and loads; ``commit`` appends
    a step conditional on the version and epoch this journal holds.

    A full record is written with a step once the steps logged since the last
    one exceed ``FULL_RECORD_RATIO`` of its size (and ``FULL_RECORD_FLOOR``).
    The state grows by at least that fraction between two full records, so
    full records cost a constant factor of the step bytes (about 1/ratio)
    however long the thread; and a load replays at most that fraction of the
    state's size in steps (replay decoding is what a cold load spends its time
    on).

    When a full record is written, the previous one is kept as a checkpoint
    (``keep_full``) if dropping it would leave more than ``CHECKPOINT_RATIO``
    times its size of steps between the last checkpoint kept and the new
    record; otherwise it is dropped. So ``get_state(version=v)`` replays at
    most about that many states' worth of steps from the full record at or
    before ``v``, and the checkpoints kept grow geometrically: their bytes
    stay a constant factor of the latest state, however long the thread.
    Each full record carries that ``span`` so a later owner decides the same.

    ``inboxed`` is the owner's set of ``(thread_id, message_id)`` of messages
    in the store's inbox and not yet consumed: a step that consumes one of
    them removes its inbox entry in the same commit (and it leaves the set).
    Every commit also tells the store which turn is in flight after it, so a
    restarted system finds parked turns without reading records.
    """

    __slots__ = (
        "_codec",
        "_full_size",
        "_inboxed",
        "_log_bytes",
        "_span",
        "_store",
        "epoch",
        "thread_id",
        "version",
    )

    def __init__(
        self,
        store: SnapshotStore,
        codec: Codec[S],
        thread_id: str,
        inboxed: set[tuple[str, str]] | None = None,
    ) -> None:
        self._store = store
        self._codec = codec
        self._inboxed = inboxed
        self.thread_id = thread_id
        self.version = 0
        self.epoch = 0
        self._full_size = 0
        self._log_bytes = 0
        # Step bytes from the last full record kept as a checkpoint (or the
        # start) to the latest full record; None: unknown (an older record).
        self._span: int | None = 0

    async def open(self, keep_consumed: int) -> Recovered[S]:
        self.epoch = await self._store.acquire(self.thread_id)
        stored = await self._store.load(self.thread_id)
        recovered, self._full_size, self._log_bytes, self._span = replay(
            self._codec, self.thread_id, stored, keep_consumed
        )
        self.version = recovered.version
        return recovered

    async def state_at(self, thread_id: str, version: int | None) -> Recovered[S]:
        """``version`` of a thread (this one or another; None: its latest), as stored."""
        if version is None:
            recovered = await load_thread(self._store, self._codec, thread_id)
            if recovered.state is None:
                raise ThreadNotFoundError(f"thread {thread_id!r} has no state")
            return recovered
        return await load_version(self._store, self._codec, thread_id, version)

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
    ) -> None:
        """Durably append one step whose result is ``state``.

        ``recent`` is the list of recently consumed message ids (kept in full
        records). ``at``/``parent``: the step starts from that version (of that
        thread), and its first update replaces the whole state (see
        ``StepRecord``). Raises what the store raises; on error nothing
        changes here.
        """
        version = self.version + 1
        now = time.time()
        step = self._codec.encode_step(
            StepRecord(
                version=version,
                kind=kind,
                updates=[self._codec.to_patch(u) for u in updates],
                ts=now,
                turn=turn,
                consumed=consumed,
                error=error,
                at=at,
                parent=parent,
            )
        )
        full = None
        keep = False
        span: int | None = None
        if version == 1 and at is not None:
            # A thread that starts as a copy (a fork): its first step holds the
            # whole state already, and counts as its first full record (a load
            # replays it from the start); a second copy would double the cost.
            pass
        elif self._log_bytes + len(step) > max(
            self._full_size * FULL_RECORD_RATIO, FULL_RECORD_FLOOR
        ):
            gap = self._log_bytes + len(step)
            span = gap
            if self._full_size:
                # Dropping the previous full record leaves this many step bytes
                # between the last checkpoint and the new record.
                dropped = None if self._span is None else self._span + gap
                keep = dropped is None or dropped > CHECKPOINT_RATIO * self._full_size
                span = gap if keep or dropped is None else dropped
            full = self._codec.encode_full(
                FullRecord(
                    version=version,
                    state=state,
                    consumed=list(recent),
                    ts=now,
                    turn=turn,
                    span=span,
                )
            )
        dequeue: tuple[str, str] | None = None
        if consumed is not None and self._inboxed:
            key = (self.thread_id, consumed)
            if key in self._inboxed:
                dequeue = key
        await self._store.commit(
            CommitRequest(
                thread_id=self.thread_id,
                expected_version=self.version,
                epoch=self.epoch,
                step=step,
                full=full,
                keep_full=keep,
                consumed=None if dequeue is None else consumed,
                turn=None if turn is None else turn.message_id,
            )
        )
        if dequeue is not None and self._inboxed is not None:
            self._inboxed.discard(dequeue)
        self.version = version
        if version == 1 and at is not None:
            self._full_size, self._log_bytes, self._span = len(step), 0, 0
        elif full is None:
            self._log_bytes += len(step)
        else:
            self._full_size, self._log_bytes, self._span = len(full), 0, span

    async def delete(self) -> bool:
        existed = await self._store.delete(self.thread_id, epoch=self.epoch)
        self.version = 0
        self._full_size = self._log_bytes = 0
        self._span = 0
        return existed


async def load_thread(
    store: SnapshotStore, codec: Codec[S], thread_id: str, keep_consumed: int = 0
) -> Recovered[S]:
    """Read a thread without taking ownership (for ``get_state``)."""
    recovered, _, _, _ = replay(codec, thread_id, await store.load(thread_id), keep_consumed)
    return recovered


async def load_version(
    store: SnapshotStore, codec: Codec[S], thread_id: str, version: int
) -> Recovered[S]:
    """``version`` of a thread, from the full record at or before it (``get_state(version=)``).

    ``ThreadNotFoundError`` if the thread has no steps; ``VersionNotFoundError``
    if it has no such version.
    """
    return replay_at(codec, thread_id, await store.load_at(thread_id, version), version)


def _infos(codec: Codec[S], thread_id: str, steps: Sequence[bytes]) -> list[StepInfo]:
    infos = []
    for data in steps:
        record = codec.decode_step(data, what=f"thread {thread_id!r} step")
        infos.append(
            StepInfo(
                version=record.version,
                kind=record.kind,
                updates=[codec.from_patch(p) for p in record.updates],
                ts=record.ts,
                turn=record.turn,
                consumed=record.consumed,
                error=record.error,
                at=record.at,
                parent=record.parent,
            )
        )
    return infos


async def read_history(
    store: SnapshotStore,
    codec: Codec[S],
    thread_id: str,
    start: int = 1,
    stop: int | None = None,
    *,
    limit: int | None = None,
    before: int | None = None,
) -> list[StepInfo]:
    """The thread's step records, decoded: ``start .. stop`` oldest first; or, with
    ``limit`` (and ``before``), one page backwards: the ``limit`` steps below
    version ``before`` (None: the latest), newest first."""
    if limit is None and before is None:
        return _infos(codec, thread_id, await store.read_steps(thread_id, start, stop))
    page = await store.read_steps_before(thread_id, before, limit if limit is not None else 100)
    return _infos(codec, thread_id, page)[::-1]
