"""``RedisSnapshotStore``: threads in plain Redis (7+, no modules).

Key layout format 2 (the deployment's ``<prefix>:config`` says ``format 2``):
a thread's keys carry the hash tag of its partition (``crc32(id) % P``, see
``_partitions``), the tag of the partition's lease and inbox too, so one Lua
script may check the lease and write the thread in a single Cluster slot::

    <prefix>:{pNNN}:t:<escaped id>:head     hash: version, epoch, full_version, turn
    <prefix>:{pNNN}:t:<escaped id>:steps    list: step record of version i at index i - 1
    <prefix>:{pNNN}:t:<escaped id>:full     string: the latest full record
    <prefix>:{pNNN}:t:<escaped id>:fulls    hash: version -> older full record kept as a
                                            checkpoint (absent in stores written before)
    <prefix>:{pNNN}:t:<escaped id>:inbox    list: ids of the messages told, oldest first
    <prefix>:{pNNN}:t:<escaped id>:told     hash: message id -> envelope (the inbox's entries)
    <prefix>:{pNNN}:t:<escaped id>:dead     hash: message id -> dead letter (msgpack)
    <prefix>:{pNNN}:lease                   the partition's lease (see ``_leases``)
    <prefix>:threads                        set of thread ids (not tagged; an index only)

Format 1 tagged each thread by its own id (``<prefix>:t:{<escaped id>}:head``);
opening a store that holds it raises ``SnapshotFormatError`` naming the
command that copies it to format 2 (``threadline migrate``).

With ``lease_token`` (a ``Worker``'s store), every writing script also checks
that the thread's partition lease still holds this worker's token, in the same
script as the write: a worker that lost the lease (paused past its TTL,
partitioned) can neither activate a thread nor commit a step, even before the
next owner has touched the thread.

Conditional writes are Lua scripts (atomic per thread). Commits are grouped:
one pipeline per batch, one ``EVALSHA`` per request; enqueues ride the same
pipelines. The head's ``turn`` is the message id of the turn in flight (empty:
none); the commit script sets it, and removes the inbox entry the step
consumed. The thread index is maintained outside the scripts and is a superset
of the threads with steps or inbox entries: ``threads()`` filters it by head
version, ``recoverable_threads()`` by turn and inbox length.

On a Redis Cluster (a ``RedisCluster`` client) a batch is one pipeline per
node that owns some of its slots, the nodes in parallel, on the cluster
client's own node connections (redis-py's cluster pipeline refuses
``EVALSHA``). A request the node did not run (``MOVED``, ``ASK``,
``TRYAGAIN``, ``NOSCRIPT``) is sent again, to the new owner, a few rounds at
most; one whose reply was lost is never sent again (its outcome is unknown,
as on a standalone client that does not retry). The index and the
deployment config (untagged) live on whichever node owns their slot; the
index is written after the scripts' replies (one ``SADD`` per batch), since
on another node a pipeline cannot order it after them.

Durability is the server's: run Redis with ``appendonly yes`` and
``appendfsync always`` for a commit to be on disk when ``commit`` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Self

import anyio
import msgspec
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from threadline.actors import (
    ConflictError,
    FencedError,
    PersistenceError,
    SnapshotCorruptError,
    StoreUnavailableError,
)

from ._batch import GroupCommitter, unavailable
from ._deployment import deployment_layout
from ._leases import AnyRedis
from ._lifecycle import ExcInfo, Reentrant
from ._partitions import KeyLayout
from ._redis_client import any_client_from_url, check_prefix, close_client, mapped, store_client
from ._snapshots import (
    AcquireRequest,
    CommitRequest,
    DeadLetter,
    EnqueueRequest,
    InboxEntry,
    RecoverableThread,
    StoredThread,
    StoredVersion,
    check_fence,
    check_head,
    check_records,
)

__all__ = ["RedisSnapshotStore"]

# KEYS: head, lease. ARGV: lease token ('' = unfenced). Returns the new epoch,
# or -1 if the lease does not hold the token.
_ACQUIRE_LUA: Final = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSETNX', KEYS[1], 'version', 0)
redis.call('HSETNX', KEYS[1], 'full_version', 0)
return epoch
"""

