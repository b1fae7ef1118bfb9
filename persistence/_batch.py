"""Group commit: one writer task turns concurrent submissions into batches.

Submitters queue an item and wait for its own result. A single writer task
takes everything queued (up to ``max_batch``), hands it to ``flush`` in one
call and delivers one result per item. While a flush runs new items pile up,
so batches form by themselves under load and a lone commit is not delayed
(there are no timers).

The writer runs in a task group owned by the :class:`GroupCommitter`, which the
store enters in its ``__aenter__`` and exits in its ``__aexit__`` (both in the
same task, as anyio requires).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, Self, TypeVar

import anyio
import anyio.abc

from threadline.actors import PersistenceError, StoreUnavailableError

__all__ = ["FlushFn", "GroupCommitter", "unavailable"]

T = TypeVar("T")

FlushFn = Callable[[Sequence[T]], Awaitable[Sequence[object]]]
"""Writes a batch; returns one result per item: an exception is raised to that
item's submitter, anything else (None for a plain commit) is returned to it."""


class _Slot(Generic[T]):
    __slots__ = ("done", "item", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = anyio.Event()
        self.result: object = None

    def resolve(self, result: object) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()


def unavailable(message: str, cause: BaseException) -> StoreUnavailableError:
    """``StoreUnavailableError(message)`` caused by ``cause``: an item's result, returned
    rather than raised (each submitter raises its own instance)."""
    exc = StoreUnavailableError(message)
    exc.__cause__ = cause
    return exc


def _again(exc: PersistenceError) -> PersistenceError:
    """A fresh copy of a store's error for one submitter: same type, message and cause."""
    copy = type(exc)(*exc.args)
    copy.__cause__ = exc.__cause__ or exc
    return copy


class GroupCommitter(Generic[T]):
    """Batches submitted items through a single writer task.

    ``submit`` returns once the item's batch was flushed and raises the item's
    error, if any. If ``flush`` raises a ``PersistenceError`` (the store says
    what failed: unavailable, corrupt), every item of the batch gets its own
    error of that type and message; if it raises anything else, its own
    ``StoreUnavailableError`` whose ``__cause__`` is the exception. A submitter
    that is cancelled while waiting does not disturb the batch (its item may
    still be written).

    Closing stops accepting items, flushes what is queued (shielded, at most
    ``close_timeout`` seconds; what cannot be flushed in time fails with
    ``StoreUnavailableError``) and ends the writer task.
    """

    def __init__(
        self,
        flush: FlushFn[T],
        *,
        max_batch: int = 512,
        close_timeout: float = 10.0,
        name: str = "threadline-group-commit",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._flush = flush
        self._max_batch = max_batch
        self._close_timeout = close_timeout
        self._name = name
        self._queue: deque[_Slot[T]] = deque()
        self._wakeup = anyio.Event()
        self._accepting = False
        self._closing = False
        self._finished = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._finished.is_set():
            raise RuntimeError("a GroupCommitter can only be entered once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._accepting = True
        tg.start_soon(self._run, name=self._name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tg = self._tg
        if tg is None:
            return
        self._tg = None
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        # The writer drains the queue and ends by itself; bound the wait so a
        # hung backend cannot hang the shutdown, then cancel it (its final
        # flush is shielded and bounded as well).
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._close_timeout):
                await self._finished.wait()
            if not self._finished.is_set():
                tg.cancel_scope.cancel()
        # Whatever brought us here (an exception, a cancellation) keeps
        # propagating from the caller; the task group only has to wait for the
        # writer, which never raises on its own.
        await tg.__aexit__(None, None, None)

    async def submit(self, item: T) -> object:
        """Queue ``item``, wait until its batch is flushed, return its result."""
        if not self._accepting:
            raise StoreUnavailableError("store is closed")
        slot = _Slot(item)
        self._queue.append(slot)
        self._wakeup.set()
        await slot.done.wait()
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    async def _next_batch(self) -> list[_Slot[T]]:
        while not self._queue:
            if self._closing:
                return []
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        n = min(len(self._queue), self._max_batch)
        return [self._queue.popleft() for _ in range(n)]

    async def _flush_batch(self, batch: list[_Slot[T]]) -> None:
        try:
            results = await self._flush([slot.item for slot in batch])
            if len(results) != len(batch):
                raise RuntimeError(  # noqa: TRY301 - a bug in flush: fail the batch
                    f"flush returned {len(results)} results for {len(batch)} items"
                )
        except PersistenceError as exc:
            # The store already said what failed: same type, message and cause.
            for slot in batch:
                slot.resolve(_again(exc))
            return
        except Exception as exc:
            for slot in batch:
                slot.resolve(unavailable(f"commit failed: {exc!r}", exc))
            return
        except BaseException as exc:
            # Cancelled mid-flush: the outcome is unknown.
            for slot in batch:
                slot.resolve(unavailable("store closed while committing; outcome unknown", exc))
            raise
        for slot, result in zip(batch, results, strict=True):
            slot.resolve(result)

    async def _run(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if not batch:
                    return
                await self._flush_batch(batch)
        finally:
            self._accepting = False
            self._closing = True
            # Flush what is still queued (after a close, or when the writer was
            # cancelled): shielded, but bounded.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._close_timeout):
                while self._queue:
                    n = min(len(self._queue), self._max_batch)
                    await self._flush_batch([self._queue.popleft() for _ in range(n)])
            while self._queue:
                self._queue.popleft().resolve(
                    StoreUnavailableError("store closed before the commit was written")
                )
            self._finished.set()
