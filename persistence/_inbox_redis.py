"""The durable inbox over Redis: one stream per partition, and per-run reply streams.

Keys (every key of a partition carries its hash tag, so each script runs on a
Redis Cluster)::

    <prefix>:{pNNN}:in              stream   envelopes (fields e: envelope, t: thread id),
                                             consumer group "w"
    <prefix>:{pNNN}:queued          hash     thread id -> entries in the inbox not yet
                                             acknowledged (the per-thread queue cap)
    <prefix>:{pNNN}:idem:<msg id>   string   the entry id of a message, PX 24 h
    <prefix>:{pNNN}:dlq             stream   dead letters (entry, reason)
    <prefix>:{pNNN}:r:<run id>      stream   reply events of one run, expires 15 min
                                             after its last event

``enqueue`` is idempotent per message id (a retried ``tell`` returns the entry
it appended the first time); it refuses with ``MailboxFullError`` when the
thread already has ``max_queued`` unacknowledged entries, and with
``OverloadedError`` when the partition's backlog is over its cap; a refused
message is not appended. An entry stays in the stream until its consumer
acknowledges it (``XACK`` + ``XDEL``, and the thread's queued count goes down)
after the turn that consumed it is over: nothing is trimmed unread, and what a
dead owner had read stays pending for the next one, which learns from
``claim`` how many times each entry was delivered (poison detection).

Every call is bounded by ``timeout`` seconds (plus a blocking read's own wait):
a Redis that does not answer (stopped, partitioned) raises
``StoreUnavailableError`` instead of hanging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Final

import anyio
import msgspec
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from threadline.actors import MailboxFullError, OverloadedError, StoreUnavailableError

from ._leases import AnyRedis
from ._partitions import KeyLayout, PartitionKeys
from ._redis_client import mapped

GROUP: Final = "w"
IDEM_TTL_MS: Final = 24 * 3600 * 1000
REPLY_TTL_MS: Final = 15 * 60 * 1000
REPLY_MAXLEN: Final = 10_000
DEFAULT_MAX_QUEUED: Final = 1000
DEFAULT_TIMEOUT: Final = 10.0

# KEYS: inbox, idem, queued. ARGV: payload, idem ttl ms, max backlog, always ("1":
# append even if the id was seen: the sender waits for a reply, and the consumer
# answers a repeated id as a duplicate), thread id, max queued per thread.
# Returns the entry id (a retried tell gets the first one) or the error
# OVERLOADED / MAILBOX_FULL <n> (nothing appended).
_ENQUEUE_LUA: Final = """
local seen = redis.call('GET', KEYS[2])
if seen and ARGV[4] ~= '1' then
  return seen
end
if tonumber(ARGV[3]) > 0 and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return redis.error_reply('OVERLOADED')
end
local queued = tonumber(redis.call('HGET', KEYS[3], ARGV[5]) or '0')
if tonumber(ARGV[6]) > 0 and queued >= tonumber(ARGV[6]) then
  return redis.error_reply('MAILBOX_FULL ' .. queued)
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 't', ARGV[5])
redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
return id
"""

# Removes one entry (KEYS[1] inbox, KEYS[2] queued): XACK + XDEL, and its thread's
# queued count goes down once (only if the entry was still in the stream).
_FORGET_LUA: Final = """
local function forget(id)
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  local n = redis.call('XACK', KEYS[1], 'w', id)
  if entry[1] then
    redis.call('XDEL', KEYS[1], id)
    local f = entry[1][2]
    for j = 1, #f, 2 do
      if f[j] == 't' then
        if redis.call('HINCRBY', KEYS[2], f[j + 1], -1) <= 0 then
          redis.call('HDEL', KEYS[2], f[j + 1])
        end
      end
    end
  end
  return n
end
"""

# KEYS: inbox, queued. ARGV: entry ids. Acknowledged entries are deleted at once:
# the stream holds only what some consumer still has to process.
_ACK_LUA: Final = (
    _FORGET_LUA
    + """
local n = 0
for i = 1, #ARGV do
  n = n + forget(ARGV[i])
end
return n
"""
)

# KEYS: inbox, queued, dlq. ARGV: entry id, reason.
_DEAD_LETTER_LUA: Final = (
    _FORGET_LUA
    + """
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local payload = ''
if entry[1] then
  local f = entry[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'e' then payload = f[j + 1] end
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*',
  'entry', ARGV[1], 'e', payload, 'reason', ARGV[2])
