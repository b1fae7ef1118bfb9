"""The ``SnapshotStore`` protocol and the in-memory implementation.

A store keeps, per thread: a head (``version`` = steps committed, ``epoch`` =
fencing token of the current owner), the step records in version order, the
latest full record, and the older full records the writer asked it to keep
(``CommitRequest.keep_full``: checkpoints, from which ``load_at`` rebuilds a
past version without replaying the whole history). Records are opaque bytes
here: framing, checksums and decoding belong to the codec. Every commit is
conditional on the version the writer built on and on its epoch, so two owners
can never fork a thread.

Deleting a thread leaves a tombstone head (version 0, epoch bumped) so a
writer that still holds the old epoch stays fenced out.

A store also keeps each thread's **inbox**: the messages told to it
(``enqueue``, grouped with the commits) and not yet consumed, in the order
they arrived. The step that consumes one removes it in the same commit
(``CommitRequest.consumed``), and the head remembers which turn is in flight
(``CommitRequest.turn``), so a restarted system finds every thread with work
left (``recoverable_threads``) without reading any record. An inbox entry that
cannot be decoded is moved aside with its reason (``dead_letter``). Deleting a
thread leaves its inbox alone: what was told after the delete still counts.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import msgspec

from threadline.actors import ConflictError, FencedError, SnapshotCorruptError

from ._lifecycle import Reentrant


class StoredThread(msgspec.Struct, frozen=True, kw_only=True):
    """What ``load`` returns: the head, the latest full record, the steps after it."""

    version: int
    epoch: int
    full: bytes | None
    full_version: int
    steps: list[bytes]
    """Records of versions ``full_version + 1 .. version``, ascending."""


class StoredVersion(msgspec.Struct, frozen=True, kw_only=True):
    """What ``load_at(thread_id, version)`` returns: the head's version, the
    newest full record at or before ``version`` and the steps up to ``version``.

    ``steps`` are the records of versions ``max(full_version, 1) .. version``:
    with a full record, the step of its own version comes first (the reader
    checks that the two were written together). Without one (``full_version``
    0) they start at version 1. ``version`` out of ``1 .. head``: no steps.
    """

    head: int
    full: bytes | None
    full_version: int
    steps: list[bytes]


class CommitRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Append ``step`` as version ``expected_version + 1``.

    Succeeds only if the stored version equals ``expected_version`` and the
    stored epoch equals ``epoch``. With ``full``, the same commit stores a full
    record at the new version; the previous latest full record is dropped,
    unless ``keep_full``: then it stays as a checkpoint for ``load_at``.
    """

    thread_id: str
    expected_version: int
    epoch: int
    step: bytes
    full: bytes | None = None
    keep_full: bool = False
    consumed: str | None = None
    """The id of the inbox entry this step consumed: removed in the same commit."""
    turn: str | None = None
    """The message id of the turn still in flight after this step (None: no turn)."""


class AcquireRequest(msgspec.Struct, frozen=True):
    """Take ownership of ``thread_id`` (stores that group-commit queue it with
    the commits, so a burst of activations shares their round trips)."""

    thread_id: str


class EnqueueRequest(msgspec.Struct, frozen=True):
    """Append ``envelope`` to the inbox of ``thread_id`` unless ``message_id`` is there
    (stores that group-commit queue it with the commits: one transaction for many)."""

    thread_id: str
    message_id: str
    envelope: bytes


