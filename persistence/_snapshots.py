"""The ``SnapshotStore`` protocol and the in-memory implementation.

A store keeps, per thread: a head (``version`` = steps committed, ``epoch`` =
fencing token of the current owner), the step records in version order, and
the latest full record. Records are opaque bytes here: framing, checksums and
decoding belong to the codec. Every commit is conditional on the version the
writer built on and on its epoch, so two owners can never fork a thread.

Deleting a thread leaves a tombstone head (version 0, epoch bumped) so a
writer that still holds the old epoch stays fenced out.
"""

from __future__ import annotations

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


class CommitRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Append ``step`` as version ``expected_version + 1``.

    Succeeds only if the stored version equals ``expected_version`` and the
    stored epoch equals ``epoch``. With ``full``, the same commit stores a full
    record at the new version and drops older full records.
    """

    thread_id: str
    expected_version: int
    epoch: int
    step: bytes
    full: bytes | None = None


class AcquireRequest(msgspec.Struct, frozen=True):
    """Take ownership of ``thread_id`` (stores that group-commit queue it with
    the commits, so a burst of activations shares their round trips)."""

    thread_id: str


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

    async def threads(self) -> list[str]:
        """Ids of the threads with at least one committed step, sorted."""
        ...

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        """Drop the thread's records, leaving a tombstone with a bumped epoch.

        With ``epoch``, fenced like a commit. Returns whether the thread had steps.
        """
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
    __slots__ = ("epoch", "full", "full_version", "steps")

    def __init__(self) -> None:
        self.epoch = 0
        self.steps: list[bytes] = []
        self.full: bytes | None = None
        self.full_version = 0


class MemorySnapshotStore(Reentrant):
    """Keeps records in this process's memory: for tests and ephemeral threads.

    Every method runs without awaiting in between its check and its write, so
    each is atomic with respect to the event loop. The head is the number of
    steps, so it cannot disagree with them. Entering it opens nothing.
    """

    def __init__(self) -> None:
        self._threads: dict[str, _MemoryThread] = {}

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
        t.steps.append(request.step)
        if request.full is not None:
            t.full = request.full
            t.full_version = len(t.steps)

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        t = self._threads.get(thread_id)
        if t is None:
            return []
        return t.steps[max(start, 1) - 1 : stop]

    async def threads(self) -> list[str]:
        return sorted(tid for tid, t in self._threads.items() if t.steps)

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        t = self._threads.get(thread_id)
        if t is None:
            return False
        if epoch is not None:
            check_fence(thread_id, t.epoch, epoch)
        existed = bool(t.steps)
        t.steps, t.full, t.full_version = [], None, 0
        t.epoch += 1
        return existed
