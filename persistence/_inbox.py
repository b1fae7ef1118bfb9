"""Inbox entries: an ``Envelope`` framed like the records (magic, format, kind, CRC32).

An entry is written when ``tell`` is acknowledged and read back by a system
that restarts, possibly a newer threadline with a changed state schema: the
decoder checks the frame, decodes only declared types (msgspec, never code)
and validates the update against the schema again, so an entry either turns
into the envelope that was told or into a typed error (and is dead-lettered).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from threadline.actors import AgentState, SnapshotCorruptError, normalize_update
from threadline.actors._api import Envelope

from ._codec import frame, unframe

__all__ = ["ENVELOPE", "decode_envelope", "encode_envelope", "read_envelope"]

ENVELOPE: Final = b"E"
"""The frame kind of an inbox entry."""

# What decoding stored bytes can raise (RecursionError: nested too deep).
_UNDECODABLE: Final = (msgspec.DecodeError, RecursionError, TypeError, ValueError, OverflowError)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    """The framed msgpack form of ``envelope`` (messages become tagged dicts)."""
    return frame(ENVELOPE, _encoder.encode(envelope))


def read_envelope(data: bytes, *, what: str = "inbox entry") -> Envelope:
    """The envelope framed in ``data``, not validated further (``SnapshotCorruptError``
    or ``SnapshotFormatError`` for anything else)."""
    payload = unframe(data, ENVELOPE, what=what)
    try:
        return _decoder.decode(payload)
    except _UNDECODABLE as exc:
        raise SnapshotCorruptError(
            f"{what}: cannot decode the envelope: {type(exc).__name__}: {exc}"
        ) from exc


def decode_envelope(
    data: bytes, schema: type[AgentState], *, thread_id: str, message_id: str
) -> Envelope:
    """The envelope an inbox entry holds, its update validated against ``schema``.

    Raises ``SnapshotCorruptError`` (or ``SnapshotFormatError``) if the bytes
    are not an intact entry, are not an input for ``thread_id`` with id
    ``message_id``, and ``InvalidUpdateError`` if the update no longer fits
    ``schema``.
    """
    what = f"inbox entry {message_id!r} of thread {thread_id!r}"
    envelope = read_envelope(data, what=what)
    if (envelope.thread_id, envelope.message_id) != (thread_id, message_id):
        raise SnapshotCorruptError(
            f"{what}: holds message {envelope.message_id!r} of thread {envelope.thread_id!r}"
        )
    if envelope.kind != "input":
        raise SnapshotCorruptError(f"{what}: a {envelope.kind!r} envelope, not an input")
    update: Any = normalize_update(schema, envelope.update, source="inbox")
    return msgspec.structs.replace(envelope, update=update)
