"""A bounded FIFO mailbox with a ``_nowait`` twin and statistics."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio
import msgspec

from ._errors import MailboxFullError

T = TypeVar("T")


class MailboxStatistics(msgspec.Struct, frozen=True, kw_only=True):
    size: int
    capacity: int
    waiting_senders: int


class Mailbox(Generic[T]):
    """Items stay in the deque until taken, so a cancelled waiter never loses one.

    (A memory object stream hands an item to a waiting receiver; if that
    receiver is cancelled in the same instant the item is gone. Here the
    consumer pops synchronously, which is why this is not a stream.)
    """

    __slots__ = ("_capacity", "_items", "_putting", "_space")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("mailbox capacity must be >= 1")
        self._capacity = capacity
        # Created lazily: an idle actor should cost little memory.
        self._items: deque[T] | None = None
        self._space: deque[anyio.Event] | None = None
        # Senders inside ``put`` (waiting for room, or woken and not yet run).
        self._putting = 0

    def __len__(self) -> int:
        return len(self._items) if self._items else 0

    @property
    def unused(self) -> bool:
        """Nothing queued and no sender inside ``put``.

        A sender woken for room leaves the wait queue before it runs; until it
        has put its item it still counts, so whoever drops an unused mailbox
        never drops one that a sender is about to put into.
        """
        return not self._items and not self._putting

    def put_nowait(self, item: T, *, thread_id: str = "") -> None:
        if self._items is None:
            self._items = deque()
        if len(self._items) >= self._capacity:
            raise MailboxFullError(
                f"mailbox of thread {thread_id!r} is full ({self._capacity} messages)"
            )
        self._items.append(item)

    async def put(self, item: T, *, thread_id: str = "") -> None:
        """Wait for room, then enqueue."""
        if len(self) < self._capacity:
            self.put_nowait(item, thread_id=thread_id)
            return
        self._putting += 1
        try:
            while len(self) >= self._capacity:
                event = anyio.Event()
                if self._space is None:
                    self._space = deque()
                self._space.append(event)
                try:
                    await event.wait()
                finally:
                    if event in self._space:
                        self._space.remove(event)
                    elif event.is_set() and self._space and len(self) < self._capacity:
                        # We were woken but may be leaving (cancelled): pass the wake-up on.
                        self._space.popleft().set()
            self.put_nowait(item, thread_id=thread_id)
        finally:
            self._putting -= 1

    def get_nowait(self) -> T | None:
        """The next item, or None when empty."""
        if not self._items:
            return None
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an empty deque still holds a 500-byte block
        if self._space:
            self._space.popleft().set()
        return item

    def drain(self) -> list[T]:
        """Take every queued item (used to fail them on shutdown)."""
        items = list(self._items or ())
        self._items = None
        while self._space:
            self._space.popleft().set()
        return items

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            size=len(self),
            capacity=self._capacity,
            waiting_senders=len(self._space or ()),
        )
