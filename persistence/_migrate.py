"""Moving a Redis store's threads from key layout format 1 to format 2.

Format 1 kept each thread's keys under a hash tag of their own; format 2 keeps
them under the tag of the thread's partition, so one script can touch the
partition's lease, its inbox and the thread (one Cluster slot)::

    format 1   <prefix>:t:{<escaped id>}:<part>
    format 2   <prefix>:{pNNN}:t:<escaped id>:<part>

(``KeyLayout.for_thread(id).thread(id, part)``) for every part (head, steps,
full, inbox, told, dead). The thread index ``<prefix>:threads`` and the
partition keys do not change.

**Stop every worker and client of the deployment first.** A format-1 process
that writes during the move writes keys the move may already have copied.
:func:`migrate_layout` refuses while a worker is registered live in
``<prefix>:workers``, unless ``force``; a run that only deletes the old keys
left behind (the prefix is at format 2 already) does not mind live workers.

The move, and why it may be cut short anywhere and run again:

1. Find the format-1 threads in the index *and* by ``SCAN`` (the index is
   written outside the commit scripts, so a thread may have keys and no index
   entry; such threads are added to the index).
2. Fix the partition count (``HSETNX partitions``) before copying: the new
   names depend on it, so a rerun copies to the same names.
3. While the config has no ``format``, the old keys are the truth: no format-2
   process runs on the prefix (``deployment_layout`` refuses it). Each old key
   is copied to its new name with ``DUMP`` + ``RESTORE ... REPLACE`` (type and
   bytes exact, across slots, its TTL kept), and a new key whose old key is
   absent is deleted: the new keys mirror the old ones, so a rerun after a
   crash overwrites a partial or stale copy.
4. ``format`` = 2: the commit point. From here format-2 processes may start.
5. The old keys are deleted (unless ``delete_old=False``).

A run that finds ``format`` = 2 already does step 5 only and never copies.
Every old key was copied before the commit point, so a new key that is missing
now was removed by the live system (an inbox entry consumed, a deleted
thread's steps) and one that differs was written by it: copying the old key
again would redeliver a message or undo a step. The new keys are kept as they
are; the old ones are only deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec

from threadline.actors import PersistenceError
from threadline.actors._api import get_logger

from ._deployment import (
    DEPLOYMENT_PARTITIONS,
    LAYOUT_FORMAT,
    OLD_THREAD_PARTS,
    old_key,
    parse_layout_format,
    scan_old_keys,
)
from ._leases import AnyRedis
from ._membership import Membership
from ._partitions import KeyLayout
from ._redis_client import mapped

__all__ = ["MigrationReport", "migrate_layout"]

THREAD_CHUNK: Final = 64
"""Threads per pipeline (each has up to six keys, each key up to a full record)."""


class MigrationReport(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`migrate_layout` did."""

    prefix: str
    partitions: int
    """The deployment's partition count (the new key names depend on it)."""
    threads: int
    """Threads that had format-1 keys (copied, or only deleted if already migrated)."""
    keys_copied: int
    keys_deleted: int
    """Format-1 keys deleted (0 with ``delete_old=False``)."""
    already_migrated: bool
    """The prefix was at format 2 before this run: nothing was copied."""
    format_set: bool
    """This run set ``format`` = 2 (a prefix with neither a config nor format-1
    keys is left untouched, and one at format 2 already needs no setting)."""