class InboxEntry(msgspec.Struct, frozen=True):
    """A message told to a thread and not consumed yet: its id and encoded envelope."""

    message_id: str
    envelope: bytes


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An inbox entry moved aside (it could not be decoded), with the reason."""

    message_id: str
    envelope: bytes
    reason: str
    ts: float


class RecoverableThread(msgspec.Struct, frozen=True, kw_only=True):
    """A thread with work left: inbox entries, a turn in flight (``turn``), or both."""

    thread_id: str
    turn: str | None = None
    """The message id of the turn the head says is in flight (None: no turn)."""


@runtime_checkable
class SnapshotStore(Protocol):
    """Durable, conditional storage of a thread's step records.

    Stores are async context managers (they may own a writer task); entering
    an open store again is allowed and the last exit closes it.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def acquire(self, thread_id: str) -> int:
        """Bump the thread's fencing epoch and return it (creating a version-0 head).

        Any writer holding an older epoch is fenced from then on.
        """
        ...

    async def load(self, thread_id: str) -> StoredThread | None:
        """The thread's records, or None if it has no head at all."""
        ...

    async def load_at(self, thread_id: str, version: int) -> StoredVersion | None:
        """What rebuilds ``version``: the newest full record (latest or kept) at or
        before it and the steps after that; None if the thread has no head.

        One consistent read; costs the steps since that full record, not the
        thread's history.
        """
        ...

    async def commit(self, request: CommitRequest) -> None:
        """Durably append one step; return only once it is durable.

        Raises ``FencedError`` if the stored epoch is newer than the request's,
        ``ConflictError`` if the stored version is not ``expected_version``,
        ``StoreUnavailableError`` if the backend failed.
        """
        ...

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        """Step records of versions ``start .. stop`` (inclusive; None = to the head)."""
        ...

    async def read_steps_before(
        self, thread_id: str, before: int | None, limit: int
    ) -> list[bytes]:
        """The last ``limit`` (>= 1) step records below version ``before`` (None: up
        to the head), oldest first: one page of history, read backwards."""
        ...

    async def threads(self) -> list[str]:
        """Ids of the threads with at least one committed step, sorted."""
        ...

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        """Drop the thread's records, leaving a tombstone with a bumped epoch.

        With ``epoch``, fenced like a commit. Returns whether the thread had steps.
        The inbox is kept.
        """
        ...

    async def enqueue(self, thread_id: str, message_id: str, envelope: bytes) -> None:
        """Durably append a message to the thread's inbox; return only once it is durable.

        Idempotent: if ``message_id`` is already in the inbox nothing changes
        (a message already consumed and removed is appended again; its
        consumer recognizes the id). Raises ``StoreUnavailableError`` if the
        backend failed (the outcome is then unknown: enqueue again).
        """
        ...

    async def pending(self, thread_id: str) -> list[InboxEntry]:
        """The thread's inbox, oldest first."""
        ...

    async def dequeue(self, thread_id: str, message_id: str) -> bool:
        """Remove an inbox entry consumed without a commit (a duplicate); whether it was there."""
        ...

    async def dead_letter(self, thread_id: str, message_id: str, reason: str) -> bool:
        """Move an inbox entry aside, to the dead letters, with ``reason``; whether it was there."""
        ...

    async def dead_letters(self, thread_id: str) -> list[DeadLetter]:
        """The thread's dead letters, oldest first."""
        ...

    async def recoverable_threads(self) -> list[RecoverableThread]:
        """Every thread with inbox entries or a turn in flight, sorted by id."""
        ...


def check_fence(thread_id: str, stored_epoch: int, epoch: int) -> None:
    """Raise ``FencedError`` if a newer owner than ``epoch`` holds the thread."""
    if stored_epoch > epoch:
        raise FencedError(
            f"thread {thread_id!r} is owned by epoch {stored_epoch}; this writer holds {epoch}"
        )


def check_head(
    thread_id: str, stored_version: int | None, stored_epoch: int, version: int, epoch: int
) -> None:
    """The conditional-commit rule shared by every store (raises on violation)."""
    check_fence(thread_id, stored_epoch, epoch)
    if stored_version is None or stored_version != version or stored_epoch != epoch:
        raise ConflictError(
            f"thread {thread_id!r} is at version {stored_version} (epoch {stored_epoch}); "
            f"this writer built on version {version} (epoch {epoch})"
        )


def check_records(thread_id: str, stored_version: int | None, last_step: int) -> None:
    """The head must sit on the last stored step: ``SnapshotCorruptError`` if not.

    ``stored_version`` is the head's version (None: there is no head) and
    ``last_step`` the highest step version stored (0: none). Every store
    checks this when it loads a thread and before it appends to one: a head
    behind its steps would make the next commit collide with a stored step,
    and one ahead of them names steps that are gone. Only that thread is
    affected; deleting it is the way out.
    """
    if (stored_version or 0) == last_step:
        return
    head = "no head" if stored_version is None else f"a head at version {stored_version}"
    raise SnapshotCorruptError(
        f"thread {thread_id!r} has {head} but step records up to version {last_step}"
    )


class _MemoryThread:
    __slots__ = ("checkpoints", "epoch", "full", "full_version", "steps", "turn")

    def __init__(self) -> None:
        self.epoch = 0
        self.steps: list[bytes] = []
        self.full: bytes | None = None
        self.full_version = 0
        self.turn: str | None = None
        self.checkpoints: dict[int, bytes] = {}


