"""A Redis deployment of workers and clients: connecting, and its fixed settings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

import redis.asyncio

from ._partitions import KeyLayout
from ._redis_client import client_from_url, close_client, mapped

DEPLOYMENT_PARTITIONS: Final = 64
"""The partition count a new deployment gets: 64 is ample for a handful of
workers and costs an idle worker little (one inbox read each)."""


@contextlib.asynccontextmanager
async def open_redis(url: str, what: str, **options: Any) -> AsyncIterator[redis.asyncio.Redis]:
    """A client for ``url``, closed on exit (``options`` as for ``client_from_url``)."""
    client = client_from_url(url, what, **options)
    try:
        yield client
    finally:
        await close_client(client)


async def deployment_layout(
    client: redis.asyncio.Redis, prefix: str, partitions: int | None = None
) -> KeyLayout:
    """The key layout of the deployment under ``prefix``.

    The partition count is written once (``HSETNX``), by whoever comes first,
    and read by everyone after: a worker or client that asks for another count
    is refused rather than routing threads to other partitions.
    """
    wanted = KeyLayout(prefix=prefix, partitions=partitions or DEPLOYMENT_PARTITIONS)
    with mapped("deployment config"):
        await client.hsetnx(wanted.config, "partitions", wanted.partitions)
        stored = int(await client.hget(wanted.config, "partitions") or 0)
    if partitions is not None and stored != partitions:
        raise ValueError(
            f"the deployment {prefix!r} has {stored} partitions, not {partitions} "
            "(the count is fixed when the deployment is first used)"
        )
    return KeyLayout(prefix=prefix, partitions=stored)