# KEYS: head, steps, full, inbox, told, lease, fulls. ARGV: expected_version,
# epoch, step, turn ('' = none), consumed ('' = none), lease token ('' =
# unfenced) [, full, keep ('1': the previous latest full record becomes a
# checkpoint in fulls; else it is overwritten)]. The first step of a thread
# drops whatever fulls a deleted earlier thread of that id left (a delete by a
# threadline that did not know the key).
# Returns {status, stored version, stored epoch}; status 0 = committed (the
# version returned is the new one), 1 = fenced, 2 = conflict, 4 = no head at
# all, 5 = the lease does not hold the token; 3 = the steps list does not
# match the head (corrupt), and then the third value is the list's length
# (and the version -1 if there is no head).
_COMMIT_LUA: Final = """
if ARGV[6] ~= '' and redis.call('GET', KEYS[6]) ~= ARGV[6] then
  return {5, 0, 0}
end
local head = redis.call('HMGET', KEYS[1], 'version', 'epoch')
if not head[1] then
  local length = redis.call('LLEN', KEYS[2])
  if length > 0 then
    return {3, -1, length}
  end
  return {4, 0, tonumber(head[2] or '0')}
end
local version = tonumber(head[1])
local epoch = tonumber(head[2] or '0')
local expected = tonumber(ARGV[1])
local writer = tonumber(ARGV[2])
if epoch > writer then
  return {1, version, epoch}
end
if version ~= expected or epoch ~= writer then
  return {2, version, epoch}
end
local length = redis.call('LLEN', KEYS[2])
if length ~= version then
  return {3, version, length}
end
if version == 0 then
  redis.call('DEL', KEYS[7])
end
redis.call('RPUSH', KEYS[2], ARGV[3])
if #ARGV >= 7 then
  if ARGV[8] == '1' then
    local previous = tonumber(redis.call('HGET', KEYS[1], 'full_version') or '0')
    local old = redis.call('GET', KEYS[3])
    if previous > 0 and old then
      redis.call('HSET', KEYS[7], previous, old)
    end
  end
  redis.call('SET', KEYS[3], ARGV[7])
  redis.call('HSET', KEYS[1], 'version', version + 1, 'full_version', version + 1, 'turn', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'version', version + 1, 'turn', ARGV[4])
end
if ARGV[5] ~= '' and redis.call('HDEL', KEYS[5], ARGV[5]) == 1 then
  redis.call('LREM', KEYS[4], 1, ARGV[5])
end
return {0, version + 1, epoch}
"""

# KEYS: inbox, told. ARGV: message id, envelope. Appends unless the id is there.
_ENQUEUE_LUA: Final = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: inbox, told [, dead]. ARGV: message id [, dead letter]. Removes the
# entry (moving it to the dead letters when given one); 1 if it was there.
_DEQUEUE_LUA: Final = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('LREM', KEYS[1], 1, ARGV[1])
if #KEYS >= 3 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
end
return 1
"""

# KEYS: head, steps, full, lease, fulls. ARGV: epoch or '', lease token or ''.
# Returns {status, value}: -1 = no head (nothing done), 1 = fenced (value =
# stored epoch), 2 = the lease does not hold the token, 0 = deleted (value > 0
# if it had steps). Steps left without a head (a corrupt thread) are deleted too.
_DELETE_LUA: Final = """
if ARGV[2] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[2] then
  return {2, 0}
end
local head = redis.call('HMGET', KEYS[1], 'version', 'epoch')
local steps = redis.call('LLEN', KEYS[2])
if not head[1] and not head[2] then
  if steps == 0 then
    return {-1, 0}
  end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
  return {0, steps}
end
local version = tonumber(head[1] or '0')
local epoch = tonumber(head[2] or '0')
if ARGV[1] ~= '' and epoch > tonumber(ARGV[1]) then
  return {1, epoch}
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
redis.call('HSET', KEYS[1], 'version', 0, 'full_version', 0, 'turn', '')
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return {0, math.max(version, steps)}
"""

# KEYS: head, steps, full. Read-only; one consistent snapshot in one round trip.
# Returns the steps list's length if there is no head, else {version, epoch,
# full_version, full or nil, steps after the full, the steps list's length}.
_LOAD_LUA: Final = """
local length = redis.call('LLEN', KEYS[2])
local head = redis.call('HMGET', KEYS[1], 'version', 'epoch', 'full_version')
if not head[1] then
  return length
end
local full_version = tonumber(head[3] or '0')
local full = false
if full_version > 0 then
  full = redis.call('GET', KEYS[3])
end
local steps = redis.call('LRANGE', KEYS[2], full_version, -1)
return {tonumber(head[1]), tonumber(head[2] or '0'), full_version, full, steps, length}
"""

# KEYS: head, steps, full, fulls. ARGV: version. Read-only, one snapshot.
# Returns nil if there is no head, else {head version, full_version, full or
# nil, steps}: the newest full record at or before the version (the latest, or
# a checkpoint) and the steps from its version (or 1) up to the version; no
# full record and no steps if the version is not in 1 .. head.
_LOAD_AT_LUA: Final = """
local head = redis.call('HMGET', KEYS[1], 'version', 'full_version')
if not head[1] then
  return false
end
local version = tonumber(head[1])
local want = tonumber(ARGV[1])
if want < 1 or want > version then
  return {version, 0, false, {}}
end
local full_version = tonumber(head[2] or '0')
local full = false
if full_version > 0 and full_version <= want then
  full = redis.call('GET', KEYS[3])
