"""``RedisStore``: the cross-conversation store in plain Redis (7+, no modules).

Keys (all carry the hash tag ``{<prefix>}``, so the multi-key transactions
and the Lua script below touch a single slot: Redis Cluster safe, at the price
of keeping one store in one slot)::

    {<prefix>}:index             sorted set, every score 0, members = <ns><KEY_MARK><key>
    {<prefix>}:item:<member>     hash: v (JSON value), c (created_at), u (updated_at),
                                 e (expires_at or ""); PEXPIRE'd when put with a ttl

``<ns>`` is the namespace encoded as in :mod:`._kv` (every segment followed by
U+0002, the key after U+0001; control characters never occur in a segment or
key). Members therefore sort (bytewise, as ZRANGEBYLEX compares) exactly like
``(namespace, key)`` tuples, and the items under a prefix are one lexicographic
range ``[<prefix ns>, <prefix ns without its last U+0002> U+0003)``: exact per
segment, no patterns.

``put`` and ``delete`` update the item and the index in one MULTI/EXEC. An
item with a ttl expires by itself (Redis's clock); its index member stays
until a reader finds the item gone and removes the member with a script that
checks, atomically, that the item is still gone (so a concurrent ``put`` of
the same key never loses its index member).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, Self

import msgspec
import redis.asyncio
from redis.commands.core import AsyncScript

from threadline.actors import ItemCorruptError, StoreUnavailableError

from ._items import (
    KEY_MARK,
    Item,
    Namespace,
    SearchPage,
    check_key,
    check_listing,
    check_namespace,
    check_search,
    check_ttl,
    decode_namespace,
    decode_value,
    encode_namespace,
    encode_value,
    prefix_upper_bound,
    truncate_namespaces,
    ttl_ms,
)
from ._lifecycle import ExcInfo, Reentrant
from ._redis_client import check_prefix, client_from_url, close_client, mapped, store_client

__all__ = ["RedisStore"]

# KEYS: index, item keys. ARGV: the index members of those items.
# Removes the members whose item key does not exist; returns how many.
_DROP_DEAD_LUA: Final = """
local removed = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i - 1])
  end
