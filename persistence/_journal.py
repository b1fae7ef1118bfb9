"""A thread's journal: conditional commits of step records, compaction, replay."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from threadline.actors import AgentState, InvalidUpdateError, SnapshotCorruptError, apply_update
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
from ._snapshots import CommitRequest, SnapshotStore, StoredThread

S = TypeVar("S", bound=AgentState)


def replay(
    codec: Codec[S], thread_id: str, stored: StoredThread | None, keep_consumed: int
) -> tuple[Recovered[S], int, int]:
    """Rebuild a thread from its latest full record and the steps after it.

    Returns the recovered thread, the full record's size and the bytes logged
    since it (the journal's compaction counters).
    """
    if stored is None:
        return Recovered(state=None, version=0, consumed=[], turn=None), 0, 0
    state: S | None = None
    consumed: list[str] = []
    turn: TurnCursor | None = None
    version = 0
    full_size = 0
    if stored.full is not None:
        full = codec.decode_full(stored.full, what=f"thread {thread_id!r} full record")
        if full.version != stored.full_version:
            raise SnapshotCorruptError(
                f"thread {thread_id!r}: full record says version {full.version}, "
                f"head says {stored.full_version}"
            )
        state, consumed, turn, version = full.state, list(full.consumed), full.turn, full.version
        full_size = len(stored.full)
    log_bytes = 0
    updates: list[dict[str, Any]] = []
    first = version + 1
    for data in stored.steps:
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
    if version != stored.version:
        raise SnapshotCorruptError(
            f"thread {thread_id!r}: head is at version {stored.version}, records reach {version}"
        )
    recovered = Recovered(
        state=state, version=version, consumed=consumed[-keep_consumed:], turn=turn
    )
    return recovered, full_size, log_bytes


FULL_RECORD_RATIO = 0.5
FULL_RECORD_FLOOR = 8192


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
    on). Older full records are dropped, so the stored size stays about the
    steps plus one state.

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

    async def open(self, keep_consumed: int) -> Recovered[S]:
        self.epoch = await self._store.acquire(self.thread_id)
        stored = await self._store.load(self.thread_id)
        recovered, self._full_size, self._log_bytes = replay(
            self._codec, self.thread_id, stored, keep_consumed
        )
        self.version = recovered.version
        return recovered

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
    ) -> None:
        """Durably append one step whose result is ``state``.

        ``recent`` is the list of recently consumed message ids (kept in full
        records). Raises what the store raises; on error nothing changes here.
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
            )
        )
        full = None
        if self._log_bytes + len(step) > max(
            self._full_size * FULL_RECORD_RATIO, FULL_RECORD_FLOOR
        ):
            full = self._codec.encode_full(
                FullRecord(version=version, state=state, consumed=list(recent), ts=now, turn=turn)
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
                consumed=None if dequeue is None else consumed,
                turn=None if turn is None else turn.message_id,
            )
        )
        if dequeue is not None and self._inboxed is not None:
            self._inboxed.discard(dequeue)
        self.version = version
        if full is None:
            self._log_bytes += len(step)
        else:
            self._full_size, self._log_bytes = len(full), 0

    async def delete(self) -> bool:
        existed = await self._store.delete(self.thread_id, epoch=self.epoch)
        self.version = 0
        self._full_size = self._log_bytes = 0
        return existed


async def load_thread(
    store: SnapshotStore, codec: Codec[S], thread_id: str, keep_consumed: int = 0
) -> Recovered[S]:
    """Read a thread without taking ownership (for ``get_state``)."""
    recovered, _, _ = replay(codec, thread_id, await store.load(thread_id), keep_consumed)
    return recovered


async def read_history(
    store: SnapshotStore, codec: Codec[S], thread_id: str, start: int = 1, stop: int | None = None
) -> list[StepInfo]:
    """The thread's step records, decoded, oldest first."""
    infos = []
    for offset, data in enumerate(await store.read_steps(thread_id, start, stop)):
        record = codec.decode_step(data, what=f"thread {thread_id!r} step {start + offset}")
        infos.append(
            StepInfo(
                version=record.version,
                kind=record.kind,
                updates=[codec.from_patch(p) for p in record.updates],
                ts=record.ts,
                turn=record.turn,
                consumed=record.consumed,
                error=record.error,
            )
        )
    return infos
