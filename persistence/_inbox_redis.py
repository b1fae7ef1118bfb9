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

The owner's writing calls (``claim``, ``read``, ``ack``, ``dead_letter``) are
fenced: each is one script whose first line compares the partition's lease with
the caller's token (``<prefix>:{pNNN}:lease``, same slot) and refuses with
``FencedError`` before it changes anything. A worker that lost its lease
(paused past the TTL, cut off) therefore cannot pull entries into its
consumer's pending list after the new owner claimed: they would be stranded
there until the partition moved again.

Reading is a fenced, non-blocking ``XREADGROUP`` (Redis refuses ``BLOCK``
inside a script) plus a doorbell: when the read finds nothing it answers the
group's last-delivered id, and ``wait`` blocks on a plain ``XREAD BLOCK``
(no group: it changes nothing) after that id. No wake-up is lost: an entry
appended after the read has a larger id, so ``XREAD`` returns at once. There
is no busy loop: entries read and not yet acknowledged have ids at or below
the last-delivered id, so they do not wake it.

Every call is bounded by ``timeout`` seconds (plus a blocking call's own wait):
a Redis that does not answer (stopped, partitioned) raises
``StoreUnavailableError`` instead of hanging.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Final

import anyio
import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from threadline.actors import (
    FencedError,
    MailboxFullError,
    OverloadedError,
    StoreUnavailableError,
)

from ._leases import AnyRedis, fenced_script, is_fenced_reply
from ._partitions import KeyLayout, PartitionKeys
from ._redis_client import mapped

GROUP: Final = "w"
IDEM_TTL_MS: Final = 24 * 3600 * 1000
REPLY_TTL_MS: Final = 15 * 60 * 1000
REPLY_MAXLEN: Final = 10_000
DEFAULT_MAX_QUEUED: Final = 1000
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_WAIT_MS: Final = 5000
"""How long ``wait`` blocks by default. A reader whose lease is lost is cancelled
(and its next read is fenced), so this bounds nothing that matters for
correctness: long, to keep an idle partition cheap."""
_SOCKET_MARGIN_MS: Final = 1000

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

# Removes one entry of the inbox: XACK + XDEL, and its thread's queued count goes
# down once (only if the entry was still in the stream).
_FORGET_LUA: Final = """
local function forget(inbox, queued, id)
  local entry = redis.call('XRANGE', inbox, id, id)
  local n = redis.call('XACK', inbox, 'w', id)
  if entry[1] then
    redis.call('XDEL', inbox, id)
    local f = entry[1][2]
    for j = 1, #f, 2 do
      if f[j] == 't' then
        if redis.call('HINCRBY', queued, f[j + 1], -1) <= 0 then
          redis.call('HDEL', queued, f[j + 1])
        end
      end
    end
  end
  return n
end
"""

# Fenced (KEYS[1] lease, ARGV[1] token). KEYS: lease, inbox, queued. ARGV: token,
# then the entry ids. Acknowledged entries are deleted at once: the stream holds
# only what some consumer still has to process.
_ACK_LUA: Final = fenced_script(
    _FORGET_LUA
    + """
local n = 0
for i = 2, #ARGV do
  n = n + forget(KEYS[2], KEYS[3], ARGV[i])
end
return n
"""
)

# Fenced. KEYS: lease, inbox, queued, dlq. ARGV: token, entry id, reason.
_DEAD_LETTER_LUA: Final = fenced_script(
    _FORGET_LUA
    + """
local entry = redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2])
local payload = ''
if entry[1] then
  local f = entry[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'e' then payload = f[j + 1] end
  end
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*',
  'entry', ARGV[2], 'e', payload, 'reason', ARGV[3])
forget(KEYS[2], KEYS[3], ARGV[2])
return 1
"""
)

# Fenced. KEYS: lease, inbox. ARGV: token, consumer, start id, count. XAUTOCLAIM
# (which counts a delivery of each entry it claims), then each claimed entry's
# delivery count from XPENDING. Returns {next start, entries, counts}.
_CLAIM_LUA: Final = fenced_script(
    """
local r = redis.call('XAUTOCLAIM', KEYS[2], 'w', ARGV[2], 0, ARGV[3], 'COUNT', ARGV[4])
local entries, counts = {}, {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[2], 'w', e[1], e[1], 1)
    entries[#entries + 1] = e
    counts[#counts + 1] = p[1] and p[1][4] or 1
  end
end
return {r[1], entries, counts}
"""
)

# Fenced. KEYS: lease, inbox. ARGV: token, consumer, count. A non-blocking
# XREADGROUP of new entries (BLOCK is refused inside a script). Returns {after,
# entries}: after is the last entry's id, or, when there is none, the group's
# last-delivered id: nothing in the stream is newer (XREADGROUP '>' would have
# delivered it), so an XREAD BLOCK after it wakes on the next append and only then.
_READ_LUA: Final = fenced_script(
    """
local r = redis.call('XREADGROUP', 'GROUP', 'w', ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[2], '>')
if r and r[1] and #r[1][2] > 0 then
  local entries = r[1][2]
  return {entries[#entries][1], entries}
end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == 'w' then return {last, {}} end
end
return redis.error_reply('NOGROUP no consumer group w on ' .. KEYS[2])
"""
)

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


def _socket_timeout(client: AnyRedis) -> float | None:
    """The read timeout (seconds) of ``client``'s connections; ``None``: none.

    What the client was given, else its connection class's default (redis-py
    8 reads for at most 5 s unless told otherwise).
    """
    if isinstance(client, RedisCluster):
        kwargs: dict[str, Any] = dict(client.get_connection_kwargs())
        connection_class: Any = kwargs.get("connection_class")
    else:
        kwargs = dict(client.connection_pool.connection_kwargs)
        connection_class = client.connection_pool.connection_class
    value = kwargs.get("socket_timeout", _default_socket_timeout(connection_class))
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _default_socket_timeout(connection_class: Any) -> Any:
    """The ``socket_timeout`` default of the first ``__init__`` in the class's MRO that names it."""
    for cls in getattr(connection_class, "__mro__", ()):
        try:
            parameters = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            continue
        if "socket_timeout" in parameters:
            return parameters["socket_timeout"].default
    return None


@contextlib.contextmanager
def _fenced(what: str, partition: int, token: str) -> Iterator[None]:
    """A ``FENCED`` reply (the script's lease check failed) becomes ``FencedError``."""
    try:
        yield
    except ResponseError as exc:
        if is_fenced_reply(exc):
            raise FencedError(
                f"partition {partition}: {what} refused, the lease is no longer held by "
                f"{token!r} (it expired or another worker took the partition over)"
            ) from exc
        raise


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


class InboxRead(msgspec.Struct, frozen=True):
    """What one fenced read of a partition inbox found.

    ``entries``: the new entries, now pending for the reader's consumer, in
    stream order (at most the read's ``count``). ``after``: the id to pass to
    :meth:`RedisInbox.wait` when ``entries`` is empty (the group's
    last-delivered id; the last entry's id otherwise): nothing in the stream
    is newer, so the wait returns on the next append, and not before.
    """

    entries: list[StreamEntry]
    after: str


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
        self._read: AsyncScript = client.register_script(_READ_LUA)
        self._publish: AsyncScript = client.register_script(_PUBLISH_LUA)
        reads_for = _socket_timeout(client)
        self.max_wait_ms: int | None = (
            None
            if reads_for is None
            else max(int(reads_for * 1000) - _SOCKET_MARGIN_MS, int(reads_for * 500), 1)
        )
        """The longest ``wait`` blocks: below the client's socket timeout, which
        would otherwise cut a quiet wait as if Redis had stopped answering."""

    def keys(self, partition: int) -> PartitionKeys:
        return self.layout.partition(partition)

    @staticmethod
    def queued_key(keys: PartitionKeys) -> str:
        """``<prefix>:{pNNN}:queued``: thread id -> its unacknowledged entries."""
        return f"{keys.base}:queued"

    @contextlib.contextmanager
    def _bounded(
        self, what: str, wait: float = 0.0, *, fence: tuple[int, str] | None = None
    ) -> Iterator[None]:
        """``mapped``, and no answer within ``timeout`` (+ ``wait``) is unavailable too.

        With ``fence`` (partition, token), a ``FENCED`` reply of a fenced script
        raises ``FencedError`` instead.
        """
        fenced = _fenced(what, *fence) if fence is not None else contextlib.nullcontext()
        if self.timeout is None:
            with mapped(what), fenced:
                yield
            return
        limit = self.timeout + wait
        try:
            with anyio.fail_after(limit), mapped(what), fenced:
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

    async def claim(self, partition: int, consumer: str, token: str) -> list[StreamEntry]:
        """Every entry read but not acknowledged (by a previous owner, or by us),
        moved to ``consumer``, in stream order, each with its delivery count
        (this claim included).

        Fenced by the lease ``token``: ``FencedError`` when the partition's lease
        holds another token or none (nothing moved by that call; a claim
        fenced halfway keeps what its earlier pages moved, which the next
        owner claims in turn).
        """
        keys = self.keys(partition)
        entries: list[StreamEntry] = []
        start = "0-0"
        while True:
            with self._bounded("inbox claim", fence=(partition, token)):
                reply: Any = await self._claim(
                    keys=[keys.lease, keys.inbox], args=[token, consumer, start, 100]
                )
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
        self, partition: int, consumer: str, token: str, *, count: int = 100
    ) -> InboxRead:
        """New entries for ``consumer`` (at most ``count``), without waiting.

        Fenced by the lease ``token`` (``FencedError``, nothing read). When it
        finds nothing, ``wait`` after the answer's ``after`` id blocks until
        there is something to read.
        """
        keys = self.keys(partition)
        with self._bounded("inbox read", fence=(partition, token)):
            reply: Any = await self._read(
                keys=[keys.lease, keys.inbox], args=[token, consumer, count]
            )
        return InboxRead(self._entries(reply[1]), _text(reply[0]))

    async def wait(self, partition: int, after_id: str, *, block_ms: int = DEFAULT_WAIT_MS) -> bool:
        """Wait until the inbox holds an entry newer than ``after_id``, or ``block_ms``.

        Whether there is one. A plain ``XREAD BLOCK`` (no group): it reads
        nothing on the group's behalf and changes nothing, so it needs no
        fence. It blocks at most ``max_wait_ms`` (a second below the client's
        socket timeout, which would otherwise end a quiet wait as a failure);
        the call is bounded by ``timeout`` + the block.
        """
        if isinstance(block_ms, bool) or not isinstance(block_ms, int) or block_ms < 1:
            raise ValueError(f"block_ms must be a positive int, got {block_ms!r}")
        if self.max_wait_ms is not None:
            block_ms = min(block_ms, self.max_wait_ms)
        inbox = self.keys(partition).inbox
        with self._bounded("inbox wait", block_ms / 1000):
            reply: Any = await self._client.xread({inbox: after_id}, count=1, block=block_ms)
        return bool(reply)

    @staticmethod
    def _entries(raw: Sequence[Any]) -> list[StreamEntry]:
        out = []
        for entry_id, fields in raw:
            if not fields:  # deleted while pending
                continue
            f = _fields(fields)
            out.append(StreamEntry(_text(entry_id), f.get(b"e", b""), 1, _text(f.get(b"t", b""))))
        return out

    async def ack(self, partition: int, entry_ids: Sequence[str], token: str) -> None:
        """Done with these entries: acknowledged, deleted, their threads' counts down.

        Fenced by the lease ``token`` (``FencedError``, nothing acknowledged:
        the entries stay pending for the partition's next owner).
        """
        if entry_ids:
            keys = self.keys(partition)
            with self._bounded("inbox ack", fence=(partition, token)):
                await self._ack(
                    keys=[keys.lease, keys.inbox, self.queued_key(keys)],
                    args=[token, *entry_ids],
                )

    async def dead_letter(self, partition: int, entry_id: str, reason: str, token: str) -> None:
        """Move an entry to the partition's dead letters, with ``reason`` (and ack it).

        Fenced by the lease ``token`` (``FencedError``, nothing moved).
        """
        keys = self.keys(partition)
        with self._bounded("inbox dead-letter", fence=(partition, token)):
            await self._dead_letter(
                keys=[keys.lease, keys.inbox, self.queued_key(keys), keys.dlq],
                args=[token, entry_id, reason[:2000]],
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