end
return removed
"""

_FIELDS: Final = ("v", "c", "u", "e")
_PAGE: Final = 500


def _member(namespace: Namespace, key: str) -> bytes:
    return (encode_namespace(namespace) + KEY_MARK + key).encode()


def _split_member(member: bytes) -> tuple[Namespace, str]:
    ns, mark, key = member.decode().partition(KEY_MARK)
    if not mark:
        raise ValueError(f"not an index member: {member!r}")
    return decode_namespace(ns), key


class RedisStore(Reentrant):
    """Cross-conversation items in Redis.

    With no ``client``, the store creates ``redis.asyncio.Redis()`` (localhost)
    and owns it; a client passed in is never closed by the store and must not
    decode responses. ``prefix`` namespaces every key (no braces allowed); two
    stores with the same prefix on the same server see the same items.
    """

    def __init__(
        self, client: redis.asyncio.Redis | None = None, *, prefix: str = "threadline:store"
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        check_prefix(prefix)
        client, self._owns_client = store_client(client, "RedisStore", redis.asyncio.Redis)
        self._client = client
        self._prefix = prefix
        self._index = f"{{{prefix}}}:index".encode()
        self._item_prefix = f"{{{prefix}}}:item:".encode()
        self._drop_dead: AsyncScript = client.register_script(_DROP_DEAD_LUA)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "threadline:store", **kwargs: Any) -> Self:
        """A store on a client made from ``url`` (``redis://``, ``rediss://``, ``unix://``).

        ``kwargs`` go to ``redis.asyncio.Redis.from_url``. The store owns the
        client and closes it on exit.
        """
        client = client_from_url(url, "RedisStore", **kwargs)
        store = cls(client, prefix=prefix)
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"

    # -- lifecycle ---------------------------------------------------------

    async def _close(self, exc_info: ExcInfo) -> None:
        if self._owns_client:
            await close_client(self._client)

    def _check_open(self) -> None:
        if self._entered == 0:
            raise StoreUnavailableError("store is closed")

    def _item_key(self, member: bytes) -> bytes:
        return self._item_prefix + member

    # -- reads -------------------------------------------------------------

    def _item(self, member: bytes, fields: Sequence[Any]) -> Item | None:
        """The item from its hash fields (None if the item key is gone)."""
        raw, created, updated, expires = fields
        if raw is None:
            return None
        try:
            namespace, key = _split_member(member)
            return Item(
                namespace=namespace,
                key=key,
                value=decode_value(raw),
                created_at=float(created),
                updated_at=float(updated),
                expires_at=float(expires) if expires else None,
            )
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            raise ItemCorruptError(
                f"redis store {self._prefix!r}: undecodable item {member!r}: {exc}"
            ) from exc

    async def get(self, namespace: Namespace, key: str) -> Item | None:
        member = _member(check_namespace(namespace), check_key(key))
        self._check_open()
        with mapped("store get"):
            fields = await self._client.hmget(self._item_key(member), list(_FIELDS))
        return self._item(member, fields)

    @staticmethod
    def _bounds(prefix: Namespace) -> tuple[bytes, bytes]:
        """ZRANGEBYLEX bounds of the members under ``prefix``."""
        upper = prefix_upper_bound(prefix)
        if upper is None:
            return b"-", b"+"
        return b"[" + encode_namespace(prefix).encode(), b"(" + upper.encode()

    async def _page(
        self, low: bytes, high: bytes, size: int
    ) -> tuple[list[tuple[bytes, Item | None]], bytes | None]:
        """Up to ``size`` members from ``low`` with their items (None = gone).

        Returns the page and the ``low`` bound of the next one (None at the end).
        Index members whose item is gone are removed on the way.
        """
        with mapped("store scan"):
            members = [
                m if isinstance(m, bytes) else m.encode()
                for m in await self._client.zrangebylex(self._index, low, high, 0, size)
            ]
            if not members:
                return [], None
            async with self._client.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hmget(self._item_key(member), list(_FIELDS))
                replies = await pipe.execute()
        page = [
            (member, self._item(member, fields))
            for member, fields in zip(members, replies, strict=True)
        ]
        dead = [member for member, item in page if item is None]
        if dead:
            await self._drop(dead)
        return page, (None if len(members) < size else b"(" + members[-1])

    async def _drop(self, members: Sequence[bytes]) -> None:
        """Remove index members whose item is (still) gone: the lazy purge."""
        with mapped("store purge"):
            await self._drop_dead(
                keys=[self._index, *(self._item_key(m) for m in members)], args=list(members)
            )

    async def search(
        self,
        namespace_prefix: Namespace,
        *,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[Item]:
        prefix, wanted, limit, offset = check_search(namespace_prefix, filter, limit, offset)
        self._check_open()
        found = SearchPage(wanted, limit, offset)
        if found.full:
            return found.items
        # Every index member must be checked (its item may have expired), so
        # the offset cannot be handed to ZRANGEBYLEX.
        size = min(_PAGE, max(16, offset + limit))
        low: bytes | None
        low, high = self._bounds(prefix)
        while low is not None:
            page, low = await self._page(low, high, size)
            for _, item in page:
                if item is not None and found.offer(item):
                    return found.items
        return found.items

    async def list_namespaces(
        self,
        *,
        prefix: Namespace | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Namespace]:
        p, depth, limit, offset = check_listing(prefix, max_depth, limit, offset)
        self._check_open()
        if limit == 0:
            return []
        # Members come in namespace order and truncation keeps that order, so
        # the distinct namespaces arrive sorted: stop once the page is full.
        found: list[Namespace] = []
        low: bytes | None
        low, high = self._bounds(p)
        while low is not None and len(found) < offset + limit:
            page, low = await self._page(low, high, _PAGE)
            for _, item in page:
                if item is None:
                    continue
                ns = item.namespace if depth is None else item.namespace[:depth]
                if not found or found[-1] != ns:
                    found.append(ns)
        return truncate_namespaces(found, None, limit, offset)

    # -- writes ------------------------------------------------------------

    async def put(
        self, namespace: Namespace, key: str, value: dict[str, Any], *, ttl: float | None = None
    ) -> None:
        member = _member(check_namespace(namespace), check_key(key))
        raw = encode_value(value)
        seconds = check_ttl(ttl)
        self._check_open()
        now = time.time()
        item_key = self._item_key(member)
        with mapped("store put"):
            async with self._client.pipeline(transaction=True) as pipe:
                # created_at survives an overwrite (HSETNX); an expired item is
                # gone, so it starts afresh.
                pipe.hsetnx(item_key, "c", repr(now))
                pipe.hset(
                    item_key,
                    mapping={
                        "v": raw,
                        "u": repr(now),
                        "e": "" if seconds is None else repr(now + seconds),
                    },
                )
                if seconds is None:
                    pipe.persist(item_key)
                else:
                    pipe.pexpire(item_key, ttl_ms(seconds))
                pipe.zadd(self._index, {member: 0})
                await pipe.execute()

    async def delete(self, namespace: Namespace, key: str) -> None:
        member = _member(check_namespace(namespace), check_key(key))
        self._check_open()
        with mapped("store delete"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._item_key(member))
                pipe.zrem(self._index, member)
                await pipe.execute()