class MemorySnapshotStore(Reentrant):
    """Keeps records in this process's memory: for tests and ephemeral threads.

    Every method runs without awaiting in between its check and its write, so
    each is atomic with respect to the event loop. The head is the number of
    steps, so it cannot disagree with them. Entering it opens nothing.
    """

    def __init__(self) -> None:
        self._threads: dict[str, _MemoryThread] = {}
        # Per thread, message id -> envelope in arrival order (dicts keep it).
        self._inbox: dict[str, dict[str, bytes]] = {}
        self._dead: dict[str, list[DeadLetter]] = {}

    async def acquire(self, thread_id: str) -> int:
        t = self._threads.get(thread_id)
        if t is None:
            t = self._threads[thread_id] = _MemoryThread()
        t.epoch += 1
        return t.epoch

    async def load(self, thread_id: str) -> StoredThread | None:
        t = self._threads.get(thread_id)
        if t is None:
            return None
        return StoredThread(
            version=len(t.steps),
            epoch=t.epoch,
            full=t.full,
            full_version=t.full_version,
            steps=t.steps[t.full_version :],
        )

    async def commit(self, request: CommitRequest) -> None:
        t = self._threads.get(request.thread_id)
        check_head(
            request.thread_id,
            None if t is None else len(t.steps),
            0 if t is None else t.epoch,
            request.expected_version,
            request.epoch,
        )
        assert t is not None
        if not t.steps:
            t.checkpoints.clear()
        t.steps.append(request.step)
        t.turn = request.turn
        if request.full is not None:
            if request.keep_full and t.full is not None and t.full_version:
                t.checkpoints[t.full_version] = t.full
            t.full = request.full
            t.full_version = len(t.steps)
        if request.consumed is not None:
            self._remove(request.thread_id, request.consumed)

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        t = self._threads.get(thread_id)
        if t is None:
            return []
        return t.steps[max(start, 1) - 1 : stop]

    async def read_steps_before(
        self, thread_id: str, before: int | None, limit: int
    ) -> list[bytes]:
        t = self._threads.get(thread_id)
        if t is None:
            return []
        stop = len(t.steps) if before is None else max(min(before - 1, len(t.steps)), 0)
        return t.steps[max(stop - limit, 0) : stop]

    async def load_at(self, thread_id: str, version: int) -> StoredVersion | None:
        t = self._threads.get(thread_id)
        if t is None:
            return None
        head = len(t.steps)
        if not 1 <= version <= head:
            return StoredVersion(head=head, full=None, full_version=0, steps=[])
        full: bytes | None
        if t.full is not None and 0 < t.full_version <= version:
            full_version, full = t.full_version, t.full
        else:
            full_version = max((v for v in t.checkpoints if v <= version), default=0)
            full = t.checkpoints.get(full_version)
        return StoredVersion(
            head=head,
            full=full,
            full_version=full_version,
            steps=t.steps[max(full_version, 1) - 1 : version],
        )

    async def threads(self) -> list[str]:
        return sorted(tid for tid, t in self._threads.items() if t.steps)

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        t = self._threads.get(thread_id)
        if t is None:
            return False
        if epoch is not None:
            check_fence(thread_id, t.epoch, epoch)
        existed = bool(t.steps)
        t.steps, t.full, t.full_version, t.turn = [], None, 0, None
        t.checkpoints = {}
        t.epoch += 1
        return existed

    # -- the inbox -----------------------------------------------------------

    def _remove(self, thread_id: str, message_id: str) -> bytes | None:
        inbox = self._inbox.get(thread_id)
        if inbox is None:
            return None
        envelope = inbox.pop(message_id, None)
        if not inbox:
            del self._inbox[thread_id]
        return envelope

    async def enqueue(self, thread_id: str, message_id: str, envelope: bytes) -> None:
        self._inbox.setdefault(thread_id, {}).setdefault(message_id, envelope)

    async def pending(self, thread_id: str) -> list[InboxEntry]:
        return [InboxEntry(mid, env) for mid, env in self._inbox.get(thread_id, {}).items()]

    async def dequeue(self, thread_id: str, message_id: str) -> bool:
        return self._remove(thread_id, message_id) is not None

    async def dead_letter(self, thread_id: str, message_id: str, reason: str) -> bool:
        envelope = self._remove(thread_id, message_id)
        if envelope is None:
            return False
        dead = self._dead.setdefault(thread_id, [])
        dead[:] = [d for d in dead if d.message_id != message_id]
        dead.append(
            DeadLetter(message_id=message_id, envelope=envelope, reason=reason, ts=time.time())
        )
        return True

    async def dead_letters(self, thread_id: str) -> list[DeadLetter]:
        return list(self._dead.get(thread_id, ()))

    async def recoverable_threads(self) -> list[RecoverableThread]:
        turns = {tid: t.turn for tid, t in self._threads.items() if t.turn is not None}
        return [
            RecoverableThread(thread_id=tid, turn=turns.get(tid))
            for tid in sorted(turns.keys() | self._inbox.keys())
        ]