else
  full_version = 0
  for _, field in ipairs(redis.call('HKEYS', KEYS[4])) do
    local v = tonumber(field)
    if v and v <= want and v > full_version then
      full_version = v
    end
  end
  if full_version > 0 then
    full = redis.call('HGET', KEYS[4], tostring(full_version))
  end
end
local first = full_version
if first < 1 then
  first = 1
end
return {version, full_version, full, redis.call('LRANGE', KEYS[2], first - 1, want - 1)}
"""

# KEYS: steps. ARGV: before (0 = past the last step), limit. Read-only: the
# last ``limit`` steps below version ``before``, oldest first.
_STEPS_BEFORE_LUA: Final = """
local stop = redis.call('LLEN', KEYS[1])
local before = tonumber(ARGV[1])
if before > 0 and before - 1 < stop then
  stop = before - 1
end
local start = stop - tonumber(ARGV[2])
if start < 0 then
  start = 0
end
if stop <= start then
  return {}
end
return redis.call('LRANGE', KEYS[1], start, stop - 1)
"""

_INDEX_CHUNK: Final = 1000
_MAX_INDEX: Final = 1 << 62
_CLUSTER_ROUNDS: Final = 10
"""Sends of one cluster request that nodes refused without running it (moved,
being migrated, script cache lost) before it fails as not written."""
_TRYAGAIN_PAUSE: Final = 0.02
_TRYAGAIN_PAUSE_MAX: Final = 0.32
"""Pauses before sending again what a node answered ``TRYAGAIN``: doubling,
at most this long (about 1.5 s in all before a request fails)."""


def _epoch(r: AcquireRequest, reply: Any, partition: int) -> object:
    if isinstance(reply, PersistenceError):
        return reply
    if isinstance(reply, Exception):
        return unavailable(f"redis acquire of {r.thread_id!r} failed: {reply}", reply)
    try:
        epoch = int(reply)
    except (TypeError, ValueError) as exc:
        return unavailable(f"unexpected redis reply to an acquire: {reply!r}", exc)
    return _lease_lost(r.thread_id, partition, "activation") if epoch < 0 else epoch


def _lease_lost(thread_id: str, partition: int, what: str) -> FencedError:
    return FencedError(
        f"thread {thread_id!r}: this worker no longer holds the lease of partition "
        f"{partition} (lost or moved); the {what} was refused"
    )


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_Request = CommitRequest | AcquireRequest | EnqueueRequest


class _ThreadKeys(NamedTuple):
    """A thread's keys (``fulls``: the full records kept as checkpoints, version ->
    record), its partition's lease key and its partition."""

    head: str
    steps: str
    full: str
    inbox: str
    told: str
    dead: str
    fulls: str
    lease: str
    partition: int


class _Call(NamedTuple):
    """One script call for the cluster path; all its keys are in one slot."""

    script: AsyncScript
    keys: tuple[str, ...]
    args: tuple[bytes | int | str, ...]


def _indexes(r: _Request) -> bool:
    """Whether the request may make a thread the index has to list."""
    return isinstance(r, EnqueueRequest) or (
        isinstance(r, CommitRequest) and r.expected_version == 0
    )


def _not_run(reply: object) -> bool:
    """Whether a node refused the call without running the script."""
    return isinstance(reply, AskError | TryAgainError | NoScriptError)  # MovedError is an AskError


_dead_encoder = msgspec.msgpack.Encoder()
_dead_decoder = msgspec.msgpack.Decoder(DeadLetter)