async def migrate_layout(
    client: AnyRedis,
    prefix: str,
    *,
    partitions: int | None = None,
    delete_old: bool = True,
    force: bool = False,
) -> MigrationReport:
    """Move the threads under ``prefix`` from key layout format 1 to format 2.

    Stop every worker and client of the deployment first: this refuses
    (``PersistenceError``) while a worker is registered live, unless ``force``
    (or the prefix is at format 2 already: deleting the old keys left by an
    earlier run is safe beside format-2 workers).
    ``partitions`` is the partition count if the deployment has none yet
    (default :data:`DEPLOYMENT_PARTITIONS`); one that differs from the stored
    count is refused (``ValueError``). ``delete_old=False`` keeps the format-1
    keys (a later run deletes them). Refuses a prefix of a newer format
    (``SnapshotFormatError``). Safe to run again, also after a crash at any
    point (see the module's docstring); a run on a migrated prefix with no
    old keys left changes nothing. A prefix with neither a config nor
    format-1 keys is left untouched (nothing is created).
    """
    config = KeyLayout(prefix=prefix).config
    log = get_logger().bind(prefix=prefix)
    with mapped("migrate: read the config"):
        stored, raw_format = await client.hmget(config, ["partitions", "format"])
    layout_format = _format(prefix, raw_format)
    count = int(stored) if stored is not None else partitions or DEPLOYMENT_PARTITIONS
    if partitions is not None and count != partitions:
        raise ValueError(
            f"the deployment {prefix!r} has {count} partitions, not {partitions} "
            "(the count is fixed when the deployment is first used)"
        )
    layout = KeyLayout(prefix=prefix, partitions=count)
    if layout_format < LAYOUT_FORMAT and not force:
        live = await Membership(client, layout=layout).live_workers()
        if live:
            raise PersistenceError(
                f"{len(live)} worker(s) of the deployment {prefix!r} are live "
                f"({', '.join(live[:5])}{', ...' if len(live) > 5 else ''}): stop every "
                "worker and client before migrating (or force it, if they are gone)"
            )
    threads, unindexed = await _find_threads(client, prefix)
    log.info("migrate: found", threads=len(threads), unindexed=len(unindexed))
    if layout_format == LAYOUT_FORMAT:
        deleted, touched = await _delete_old(client, prefix, threads) if delete_old else (0, 0)
        return MigrationReport(
            prefix=prefix,
            partitions=count,
            threads=touched,
            keys_copied=0,
            keys_deleted=deleted,
            already_migrated=True,
            format_set=False,
        )
    if not threads and stored is None:
        # Not a deployment, no format-1 keys: a typo'd prefix must not create one.
        return MigrationReport(
            prefix=prefix,
            partitions=count,
            threads=0,
            keys_copied=0,
            keys_deleted=0,
            already_migrated=False,
            format_set=False,
        )
    with mapped("migrate: fix the partition count"):
        await client.hsetnx(config, "partitions", count)
        again = await client.hget(config, "partitions")
    if again is None or int(again) != count:  # another process won the HSETNX
        raise PersistenceError(f"the partition count of {prefix!r} changed during the migration")
    copied, moved = 0, 0
    for chunk in _chunks(threads):
        chunk_copied, chunk_moved = await _copy(client, layout, chunk)
        copied += chunk_copied
        moved += chunk_moved
    log.info("migrate: copied", threads=moved, keys=copied)
    with mapped("migrate: index and set the format"):
        if unindexed:
            await client.sadd(f"{prefix}:threads", *unindexed)
        await client.hset(config, "format", LAYOUT_FORMAT)  # the commit point
    log.info("migrate: format set", format=LAYOUT_FORMAT)
    deleted = (await _delete_old(client, prefix, threads))[0] if delete_old else 0
    return MigrationReport(
        prefix=prefix,
        partitions=count,
        threads=moved,
        keys_copied=copied,
        keys_deleted=deleted,
        already_migrated=False,
        format_set=True,
    )


def _format(prefix: str, value: bytes | str | None) -> int:
    """The stored layout format (1 if absent); refuses a newer one."""
    if value is None:
        return 1
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if text.strip().isdigit() and int(text) < LAYOUT_FORMAT:
        return int(text)  # an explicit old format: migrate it
    parse_layout_format(None, prefix, value)  # a newer or unreadable one raises
    return LAYOUT_FORMAT


async def _find_threads(client: AnyRedis, prefix: str) -> tuple[list[str], list[str]]:
    """The candidate threads, sorted (index and ``SCAN``), and those the index lacks."""
    with mapped("migrate: find the threads"):
        indexed = {
            bytes(m).decode() if isinstance(m, bytes) else str(m)
            async for m in client.sscan_iter(f"{prefix}:threads", count=1000)
        }
        scanned = {thread_id async for thread_id, _ in scan_old_keys(client, prefix)}
    return sorted(indexed | scanned), sorted(scanned - indexed)


def _chunks(threads: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(threads), THREAD_CHUNK):
        yield threads[i : i + THREAD_CHUNK]


async def _copy(client: AnyRedis, layout: KeyLayout, threads: Sequence[str]) -> tuple[int, int]:
    """Mirror the old keys of ``threads`` at their new names: (keys copied, threads
    with a key copied). Two round trips: read every old key, then write."""
    pairs = [(t, part) for t in threads for part in OLD_THREAD_PARTS]
    with mapped("migrate: copy"):
        async with client.pipeline(transaction=False) as pipe:
            for thread_id, part in pairs:
                pipe.dump(old_key(layout.prefix, thread_id, part))
                pipe.pttl(old_key(layout.prefix, thread_id, part))
            replies: list[Any] = await pipe.execute()
        copied: dict[str, int] = {}
        async with client.pipeline(transaction=False) as pipe:
            for i, (thread_id, part) in enumerate(pairs):
                payload, ttl = replies[2 * i], int(replies[2 * i + 1])
                new = layout.for_thread(thread_id).thread(thread_id, part)
                if payload is None or ttl == -2:  # absent (or expired since)
                    pipe.delete(new)
                else:
                    pipe.restore(new, max(ttl, 0), payload, replace=True)
                    copied[thread_id] = copied.get(thread_id, 0) + 1
            await pipe.execute()
    return sum(copied.values()), len(copied)


async def _delete_old(client: AnyRedis, prefix: str, threads: Sequence[str]) -> tuple[int, int]:
    """Delete the old keys of ``threads``: (keys deleted, threads with a key deleted)."""
    deleted, touched = 0, 0
    for chunk in _chunks(threads):
        with mapped("migrate: delete the old keys"):
            async with client.pipeline(transaction=False) as pipe:
                for thread_id in chunk:
                    for part in OLD_THREAD_PARTS:
                        # Not pipe.unlink: redis-py's asyncio ClusterPipeline.unlink is
                        # a coroutine that queues nothing.
                        pipe.execute_command("UNLINK", old_key(prefix, thread_id, part))
                replies: list[Any] = await pipe.execute()
        n = len(OLD_THREAD_PARTS)
        for i in range(len(chunk)):
            gone = sum(int(r) for r in replies[i * n : (i + 1) * n])
            deleted += gone
            touched += gone > 0
    return deleted, touched
