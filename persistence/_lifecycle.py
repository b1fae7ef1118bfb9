"""Re-entrant ``async with`` for the stores: open on the first entry, close on the last exit."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["ExcInfo", "Reentrant"]

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
"""What ``__aexit__`` received: the exception leaving the outermost block, if any."""


class Reentrant:
    """A store that may be entered again while entered (nested ``async with``).

    The first entry calls ``_open`` (if it raises, the store stays closed and
    the next entry tries again); the matching last exit calls ``_close``. An
    exit without an entry does nothing.
    """

    _entered: int = 0

    async def __aenter__(self) -> Self:
        if self._entered == 0:
            await self._open()
        self._entered += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entered == 0:
            return
        self._entered -= 1
        if self._entered == 0:
            await self._close((exc_type, exc, tb))

    async def _open(self) -> None:
        """Acquire what the store needs; on failure release it and raise."""

    async def _close(self, exc_info: ExcInfo) -> None:
        """Release what ``_open`` acquired."""
