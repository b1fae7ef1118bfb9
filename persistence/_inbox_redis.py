"""The durable inbox over Redis: one stream per partition, and per-run reply streams.

Keys (every key of a partition carries its hash tag, so each script runs on a
Redis Cluster)::

    <prefix>:{pNNN}:in              stream   envelopes, consumer group "w"
    <prefix>:{pNNN}:idem:<msg id>   string   the entry id of a message, PX 24 h
    <prefix>:{pNNN}:dlq             stream   dead letters (entry, reason)
    <prefix>:{pNNN}:r:<run id>      stream   reply events of one run, expires 15 min
                                             after its last event

``enqueue`` is idempotent per message id (a retried ``tell`` returns the entry
it appended the first time) and refuses when the partition's backlog is over
its cap. An entry stays in the stream until its consumer acknowledges it
(``XACK`` + ``XDEL``) after the step that consumed it is committed: nothing is
trimmed unread, and what a dead owner had read stays pending for the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
import redis.asyncio
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from threadline.actors import OverloadedError

from ._partitions import KeyLayout, PartitionKeys
from ._redis_client import mapped

GROUP: Final = "w"
IDEM_TTL_MS: Final = 24 * 3600 * 1000
REPLY_TTL_MS: Final = 15 * 60 * 1000
REPLY_MAXLEN: Final = 10_000

# KEYS: inbox, idem. ARGV: payload, idem ttl ms, max backlog, always ("1": append
# even if the id was seen: the sender waits for a reply, and the consumer answers a
# repeated id as a duplicate). Returns the entry id (a retried tell gets the first
# one) or the error OVERLOADED.
_ENQUEUE_LUA: Final = """
local seen = redis.call('GET', KEYS[2])
if seen and ARGV[4] ~= '1' then
  return seen
end
if tonumber(ARGV[3]) > 0 and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return redis.error_reply('OVERLOADED')
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
return id
"""

# KEYS: inbox. ARGV: entry ids. Acknowledged entries are deleted at once: the
# stream holds only what some consumer still has to process.
_ACK_LUA: Final = """
local n = redis.call('XACK', KEYS[1], 'w', unpack(ARGV))
redis.call('XDEL', KEYS[1], unpack(ARGV))
return n
"""

# KEYS: inbox, dlq. ARGV: entry id, reason.
_DEAD_LETTER_LUA: Final = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local payload = ''
if entry[1] then
  payload = entry[1][2][2]
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '100000', '*',
  'entry', ARGV[1], 'e', payload, 'reason', ARGV[2])
redis.call('XACK', KEYS[1], 'w', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: reply stream. ARGV: ttl ms, maxlen, then the events' payloads.
_PUBLISH_LUA: Final = """
local last
for i = 3, #ARGV do
  last = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return last
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamEntry(msgspec.Struct, frozen=True):
    """One entry of a partition inbox: its stream id and the encoded envelope."""

    entry_id: str
    payload: bytes


