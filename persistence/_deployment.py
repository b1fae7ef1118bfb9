"""A Redis deployment of workers and clients: connecting, and its fixed settings.

The config hash ``<prefix>:config`` holds what every process of a deployment
must agree on: ``partitions`` (the partition count) and ``format`` (the key
layout). Layout format 2 keeps every key of a thread under its partition's
hash tag (``<prefix>:{pNNN}:t:<escaped id>:<part>``); format 1, the layout
before it, kept them under a hash tag of their own
(``<prefix>:t:{<escaped id>}:<part>``) and wrote no ``format`` field. A
process never reads one layout as the other (format-1 threads would simply
look absent): :func:`deployment_layout` refuses a prefix that holds format-1
keys until ``threadline migrate`` (:func:`~._migrate.migrate_layout`) has
moved them.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shlex
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from threadline.actors import SnapshotFormatError

from ._leases import AnyRedis
from ._partitions import KeyLayout, escape_key_id
from ._redis_client import any_client_from_url, close_client, mapped

DEPLOYMENT_PARTITIONS: Final = 64
"""The partition count a new deployment gets: 64 is ample for a handful of
workers and costs an idle worker little (one inbox read each)."""

LAYOUT_FORMAT: Final = 2
"""The key layout this threadline reads and writes (the config's ``format``)."""

OLD_THREAD_PARTS: Final = ("head", "steps", "full", "inbox", "told", "dead")
"""The keys of a thread in the format-1 layout, ``<prefix>:t:{<escaped id>}:<part>``."""

SCAN_COUNT: Final = 1000
"""``SCAN ... COUNT``: keys a server looks at per call (a hint, not a limit)."""


@contextlib.asynccontextmanager
async def open_redis(url: str, what: str, **options: Any) -> AsyncIterator[AnyRedis]:
    """A client for ``url``, closed on exit (``options`` as for ``any_client_from_url``:
    ``redis+cluster://`` gives a Redis Cluster client)."""
    client = any_client_from_url(url, what, **options)
    try:
        yield client
    finally:
        await close_client(client)


async def deployment_layout(
    client: AnyRedis, prefix: str, partitions: int | None = None
) -> KeyLayout:
    """The key layout of the deployment under ``prefix``.

    The partition count is written once (``HSETNX``), by whoever comes first,
    and read by everyone after: a worker or client that asks for another count
    is refused rather than routing threads to other partitions (``ValueError``).

    The layout format is written with it (``format`` = :data:`LAYOUT_FORMAT`)
    when the deployment is new. ``SnapshotFormatError`` refuses a deployment
    whose ``format`` is newer than this threadline's, or one without a
    ``format`` that holds format-1 keys (the thread index is not empty, or a
    ``SCAN`` finds a format-1 thread key): its message gives the
    ``threadline migrate`` command that moves them. Nothing is written then.

    One round trip when the deployment exists with its format; the search for
    format-1 keys (a ``SCAN`` of the whole keyspace, of every primary on a
    Cluster) only when it has none. Processes of an older threadline must not
    run beside this one (they would write format-1 keys nobody reads).
    """
    wanted = KeyLayout(prefix=prefix, partitions=partitions or DEPLOYMENT_PARTITIONS)
    with mapped("deployment config"):
        stored, layout_format = await client.hmget(wanted.config, ["partitions", "format"])
        found = parse_layout_format(client, prefix, layout_format)
        if found is None and await old_layout_found(client, prefix):
            raise SnapshotFormatError(old_layout_message(client, prefix))
        if found is None or stored is None:
            async with client.pipeline(transaction=False) as pipe:  # one round trip
                pipe.hsetnx(wanted.config, "partitions", wanted.partitions)
                pipe.hsetnx(wanted.config, "format", LAYOUT_FORMAT)
                pipe.hmget(wanted.config, ["partitions", "format"])
                *_, (stored, layout_format) = await pipe.execute()
            parse_layout_format(client, prefix, layout_format)  # a newer one may have won
    count = int(stored)
    if partitions is not None and count != partitions:
        raise ValueError(
            f"the deployment {prefix!r} has {count} partitions, not {partitions} "
            "(the count is fixed when the deployment is first used)"
        )
    return KeyLayout(prefix=prefix, partitions=count)


def parse_layout_format(
    client: AnyRedis | None, prefix: str, value: bytes | str | None
) -> int | None:
    """The config's ``format``: ``None`` if absent; ``SnapshotFormatError`` if it is
    not :data:`LAYOUT_FORMAT` (a newer one, or an old one to migrate)."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    try:
        found = int(text)
    except ValueError:
        raise SnapshotFormatError(
            f"the deployment {prefix!r} has an unreadable key layout format {text!r}"
        ) from None
    if found > LAYOUT_FORMAT:
        raise SnapshotFormatError(
            f"the deployment {prefix!r} uses key layout format {found}, written by a newer "
            f"threadline; this one reads format {LAYOUT_FORMAT} (upgrade threadline)"
        )
    if found < LAYOUT_FORMAT:
        raise SnapshotFormatError(old_layout_message(client, prefix))
    return found


# -- the format-1 layout ------------------------------------------------------------

_GLOB_SPECIAL: Final = re.compile(r"([\\*?\[\]])")
_UNESCAPES: Final = {"%25": "%", "%7B": "{", "%7D": "}"}


def old_key(prefix: str, thread_id: str, part: str) -> str:
    """The format-1 key of ``part`` of ``thread_id``: ``<prefix>:t:{<escaped id>}:<part>``."""
    return f"{prefix}:t:{{{escape_key_id(thread_id)}}}:{part}"


def old_key_pattern(prefix: str) -> str:
    """A ``SCAN MATCH`` pattern for the format-1 thread keys (glob characters of
    ``prefix`` escaped; :func:`parse_old_key` has the last word)."""
    return _GLOB_SPECIAL.sub(r"\\\1", prefix) + ":t:{*}:*"


@functools.lru_cache(maxsize=64)
def _old_key_re(prefix: str) -> re.Pattern[str]:
    parts = "|".join(OLD_THREAD_PARTS)
    return re.compile(rf"{re.escape(prefix)}:t:\{{([^{{}}]*)\}}:({parts})", re.DOTALL)


def parse_old_key(prefix: str, key: bytes | str) -> tuple[str, str] | None:
    """``(thread id, part)`` of a format-1 thread key under ``prefix``, else ``None``.

    Only an exact format-1 name counts: ``<prefix>:t:{<escaped id>}:<part>``
    with one of :data:`OLD_THREAD_PARTS` (another deployment's key, such as
    ``<prefix>:t:{p001}:lease`` of the prefix ``<prefix>:t``, does not), and an
    id that escapes back to itself.
    """
    if isinstance(key, bytes):
        try:
            key = key.decode()
        except UnicodeDecodeError:
            return None  # never written from a str id
    match = _old_key_re(prefix).fullmatch(key)
    if match is None:
        return None
    escaped, part = match.groups()
    thread_id = re.sub(r"%(25|7B|7D)", lambda m: _UNESCAPES[m.group(0)], escaped)
    if old_key(prefix, thread_id, part) != key:
        return None  # a stray '%' or '{': not written by the store
    return thread_id, part


async def scan_old_keys(client: AnyRedis, prefix: str) -> AsyncGenerator[tuple[str, str], None]:
    """``(thread id, part)`` of every format-1 thread key under ``prefix`` (a
    ``SCAN`` of every primary on a Cluster; a key may come twice)."""
    keys = client.scan_iter(match=old_key_pattern(prefix), count=SCAN_COUNT)
    try:
        async for key in keys:
            parsed = parse_old_key(prefix, key)
            if parsed is not None:
                yield parsed
    finally:
        await keys.aclose()  # type: ignore[attr-defined]  # an async generator


async def old_layout_found(client: AnyRedis, prefix: str) -> bool:
    """Whether format-1 thread data exists under ``prefix``: its thread index
    (``<prefix>:threads``) is not empty, or a ``SCAN`` finds a format-1 thread key."""
    if int(await client.scard(f"{prefix}:threads")) > 0:
        return True
    found = scan_old_keys(client, prefix)
    try:
        async for _ in found:
            return True
    finally:
        await found.aclose()
    return False


def redis_url_of(client: AnyRedis | None) -> str:
    """A URL for ``client``'s server, for a message (credentials as placeholders)."""
    if client is None:
        return "URL"
    if isinstance(client, RedisCluster):
        node = client.get_default_node()
        return f"redis://{_host(node.host)}:{node.port} --cluster"
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    klass = client.connection_pool.connection_class
    scheme = "rediss" if isinstance(klass, type) and issubclass(klass, SSLConnection) else "redis"
    auth = ""
    if kwargs.get("password"):
        auth = ("USER" if kwargs.get("username") else "") + ":PASSWORD@"
    return (
        f"{scheme}://{auth}{_host(kwargs.get('host', 'localhost'))}:{kwargs.get('port', 6379)}/{db}"
    )


def _host(host: object) -> str:
    text = str(host)
    return f"[{text}]" if ":" in text else text


def old_layout_message(client: AnyRedis | None, prefix: str) -> str:
    return (
        f"the Redis keys under the prefix {prefix!r} use the old key layout (format 1), "
        f"which this threadline (format {LAYOUT_FORMAT}) does not read; stop every worker "
        "and client of the deployment, then move them with: "
        f"threadline migrate --redis {redis_url_of(client)} --prefix {shlex.quote(prefix)}"
    )
