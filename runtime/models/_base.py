"""What every chat model is: the ``ChatModel`` protocol and the chunks models stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from threadline.actors import AIMessage

if TYPE_CHECKING:
    from ..agent import ModelRequest


@runtime_checkable
class ChatModel(Protocol):
    """Anything with ``async def invoke(request) -> AIMessage``."""

    async def invoke(self, request: ModelRequest[Any]) -> AIMessage: ...


class MessageChunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of model output text, sent to ``stream(..., mode="messages")``.

    ``message_id`` is the id of the ``AIMessage`` being generated (the one the
    turn will store); ``index`` counts the chunks of that message from 0.
    Concatenating the ``content`` of a message's chunks gives its text.
    """

    content: str
    message_id: str
    index: int