class RedisSnapshotStore(Reentrant):
    """Durable threads in Redis.

    With no ``client``, the store creates a client for ``redis://localhost:6379/0``
    and owns it. A client passed in is never closed by the store; it must not
    decode responses. ``prefix`` namespaces every key (no braces allowed).
    ``partitions`` is the deployment's partition count: fixed by the first
    store, worker or client that uses ``prefix`` (default 64) and read from it
    afterwards. ``max_batch`` caps the commits sent in one pipeline.
    ``lease_token(partition)`` (given by a ``Worker``) returns the token of
    the partition lease this process holds, or None: every activation, commit
    and delete then checks it in the same script as the write, and raises
    ``FencedError`` when the lease is no longer this process's.

    redis-py retries a command on connection errors according to the client's
    ``retry`` policy; a commit whose reply was lost and which is then retried
    reports ``ConflictError`` although it was applied. Clients made by
    :meth:`from_url` do not retry (redis-py's default for URL-built pools), so
    a lost reply surfaces as ``StoreUnavailableError`` (outcome unknown).

    ``client`` may be a ``redis.asyncio.cluster.RedisCluster``. Its writes
    (activations, commits, enqueues, deletes, dequeues) then go to the nodes
    directly and are never retried after a lost reply, whatever the cluster
    client's ``retry``: a lost reply is ``StoreUnavailableError`` (outcome
    unknown). Its reads go through the cluster client (and its retries).
    """

    def __init__(
        self,
        client: AnyRedis | None = None,
        *,
        prefix: str = "threadline",
        partitions: int | None = None,
        max_batch: int = 512,
        lease_token: Callable[[int], str | None] | None = None,
    ) -> None:
        check_prefix(prefix)
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        client, self._owns_client = store_client(
            client,
            "RedisSnapshotStore",
            lambda: redis.asyncio.Redis.from_url("redis://localhost:6379/0"),
        )
        self._client: AnyRedis = client
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._refresh_slots = False  # a node failed: ask the cluster for its slots first
        self._prefix = prefix
        self._partitions = partitions
        self._layout: KeyLayout | None = None
        self._lease_token = lease_token
        self._index = f"{prefix}:threads"
        self._max_batch = max_batch
        self._acquire_script: AsyncScript = client.register_script(_ACQUIRE_LUA)
        self._commit_script: AsyncScript = client.register_script(_COMMIT_LUA)
        self._delete_script: AsyncScript = client.register_script(_DELETE_LUA)
        self._load_script: AsyncScript = client.register_script(_LOAD_LUA)
        self._load_at_script: AsyncScript = client.register_script(_LOAD_AT_LUA)
        self._steps_before_script: AsyncScript = client.register_script(_STEPS_BEFORE_LUA)
        self._enqueue_script: AsyncScript = client.register_script(_ENQUEUE_LUA)
        self._dequeue_script: AsyncScript = client.register_script(_DEQUEUE_LUA)
        self._committer: GroupCommitter[_Request] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "threadline", max_batch: int = 512, **kwargs: Any
    ) -> Self:
        """A store on a client made from ``url`` (``redis://``, ``rediss://``,
        ``unix://``; ``redis+cluster://host:port``, a node of a Redis Cluster).

        ``kwargs`` are the client's connection options. The store owns the
        client and closes it on exit.
        """
        client = any_client_from_url(url, "RedisSnapshotStore", **kwargs)
        store = cls(client, prefix=prefix, max_batch=max_batch)
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        return f"RedisSnapshotStore(prefix={self._prefix!r})"

    # -- lifecycle ---------------------------------------------------------

    async def _open(self) -> None:
        self._layout = await deployment_layout(self._client, self._prefix, self._partitions)
        committer: GroupCommitter[_Request] = GroupCommitter(
            self._flush, max_batch=self._max_batch, name="threadline-redis-commit"
        )
        await committer.__aenter__()
        self._committer = committer

    async def _close(self, exc_info: ExcInfo) -> None:
        committer, self._committer = self._committer, None
        try:
            if committer is not None:
                await committer.__aexit__(*exc_info)
        finally:
            if self._owns_client:
                await close_client(self._client)

    def _check_open(self) -> None:
        if self._committer is None:
            raise StoreUnavailableError("store is closed")

    # -- keys --------------------------------------------------------------

    @property
    def layout(self) -> KeyLayout:
        """The deployment's key layout (known once the store is open)."""
        if self._layout is None:
            raise StoreUnavailableError("store is closed")
        return self._layout

    def _keys(self, thread_id: str) -> _ThreadKeys:
        """Every key of the thread (and its partition's lease), from one hash."""
        partition = self.layout.partition_of(thread_id)
        keys = self.layout.partition(partition)
        base = keys.thread_prefix(thread_id)
        return _ThreadKeys(
            head=base + "head",
            steps=base + "steps",
            full=base + "full",
            inbox=base + "inbox",
            told=base + "told",
            dead=base + "dead",
            fulls=base + "fulls",
            lease=keys.lease,
            partition=partition,
        )

    def _token(self, partition: int) -> str | None:
        """The lease token to check ('' = unfenced; None = this process holds no
        lease of ``partition``)."""
        return "" if self._lease_token is None else self._lease_token(partition)

    # -- reads -------------------------------------------------------------

    async def load(self, thread_id: str) -> StoredThread | None:
        self._check_open()
        with mapped("load"):
            k = self._keys(thread_id)
            reply = await self._load_script(keys=[k.head, k.steps, k.full])
        if isinstance(reply, int):  # no head
            check_records(thread_id, None, reply)
            return None
        try:
            version, epoch, full_version, full, steps, length = reply
            stored = StoredThread(
                version=int(version),
                epoch=int(epoch),
                full=None if full is None else bytes(full),
                full_version=int(full_version),
                steps=[bytes(step) for step in steps],
            )
        except (TypeError, ValueError) as exc:
            raise SnapshotCorruptError(
                f"unexpected head of thread {thread_id!r} in redis: {reply!r}"
            ) from exc
        check_records(thread_id, stored.version, int(length))
        return stored

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        self._check_open()
        start = max(start, 1)
        if stop is not None and stop < start:
            return []
        steps_key = self._keys(thread_id).steps
        with mapped("read_steps"):
            steps = await self._client.lrange(
                steps_key,
                min(start, _MAX_INDEX) - 1,
                -1 if stop is None else min(stop, _MAX_INDEX) - 1,
            )
        return [_as_bytes(step) for step in steps]

    async def read_steps_before(
        self, thread_id: str, before: int | None, limit: int
    ) -> list[bytes]:
        self._check_open()
        if limit < 1 or (before is not None and before <= 1):
            return []
        steps_key = self._keys(thread_id).steps
        with mapped("read_steps_before"):
            steps = await self._steps_before_script(
                keys=[steps_key],
                args=[0 if before is None else min(before, _MAX_INDEX), min(limit, _MAX_INDEX)],
            )
        return [_as_bytes(step) for step in steps]

    async def load_at(self, thread_id: str, version: int) -> StoredVersion | None:
        self._check_open()
        k = self._keys(thread_id)
        keys = [k.head, k.steps, k.full, k.fulls]
        with mapped("load_at"):
            reply = await self._load_at_script(keys=keys, args=[max(min(version, _MAX_INDEX), -1)])
        if reply is None:
            return None
        try:
            head, full_version, full, steps = reply
            return StoredVersion(
                head=int(head),
                full=None if full is None else bytes(full),
                full_version=int(full_version),
                steps=[bytes(step) for step in steps],
            )
        except (TypeError, ValueError) as exc:
            raise SnapshotCorruptError(
                f"unexpected reply for version {version} of thread {thread_id!r}: {reply!r}"
            ) from exc

    async def threads(self) -> list[str]:
        self._check_open()
        live: list[str] = []
        with mapped("threads"):
            candidates = [
                bytes(member).decode() async for member in self._client.sscan_iter(self._index)
            ]
            for i in range(0, len(candidates), _INDEX_CHUNK):
                chunk = candidates[i : i + _INDEX_CHUNK]
                async with self._client.pipeline(transaction=False) as pipe:
                    for thread_id in chunk:
                        pipe.hget(self._keys(thread_id).head, "version")
                    versions = await pipe.execute()
                live.extend(
                    tid
                    for tid, v in zip(chunk, versions, strict=True)
                    if v is not None and int(v) > 0
                )
        return sorted(set(live))

    # -- writes ------------------------------------------------------------

    async def acquire(self, thread_id: str) -> int:
        # Through the group committer: a burst of activations rides the
        # commits' pipeline on one connection instead of opening one each.
        self._check_open()
        assert self._committer is not None
        epoch = await self._committer.submit(AcquireRequest(thread_id))
        assert isinstance(epoch, int)
        return epoch

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        self._check_open()
        k = self._keys(thread_id)
        token = self._token(k.partition)
        if token is None:
            raise _lease_lost(thread_id, k.partition, "delete")
        with mapped("delete"):
            reply = await self._eval(
                self._delete_script,
                (k.head, k.steps, k.full, k.lease, k.fulls),
                ("" if epoch is None else epoch, token),
            )
        status, value = int(reply[0]), int(reply[1])
        if status == -1:
            return False
        if status == 2:
            raise _lease_lost(thread_id, k.partition, "delete")
        if status == 1:
            assert epoch is not None
            check_fence(thread_id, value, epoch)
        # Drop the thread from the index, then look again: a new owner may
        # have committed (and added it) between the script and the SREM, and
        # the inbox (which a delete keeps) may hold messages.
        with mapped("delete"):
            if self._cluster is None:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.srem(self._index, thread_id)
                    pipe.hget(k.head, "version")
                    pipe.llen(k.inbox)
                    _, version, queued = await pipe.execute()
            else:
                # The index is on another node: the look must follow the SREM.
                await self._cluster.srem(self._index, thread_id)
                async with self._cluster.pipeline(transaction=False) as cpipe:
                    cpipe.hget(k.head, "version")
                    cpipe.llen(k.inbox)
                    version, queued = await cpipe.execute()
            if (version is not None and int(version) > 0) or int(queued) > 0:
                await self._client.sadd(self._index, thread_id)
        return value > 0

    # -- the inbox -----------------------------------------------------------

    async def enqueue(self, thread_id: str, message_id: str, envelope: bytes) -> None:
        # Through the group committer: many tells share one pipeline.
        committer = self._committer
        if committer is None:
            raise StoreUnavailableError("store is closed")
        await committer.submit(EnqueueRequest(thread_id, message_id, envelope))

    async def pending(self, thread_id: str) -> list[InboxEntry]:
        self._check_open()
        k = self._keys(thread_id)
        with mapped("pending"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lrange(k.inbox, 0, -1)
                pipe.hgetall(k.told)
                ids, envelopes = await pipe.execute()
        by_id = {_as_str(k): _as_bytes(v) for k, v in envelopes.items()}
        entries = []
        for raw in ids:
            message_id = _as_str(raw)
            envelope = by_id.get(message_id)
            if envelope is not None:
                entries.append(InboxEntry(message_id, envelope))
        return entries

    async def dequeue(self, thread_id: str, message_id: str) -> bool:
        self._check_open()
        k = self._keys(thread_id)
        with mapped("dequeue"):
            return bool(await self._eval(self._dequeue_script, (k.inbox, k.told), (message_id,)))

    async def dead_letter(self, thread_id: str, message_id: str, reason: str) -> bool:
        self._check_open()
        k = self._keys(thread_id)
        with mapped("dead_letter"):
            envelope = await self._client.hget(k.told, message_id)
            if envelope is None:
                return False
            letter = DeadLetter(
                message_id=message_id, envelope=_as_bytes(envelope), reason=reason, ts=time.time()
            )
            moved = await self._eval(
                self._dequeue_script,
                (k.inbox, k.told, k.dead),
                (message_id, _dead_encoder.encode(letter)),
            )
        return bool(moved)

    async def dead_letters(self, thread_id: str) -> list[DeadLetter]:
        self._check_open()
        with mapped("dead_letters"):
            raw = await self._client.hvals(self._keys(thread_id).dead)
        letters = []
        for value in raw:
            try:
                letters.append(_dead_decoder.decode(_as_bytes(value)))
            except msgspec.DecodeError as exc:
                raise SnapshotCorruptError(
                    f"a dead letter of thread {thread_id!r} does not decode: {exc}"
                ) from exc
        return sorted(letters, key=lambda d: (d.ts, d.message_id))

    async def recoverable_threads(self) -> list[RecoverableThread]:
        self._check_open()
        found: dict[str, RecoverableThread] = {}
        with mapped("recoverable_threads"):
            candidates = sorted(
                {_as_str(member) async for member in self._client.sscan_iter(self._index)}
            )
            for i in range(0, len(candidates), _INDEX_CHUNK):
                chunk = candidates[i : i + _INDEX_CHUNK]
                async with self._client.pipeline(transaction=False) as pipe:
                    for thread_id in chunk:
                        k = self._keys(thread_id)
                        pipe.hget(k.head, "turn")
                        pipe.llen(k.inbox)
                    replies = await pipe.execute()
                for j, thread_id in enumerate(chunk):
                    turn, queued = replies[2 * j], int(replies[2 * j + 1])
                    turn = _as_str(turn) if turn else None
                    if turn is not None or queued > 0:
                        found[thread_id] = RecoverableThread(thread_id=thread_id, turn=turn)
        return [found[tid] for tid in sorted(found)]

    async def commit(self, request: CommitRequest) -> None:
        committer = self._committer
        if committer is None:
            raise StoreUnavailableError("store is closed")
        await committer.submit(request)

    async def _flush(self, batch: Sequence[_Request]) -> list[object]:
        if self._cluster is not None:
            return await self._flush_cluster(self._cluster, batch)
        with mapped("commit"):
            replies = await self._send(batch)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # The server lost its script cache (restart, SCRIPT FLUSH). A
                # NOSCRIPT reply means the script did not run: send those again.
                self._commit_script.sha = await self._client.script_load(_COMMIT_LUA)
                self._acquire_script.sha = await self._client.script_load(_ACQUIRE_LUA)
                self._enqueue_script.sha = await self._client.script_load(_ENQUEUE_LUA)
                again = await self._send([batch[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        return [self._outcome(r, reply) for r, reply in zip(batch, replies, strict=True)]

    def _outcome(self, r: _Request, reply: Any) -> object:
        if isinstance(r, CommitRequest):
            return self._result(r, reply)
        if isinstance(r, AcquireRequest):
            return _epoch(r, reply, self.layout.partition_of(r.thread_id))
        if isinstance(reply, PersistenceError):
            return reply
        if isinstance(reply, Exception):
            return unavailable(f"redis enqueue to {r.thread_id!r} failed: {reply}", reply)
        return None

    async def _send(self, batch: Sequence[_Request]) -> list[Any]:
        """One pipeline for the batch; one reply (or error) per request."""
        refused: dict[int, FencedError] = {}  # index in batch -> refused here, not sent
        async with self._client.pipeline(transaction=False) as pipe:
            for n, r in enumerate(batch):
                call = self._call(r)
                if isinstance(call, FencedError):
                    refused[n] = call
                    continue
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                if _indexes(r):
                    # After the script: a delete that races with this first commit
                    # (or enqueue) sees the new head (or entry) and keeps the index entry.
                    pipe.sadd(self._index, r.thread_id)
            raw = await pipe.execute(raise_on_error=False) if len(refused) < len(batch) else []
        replies: list[Any] = []
        i = 0
        for n, r in enumerate(batch):
            if n in refused:
                replies.append(refused[n])
                continue
            reply = raw[i]
            i += 1
            if _indexes(r):
                indexed = raw[i]
                i += 1
                if isinstance(indexed, Exception) and not isinstance(reply, Exception):
                    reply = unavailable(
                        f"thread {r.thread_id!r} written but not indexed: {indexed}", indexed
                    )
            replies.append(reply)
        return replies

    def _result(self, r: CommitRequest, reply: Any) -> BaseException | None:
        if isinstance(reply, PersistenceError):
            return reply
        if isinstance(reply, Exception):
            return unavailable(f"redis commit of {r.thread_id!r} failed: {reply}", reply)
        try:
            status, version, third = (int(x) for x in reply)
        except (TypeError, ValueError) as exc:
            return unavailable(f"unexpected redis reply to a commit: {reply!r}", exc)
        if status == 0:
            return None
        if status == 5:
            return _lease_lost(r.thread_id, self.layout.partition_of(r.thread_id), "commit")
        try:
            if status == 3:  # the third value is the steps list's length
                check_records(r.thread_id, None if version < 0 else version, third)
            else:  # the third value is the stored epoch
                check_head(
                    r.thread_id,
                    None if status == 4 else version,
                    third,
                    r.expected_version,
                    r.epoch,
                )
        except PersistenceError as exc:
            return exc
        return ConflictError(  # unreachable unless the script and check_head disagree
            f"thread {r.thread_id!r} refused the commit (status {status})"
        )

    # -- a Redis Cluster ------------------------------------------------------

    async def _eval(
        self, script: AsyncScript, keys: tuple[str, ...], args: tuple[bytes | int | str, ...]
    ) -> Any:
        """One writing script: on a cluster through :meth:`_eval_on_nodes` (never
        retried after a lost reply), else through the client."""
        if self._cluster is None:
            return await script(keys=list(keys), args=list(args))
        (reply,) = await self._eval_on_nodes(self._cluster, [_Call(script, keys, args)])
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _call(self, r: _Request) -> _Call | FencedError:
        """The script call of a request (as ``_send`` pipelines it), or why it is refused."""
        k = self._keys(r.thread_id)
        if isinstance(r, EnqueueRequest):
            return _Call(self._enqueue_script, (k.inbox, k.told), (r.message_id, r.envelope))
        token = self._token(k.partition)
        if token is None:
            what = "activation" if isinstance(r, AcquireRequest) else "commit"
            return _lease_lost(r.thread_id, k.partition, what)
        if isinstance(r, AcquireRequest):
            return _Call(self._acquire_script, (k.head, k.lease), (token,))
        args: tuple[bytes | int | str, ...] = (
            r.expected_version,
            r.epoch,
            r.step,
            r.turn or "",
            r.consumed or "",
            token,
        )
        if r.full is not None:
            args = (*args, r.full, "1" if r.keep_full else "0")
        return _Call(
            self._commit_script, (k.head, k.steps, k.full, k.inbox, k.told, k.lease, k.fulls), args
        )

    async def _flush_cluster(self, client: RedisCluster, batch: Sequence[_Request]) -> list[object]:
        replies: list[Any] = [None] * len(batch)
        calls: list[_Call] = []
        sent: list[int] = []
        for n, r in enumerate(batch):
            call = self._call(r)
            if isinstance(call, FencedError):
                replies[n] = call
            else:
                calls.append(call)
                sent.append(n)
        for n, reply in zip(sent, await self._eval_on_nodes(client, calls), strict=True):
            replies[n] = reply
        # The index, once the scripts have run (as the standalone pipeline
        # orders it): a racing delete then sees the new head or inbox entry.
        indexed = [
            n for n in sent if _indexes(batch[n]) and not isinstance(replies[n], BaseException)
        ]
        if indexed:
            try:
                await client.sadd(self._index, *{batch[n].thread_id for n in indexed})
            except (RedisError, RedisClusterException, OSError) as exc:
                for n in indexed:
                    replies[n] = unavailable(
                        f"thread {batch[n].thread_id!r} written but not indexed: {exc}", exc
                    )
        return [self._outcome(r, reply) for r, reply in zip(batch, replies, strict=True)]

    async def _eval_on_nodes(self, client: RedisCluster, calls: Sequence[_Call]) -> list[Any]:
        """Run ``calls``: one pipeline per node that owns some of their slots, the
        nodes in parallel. One reply per call, in order: the script's, or an
        exception (a redis error, or ``StoreUnavailableError``).

        A call the node refused without running it is sent again, at most
        ``_CLUSTER_ROUNDS`` times in all: after ``MOVED`` to the slot's new
        owner (the cluster client's slot map is refreshed), after ``ASK`` to
        the migration's target (with ``ASKING``), after ``TRYAGAIN`` (the
        slot is being migrated and the thread's keys are not all on one side
        yet) after a growing pause, after ``NOSCRIPT`` once the script is
        loaded on every primary. A call whose reply was lost (the connection
        failed) is never sent again: a commit applied twice would answer
        ``ConflictError``.
        """
        replies: list[Any] = [None] * len(calls)
        if self._refresh_slots:
            self._refresh_slots = False
            await self._reload_slots(client)
        todo = list(range(len(calls)))
        asking: dict[int, ClusterNode] = {}
        pause = _TRYAGAIN_PAUSE
        for round_ in range(1, _CLUSTER_ROUNDS + 1):
            by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                node = asking.get(i) or self._node_of(client, calls[i].keys[0])
                if isinstance(node, Exception):
                    replies[i] = node
                    continue
                by_node.setdefault(node.name, (node, []))[1].append(i)
            async with anyio.create_task_group() as tg:
                for node, indices in by_node.values():
                    tg.start_soon(self._node_pipeline, node, indices, calls, replies, asking)
            todo = [i for i in todo if _not_run(replies[i])]
            if not todo or round_ == _CLUSTER_ROUNDS:
                break
            todo = await self._before_resending(client, calls, replies, todo, asking)
            if any(isinstance(replies[i], TryAgainError) for i in todo):
                await anyio.sleep(pause)
                pause = min(2 * pause, _TRYAGAIN_PAUSE_MAX)
        for i in todo:
            replies[i] = unavailable(
                f"not written: the cluster refused it {_CLUSTER_ROUNDS} times "
                f"(its slot is being migrated?): {replies[i]}",
                replies[i],
            )
        return replies

    async def _before_resending(
        self,
        client: RedisCluster,
        calls: Sequence[_Call],
        replies: list[Any],
        todo: list[int],
        asking: dict[int, ClusterNode],
    ) -> list[int]:
        """Learn from the refusals of ``todo``: where each goes next (``asking``
        is rewritten: the calls to send with ``ASKING``, and to which node),
        the slot map, the scripts. Returns the calls to send again."""
        reload_slots = False
        scripts: dict[str, AsyncScript] = {}
        previous = dict(asking)
        asking.clear()
        for i in todo:
            reply = replies[i]
            if isinstance(reply, MovedError):
                reload_slots = True
            elif isinstance(reply, AskError):
                target = client.get_node(host=reply.host, port=reply.port)
                if target is None:
                    reload_slots = True
                else:
                    asking[i] = target
            elif isinstance(reply, TryAgainError):
                if i in previous:  # the migration's target: ask it again
                    asking[i] = previous[i]
            else:  # NOSCRIPT
                scripts[str(calls[i].script.sha)] = calls[i].script
        if reload_slots:
            await self._reload_slots(client)
        for script in scripts.values():
            try:  # SCRIPT LOAD goes to every primary
                script.sha = await client.script_load(script.script)
            except (RedisError, RedisClusterException, OSError) as exc:
                for i in todo:
                    if calls[i].script is script:
                        replies[i] = exc
                todo = [i for i in todo if calls[i].script is not script]
        return todo

    @staticmethod
    def _node_of(client: RedisCluster, key: str) -> ClusterNode | Exception:
        try:
            node = client.get_node_from_key(key)
        except (RedisError, RedisClusterException) as exc:
            return exc
        if node is None:
            return RedisClusterException(f"no node serves the slot of {key!r}")
        return node

    async def _reload_slots(self, client: RedisCluster) -> None:
        """Ask the cluster which node serves which slot (``CLUSTER SLOTS``)."""
        try:
            await client.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError):
            self._refresh_slots = True  # the calls fail on their own; try again next time

    async def _node_pipeline(
        self,
        node: ClusterNode,
        indices: list[int],
        calls: Sequence[_Call],
        replies: list[Any],
        asking: dict[int, ClusterNode],
    ) -> None:
        """Send ``calls[i]`` for each of ``indices`` to ``node`` in one pipeline.

        ``ClusterNode.execute_pipeline`` is what redis-py's own cluster pipeline
        runs per node: one connection, no retry, each command's reply or error
        in its ``result``.
        """
        commands: list[PipelineCommand] = []
        for i in indices:
            if i in asking:
                commands.append(PipelineCommand(len(commands), "ASKING"))
            script, keys, args = calls[i]
            commands.append(
                PipelineCommand(len(commands), "EVALSHA", script.sha, len(keys), *keys, *args)
            )
        try:
            await node.execute_pipeline(commands)
        except Exception as exc:  # the connection failed: each call's outcome is unknown
            for i in indices:
                replies[i] = exc
            self._refresh_slots = True
            return
        results = (command.result for command in commands if command.args[0] == "EVALSHA")
        for i, result in zip(indices, results, strict=True):
            replies[i] = result
            if isinstance(result, RedisConnectionError | RedisTimeoutError | OSError):
                self._refresh_slots = True
