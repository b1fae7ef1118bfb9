"""Record framing: magic, format version, kind and a CRC32 around msgpack.

::

    0      2        3      4          8
    | "TL" | format | kind | crc32 BE | msgpack payload ...

Decoding never executes code: msgspec decodes into declared types only.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final, Generic, TypeVar

import msgspec

from threadline.actors import AgentState, SnapshotCorruptError, SnapshotFormatError
from threadline.actors._api import FullRecord, StepRecord, schema_info

S = TypeVar("S", bound=AgentState)

FORMAT_VERSION: Final = 1
_MAGIC: Final = b"TL"
_HEADER: Final = struct.Struct(">2sBcI")
STEP: Final = b"S"
FULL: Final = b"F"


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, kind, zlib.crc32(payload)) + payload


def unframe(data: bytes, kind: bytes, *, what: str) -> memoryview:
    """The payload of a framed record; typed errors for anything off."""
    if len(data) < _HEADER.size:
        raise SnapshotCorruptError(f"{what}: record is truncated ({len(data)} bytes)")
    magic, fmt, got_kind, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotCorruptError(f"{what}: not a threadline record")
    if fmt > FORMAT_VERSION:
        raise SnapshotFormatError(
            f"{what}: written in record format {fmt}; this threadline reads up to "
            f"{FORMAT_VERSION} (upgrade threadline to read it)"
        )
    payload = memoryview(data)[_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise SnapshotCorruptError(f"{what}: checksum mismatch (the stored bytes were damaged)")
    if got_kind != kind:
        raise SnapshotCorruptError(f"{what}: expected a {kind!r} record, found {got_kind!r}")
    return payload


class Codec(Generic[S]):
    """Encodes and decodes the records of threads whose state is ``schema``."""

    def __init__(self, schema: type[S]) -> None:
        self.schema = schema
        info = schema_info(schema)
        self.patch_type: Any = info.patch
        self._patch_fields = tuple(info.fields)
        self._encoder = msgspec.msgpack.Encoder()
        self._step_decoder = msgspec.msgpack.Decoder(StepRecord[self.patch_type])  # type: ignore[name-defined]
        self._full_decoder = msgspec.msgpack.Decoder(FullRecord[schema])  # type: ignore[valid-type]

    def to_patch(self, update: dict[str, Any]) -> Any:
        return self.patch_type(**update)

    def from_patch(self, patch: Any) -> dict[str, Any]:
        return {
            name: value
            for name in self._patch_fields
            if (value := getattr(patch, name)) is not msgspec.UNSET
        }

    def encode_step(self, record: StepRecord[Any]) -> bytes:
        return frame(STEP, self._encoder.encode(record))

    def encode_full(self, record: FullRecord[S]) -> bytes:
        return frame(FULL, self._encoder.encode(record))

    def decode_step(self, data: bytes, *, what: str) -> StepRecord[Any]:
        payload = unframe(data, STEP, what=what)
        try:
            return self._step_decoder.decode(payload)
        except _UNDECODABLE as exc:
            raise SnapshotCorruptError(f"{what}: cannot decode step record: {_why(exc)}") from exc

    def decode_full(self, data: bytes, *, what: str) -> FullRecord[S]:
        payload = unframe(data, FULL, what=what)
        try:
            return self._full_decoder.decode(payload)
        except _UNDECODABLE as exc:
            raise SnapshotCorruptError(
                f"{what}: cannot decode the state as {self.schema.__name__}: {_why(exc)}"
            ) from exc


# What decoding stored bytes can raise besides DecodeError: RecursionError
# for a record nested deeper than the stack allows (the door keeps
# threadline's own records far shallower, so only crafted or damaged bytes get
# there), and whatever a state class's own __post_init__ raises. Each means
# this record cannot be read: a corrupt thread, not a crash of whoever asked.
_UNDECODABLE: Final = (msgspec.DecodeError, RecursionError, TypeError, ValueError, OverflowError)


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return str(exc) if isinstance(exc, msgspec.DecodeError) else f"{type(exc).__name__}: {exc}"
