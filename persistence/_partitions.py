"""Partitions: which partition a thread lives in, and the Redis keys of a partition.

A deployment has ``P`` partitions, fixed when it is created (default 256).
A thread's partition is ``crc32(thread_id) % P``: a stable hash that every
process and every Python version computes alike (``hash()`` is salted per
process). Every key of a partition carries the partition's hash tag
(``{p042}``), so one Lua script may touch the lease, the inbox and any of
the partition's threads on a Redis Cluster (one slot)::

    tl:config                      hash   partitions, format (untagged)
    tl:workers                     zset   worker -> membership expiry (untagged)
    tl:{p042}:lease                str    "<epoch>:<worker>" PX ttl
    tl:{p042}:epoch                str    INCR only
    tl:{p042}:in                   stream inbox
    tl:{p042}:bell                 sharded pub/sub doorbell
    tl:{p042}:idem:<message id>    str    stream id of an enqueued message
    tl:{p042}:dlq                  stream dead letters
    tl:{p042}:expiry               zset   thread -> expires_at
    tl:{p042}:t:<esc id>:head      hash   (and :steps, :full, :runs)
    tl:{p042}:r:<run id>           stream reply events

Ids inside keys are escaped (``%`` -> ``%25``, ``{`` -> ``%7B``, ``}`` ->
``%7D``): Redis hashes the first ``{...}`` of a key, which is the partition
tag whatever the id holds, but an escaped key never shows a second tag to a
human reading it, and the escape is injective.
"""

from __future__ import annotations

import zlib
from typing import Final

import msgspec

from ._redis_client import check_prefix

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_PARTITIONS",
    "KeyLayout",
    "PartitionKeys",
    "escape_key_id",
    "partition_of",
    "partition_tag",
]

DEFAULT_PARTITIONS: Final = 256
DEFAULT_KEY_PREFIX: Final = "tl"


def _check_partitions(partitions: int) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive int, got {partitions!r}")


def partition_of(thread_id: str, partitions: int) -> int:
    """The partition of ``thread_id`` among ``partitions``: ``crc32(utf-8) % partitions``.

    ``surrogatepass`` lets a lone surrogate (which a JSON client may send)
    hash like any other code point instead of raising.
    """
    _check_partitions(partitions)
    return zlib.crc32(thread_id.encode("utf-8", "surrogatepass")) % partitions


def partition_tag(partition: int) -> str:
    """The hash tag of ``partition``: ``{p042}`` (at least three digits)."""
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise ValueError(f"a partition is a non-negative int, got {partition!r}")
    return f"{{p{partition:03d}}}"


def escape_key_id(value: str) -> str:
    """An id as it appears inside a key: injective and free of braces."""
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


class PartitionKeys(msgspec.Struct, frozen=True, kw_only=True):
    """The keys of one partition; all share its hash tag (one Cluster slot)."""

    prefix: str
    partition: int

    @property
    def tag(self) -> str:
        return partition_tag(self.partition)

    @property
    def base(self) -> str:
        """``<prefix>:{pNNN}``: every key of the partition starts with it."""
        return f"{self.prefix}:{self.tag}"

    @property
    def lease(self) -> str:
        return f"{self.base}:lease"

    @property
    def epoch(self) -> str:
        return f"{self.base}:epoch"

    @property
    def inbox(self) -> str:
        return f"{self.base}:in"

    @property
    def bell(self) -> str:
        return f"{self.base}:bell"

    @property
    def dlq(self) -> str:
        return f"{self.base}:dlq"

    @property
    def expiry(self) -> str:
        return f"{self.base}:expiry"

    def idem(self, message_id: str) -> str:
        return f"{self.base}:idem:{escape_key_id(message_id)}"

    def thread(self, thread_id: str, part: str) -> str:
        """A key of a thread of this partition: ``part`` is head, steps, full or runs."""
        return self.thread_prefix(thread_id) + part

    def thread_prefix(self, thread_id: str) -> str:
        """What every key of the thread starts with (its keys are this + part)."""
        return f"{self.base}:t:{escape_key_id(thread_id)}:"

    def reply(self, run_id: str) -> str:
        return f"{self.base}:r:{escape_key_id(run_id)}"


class KeyLayout(msgspec.Struct, frozen=True, kw_only=True):
    """The key names of one deployment: ``prefix`` (no braces) and ``partitions``."""

    prefix: str = DEFAULT_KEY_PREFIX
    partitions: int = DEFAULT_PARTITIONS

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        _check_partitions(self.partitions)

    @property
    def config(self) -> str:
        return f"{self.prefix}:config"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def partition(self, partition: int) -> PartitionKeys:
        """The keys of ``partition`` (``0 <= partition < partitions``)."""
        if (
            isinstance(partition, bool)
            or not isinstance(partition, int)
            or not 0 <= partition < self.partitions
        ):
            raise ValueError(f"partition must be in [0, {self.partitions}), got {partition!r}")
        return PartitionKeys(prefix=self.prefix, partition=partition)

    def partition_of(self, thread_id: str) -> int:
        return partition_of(thread_id, self.partitions)

    def for_thread(self, thread_id: str) -> PartitionKeys:
        """The keys of the partition ``thread_id`` lives in."""
        return self.partition(self.partition_of(thread_id))
