"""``ModelFallbackMiddleware``: try other models when the model call fails."""

from __future__ import annotations

from typing import Any

from threadline.actors import (
    AIMessage,
)

from ...models import ChatModel
from .._middleware import AgentMiddleware, ModelHandler
from .._requests import ModelRequest


class ModelFallbackMiddleware(AgentMiddleware):
    """When the model call fails, try ``first_fallback``, then each of ``more``,
    in order; the last error is raised if all of them fail."""

    def __init__(self, first_fallback: ChatModel, *more: ChatModel) -> None:
        models = (first_fallback, *more)
        for m in models:
            if not callable(getattr(m, "invoke", None)):
                raise TypeError(f"a fallback must be a ChatModel with async invoke(), got {m!r}")
        self.models: tuple[ChatModel, ...] = models

    async def wrap_model_call(self, request: ModelRequest[Any], handler: ModelHandler) -> AIMessage:
        try:
            return await handler(request)
        except Exception as exc:
            error = exc
        for model in self.models:
            try:
                return await handler(request.override(model=model))
            except Exception as exc:
                error = exc
        raise error
