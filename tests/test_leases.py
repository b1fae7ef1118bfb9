"""Partitions, placement, membership and partition leases with fencing epochs.

Redis tests run against the private redis-server of the fixtures and, for
the Cluster checks (F13), against a real three-node Redis Cluster. The race
(F5) and SIGSTOP (F4) tests run real worker processes
(``tests/_lease_worker.py``) and judge their logs on Redis's clock.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import statistics
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from threadline.actors import FencedError, PersistenceError, StoreUnavailableError
from threadline.persistence import (
    DEFAULT_PARTITIONS,
    FENCE_CHECK_LUA,
    KeyLayout,
    Lease,
    Membership,
    PartitionLeases,
    RedisSnapshotStore,
    assign_partitions,
    fenced_script,
    partition_of,
    partition_owner,
    plan_partitions,
)
from threadline.persistence._leases import fenced_mapped

from ._cluster import RedisClusterProcesses, free_port
from .conftest import RedisServer

pytestmark = pytest.mark.anyio

WORKER = str(Path(__file__).with_name("_lease_worker.py"))

# KEYS: lease, list. ARGV: token, value. A writing script fenced by the lease.
APPEND_LUA = fenced_script("return redis.call('RPUSH', KEYS[2], ARGV[2])")


# -- partitions and keys ---------------------------------------------------------


def test_partition_of_is_crc32_modulo_the_partition_count() -> None:
    # Pinned values: every process, every Python version, every run agrees.
    # crc32(b"thread-1") = 1609154361, as `gzip` also computes it.
    assert partition_of("thread-1", 256) == 1609154361 % 256 == 57
    assert partition_of("", 256) == 0
    assert partition_of("t1", DEFAULT_PARTITIONS) == 55
    assert partition_of("é", 7) == zlib.crc32("é".encode()) % 7
    # A lone surrogate (which a JSON client may send) hashes instead of raising.
    assert 0 <= partition_of("\ud800", 256) < 256
    with pytest.raises(ValueError, match="partitions"):
        partition_of("t", 0)


def test_partition_keys_share_one_hash_tag_and_escape_ids() -> None:
    layout = KeyLayout()
    keys = layout.partition(42)
    assert keys.lease == "tl:{p042}:lease"
    assert keys.epoch == "tl:{p042}:epoch"
    assert keys.inbox == "tl:{p042}:in"
    assert keys.thread("a{b}%", "head") == "tl:{p042}:t:a%7Bb%7D%25:head"
    assert keys.idem("m}1") == "tl:{p042}:idem:m%7D1"
    assert keys.reply("r1") == "tl:{p042}:r:r1"
    assert (layout.config, layout.workers) == ("tl:config", "tl:workers")
    assert KeyLayout(prefix="x", partitions=2000).partition(1999).lease == "x:{p1999}:lease"
    assert layout.for_thread("thread-1").partition == 57
    with pytest.raises(ValueError, match="braces"):
        KeyLayout(prefix="a{b}")
    with pytest.raises(ValueError, match="partition"):
        layout.partition(256)
    with pytest.raises(ValueError, match="partitions"):
        KeyLayout(partitions=0)


# -- placement -------------------------------------------------------------------

P = 256


def _workers(n: int, seed: int) -> list[str]:
    # Uuid-like ids from a fixed seed: the tests are deterministic, yet the
    # ids look like the ones real workers use.
    return [
        str(UUID(int=(seed * 1_000_003 + i) * 0x9E3779B97F4A7C15 % (1 << 128))) for i in range(n)
    ]


def _moved(before: tuple[str, ...], after: tuple[str, ...]) -> int:
    return sum(a != b for a, b in zip(before, after, strict=True))


def test_rendezvous_owner_is_order_free_and_moves_only_what_must_move() -> None:
    workers = _workers(6, seed=1)
    assert partition_owner(3, []) is None
    assert partition_owner(3, workers) == partition_owner(3, list(reversed(workers)))
    before = assign_partitions(P, workers, tolerance=None)
    assert before == tuple(partition_owner(p, workers) for p in range(P))
    # A joining worker takes only partitions it wins; nobody else's move.
    joined = assign_partitions(P, [*workers, "newcomer"], tolerance=None)
    assert all(a == b or b == "newcomer" for a, b in zip(before, joined, strict=True))
    # A leaving worker gives away only its own.
    left = assign_partitions(P, workers[1:], tolerance=None)
    assert all(a == b or a == workers[0] for a, b in zip(before, left, strict=True))


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("seed", range(4))
def test_balanced_placement_stays_within_30_percent_and_moves_little(n: int, seed: int) -> None:
    workers = _workers(n, seed)
    owners = assign_partitions(P, workers)
    assert len(owners) == P
    loads = Counter(owners)
    fair = P / n
    assert set(loads) == set(workers)
    assert all(abs(load - fair) <= 0.3 * fair for load in loads.values()), loads
    # The default band is ±20%, rounded outwards to whole partitions.
    assert all(math.floor(fair * 0.8) <= load <= math.ceil(fair * 1.2) for load in loads.values())
    assert assign_partitions(P, list(reversed(workers))) == owners

    # Adding a worker: it receives about P/(n+1); the rest stays put but for
    # a few partitions passed between the others.
    newcomer = _workers(1, seed + 100)[0]
    joined = assign_partitions(P, [*workers, newcomer])
    received = sum(o == newcomer for o in joined)
    assert abs(received - P / (n + 1)) <= 0.3 * P / (n + 1)
    assert _moved(owners, joined) <= 1.5 * received

    # Removing a worker: its partitions move, and few others.
    if n > 1:
        gone = workers[0]
        left = assign_partitions(P, workers[1:])
        assert all(o != gone for o in left)
        assert loads[gone] <= _moved(owners, left) <= 1.5 * loads[gone]


def test_placement_movement_on_average_over_many_worker_sets() -> None:
    # Over 10 random sets per size the extra movement stays small: the
    # bounded loads pass few partitions between the other workers.
    extra_add, extra_remove = [], []
    for n in range(2, 9):
        for seed in range(10):
            workers = _workers(n, 1000 + seed)
            owners = assign_partitions(P, workers)
            joined = assign_partitions(P, [*workers, "newcomer"])
            extra_add.append(_moved(owners, joined) / sum(o == "newcomer" for o in joined))
            left = assign_partitions(P, workers[1:])
            extra_remove.append(_moved(owners, left) / sum(o == workers[0] for o in owners))
    assert statistics.mean(extra_add) < 1.15, statistics.mean(extra_add)
    assert statistics.mean(extra_remove) < 1.15, statistics.mean(extra_remove)


def test_plan_takes_and_hands_back_only_what_changes_owner() -> None:
    workers = _workers(3, seed=7)
    me = workers[0]
    owners = assign_partitions(P, workers)
    mine = {p for p, o in enumerate(owners) if o == me}
    assert plan_partitions(mine, P, workers, me).acquire == ()
    assert plan_partitions(mine, P, workers, me).release == ()
    # From nothing: acquire exactly mine.
    fresh = plan_partitions(set(), P, workers, me)
    assert set(fresh.acquire) == mine and fresh.release == ()
    # A fourth worker joins: hand back only what it (or another) now owns.
    joined = [*workers, "newcomer"]
    after = assign_partitions(P, joined)
    step = plan_partitions(mine, P, joined, me)
    assert set(step.release) == {p for p in mine if after[p] != me}
    assert set(step.acquire) == {p for p, o in enumerate(after) if o == me} - mine
    # Not live (or draining): release everything, acquire nothing.
    drain = plan_partitions(mine | {999}, P, workers[1:], me)
    assert drain.acquire == () and set(drain.release) == mine | {999}
    # limit spreads a big move over several ticks, lowest partitions first.
    limited = plan_partitions(set(), P, workers, me, limit=5)
    assert limited.acquire == tuple(sorted(mine))[:5]
    with pytest.raises(ValueError, match="limit"):
        plan_partitions(set(), P, workers, me, limit=-1)


def test_placement_with_fewer_partitions_than_workers() -> None:
    owners = assign_partitions(3, _workers(8, seed=3))
    assert len(set(owners)) == 3
    assert assign_partitions(3, []) == ()


# -- leases on one redis-server --------------------------------------------------


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def layout(redis_prefix: str) -> KeyLayout:
    return KeyLayout(prefix=redis_prefix, partitions=16)


async def _redis_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.01)


@pytest.mark.redis
async def test_acquire_grants_a_new_epoch_only_when_the_lease_is_free(
    client: redis.asyncio.Redis, layout: KeyLayout
) -> None:
    leases = PartitionLeases(client, layout=layout, ttl_ms=10_000)
    before = await _redis_ms(client)
    first = await leases.acquire(3, "w-a")
    after = await _redis_ms(client)
    assert first is not None
    assert (first.partition, first.epoch, first.worker, first.token) == (3, 1, "w-a", "1:w-a")
    assert before <= first.server_ms <= after  # Redis's clock, not ours
    assert first.expires_ms == first.server_ms + 10_000
    assert await client.get(layout.partition(3).lease) == b"1:w-a"
    assert 9_000 < await client.pttl(layout.partition(3).lease) <= 10_000

    # Held: nobody else gets it, and its holder cannot "re-acquire" it either.
    assert await leases.acquire(3, "w-b") is None
    assert await leases.acquire(3, "w-a") is None
    held = await leases.holder(3)
    assert held is not None
    assert (held.epoch, held.worker) == (1, "w-a")
    assert held.server_ms < held.expires_ms <= held.server_ms + 10_000

    # Partitions are independent.
    other = await leases.acquire(4, "w-b")
    assert other is not None and other.epoch == 1

    # Released: the next grant has a higher epoch, whoever takes it.
    assert await leases.release(first)
    assert await leases.holder(3) is None
    second = await leases.acquire(3, "w-b")
    assert second is not None and second.epoch == 2
    assert not await leases.release(first)  # a stale token releases nothing
    now = await leases.holder(3)
    assert now is not None and now.token == second.token == "2:w-b"


@pytest.mark.redis
async def test_renew_extends_only_the_current_token(
    client: redis.asyncio.Redis, layout: KeyLayout
) -> None:
    leases = PartitionLeases(client, layout=layout, ttl_ms=300)
    lease = await leases.acquire(0, "w-a")
    assert lease is not None
    sent = anyio.current_time()
    renewed = await leases.renew(lease)
    assert renewed is not None
    assert lease.sent_at <= sent <= renewed.sent_at <= anyio.current_time()
    assert (renewed.epoch, renewed.worker) == (lease.epoch, lease.worker)
    assert renewed.server_ms >= lease.server_ms
    assert renewed.expires_ms == renewed.server_ms + 300

    # Not renewed: Redis drops it after the TTL. A late renew finds nothing
    # and must not bring it back (the holder acquires again, new epoch).
    await _wait_until(lambda: _is_free(leases, 0))
    assert await leases.renew(renewed) is None
    assert await leases.holder(0) is None

    # Someone else took it: the stale holder's renew is fenced.
    taken = await leases.acquire(0, "w-b")
    assert taken is not None and taken.epoch == lease.epoch + 1
    with pytest.raises(FencedError, match=taken.token):
        await leases.renew(renewed)
    holder = await leases.holder(0)
    assert holder is not None and holder.token == taken.token
    # Same worker id, older epoch: still someone else's token.
    await leases.release(taken)
    again = await leases.acquire(0, "w-a")
    assert again is not None
    with pytest.raises(FencedError):
        await leases.renew(lease)


async def _is_free(leases: PartitionLeases, partition: int) -> bool:
    return await leases.holder(partition) is None


@pytest.mark.redis
async def test_a_fenced_script_refuses_a_stale_or_absent_token(
    client: redis.asyncio.Redis, layout: KeyLayout
) -> None:
    assert APPEND_LUA.startswith(FENCE_CHECK_LUA)
    append = client.register_script(APPEND_LUA)
    leases = PartitionLeases(client, layout=layout, ttl_ms=10_000)
    keys = layout.partition(5)
    steps = keys.thread("thread-1", "steps")

    async def write(lease: Lease, value: str) -> None:
        with fenced_mapped("append"):
            await append(keys=[keys.lease, steps], args=[lease.token, value])

    old = await leases.acquire(5, "w-a")
    assert old is not None
    await write(old, "by old")
    # The lease is dropped (as on expiry) and another worker takes it.
    await client.delete(keys.lease)
    with pytest.raises(FencedError):
        await write(old, "absent")
    new = await leases.acquire(5, "w-b")
    assert new is not None
    with pytest.raises(FencedError):
        await write(old, "stale")
    await write(new, "by new")
    # A token with the right epoch but another worker (an epoch re-issued
    # after a failover) is stale too.
    forged = Lease(partition=5, epoch=new.epoch, worker="w-a", server_ms=0, expires_ms=0)
    with pytest.raises(FencedError):
        await write(forged, "forged")
    assert await client.lrange(steps, 0, -1) == [b"by old", b"by new"]

    # Without the mapping, the reply is the bare FENCED error.
    with pytest.raises(redis.ResponseError, match=r"^FENCED$"):
        await append(keys=[keys.lease, steps], args=[old.token, "raw"])


@pytest.mark.redis
async def test_membership_follows_heartbeats_on_redis_time(
    client: redis.asyncio.Redis, layout: KeyLayout
) -> None:
    members = Membership(client, layout=layout, ttl_ms=10_000)
    brief = Membership(client, layout=layout, ttl_ms=200)
    assert await members.live_workers() == []
    now = await _redis_ms(client)
    expiry = await members.heartbeat("w-b")
    assert now + 10_000 <= expiry <= now + 11_000
    await members.heartbeat("w-a")
    await brief.heartbeat("w-c")
    assert await members.live_workers() == ["w-a", "w-b", "w-c"]
    assert await client.zscore(layout.workers, "w-b") == expiry

    # w-c stops beating: it drops out after its TTL, on Redis's clock...
    await _wait_until(lambda: _not_live(members, "w-c"))
    # ...and the next heartbeat of anyone prunes it from the set.
    assert await client.zscore(layout.workers, "w-c") is not None
    await members.heartbeat("w-a")
    assert await client.zscore(layout.workers, "w-c") is None

    await members.leave("w-b")
    assert await members.live_workers() == ["w-a"]


async def _not_live(members: Membership, worker: str) -> bool:
    return worker not in await members.live_workers()


@pytest.mark.redis
async def test_worker_ids_and_ttls_are_checked(
    client: redis.asyncio.Redis, layout: KeyLayout
) -> None:
    leases = PartitionLeases(client, layout=layout)
    for bad in ["", " w", "w\n", "x" * 201]:
        with pytest.raises(ValueError, match="worker id"):
            await leases.acquire(1, bad)
        with pytest.raises(ValueError, match="worker id"):
            await Membership(client, layout=layout).heartbeat(bad)
    with pytest.raises(ValueError, match="ttl_ms"):
        PartitionLeases(client, ttl_ms=0)
    with pytest.raises(ValueError, match="partition"):
        await leases.acquire(16, "w")
    # A worker id may hold colons: the token splits at the first one.
    lease = await leases.acquire(1, "host:1234:abc")
    assert lease is not None
    holder = await leases.holder(1)
    assert holder is not None and holder.worker == "host:1234:abc"
    # A lease value that is no token is a persistence error, not a crash.
    await client.set(layout.partition(2).lease, "garbage", px=10_000)
    with pytest.raises(PersistenceError, match="malformed lease"):
        await leases.holder(2)


async def test_redis_failures_raise_store_unavailable() -> None:
    # A URL-built client does not retry (as the stores' clients): fail fast.
    client = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        leases = PartitionLeases(client)
        lease = Lease(partition=0, epoch=1, worker="w", server_ms=0, expires_ms=0)
        with pytest.raises(StoreUnavailableError, match="lease acquire"):
            await leases.acquire(0, "w")
        with pytest.raises(StoreUnavailableError, match="lease renew"):
            await leases.renew(lease)
        with pytest.raises(StoreUnavailableError, match="lease release"):
            await leases.release(lease)
        with pytest.raises(StoreUnavailableError):
            await leases.holder(0)
        with pytest.raises(StoreUnavailableError):
            await Membership(client).heartbeat("w")
        with pytest.raises(StoreUnavailableError):
            await Membership(client).live_workers()
    finally:
        await client.aclose()


# -- F13: the same scripts on a real Redis Cluster ---------------------------------


@pytest.fixture
async def cluster_client(
    redis_cluster: RedisClusterProcesses,
) -> AsyncIterator[RedisCluster]:
    host, port = redis_cluster.startup
    client = RedisCluster(host=host, port=port)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


def _spread_over_nodes(client: RedisCluster, layout: KeyLayout, per_node: int) -> list[int]:
    """Partitions whose slot lives on each node, ``per_node`` of each."""
    chosen: dict[str, list[int]] = defaultdict(list)
    for p in range(layout.partitions):
        node = client.get_node_from_key(layout.partition(p).lease)
        assert node is not None
        if len(chosen[node.name]) < per_node:
            chosen[node.name].append(p)
    assert len(chosen) == 3, chosen
    return sorted(p for ps in chosen.values() for p in ps)


@pytest.mark.redis
async def test_f13_every_lease_script_runs_on_a_cluster(
    cluster_client: RedisCluster, redis_prefix: str
) -> None:
    client = cluster_client
    layout = KeyLayout(prefix=redis_prefix, partitions=DEFAULT_PARTITIONS)
    leases = PartitionLeases(client, layout=layout, ttl_ms=10_000)
    append = client.register_script(APPEND_LUA)
    partitions = _spread_over_nodes(client, layout, per_node=2)
    for p in partitions:
        keys = layout.partition(p)
        every_key = [
            keys.lease,
            keys.epoch,
            keys.inbox,
            keys.bell,
            keys.dlq,
            keys.expiry,
            keys.idem("m{1}"),
            keys.thread("a{b}c", "head"),
            keys.thread("a{b}c", "steps"),
            keys.reply("r-1"),
        ]
        slots = {await client.cluster_keyslot(key) for key in every_key}
        assert len(slots) == 1, (p, slots)

        first = await leases.acquire(p, "w-a")
        assert first is not None and first.epoch == 1
        assert await leases.acquire(p, "w-b") is None
        renewed = await leases.renew(first)
        assert renewed is not None
        held = await leases.holder(p)
        assert held is not None and held.token == first.token
        with fenced_mapped("append"):
            await append(keys=[keys.lease, keys.thread("t", "steps")], args=[first.token, "1"])
        assert await leases.release(renewed)
        second = await leases.acquire(p, "w-b")
        assert second is not None and second.epoch == 2
        with pytest.raises(FencedError):
            await leases.renew(first)
        with pytest.raises(FencedError), fenced_mapped("append"):
            await append(keys=[keys.lease, keys.thread("t", "steps")], args=[first.token, "2"])
        assert await client.lrange(keys.thread("t", "steps"), 0, -1) == [b"1"]

    # Membership: one untagged key per script.
    members = Membership(client, layout=layout)
    await members.heartbeat("w-a")
    assert await members.live_workers() == ["w-a"]
    await members.leave("w-a")


def _port_of(client: RedisCluster, key: str) -> int:
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


@pytest.mark.redis
async def test_f13_a_lease_follows_its_partition_when_the_slot_moves(
    cluster_client: RedisCluster, redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    client = cluster_client
    layout = KeyLayout(prefix=redis_prefix)
    leases = PartitionLeases(client, layout=layout, ttl_ms=10_000)
    append = client.register_script(APPEND_LUA)
    p = _spread_over_nodes(client, layout, per_node=1)[0]
    keys = layout.partition(p)
    steps = keys.thread("t", "steps")
    lease = await leases.acquire(p, "w-a")
    assert lease is not None
    await append(keys=[keys.lease, steps], args=[lease.token, "before"])

    slot = await client.cluster_keyslot(keys.lease)
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.nodes if node is not source)
    await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, target)
    assert redis_cluster.node_of_slot(slot) is target

    # The client still routes the slot to the old node: MOVED, refresh, retry.
    assert _port_of(client, keys.lease) == source.port
    renewed = await leases.renew(lease)
    assert renewed is not None
    assert _port_of(client, keys.lease) == target.port
    await append(keys=[keys.lease, steps], args=[lease.token, "after"])
    direct = target.client()
    try:
        assert direct.get(keys.lease) == lease.token.encode()
        assert direct.lrange(steps, 0, -1) == [b"before", b"after"]
    finally:
        direct.close()
    # The epoch moved with the lease: the next grant continues the sequence.
    assert await leases.release(renewed)
    second = await leases.acquire(p, "w-b")
    assert second is not None and second.epoch == lease.epoch + 1
    with pytest.raises(FencedError), fenced_mapped("append"):
        await append(keys=[keys.lease, steps], args=[lease.token, "stale"])


@pytest.mark.redis
async def test_f13_scripts_survive_a_node_that_lost_its_script_cache(
    cluster_client: RedisCluster, redis_prefix: str
) -> None:
    client = cluster_client
    layout = KeyLayout(prefix=redis_prefix)
    leases = PartitionLeases(client, layout=layout)
    partitions = _spread_over_nodes(client, layout, per_node=1)
    for node in client.get_nodes():
        await client.execute_command("SCRIPT FLUSH", target_nodes=node)
    for p in partitions:
        lease = await leases.acquire(p, "w")
        assert lease is not None
        assert await leases.renew(lease) is not None


@pytest.mark.redis
async def test_f13_the_snapshot_store_on_a_cluster(
    cluster_client: RedisCluster, redis_prefix: str
) -> None:
    """The worker's store (fenced by partition leases) on the cluster client: a
    batch spans all three nodes, each thread's keys land on its partition
    lease's node, the scripts survive ``SCRIPT FLUSH`` on every node, and a
    lost lease refuses the writes."""
    from threadline.persistence import CommitRequest, InboxEntry

    client = cluster_client
    held: dict[int, Lease] = {}
    store = RedisSnapshotStore(
        client,
        prefix=redis_prefix,
        lease_token=lambda p: held[p].token if p in held else None,
    )
    async with store:
        layout = store.layout
        leases = PartitionLeases(client, layout=layout, ttl_ms=60_000)
        partitions = _spread_over_nodes(client, layout, per_node=2)
        names = (f"thread-{i}" for i in itertools.count())
        thread_of = {p: next(t for t in names if layout.partition_of(t) == p) for p in partitions}
        threads = sorted(thread_of.values())
        unleased = next(  # in a partition this worker holds no lease of
            t
            for t in (f"other-{i}" for i in itertools.count())
            if layout.partition_of(t) not in partitions
        )
        for p in partitions:
            lease = await leases.acquire(p, "w-a")
            assert lease is not None
            held[p] = lease

        committer = store._committer
        assert committer is not None
        real_flush = committer._flush
        sizes: list[int] = []

        async def one_batch(calls: list[Callable[[], Any]]) -> list[Any]:
            """Run ``calls`` (store calls) as ONE batch of the group committer."""
            outcomes: list[Any] = [None] * len(calls)
            gate = anyio.Event()

            async def gated_flush(items: Any) -> Any:
                sizes.append(len(items))
                await gate.wait()
                return await real_flush(items)

            async def run(i: int) -> None:
                try:
                    outcomes[i] = await calls[i]()
                except PersistenceError as exc:
                    outcomes[i] = exc

            sizes.clear()
            committer._flush = gated_flush
            try:
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(store.enqueue, threads[0], "blocker", b"b")
                        await anyio.wait_all_tasks_blocked()
                        for i in range(len(calls)):
                            tg.start_soon(run, i)
                        await anyio.wait_all_tasks_blocked()
                        gate.set()
            finally:
                committer._flush = real_flush
            assert sizes == [1, len(calls)]
            return outcomes

        def commit(thread_id: str, version: int, epoch: int, **kw: Any) -> Callable[[], Any]:
            return lambda: store.commit(
                CommitRequest(
                    thread_id=thread_id,
                    expected_version=version,
                    epoch=epoch,
                    step=b"%s/%d" % (thread_id.encode(), version + 1),
                    **kw,
                )
            )

        # Activations, then first commits and tells: each one batch over three nodes.
        acquired = await one_batch([lambda t=t: store.acquire(t) for t in threads])
        assert acquired == [1] * len(threads)
        outcomes = await one_batch(
            [commit(t, 0, 1) for t in threads]
            + [lambda t=t: store.enqueue(t, "m1", b"m1") for t in threads]
            + [commit(unleased, 0, 1)]
        )
        assert outcomes[:-1] == [None] * (2 * len(threads))
        assert isinstance(outcomes[-1], FencedError)
        assert f"partition {layout.partition_of(unleased)}" in str(outcomes[-1])
        ports = set()
        for p, t in thread_of.items():
            node = client.get_node_from_key(layout.partition(p).lease)
            assert node is not None
            ports.add(node.port)
            raw = redis.asyncio.Redis(host=node.host, port=node.port)
            try:
                assert await raw.hget(layout.for_thread(t).thread(t, "head"), "version") == b"1"
            finally:
                await raw.aclose()
        assert len(ports) == 3

        # Every node forgets its scripts: the next batch reloads them and runs.
        for node in client.get_nodes():
            await client.execute_command("SCRIPT FLUSH", target_nodes=node)
        fresh = next(
            t
            for t in (f"fresh-{i}" for i in itertools.count())
            if layout.partition_of(t) == partitions[-1]
        )
        outcomes = await one_batch(
            [commit(t, 1, 1, consumed="m1") for t in threads]
            + [lambda: store.acquire(fresh)]
            + [lambda t=t: store.enqueue(t, "m2", b"m2") for t in threads]
        )
        assert outcomes == [None] * len(threads) + [1] + [None] * len(threads)
        for t in threads:
            assert await store.read_steps(t) == [f"{t}/1".encode(), f"{t}/2".encode()]
            expected = [InboxEntry("m2", b"m2")]
            if t == threads[0]:
                expected.insert(0, InboxEntry("blocker", b"b"))
            assert await store.pending(t) == expected
        for node in client.get_nodes():
            await client.execute_command("SCRIPT FLUSH", target_nodes=node)
        assert await store.dequeue(threads[0], "blocker") is True
        for node in client.get_nodes():
            await client.execute_command("SCRIPT FLUSH", target_nodes=node)
        assert await store.dead_letter(threads[1], "m2", "bad") is True
        for node in client.get_nodes():
            await client.execute_command("SCRIPT FLUSH", target_nodes=node)
        assert await store.delete(threads[2], epoch=1) is True
        assert await store.threads() == sorted(t for t in threads if t != threads[2])

        # A lease is lost (expired during a pause) and taken by another worker,
        # who has not touched the thread: only the lease can refuse the writes.
        p0 = partitions[0]
        t0 = thread_of[p0]
        head = layout.for_thread(t0).thread(t0, "head")
        await client.delete(layout.partition(p0).lease)
        successor = await leases.acquire(p0, "w-b")
        assert successor is not None and successor.epoch == held[p0].epoch + 1
        with pytest.raises(FencedError, match=f"lease of partition {p0}"):
            await store.commit(CommitRequest(thread_id=t0, expected_version=2, epoch=1, step=b"x"))
        with pytest.raises(FencedError, match=f"lease of partition {p0}"):
            await store.acquire(t0)
        with pytest.raises(FencedError, match=f"lease of partition {p0}"):
            await store.delete(t0, epoch=1)
        assert await client.hget(head, "version") == b"2"
        assert await client.hget(head, "epoch") == b"1"
        held[p0] = successor
        epoch = await store.acquire(t0)
        assert epoch == 2
        await store.commit(CommitRequest(thread_id=t0, expected_version=2, epoch=2, step=b"x"))
        loaded = await store.load(t0)
        assert loaded is not None and loaded.version == 3


# -- the snapshot store's writes are fenced by the partition lease -----------------


@pytest.mark.redis
async def test_a_worker_store_writes_only_under_its_partition_lease(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    from threadline.persistence import CommitRequest

    held: dict[int, Lease] = {}
    store = RedisSnapshotStore(
        client,
        prefix=redis_prefix,
        lease_token=lambda p: held[p].token if p in held else None,
    )
    async with store:
        layout = store.layout
        leases = PartitionLeases(client, layout=layout, ttl_ms=10_000)
        thread = "t-fenced"
        partition = layout.partition_of(thread)
        head = layout.for_thread(thread).thread(thread, "head")

        def commit(version: int, epoch: int) -> CommitRequest:
            return CommitRequest(
                thread_id=thread, expected_version=version, epoch=epoch, step=b"s%d" % version
            )

        # No lease of the partition: nothing is activated, committed or deleted.
        with pytest.raises(FencedError, match=f"partition {partition}"):
            await store.acquire(thread)
        assert await client.exists(head) == 0

        lease = await leases.acquire(partition, "w-a")
        assert lease is not None
        held[partition] = lease
        epoch = await store.acquire(thread)
        await store.commit(commit(0, epoch))

        # The lease expires while this worker still believes it holds it (a
        # pause), and another worker takes the partition without touching the
        # thread: its epoch is unchanged, so only the lease can refuse the write.
        await client.delete(layout.partition(partition).lease)
        successor = await leases.acquire(partition, "w-b")
        assert successor is not None and successor.epoch == lease.epoch + 1
        with pytest.raises(FencedError, match="lease of partition"):
            await store.commit(commit(1, epoch))
        with pytest.raises(FencedError, match="lease of partition"):
            await store.acquire(thread)
        with pytest.raises(FencedError, match="lease of partition"):
            await store.delete(thread, epoch=epoch)
        assert await client.hget(head, "version") == b"1"
        assert int(await client.hget(head, "epoch") or 0) == epoch

        # The new holder writes on.
        held[partition] = successor
        epoch = await store.acquire(thread)
        await store.commit(commit(1, epoch))
        loaded = await store.load(thread)
        assert loaded is not None and loaded.version == 2 and loaded.steps == [b"s0", b"s1"]


# -- F5: worker processes race for the same partitions ------------------------------


def race_violations(events: Iterable[dict[str, Any]], ttl_ms: int, slack_ms: int = 2) -> list[str]:
    """Everything in a race log that breaks the lease contract, on Redis's clock.

    Per partition and epoch: one worker; one acquire; epochs 1..n with no
    gap (no grant missing from the log); grants in epoch order are in time
    order; no success of a grant (acquire or renew) after the next grant's
    acquire (no two believers at once); a grant that was not released is not
    taken again before it expired (``slack_ms`` absorbs millisecond rounding).
    """
    grants: dict[tuple[int, int], dict[str, Any]] = {}
    problems: list[str] = []
    for event in events:
        if event["op"] not in ("acquire", "renew", "release"):
            continue
        key = (event["p"], event["epoch"])
        grant = grants.setdefault(
            key, {"workers": set(), "acquired": None, "times": [], "released": False}
        )
        grant["workers"].add(event["w"])
        if event["op"] == "acquire":
            if grant["acquired"] is not None:
                problems.append(f"partition {key[0]} epoch {key[1]} granted twice")
            grant["acquired"] = event["t"]
        if event["op"] in ("acquire", "renew"):
            grant["times"].append(event["t"])
        if event["op"] == "release":
            grant["released"] = True
    by_partition: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for (p, epoch), grant in grants.items():
        if len(grant["workers"]) > 1:
            problems.append(f"partition {p} epoch {epoch} held by {sorted(grant['workers'])}")
        if grant["acquired"] is None:
            problems.append(f"partition {p} epoch {epoch} renewed but never acquired")
            continue
        by_partition[p].append((epoch, grant))
    for p, seq in by_partition.items():
        seq.sort(key=lambda item: item[0])
        epochs = [epoch for epoch, _ in seq]
        if epochs != list(range(1, len(epochs) + 1)):
            problems.append(f"partition {p}: epochs {epochs[:5]}... are not 1..n")
        for (e1, g1), (e2, g2) in itertools.pairwise(seq):
            if g2["acquired"] < g1["acquired"]:
                problems.append(f"partition {p}: epoch {e2} acquired before epoch {e1}")
            last = max(g1["times"])
            if last > g2["acquired"]:
                problems.append(
                    f"partition {p}: epoch {e1} ({sorted(g1['workers'])}) succeeded at {last}"
                    f" after epoch {e2} ({sorted(g2['workers'])}) was acquired at"
                    f" {g2['acquired']}"
                )
            if not g1["released"] and g2["acquired"] < last + ttl_ms - slack_ms:
                problems.append(
                    f"partition {p}: epoch {e2} acquired at {g2['acquired']}, before epoch"
                    f" {e1} expired ({last} + {ttl_ms} ms)"
                )
    return problems


def test_the_race_checker_finds_every_kind_of_violation() -> None:
    def ev(op: str, p: int, epoch: int, w: str, t: int | None = None) -> dict[str, Any]:
        return {"op": op, "p": p, "epoch": epoch, "w": w, "t": t}

    clean = [
        ev("acquire", 0, 1, "a", 100),
        ev("renew", 0, 1, "a", 150),
        ev("release", 0, 1, "a"),
        ev("acquire", 0, 2, "b", 160),
        ev("acquire", 0, 3, "a", 300),  # epoch 2 expired at 260
        ev("acquire", 1, 1, "b", 100),
    ]
    assert race_violations(clean, ttl_ms=100) == []
    cases = {
        "held by": [*clean, ev("renew", 1, 1, "a", 120)],
        "granted twice": [*clean, ev("acquire", 1, 1, "b", 130)],
        "never acquired": [*clean, ev("renew", 1, 7, "b", 130)],
        "not 1..n": [*clean, ev("acquire", 1, 3, "b", 500)],
        "acquired before epoch": [*clean[:4], ev("acquire", 0, 3, "a", 120)],
        "succeeded at": [*clean, ev("renew", 0, 2, "b", 310)],
        "before epoch 2 expired": [*clean[:4], ev("acquire", 0, 3, "a", 200)],
    }
    for expected, events in cases.items():
        found = race_violations(events, ttl_ms=100)
        assert any(expected in problem for problem in found), (expected, found)


def _read_events(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def _percentiles(values: list[int]) -> str:
    if len(values) < 2:
        return "n/a"
    q = statistics.quantiles(values, n=100)
    return f"p50 {q[49] / 1000:.2f} ms, p99 {q[98] / 1000:.2f} ms (n={len(values)})"


@pytest.mark.slow
@pytest.mark.redis
def test_f5_worker_processes_racing_for_partitions_never_share_one(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    workers, partitions, ttl_ms, seconds = 4, 8, 60, 5.0
    go = tmp_path / "go"
    logs = [tmp_path / f"w{i}.jsonl" for i in range(workers)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "race",
                redis_server.url,
                redis_prefix,
                f"worker-{i}",
                str(partitions),
                str(ttl_ms),
                str(seconds),
                str(1234 + i),
                str(go),
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, log in enumerate(logs)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(log.exists() and log.read_text() for log in logs):
            for proc in procs:
                assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.02)
        go.touch()  # all ready: start the race at once
        for proc in procs:
            _, stderr = proc.communicate(timeout=seconds + 60)
            assert proc.returncode == 0, stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    events = _read_events(logs)
    ops = Counter(e["op"] for e in events)
    assert ops["done"] == workers
    assert race_violations(events, ttl_ms) == []
    # The race did happen: every partition changed hands between workers,
    # leases were renewed, released and lost (renewed too late).
    holders = defaultdict(set)
    for e in events:
        if e["op"] == "acquire":
            holders[e["p"]].add(e["w"])
    assert len(holders) == partitions
    assert all(len(ws) >= 2 for ws in holders.values()), holders
    assert ops["renew"] > 0 and ops["release"] > 0
    assert ops["fenced"] + ops["lost"] > 0
    print(
        f"\nF5 race: {ops['acquire']} grants, {ops['renew']} renews, {ops['release']} releases,"
        f" {ops['fenced']} fenced and {ops['lost']} lost renews over {partitions} partitions;"
        f" acquire {_percentiles([e['us'] for e in events if e['op'] == 'acquire'])};"
        f" renew {_percentiles([e['us'] for e in events if e['op'] == 'renew'])}"
    )


# -- F4: a stopped holder loses its lease and cannot write after it wakes -------------


@pytest.mark.slow
@pytest.mark.redis
async def test_f4_a_sigstopped_holder_loses_its_lease_and_is_fenced_on_waking(
    redis_server: RedisServer, client: redis.asyncio.Redis, redis_prefix: str, tmp_path: Path
) -> None:
    ttl_ms, partition = 400, 5
    layout = KeyLayout(prefix=redis_prefix)
    keys = layout.partition(partition)
    steps = keys.thread("t", "steps")
    leases = PartitionLeases(client, layout=layout, ttl_ms=10_000)
    log = tmp_path / "hold.jsonl"
    proc = await anyio.open_process(
        [
            sys.executable,
            WORKER,
            "hold",
            redis_server.url,
            redis_prefix,
            "sleeper",
            str(partition),
            str(ttl_ms),
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def events() -> list[dict[str, Any]]:
        return _read_events([log]) if log.exists() else []

    async def stderr() -> str:
        assert proc.stderr is not None
        chunks = []
        with anyio.move_on_after(5):
            try:
                while True:
                    chunks.append(await proc.stderr.receive())
            except anyio.EndOfStream:
                pass
        return b"".join(chunks).decode(errors="replace")

    async def renewed_twice() -> bool:
        assert proc.returncode is None, await stderr()
        return sum(e["op"] == "renew" for e in events()) >= 2

    try:
        await _wait_until(renewed_twice, timeout=60)
        proc.send_signal(signal.SIGSTOP)
        stopped_at = await _redis_ms(client)
        old = await leases.holder(partition)
        assert old is not None and old.worker == "sleeper"

        # Stopped, it cannot renew: Redis expires the lease after the TTL.
        await _wait_until(lambda: _is_free(leases, partition))
        freed_at = await _redis_ms(client)
        last_renew = max(e["t"] for e in events() if e["op"] in ("acquire", "renew"))
        assert freed_at >= last_renew + ttl_ms - 2
        assert freed_at - stopped_at <= ttl_ms + 2000

        successor = await leases.acquire(partition, "successor")
        assert successor is not None and successor.epoch == old.epoch + 1
        append = client.register_script(APPEND_LUA)
        await append(keys=[keys.lease, steps], args=[successor.token, "successor"])
        written_by_sleeper = len(await client.lrange(steps, 0, -1)) - 1

        proc.send_signal(signal.SIGCONT)
        with anyio.fail_after(30):
            returncode = await proc.wait()
        assert returncode == 0, await stderr()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        with anyio.CancelScope(shield=True):
            await proc.aclose()

    woke = [e["op"] for e in events()]
    # Awake, its next write is refused and its renew is fenced: it stops.
    assert woke[-2:] == ["write-refused", "fenced"], woke
    assert "FENCED" in events()[-2]["error"]
    assert successor.token in events()[-1]["error"]
    stored = await client.lrange(steps, 0, -1)
    assert written_by_sleeper >= 1
    assert stored[-1] == b"successor"  # nothing by the sleeper after the takeover
    holder = await leases.holder(partition)
    assert holder is not None and holder.token == successor.token