forget(ARGV[1])
return 1
"""
)

# KEYS: inbox. ARGV: consumer, start id, count. XAUTOCLAIM (which counts a delivery
# of each entry it claims), then each claimed entry's delivery count from XPENDING.
# Returns {next start, entries, counts}.
_CLAIM_LUA: Final = """
local r = redis.call('XAUTOCLAIM', KEYS[1], 'w', ARGV[1], 0, ARGV[2], 'COUNT', ARGV[3])
local entries, counts = {}, {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], 'w', e[1], e[1], 1)
    entries[#entries + 1] = e
    counts[#counts + 1] = p[1] and p[1][4] or 1
  end
end
return {r[1], entries, counts}
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


def _fields(raw: Any) -> dict[bytes, bytes]:
    """An entry's fields: a dict (redis-py parsed them) or a flat list (from a script)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list):
        return {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
    return {}


class StreamEntry(msgspec.Struct, frozen=True):
    """One entry of a partition inbox: its stream id and the encoded envelope.

    ``deliveries`` is how many times the entry was handed to a consumer,
    this time included (1 when read new; a claim after its owner died counts
    one more). ``thread_id`` is the thread it was enqueued for ("" for an
    entry written before the inbox recorded it).
    """

    entry_id: str
    payload: bytes
    deliveries: int = 1
    thread_id: str = ""


class RedisInbox:
    """The partition inboxes and reply streams of one deployment (``layout``).

    The client (standalone or Cluster, asyncio) is borrowed: the caller opens
    and closes it. It must not decode responses. ``max_queued`` caps each
    thread's unacknowledged entries (``MailboxFullError`` past it; 0: no cap),
    ``max_backlog`` each partition's (``OverloadedError``; 0: no cap).
    ``timeout`` bounds each call (``StoreUnavailableError`` after it; ``None``:
    wait as long as the connection does).
    """

    def __init__(
        self,
        client: AnyRedis,
        layout: KeyLayout,
        *,
        max_backlog: int = 100_000,
        max_queued: int = DEFAULT_MAX_QUEUED,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self._client = client
        self.layout = layout
        self.max_backlog = max_backlog
        self.max_queued = max_queued
        self.timeout = timeout
        self._enqueue: AsyncScript = client.register_script(_ENQUEUE_LUA)
        self._ack: AsyncScript = client.register_script(_ACK_LUA)
        self._dead_letter: AsyncScript = client.register_script(_DEAD_LETTER_LUA)
        self._claim: AsyncScript = client.register_script(_CLAIM_LUA)
        self._publish: AsyncScript = client.register_script(_PUBLISH_LUA)

    def keys(self, partition: int) -> PartitionKeys:
        return self.layout.partition(partition)

    @staticmethod
    def queued_key(keys: PartitionKeys) -> str:
        """``<prefix>:{pNNN}:queued``: thread id -> its unacknowledged entries."""
        return f"{keys.base}:queued"

    @contextlib.contextmanager
    def _bounded(self, what: str, wait: float = 0.0) -> Iterator[None]:
        """``mapped``, and no answer within ``timeout`` (+ ``wait``) is unavailable too."""
        if self.timeout is None:
            with mapped(what):
                yield
            return
        limit = self.timeout + wait
        try:
            with anyio.fail_after(limit), mapped(what):
                yield
        except TimeoutError as exc:  # fail_after's: the call was cancelled
            raise StoreUnavailableError(f"redis {what}: no answer within {limit:g} s") from exc

    # -- senders -------------------------------------------------------------

    async def enqueue(
        self, thread_id: str, message_id: str, payload: bytes, *, always: bool = False
    ) -> str:
        """Append an envelope to its thread's partition inbox; the entry id.

        Durable when it returns, as far as the server's ``appendfsync`` makes it.
        A message id seen in the last 24 h is not appended again (the first
        entry's id is returned), unless ``always``: a sender waiting for a reply
        needs its envelope consumed, and the thread answers it as a duplicate.
        Raises ``MailboxFullError`` (the thread has ``max_queued`` entries not
        yet processed) or ``OverloadedError`` (the partition is over
        ``max_backlog``) without appending; ``StoreUnavailableError`` when Redis
        fails or does not answer in time (the outcome is unknown: send again with
        the same message id, which is applied once).
        """
        keys = self.layout.for_thread(thread_id)
        try:
            with self._bounded("inbox enqueue"):
                reply = await self._enqueue(
                    keys=[keys.inbox, keys.idem(message_id), self.queued_key(keys)],
                    args=[
                        payload,
                        IDEM_TTL_MS,
                        self.max_backlog,
                        "1" if always else "0",
                        thread_id,
                        self.max_queued,
                    ],
                )
        except StoreUnavailableError as exc:
            text = str(exc.__cause__) if isinstance(exc.__cause__, ResponseError) else ""
            if text.startswith("OVERLOADED"):
                raise OverloadedError(
                    f"partition {keys.partition} of thread {thread_id!r} has "
                    f"{self.max_backlog} unprocessed messages; try again later"
                ) from None
            if text.startswith("MAILBOX_FULL"):
                raise MailboxFullError(
                    f"thread {thread_id!r} has {self.max_queued} messages waiting "
                    "(its mailbox is full); try again later"
                ) from None
            raise
        return _text(reply)

    # -- the partition's owner -------------------------------------------------

    async def ensure_group(self, partition: int) -> None:
        """Create the consumer group (from the stream's start) if it is missing."""
        inbox = self.keys(partition).inbox
        try:
            with self._bounded("inbox group"):
                await self._client.xgroup_create(inbox, GROUP, id="0", mkstream=True)
        except StoreUnavailableError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, partition: int, consumer: str) -> list[StreamEntry]:
        """Every entry read but not acknowledged (by a previous owner, or by us),
        moved to ``consumer``, in stream order, each with its delivery count
        (this claim included)."""
        inbox = self.keys(partition).inbox
        entries: list[StreamEntry] = []
        start = "0-0"
        while True:
            with self._bounded("inbox claim"):
                reply: Any = await self._claim(keys=[inbox], args=[consumer, start, 100])
            start = _text(reply[0])
            for (entry_id, raw), count in zip(reply[1], reply[2], strict=True):
                fields = _fields(raw)
                entries.append(
                    StreamEntry(
                        _text(entry_id),
                        fields.get(b"e", b""),
                        int(count),
                        _text(fields.get(b"t", b"")),
                    )
                )
            if start == "0-0":
                return entries

    async def read(
        self, partition: int, consumer: str, *, count: int = 100, block_ms: int = 500
    ) -> list[StreamEntry]:
        """New entries for ``consumer`` (waits up to ``block_ms`` for one)."""
        inbox = self.keys(partition).inbox
        with self._bounded("inbox read", block_ms / 1000):
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
            f = _fields(fields)
            out.append(StreamEntry(_text(entry_id), f.get(b"e", b""), 1, _text(f.get(b"t", b""))))
        return out

    async def ack(self, partition: int, entry_ids: Sequence[str]) -> None:
        """Done with these entries: acknowledged, deleted, their threads' counts down."""
        if entry_ids:
            keys = self.keys(partition)
            with self._bounded("inbox ack"):
                await self._ack(keys=[keys.inbox, self.queued_key(keys)], args=list(entry_ids))

    async def dead_letter(self, partition: int, entry_id: str, reason: str) -> None:
        """Move an entry to the partition's dead letters, with ``reason`` (and ack it)."""
        keys = self.keys(partition)
        with self._bounded("inbox dead-letter"):
            await self._dead_letter(
                keys=[keys.inbox, self.queued_key(keys), keys.dlq], args=[entry_id, reason[:2000]]
            )

    async def dead_letters(self, partition: int) -> list[tuple[str, bytes, str]]:
        """(entry id, payload, reason) of the partition's dead letters, oldest first."""
        with self._bounded("inbox dead letters"):
            raw: Any = await self._client.xrange(self.keys(partition).dlq)
        return [(_text(f[b"entry"]), f[b"e"], _text(f[b"reason"])) for _, f in raw]

    async def backlog(self, partition: int) -> int:
        """Entries in the partition's inbox (read or not) not yet acknowledged."""
        with self._bounded("inbox backlog"):
            return int(await self._client.xlen(self.keys(partition).inbox))

    async def pending(self, partition: int) -> int:
        """Entries some consumer has read and not yet acknowledged (0 without a group)."""
        try:
            with self._bounded("inbox pending"):
                summary: Any = await self._client.xpending(self.keys(partition).inbox, GROUP)
        except StoreUnavailableError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):
                return 0
            raise
        return int(summary.get("pending", 0) if isinstance(summary, dict) else summary[0])

    async def queued(self, thread_id: str) -> int:
        """The thread's unacknowledged entries (what ``max_queued`` caps)."""
        keys = self.layout.for_thread(thread_id)
        with self._bounded("inbox queued"):
            value = await self._client.hget(self.queued_key(keys), thread_id)
        return int(value or 0)

    # -- replies ---------------------------------------------------------------

    async def publish(self, reply_key: str, events: Sequence[bytes]) -> None:
        if events:
            with self._bounded("reply publish"):
                await self._publish(keys=[reply_key], args=[REPLY_TTL_MS, REPLY_MAXLEN, *events])

    async def replies(
        self, reply_key: str, after: str, *, block_ms: int = 1000
    ) -> list[tuple[str, bytes]]:
        """Events of a reply stream after the id ``after`` (``"0-0"``: from the start)."""
        with self._bounded("reply read", block_ms / 1000):
            reply: Any = await self._client.xread({reply_key: after}, block=block_ms, count=500)
        if not reply:
            return []
        return [(_text(i), f[b"e"]) for i, f in reply[0][1]]
