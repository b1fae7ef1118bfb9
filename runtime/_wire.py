"""What travels between a remote client and a worker: envelopes out, reply events back.

Envelopes travel framed like the store's inbox entries
(``threadline.persistence.encode_envelope``: format version, CRC32). A reply stream holds
``ReplyEvent`` records: the stream parts the sender asked for (``updates``,
``values``, ``custom``, ``messages``), then exactly one ``end`` (the reply:
a turn result, a thread snapshot or a bool) or ``error`` (the typed error's
class name and message). ``end`` and step events are written only after the
step they report is committed, so a reply read from the stream is durable.
"""

from __future__ import annotations

from typing import Any

import msgspec

import threadline.actors as _actors
from threadline.actors import ThreadlineError

_encoder = msgspec.msgpack.Encoder()


class ReplyEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    event: str
    data: Any = None
    version: int = 0


_event_decoder = msgspec.msgpack.Decoder(ReplyEvent)


def encode_event(event: ReplyEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(payload: bytes) -> ReplyEvent:
    return _event_decoder.decode(payload)


_DETAILS = ("thread_id", "step")
"""Keyword details some errors carry (``TurnFailedError``), sent along."""


def error_event(error: BaseException) -> ReplyEvent:
    data: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    for name in _DETAILS:
        if isinstance(value := getattr(error, name, None), str):
            data[name] = value
    return ReplyEvent(event="error", data=data)


def raise_error(data: Any) -> None:
    """Raise the typed error an ``error`` event describes (``ThreadlineError`` if unknown)."""
    name = str(data.get("type", "")) if isinstance(data, dict) else ""
    message = str(data.get("message", "")) if isinstance(data, dict) else str(data)
    cls = getattr(_actors, name, None)
    if isinstance(cls, type) and issubclass(cls, ThreadlineError):
        details = {k: data[k] for k in _DETAILS if isinstance(data, dict) and k in data}
        try:
            error = cls(message, **details)
        except TypeError:  # details this class does not take, or lacks
            error = ThreadlineError(f"{name}: {message}")
        raise error
    raise ThreadlineError(f"{name or 'error'}: {message}")
