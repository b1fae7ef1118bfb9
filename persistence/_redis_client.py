"""The redis-py client under the Redis stores: made or checked, closed, errors mapped."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import anyio
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from threadline.actors import StoreUnavailableError

__all__ = [
    "check_prefix",
    "close_client",
    "CLUSTER_SCHEMES",
    "any_client_from_url",
    "client_from_url",
    "mapped",
    "store_client",
]

C = TypeVar("C", bound=redis.asyncio.Redis | RedisCluster)

_SCHEMES: Final = ("redis", "rediss", "unix")
_CLOSE_TIMEOUT: Final = 10.0


def check_prefix(prefix: str) -> None:
    """Refuse braces: the stores put hash tags (``{...}``) in their keys."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"prefix must not contain braces, got {prefix!r}")


def store_client(client: C | None, store: str, default: Callable[[], C]) -> tuple[C, bool]:
    """The client ``store`` uses and whether it owns it (it does when it made it).

    A client passed in (standalone or Cluster) must not decode responses (the
    stores read bytes).
    """
    if client is None:
        return default(), True
    if isinstance(client, RedisCluster):
        decodes = client.get_encoder().decode_responses
    else:
        decodes = client.connection_pool.connection_kwargs.get("decode_responses")
    if decodes:
        raise ValueError(f"{store} needs a client with decode_responses=False")
    return client, False


def client_from_url(url: str, store: str, **kwargs: Any) -> redis.asyncio.Redis:
    """A client for ``store`` made from ``url`` (``redis://``, ``rediss://``, ``unix://``).

    The pool blocks when all its connections are busy (``max_connections``,
    default 16; ``timeout``, seconds to wait for one, default 30): a thousand
    actors activating at once queue for a connection instead of failing with
    "Too many connections". Other ``kwargs`` are connection options. Such
    clients do not retry (redis-py's default for URL-built pools): a retried
    commit whose reply was lost would look like a conflict.
    """
    scheme = url.partition("://")[0]
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"not a redis URL: {scheme!r} scheme")
    if kwargs.get("decode_responses"):
        raise ValueError(f"{store} needs decode_responses=False")
    kwargs.setdefault("max_connections", 16)
    kwargs.setdefault("timeout", 30.0)
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, **kwargs)
    return redis.asyncio.Redis.from_pool(pool)  # the client owns (and closes) the pool


CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that name a node of a Redis Cluster (``redis+cluster://host:port``):
the client discovers the other nodes from it."""


def any_client_from_url(url: str, store: str, **kwargs: Any) -> redis.asyncio.Redis | RedisCluster:
    """``client_from_url``, or for ``redis+cluster://`` (``rediss+cluster://``) a
    Redis Cluster client, whose ``max_connections`` (default 64) bounds each
    node's pool."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        return client_from_url(url, store, **kwargs)
    if kwargs.get("decode_responses"):
        raise ValueError(f"{store} needs decode_responses=False")
    kwargs.pop("timeout", None)  # a blocking-pool option: a cluster's pools have none
    kwargs.setdefault("max_connections", 64)
    return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}", **kwargs)


async def close_client(client: redis.asyncio.Redis | RedisCluster) -> None:
    """Close a client the store owns: shielded, bounded, never raising."""
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(_CLOSE_TIMEOUT),
        contextlib.suppress(RedisError, OSError),
    ):
        await client.aclose()


@contextlib.contextmanager
def mapped(what: str) -> Iterator[None]:
    """Turn every redis-py (and socket) failure into ``StoreUnavailableError``.

    A Cluster client's own errors (no node serves a slot, the cluster cannot
    be reached) are ``RedisClusterException``, which is not a ``RedisError``.
    """
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StoreUnavailableError(f"redis {what} failed: {exc}") from exc
