"""``ScriptedModel``: a deterministic model for tests, examples and benchmarks."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from threadline.actors import AIMessage
from threadline.actors._api import new_id

if TYPE_CHECKING:
    from ..agent import ModelRequest

Response = str | AIMessage
Responder = Callable[["ModelRequest[Any]"], Response | Awaitable[Response]]


def _as_ai(value: object) -> AIMessage:
    if isinstance(value, str):
        return AIMessage(value, id=new_id())
    if isinstance(value, AIMessage):
        # Scripts reuse messages; a reused id would *replace* the earlier one.
        return msgspec.structs.replace(value, id=new_id())
    raise TypeError(
        f"a scripted response must be a str or an AIMessage, got {type(value).__name__}"
    )


class ScriptedModel:
    """A deterministic model for tests, examples, benchmarks and the offline demo.

    ``ScriptedModel(["hi", AIMessage("", tool_calls=[...]), ...])`` answers in
    order (cycling when ``cycle``); ``ScriptedModel(fn)`` answers ``fn(request)``
    (sync or async), which can derive the answer from the conversation so that
    it is the same after a crash and a resume.
    """

    def __init__(
        self,
        responses: Sequence[Response] | Responder,
        *,
        cycle: bool = True,
        name: str = "scripted",
    ) -> None:
        self._responder: Responder | None = None
        self._responses: list[Response] = []
        if callable(responses):
            self._responder = responses
        else:
            self._responses = list(responses)
            if not self._responses:
                raise ValueError("ScriptedModel needs at least one response")
        self._cycle = cycle
        self.name = name
        self.calls = 0

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage:
        index = self.calls
        self.calls += 1
        if self._responder is not None:
            value = self._responder(request)
            if inspect.isawaitable(value):
                value = await value
            return _as_ai(value)
        if index >= len(self._responses) and not self._cycle:
            raise RuntimeError(f"ScriptedModel ran out of responses after {index} calls")
        return _as_ai(self._responses[index % len(self._responses)])
