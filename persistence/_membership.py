"""Worker membership: who is alive, by heartbeats into one Redis sorted set.

``<prefix>:workers`` maps each worker id to the Redis time (ms) its
membership expires. A heartbeat re-adds the worker with ``now + ttl`` and
drops members whose expiry has passed; a worker is live while its expiry is
in the future. As with leases, Redis's clock decides, never a client's. The
key is untagged and every script touches only it (one key: one slot).

Membership only steers placement (who *should* own a partition); it never
decides who *may* write, which is the lease's job. A worker that missed its
heartbeats but still holds a lease stays the only writer until the lease
expires.
"""

from __future__ import annotations

from typing import Final

from redis.commands.core import AsyncScript

from ._leases import DEFAULT_LEASE_TTL_MS, NOW_LUA, AnyRedis, check_ttl_ms, check_worker_id
from ._partitions import KeyLayout
from ._redis_client import mapped

__all__ = ["Membership"]

# KEYS: workers. ARGV: worker, ttl_ms. Returns the new expiry (Redis ms).
_HEARTBEAT_LUA: Final = (
    NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
return expiry
"""
)

# KEYS: workers. Read-only. Returns the members whose expiry is after now.
_LIVE_LUA: Final = (
    NOW_LUA
    + """
return redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')
"""
)


class Membership:
    """Heartbeats and the live worker set of one deployment.

    ``ttl_ms`` is how long one heartbeat keeps a worker live (default 10 s,
    like a lease; beat every ``ttl_ms / 5``). The client is never closed here.
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
        self._heartbeat: AsyncScript = client.register_script(_HEARTBEAT_LUA)
        self._live: AsyncScript = client.register_script(_LIVE_LUA)

    def __repr__(self) -> str:
        return f"Membership(layout={self.layout!r}, ttl_ms={self.ttl_ms})"

    async def heartbeat(self, worker: str) -> int:
        """Mark ``worker`` live for ``ttl_ms`` more; the Redis time (ms) it expires."""
        check_worker_id(worker)
        with mapped("membership heartbeat"):
            reply = await self._heartbeat(keys=[self.layout.workers], args=[worker, self.ttl_ms])
        return int(reply)

    async def live_workers(self) -> list[str]:
        """The workers whose membership has not expired (Redis time), sorted."""
        with mapped("membership read"):
            reply = await self._live(keys=[self.layout.workers])
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in reply)

    async def leave(self, worker: str) -> None:
        """Drop ``worker`` at once (a graceful stop, after releasing its leases)."""
        with mapped("membership leave"):
            await self._client.zrem(self.layout.workers, worker)