class RedisInbox:
    """The partition inboxes and reply streams of one deployment (``layout``).

    The client is borrowed: the caller opens and closes it. It must not decode
    responses.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        layout: KeyLayout,
        *,
        max_backlog: int = 100_000,
    ) -> None:
        self._client = client
        self.layout = layout
        self.max_backlog = max_backlog
        self._enqueue: AsyncScript = client.register_script(_ENQUEUE_LUA)
        self._ack: AsyncScript = client.register_script(_ACK_LUA)
        self._dead_letter: AsyncScript = client.register_script(_DEAD_LETTER_LUA)
        self._publish: AsyncScript = client.register_script(_PUBLISH_LUA)

    def keys(self, partition: int) -> PartitionKeys:
        return self.layout.partition(partition)

    # -- senders -------------------------------------------------------------

    async def enqueue(
        self, thread_id: str, message_id: str, payload: bytes, *, always: bool = False
    ) -> str:
        """Append an envelope to its thread's partition inbox; the entry id.

        Durable when it returns, as far as the server's ``appendfsync`` makes it.
        A message id seen in the last 24 h is not appended again (the first
        entry's id is returned), unless ``always``: a sender waiting for a reply
        needs its envelope consumed, and the thread answers it as a duplicate.
        """
        keys = self.layout.for_thread(thread_id)
        with mapped("inbox enqueue"):
            try:
                reply = await self._enqueue(
                    keys=[keys.inbox, keys.idem(message_id)],
                    args=[payload, IDEM_TTL_MS, self.max_backlog, "1" if always else "0"],
                )
            except ResponseError as exc:
                if "OVERLOADED" not in str(exc):
                    raise
                raise OverloadedError(
                    f"partition {keys.partition} of thread {thread_id!r} has "
                    f"{self.max_backlog} unprocessed messages; try again later"
                ) from None
        return _text(reply)

    # -- the partition's owner -------------------------------------------------

    async def ensure_group(self, partition: int) -> None:
        """Create the consumer group (from the stream's start) if it is missing."""
        inbox = self.keys(partition).inbox
        try:
            with mapped("inbox group"):
                await self._client.xgroup_create(inbox, GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, partition: int, consumer: str) -> list[StreamEntry]:
        """Every entry read but not acknowledged (by a previous owner, or by us),
        moved to ``consumer``, in stream order."""
        inbox = self.keys(partition).inbox
        entries: list[StreamEntry] = []
        start = "0-0"
        while True:
            with mapped("inbox claim"):
                reply = await self._client.xautoclaim(
                    inbox, GROUP, consumer, min_idle_time=0, start_id=start, count=100
                )
            start = _text(reply[0])
            entries.extend(self._entries(reply[1]))
            if start == "0-0":
                return entries

    async def read(
        self, partition: int, consumer: str, *, count: int = 100, block_ms: int = 500
    ) -> list[StreamEntry]:
        """New entries for ``consumer`` (waits up to ``block_ms`` for one)."""
        inbox = self.keys(partition).inbox
        with mapped("inbox read"):
            reply: Any = await self._client.xreadgroup(
                GROUP, consumer, {inbox: ">"}, count=count, block=block_ms
            )
        if not reply:
            return []
        return self._entries(reply[0][1])

    @staticmethod
    def _entries(raw: Sequence[Any]) -> list[StreamEntry]:
        out = []
        for entry_id, fields in raw:
            if fields is None:  # deleted while pending
                continue
            payload = fields.get(b"e", b"") if isinstance(fields, dict) else b""
            out.append(StreamEntry(_text(entry_id), payload))
        return out

    async def ack(self, partition: int, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            with mapped("inbox ack"):
                await self._ack(keys=[self.keys(partition).inbox], args=list(entry_ids))

    async def dead_letter(self, partition: int, entry_id: str, reason: str) -> None:
        keys = self.keys(partition)
        with mapped("inbox dead-letter"):
            await self._dead_letter(keys=[keys.inbox, keys.dlq], args=[entry_id, reason[:2000]])

    async def dead_letters(self, partition: int) -> list[tuple[str, bytes, str]]:
        """(entry id, payload, reason) of the partition's dead letters, oldest first."""
        with mapped("inbox dead letters"):
            raw: Any = await self._client.xrange(self.keys(partition).dlq)
        return [(_text(f[b"entry"]), f[b"e"], _text(f[b"reason"])) for _, f in raw]

    async def backlog(self, partition: int) -> int:
        with mapped("inbox backlog"):
            return int(await self._client.xlen(self.keys(partition).inbox))

    # -- replies ---------------------------------------------------------------

    async def publish(self, reply_key: str, events: Sequence[bytes]) -> None:
        if events:
            with mapped("reply publish"):
                await self._publish(keys=[reply_key], args=[REPLY_TTL_MS, REPLY_MAXLEN, *events])

    async def replies(
        self, reply_key: str, after: str, *, block_ms: int = 1000
    ) -> list[tuple[str, bytes]]:
        """Events of a reply stream after the id ``after`` (``"0-0"``: from the start)."""
        with mapped("reply read"):
            reply: Any = await self._client.xread({reply_key: after}, block=block_ms, count=500)
        if not reply:
            return []
        return [(_text(i), f[b"e"]) for i, f in reply[0][1]]
