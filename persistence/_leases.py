"""Partition leases with a fencing epoch, kept in Redis.

One lease per partition, a string ``<prefix>:{pNNN}:lease`` holding the token
``"<epoch>:<worker>"`` with a Redis expiry (``PX``). Acquiring it when it is
absent increments ``<prefix>:{pNNN}:epoch`` (never decremented, never
deleted), so every grant has a new epoch. The token is the epoch *and* the
worker: after a Redis failover that lost the last ``INCR``, an epoch may be
issued again, but to a token that still differs from the old holder's.

Redis's clock decides when a lease expires; a client's clock never does.
Each script reads ``TIME`` and returns it, so callers learn when (on Redis's
clock) they acquired or renewed.

Writing scripts elsewhere fence themselves with :data:`FENCE_CHECK_LUA`: its
first line compares the lease with the writer's token and answers the error
``FENCED`` on a mismatch, before the script writes anything. Every script's
keys share the partition's hash tag, so all of them run on a Redis Cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from threadline.actors import FencedError, PersistenceError, StoreUnavailableError

from ._partitions import KeyLayout, PartitionKeys
from ._redis_client import mapped

__all__ = [
    "DEFAULT_LEASE_TTL_MS",
    "FENCE_CHECK_LUA",
    "NOW_LUA",
    "AnyRedis",
    "Lease",
    "PartitionLeases",
    "check_ttl_ms",
    "check_worker_id",
    "fenced_mapped",
    "fenced_script",
    "is_fenced_reply",
]

AnyRedis = redis.asyncio.Redis | RedisCluster
"""A standalone client or a Cluster client (both asyncio)."""

DEFAULT_LEASE_TTL_MS: Final = 10_000

NOW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
"""Lua that sets ``now`` to Redis's time in milliseconds: the first lines of a
script that needs it. A script may read TIME and then write (Redis 7
replicates a script's effects, not the script)."""

# KEYS: lease, epoch. ARGV: worker, ttl_ms.
# Returns {epoch, now} when granted, {0, now, token} when someone holds it.
_ACQUIRE_LUA: Final = (
    NOW_LUA
    + """
local held = redis.call('GET', KEYS[1])
if held then
  return {0, now, held}
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], epoch .. ':' .. ARGV[1], 'PX', ARGV[2])
return {epoch, now}
"""
)

# KEYS: lease. ARGV: token, ttl_ms.
# Returns {1, now} renewed, {0, now} absent (expired), {-1, now, token} taken.
_RENEW_LUA: Final = (
    NOW_LUA
    + """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, now}
end
if not held then
  return {0, now}
end
return {-1, now, held}
"""
)

# KEYS: lease. ARGV: token. Returns 1 when released, 0 when not ours.
_RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: lease. Read-only. Returns false, or {token, pttl, now}.
_HOLDER_LUA: Final = (
    NOW_LUA
    + """
local held = redis.call('GET', KEYS[1])
if not held then
  return false
end
return {held, redis.call('PTTL', KEYS[1]), now}
"""
)

FENCE_CHECK_LUA: Final = (
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end\n"
)
"""The first line of a lease-checked script: ``KEYS[1]`` is the partition's
lease key, ``ARGV[1]`` the writer's token. A mismatch (another holder, or
none) answers the error ``FENCED`` before anything is written."""

_MAX_WORKER_ID: Final = 200


def fenced_script(body: str) -> str:
    """``body`` preceded by :data:`FENCE_CHECK_LUA` (``KEYS[1]`` = lease, ``ARGV[1]`` = token)."""
    return FENCE_CHECK_LUA + body


def is_fenced_reply(reply: object) -> bool:
    """Whether ``reply`` (e.g. from a pipeline with ``raise_on_error=False``) is ``FENCED``."""
    return isinstance(reply, ResponseError) and str(reply).startswith("FENCED")


@contextlib.contextmanager
def fenced_mapped(what: str) -> Iterator[None]:
    """Like ``mapped``, but a ``FENCED`` error reply becomes :class:`FencedError`."""
    try:
        yield
    except ResponseError as exc:
        if is_fenced_reply(exc):
            raise FencedError(f"redis {what} refused: the lease is held by another token") from exc
        raise StoreUnavailableError(f"redis {what} failed: {exc}") from exc
    except (RedisError, OSError) as exc:
        raise StoreUnavailableError(f"redis {what} failed: {exc}") from exc


def check_ttl_ms(ttl_ms: object) -> int:
    """A lease or heartbeat lifetime: a positive int of milliseconds."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 1:
        raise ValueError(f"ttl_ms must be a positive int, got {ttl_ms!r}")
    return ttl_ms


def check_worker_id(worker: str) -> str:
    """``worker`` if it can name a worker (printable, 1 to 200 characters)."""
    if not isinstance(worker, str) or not 0 < len(worker) <= _MAX_WORKER_ID:
        raise ValueError(f"a worker id is a str of 1 to {_MAX_WORKER_ID} characters")
    if not worker.isprintable() or worker != worker.strip():
        raise ValueError(f"a worker id must be printable, without spaces around: {worker!r}")
    return worker


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """A grant of one partition to one worker, as Redis saw it at ``server_ms``.

    Times are Redis's (milliseconds since the Unix epoch): the holder may
    write while the lease is in Redis with its token; ``expires_ms`` is when
    Redis drops it unless it is renewed.
    """

    partition: int
    epoch: int
    worker: str
    server_ms: int
    """Redis time of the acquire, the renew or the look that produced this value."""
    expires_ms: int
    sent_at: float = 0.0
    """``anyio.current_time()`` when that request was sent: the local clock,
    for self-fencing only (stop work ``0.7 * ttl`` after the last good renew
    was *sent*; the lease cannot have lasted longer). Safety never reads it."""

    @property
    def token(self) -> str:
        """``"<epoch>:<worker>"``: what the lease key holds and fenced scripts compare."""
        return f"{self.epoch}:{self.worker}"


def _parse_token(
    partition: int, token: str, server_ms: int, expires_ms: int, sent_at: float
) -> Lease:
    epoch, sep, worker = token.partition(":")
    if not sep or not epoch.isdigit() or not worker:
        raise PersistenceError(f"malformed lease of partition {partition}: {token!r}")
    return Lease(
        partition=partition,
        epoch=int(epoch),
        worker=worker,
        server_ms=server_ms,
        expires_ms=expires_ms,
        sent_at=sent_at,
    )


class PartitionLeases:
    """The lease table of one deployment: acquire, renew, release, look.

    ``client`` is a standalone or Cluster asyncio client; the table never
    closes it. ``ttl_ms`` is how long a grant or a renewal lasts (default
    10 s; renew every ``ttl_ms / 5``). Every Redis failure raises
    :class:`StoreUnavailableError`.

    A client that retries is safe here: renew and release are idempotent,
    and an acquire retried after a lost reply answers ``None`` while the
    first attempt's grant stays unused until it expires (:meth:`holder`
    shows it).
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        layout: KeyLayout | None = None,
        ttl_ms: int = DEFAULT_LEASE_TTL_MS,
    ) -> None:
        self._client = client
        self.layout = layout if layout is not None else KeyLayout()
        self.ttl_ms = check_ttl_ms(ttl_ms)
        self._acquire: AsyncScript = client.register_script(_ACQUIRE_LUA)
        self._renew: AsyncScript = client.register_script(_RENEW_LUA)
        self._release: AsyncScript = client.register_script(_RELEASE_LUA)
        self._holder: AsyncScript = client.register_script(_HOLDER_LUA)

    def __repr__(self) -> str:
        return f"PartitionLeases(layout={self.layout!r}, ttl_ms={self.ttl_ms})"

    def keys(self, partition: int) -> PartitionKeys:
        return self.layout.partition(partition)

    async def acquire(self, partition: int, worker: str) -> Lease | None:
        """Take ``partition`` for ``worker`` with a new epoch, or ``None`` if it is held.

        A worker that already holds it gets ``None`` too: a grant is never
        extended by acquiring, only by :meth:`renew`.
        """
        check_worker_id(worker)
        keys = self.keys(partition)
        sent_at = anyio.current_time()
        with mapped(f"lease acquire of partition {partition}"):
            reply = await self._acquire(keys=[keys.lease, keys.epoch], args=[worker, self.ttl_ms])
        try:
            epoch, now = int(reply[0]), int(reply[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise PersistenceError(f"unexpected reply to a lease acquire: {reply!r}") from exc
        if epoch == 0:
            return None
        return Lease(
            partition=partition,
            epoch=epoch,
            worker=worker,
            server_ms=now,
            expires_ms=now + self.ttl_ms,
            sent_at=sent_at,
        )

    async def renew(self, lease: Lease) -> Lease | None:
        """Extend ``lease`` by ``ttl_ms`` from now (Redis time) if its token still holds.

        Returns the renewed lease, or ``None`` when the lease expired and
        nobody took it (acquire again, with a new epoch). Raises
        :class:`FencedError` when another token holds the partition.
        """
        keys = self.keys(lease.partition)
        sent_at = anyio.current_time()
        with mapped(f"lease renew of partition {lease.partition}"):
            reply = await self._renew(keys=[keys.lease], args=[lease.token, self.ttl_ms])
        try:
            status, now = int(reply[0]), int(reply[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise PersistenceError(f"unexpected reply to a lease renew: {reply!r}") from exc
        if status == 1:
            return msgspec.structs.replace(
                lease, server_ms=now, expires_ms=now + self.ttl_ms, sent_at=sent_at
            )
        if status == 0:
            return None
        raise FencedError(
            f"partition {lease.partition} is held by {_text(reply[2])!r}, not {lease.token!r}"
        )

    async def release(self, lease: Lease) -> bool:
        """Drop ``lease`` if its token still holds; whether it did."""
        keys = self.keys(lease.partition)
        with mapped(f"lease release of partition {lease.partition}"):
            reply = await self._release(keys=[keys.lease], args=[lease.token])
        return int(reply) == 1

    async def holder(self, partition: int) -> Lease | None:
        """Who holds ``partition`` now, as Redis sees it, or ``None``."""
        keys = self.keys(partition)
        sent_at = anyio.current_time()
        with mapped(f"lease look-up of partition {partition}"):
            reply = await self._holder(keys=[keys.lease])
        if reply is None:
            return None
        try:
            token, pttl, now = _text(reply[0]), int(reply[1]), int(reply[2])
        except (TypeError, ValueError, IndexError) as exc:
            raise PersistenceError(f"unexpected reply to a lease look-up: {reply!r}") from exc
        return _parse_token(partition, token, now, now + max(pttl, 0), sent_at)
