"""Key layout format 2 and the migration of format-1 data (``threadline migrate``).

Format-1 data is written here by hand, command by command, the way the
format-1 ``RedisSnapshotStore`` wrote it (``<prefix>:t:{<escaped id>}:<part>``),
so these tests keep meaning the old layout whatever the store writes now.
Every check reads the real keys of a private redis-server (and of a real
three-node Cluster).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import msgspec
import pytest
import redis
import redis.asyncio
import structlog
from redis.asyncio.cluster import RedisCluster

from threadline.actors import PersistenceError, SnapshotFormatError
from threadline.persistence import (
    DEPLOYMENT_PARTITIONS,
    LAYOUT_FORMAT,
    DeadLetter,
    InboxEntry,
    KeyLayout,
    Membership,
    RecoverableThread,
    RedisSnapshotStore,
    deployment_layout,
    migrate_layout,
)
from threadline.runtime.cli import main

from ._cluster import RedisClusterProcesses
from .conftest import RedisServer

pytestmark = pytest.mark.redis

PARTS = ("head", "steps", "full", "inbox", "told", "dead")
ODD_ID = "we{ir}d %7B id {}% ünï 🧵"  # braces, a percent, an escape look-alike, non-ASCII


def old_key(prefix: str, thread_id: str, part: str) -> str:
    """Written out here, not imported: the format-1 name as the old store built it."""
    escaped = thread_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return f"{prefix}:t:{{{escaped}}}:{part}"


def new_key(prefix: str, partitions: int, thread_id: str, part: str) -> str:
    return (
        KeyLayout(prefix=prefix, partitions=partitions)
        .for_thread(thread_id)
        .thread(thread_id, part)
    )


Value = tuple[str, Any] | None


async def read_key(client: Any, key: str) -> Value:
    """A key's type and whole content (bytes), or None if it does not exist."""
    kind = (await client.type(key)).decode()
    if kind == "none":
        return None
    if kind == "hash":
        return kind, await client.hgetall(key)
    if kind == "list":
        return kind, await client.lrange(key, 0, -1)
    if kind == "string":
        return kind, await client.get(key)
    raise AssertionError(f"unexpected type {kind} of {key}")


async def write_thread(
    client: Any, prefix: str, thread_id: str, *, indexed: bool = True, seed: bytes = b""
) -> dict[str, Value]:
    """A format-1 thread with every part (a turn in flight, two queued messages, a dead
    letter), written as the old store's scripts did; its keys' contents by part."""
    head = old_key(prefix, thread_id, "head")
    # _ACQUIRE_LUA, then two commits (_COMMIT_LUA); the second with a full record.
    await client.hincrby(head, "epoch", 3)
    await client.hset(head, mapping={"version": 2, "full_version": 2, "turn": "m1"})
    steps = [b"\xff\xfe\x00step 1" + seed, b"\x80\x81 not utf-8 \xc3" + seed]
    await client.rpush(old_key(prefix, thread_id, "steps"), *steps)
    await client.set(old_key(prefix, thread_id, "full"), b"\x00\xffFULL" + seed)
    # _ENQUEUE_LUA twice, then a dead letter (_DEQUEUE_LUA with a dead key).
    for message_id, envelope in (("m2", b"\xffenvelope 2"), ("m3", b"envelope 3")):
        await client.hsetnx(old_key(prefix, thread_id, "told"), message_id, envelope + seed)
        await client.rpush(old_key(prefix, thread_id, "inbox"), message_id)
    letter = DeadLetter(message_id="m0", envelope=b"\xff" + seed, reason="undecodable", ts=1.5)
    await client.hset(old_key(prefix, thread_id, "dead"), "m0", msgspec.msgpack.encode(letter))
    if indexed:
        await client.sadd(f"{prefix}:threads", thread_id)
    return {part: await read_key(client, old_key(prefix, thread_id, part)) for part in PARTS}


async def write_queued_only(client: Any, prefix: str, thread_id: str) -> dict[str, Value]:
    """A thread with an inbox and no head yet (told, never activated)."""
    await client.hsetnx(old_key(prefix, thread_id, "told"), "q1", b"\xfequeued")
    await client.rpush(old_key(prefix, thread_id, "inbox"), "q1")
    await client.sadd(f"{prefix}:threads", thread_id)
    return {part: await read_key(client, old_key(prefix, thread_id, part)) for part in PARTS}


async def write_decoys(client: Any, prefix: str) -> dict[str, Value]:
    """Keys that look like format-1 ones and are not: they must stay as they are."""
    decoys = {
        f"{prefix}:t:{{p001}}:lease": b"1:w",  # the prefix '<prefix>:t', format 2
        f"{prefix}:t:{{x}}:other": b"not a part",
        f"{prefix}x:t:{{y}}:head": b"another prefix",
        f"{prefix}:t:{{a{{b}}:head": b"a brace inside: not the store's",
    }
    for key, value in decoys.items():
        await client.set(key, value)
    return {key: await read_key(client, key) for key in decoys}


async def config_of(client: Any, prefix: str) -> dict[bytes, bytes]:
    return dict(await client.hgetall(f"{prefix}:config"))


async def assert_moved(
    client: Any,
    prefix: str,
    partitions: int,
    threads: dict[str, dict[str, Value]],
    *,
    old_left: bool = False,
) -> None:
    for thread_id, parts in threads.items():
        for part, value in parts.items():
            moved = await read_key(client, new_key(prefix, partitions, thread_id, part))
            assert moved == value, (thread_id, part)
            old = await read_key(client, old_key(prefix, thread_id, part))
            assert old == (value if old_left else None), (thread_id, part)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield c
    finally:
        await c.aclose()


# -- deployment_layout ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_new_deployment_gets_layout_format_2(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    layout = await deployment_layout(client, redis_prefix, 8)
    assert layout == KeyLayout(prefix=redis_prefix, partitions=8)
    assert await config_of(client, redis_prefix) == {b"partitions": b"8", b"format": b"2"}
    assert await deployment_layout(client, redis_prefix) == layout  # read, not rewritten
    with pytest.raises(ValueError, match="has 8 partitions, not 16"):
        await deployment_layout(client, redis_prefix, 16)
    assert LAYOUT_FORMAT == 2


@pytest.mark.anyio
async def test_a_format_1_deployment_without_threads_is_marked_format_2(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    # What deployment_layout wrote before format 2: the partition count only.
    await client.hset(f"{redis_prefix}:config", "partitions", 32)
    await write_decoys(client, redis_prefix)
    layout = await deployment_layout(client, redis_prefix)
    assert layout.partitions == 32
    assert await config_of(client, redis_prefix) == {b"partitions": b"32", b"format": b"2"}


@pytest.mark.anyio
@pytest.mark.parametrize("found_by", ["index", "scan", "both"])
@pytest.mark.parametrize("configured", [True, False])
async def test_format_1_data_is_refused_with_the_command_that_migrates_it(
    client: redis.asyncio.Redis,
    redis_server: RedisServer,
    redis_prefix: str,
    found_by: str,
    configured: bool,
) -> None:
    if configured:
        await client.hset(f"{redis_prefix}:config", "partitions", 64)
    if found_by == "index":  # index entries only (their keys not written yet)
        await client.sadd(f"{redis_prefix}:threads", ODD_ID)
    else:  # keys found by SCAN; maybe without an index entry
        await write_thread(client, redis_prefix, ODD_ID, indexed=found_by == "both")
    before = await config_of(client, redis_prefix)
    for partitions in (None, 64):
        with pytest.raises(SnapshotFormatError) as caught:
            await deployment_layout(client, redis_prefix, partitions)
        message = str(caught.value)
        assert f"prefix {redis_prefix!r}" in message
        assert "old key layout (format 1)" in message
        command = f"threadline migrate --redis {redis_server.url} --prefix {redis_prefix}"
        assert message.endswith(command), message
    assert await config_of(client, redis_prefix) == before  # nothing written


@pytest.mark.anyio
async def test_a_newer_or_explicitly_old_format_is_refused(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    config = f"{redis_prefix}:config"
    await client.hset(config, mapping={"partitions": 64, "format": 3})
    with pytest.raises(SnapshotFormatError, match="format 3, written by a newer threadline"):
        await deployment_layout(client, redis_prefix)
    with pytest.raises(SnapshotFormatError, match="format 3, written by a newer threadline"):
        await migrate_layout(client, redis_prefix)
    await client.hset(config, "format", "x")
    with pytest.raises(SnapshotFormatError, match="unreadable key layout format 'x'"):
        await deployment_layout(client, redis_prefix)
    await client.hset(config, "format", 1)
    with pytest.raises(SnapshotFormatError, match="threadline migrate"):
        await deployment_layout(client, redis_prefix)
    assert await config_of(client, redis_prefix) == {b"partitions": b"64", b"format": b"1"}


@pytest.mark.anyio
async def test_look_alike_keys_are_not_format_1_data(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    decoys = await write_decoys(client, redis_prefix)
    # A glob character in the prefix matches itself only.
    await write_thread(client, f"{redis_prefix}a", "t")
    assert (await deployment_layout(client, f"{redis_prefix}?")).partitions == 64
    assert (await deployment_layout(client, redis_prefix)).partitions == 64
    report = await migrate_layout(client, redis_prefix)
    assert (report.threads, report.keys_copied, report.keys_deleted) == (0, 0, 0)
    for key, value in decoys.items():
        assert await read_key(client, key) == value


# -- migrate_layout ------------------------------------------------------------------


@pytest.mark.anyio
async def test_migrate_moves_every_key_byte_exact_and_runs_again_as_a_no_op(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    prefix = redis_prefix
    threads = {
        "plain": await write_thread(client, prefix, "plain"),
        ODD_ID: await write_thread(client, prefix, ODD_ID, seed=b"odd"),
        "unindexed": await write_thread(client, prefix, "unindexed", indexed=False),
        "queued": await write_queued_only(client, prefix, "queued"),
    }
    await client.sadd(f"{prefix}:threads", "index-only")  # the index is a superset
    await client.pexpire(old_key(prefix, "plain", "dead"), 600_000)
    decoys = await write_decoys(client, prefix)
    with pytest.raises(SnapshotFormatError):
        await deployment_layout(client, prefix)

    report = await migrate_layout(client, prefix)

    copied = 6 + 6 + 6 + 2
    assert (report.threads, report.keys_copied, report.keys_deleted) == (4, copied, copied)
    assert report.partitions == DEPLOYMENT_PARTITIONS
    assert (report.already_migrated, report.format_set) == (False, True)
    await assert_moved(client, prefix, DEPLOYMENT_PARTITIONS, threads)
    ttl = await client.pttl(new_key(prefix, DEPLOYMENT_PARTITIONS, "plain", "dead"))
    assert 0 < ttl <= 600_000
    assert await client.pttl(new_key(prefix, DEPLOYMENT_PARTITIONS, "plain", "head")) == -1
    # The index is unchanged, and now has the thread it lacked.
    index = {m.decode() for m in await client.smembers(f"{prefix}:threads") if isinstance(m, bytes)}
    assert index == {*threads, "index-only"}
    assert await config_of(client, prefix) == {b"partitions": b"64", b"format": b"2"}
    for key, value in decoys.items():
        assert await read_key(client, key) == value
    assert await deployment_layout(client, prefix) == KeyLayout(prefix=prefix, partitions=64)

    again = await migrate_layout(client, prefix)
    assert (again.threads, again.keys_copied, again.keys_deleted) == (0, 0, 0)
    assert (again.already_migrated, again.format_set) == (True, False)
    await assert_moved(client, prefix, DEPLOYMENT_PARTITIONS, threads)


@pytest.mark.anyio
async def test_migrate_uses_the_stored_partition_count_or_the_one_given(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    stored, fresh = f"{redis_prefix}s", f"{redis_prefix}f"
    await client.hset(f"{stored}:config", "partitions", 8)
    threads = {ODD_ID: await write_thread(client, stored, ODD_ID)}
    with pytest.raises(ValueError, match="has 8 partitions, not 16"):
        await migrate_layout(client, stored, partitions=16)
    assert await read_key(client, new_key(stored, 8, ODD_ID, "head")) is None  # nothing done
    assert (await migrate_layout(client, stored)).partitions == 8
    await assert_moved(client, stored, 8, threads)

    threads = {ODD_ID: await write_thread(client, fresh, ODD_ID)}  # no config at all
    assert (await migrate_layout(client, fresh, partitions=16)).partitions == 16
    await assert_moved(client, fresh, 16, threads)
    assert await config_of(client, fresh) == {b"partitions": b"16", b"format": b"2"}


@pytest.mark.anyio
async def test_a_prefix_with_nothing_to_migrate_is_left_untouched(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    report = await migrate_layout(client, redis_prefix)
    assert (report.threads, report.format_set, report.already_migrated) == (0, False, False)
    assert not await client.exists(f"{redis_prefix}:config")


@pytest.mark.anyio
async def test_keep_old_then_a_second_run_deletes_the_old_keys(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    prefix = redis_prefix
    threads = {t: await write_thread(client, prefix, t) for t in ("a", ODD_ID)}
    report = await migrate_layout(client, prefix, delete_old=False)
    assert (report.threads, report.keys_copied, report.keys_deleted) == (2, 12, 0)
    await assert_moved(client, prefix, 64, threads, old_left=True)
    assert (await deployment_layout(client, prefix)).partitions == 64  # format 2 is set
    # Workers run again; one that is live does not stop the old keys' deletion.
    await Membership(client, layout=KeyLayout(prefix=prefix)).heartbeat("w1")
    # A live worker writes a new key: the rerun must keep it.
    await client.rpush(new_key(prefix, 64, "a", "steps"), b"step 3")
    threads["a"]["steps"] = ("list", [*threads["a"]["steps"][1], b"step 3"])  # type: ignore[index]

    again = await migrate_layout(client, prefix)

    assert (again.threads, again.keys_copied, again.keys_deleted) == (2, 0, 12)
    assert again.already_migrated
    await assert_moved(client, prefix, 64, threads)


@pytest.mark.anyio
async def test_a_run_cut_short_before_the_format_is_set_is_finished(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Before the commit point the old keys are the truth: a partial or stale copy
    is overwritten, and a copy whose old key is gone is deleted."""
    prefix = redis_prefix
    threads = {t: await write_thread(client, prefix, t) for t in ("a", "b", ODD_ID)}
    # The state a crash left: the partition count fixed, thread a copied whole,
    # b's head only, and two copies that no longer mirror the old keys.
    await client.hset(f"{prefix}:config", "partitions", 64)
    for thread_id, part in [("a", part) for part in PARTS] + [("b", "head")]:
        payload = await client.dump(old_key(prefix, thread_id, part))
        assert payload is not None
        await client.restore(new_key(prefix, 64, thread_id, part), 0, payload)
    await client.rpush(new_key(prefix, 64, ODD_ID, "steps"), b"stale")
    # The dead letter of b was copied, then went (the old key is the truth).
    await client.delete(old_key(prefix, "b", "dead"))
    threads["b"]["dead"] = None
    await client.hset(new_key(prefix, 64, "b", "dead"), "m0", b"gone")
    with pytest.raises(SnapshotFormatError):
        await deployment_layout(client, prefix)

    report = await migrate_layout(client, prefix)

    assert (report.threads, report.keys_copied, report.keys_deleted) == (3, 17, 17)
    await assert_moved(client, prefix, 64, threads)
    assert await config_of(client, prefix) == {b"partitions": b"64", b"format": b"2"}


@pytest.mark.anyio
async def test_a_run_cut_short_after_the_format_is_set_never_copies_again(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """After the commit point the new keys are the truth: a rerun deletes the old
    keys left, and neither resurrects a new key the live system removed nor
    overwrites one it wrote."""
    prefix = redis_prefix
    threads = {t: await write_thread(client, prefix, t) for t in ("a", ODD_ID)}
    await migrate_layout(client, prefix, delete_old=False)
    await client.delete(old_key(prefix, "a", "full"))  # the crash: some deleted
    # The live system since: thread a consumed its queue (the keys went away),
    # ODD_ID committed a step.
    for part in ("inbox", "told"):
        await client.delete(new_key(prefix, 64, "a", part))
        threads["a"][part] = None
    await client.rpush(new_key(prefix, 64, ODD_ID, "steps"), b"step 3")
    threads[ODD_ID]["steps"] = ("list", [*threads[ODD_ID]["steps"][1], b"step 3"])  # type: ignore[index]

    report = await migrate_layout(client, prefix)

    assert (report.threads, report.keys_copied, report.keys_deleted) == (2, 0, 11)
    assert report.already_migrated
    await assert_moved(client, prefix, 64, threads)


@pytest.mark.anyio
async def test_migrate_refuses_while_a_worker_is_live_unless_forced(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    prefix = redis_prefix
    threads = {"a": await write_thread(client, prefix, "a")}
    await Membership(client, layout=KeyLayout(prefix=prefix)).heartbeat("worker-1")
    with pytest.raises(PersistenceError, match=r"1 worker\(s\) .* live \(worker-1\)"):
        await migrate_layout(client, prefix)
    assert not await client.exists(f"{prefix}:config", new_key(prefix, 64, "a", "head"))
    report = await migrate_layout(client, prefix, force=True)
    assert report.keys_copied == 6
    await assert_moved(client, prefix, 64, threads)


@pytest.mark.anyio
async def test_the_store_refuses_format_1_data_and_reads_every_thread_once_migrated(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    prefix = redis_prefix
    await write_thread(client, prefix, ODD_ID, seed=b"odd")
    await write_queued_only(client, prefix, "queued")
    with pytest.raises(SnapshotFormatError, match="threadline migrate"):
        async with RedisSnapshotStore(client, prefix=prefix):
            pass

    await migrate_layout(client, prefix)

    async with RedisSnapshotStore(client, prefix=prefix) as store:
        assert await store.threads() == [ODD_ID]  # "queued" has no step yet
        stored = await store.load(ODD_ID)
        assert stored is not None
        assert (stored.version, stored.epoch, stored.full_version) == (2, 3, 2)
        assert (stored.full, stored.steps) == (b"\x00\xffFULLodd", [])
        assert await store.read_steps(ODD_ID) == [
            b"\xff\xfe\x00step 1odd",
            b"\x80\x81 not utf-8 \xc3odd",
        ]
        assert await store.pending(ODD_ID) == [
            InboxEntry("m2", b"\xffenvelope 2odd"),
            InboxEntry("m3", b"envelope 3odd"),
        ]
        assert await store.dead_letters(ODD_ID) == [
            DeadLetter(message_id="m0", envelope=b"\xffodd", reason="undecodable", ts=1.5)
        ]
        assert await store.pending("queued") == [InboxEntry("q1", b"\xfequeued")]
        assert await store.recoverable_threads() == [
            RecoverableThread(thread_id="queued", turn=None),
            RecoverableThread(thread_id=ODD_ID, turn="m1"),
        ]
        # And it writes on: the next step lands after the migrated ones.
        epoch = await store.acquire(ODD_ID)
        assert epoch == 4


# -- a Redis Cluster -------------------------------------------------------------------


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterProcesses) -> AsyncIterator[RedisCluster]:
    host, port = redis_cluster.startup
    c = RedisCluster(host=host, port=port)
    await c.initialize()
    try:
        yield c
    finally:
        await c.aclose()


@pytest.mark.anyio
async def test_on_a_cluster_scan_finds_keys_on_every_node_and_migrate_moves_them(
    cluster_client: RedisCluster, redis_prefix: str
) -> None:
    client, prefix = cluster_client, redis_prefix
    default = client.get_default_node()
    # An unindexed thread on each node, the default node's one last (SCAN has
    # to reach the others to find the first ones).
    by_node: dict[str, str] = {}
    for i in range(1000):
        thread_id = f"{ODD_ID}-{i}"
        node = client.get_node_from_key(old_key(prefix, thread_id, "head"))
        assert node is not None
        by_node.setdefault(node.name, thread_id)
    assert len(by_node) == 3
    away = [t for name, t in by_node.items() if name != default.name]
    threads = {t: await write_thread(client, prefix, t, indexed=False) for t in away}
    with pytest.raises(SnapshotFormatError, match=r"--prefix \S+ *$") as caught:
        await deployment_layout(client, prefix)
    assert f" --cluster --prefix {prefix}" in str(caught.value)
    threads[by_node[default.name]] = await write_thread(client, prefix, by_node[default.name])

    report = await migrate_layout(client, prefix)

    assert (report.threads, report.keys_copied, report.keys_deleted) == (3, 18, 18)
    await assert_moved(client, prefix, 64, threads)
    assert (await deployment_layout(client, prefix)).partitions == 64
    assert (await migrate_layout(client, prefix)).already_migrated


# -- the command -----------------------------------------------------------------------


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """``main(argv)`` in this process: (exit code, stdout, stderr), with structlog
    unconfigured as in a new process (a test before may have configured it)."""
    logger = logging.getLogger("threadline")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    was_configured, config = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()

    def _run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    try:
        yield _run
    finally:
        logger.level, logger.handlers[:], logger.propagate = saved
        if was_configured:
            structlog.configure(**config)
        else:
            structlog.reset_defaults()


def on_redis(url: str, work: Any, *args: Any) -> Any:
    """``await work(client, *args)`` with a client of ``url``, from a plain test."""

    async def go() -> Any:
        async with redis.asyncio.Redis.from_url(url) as c:
            return await work(c, *args)

    return anyio.run(go)


def test_the_command_runs_the_migration_the_refusal_names(
    run: Any, redis_server: RedisServer, redis_prefix: str
) -> None:
    url, prefix = redis_server.url, redis_prefix
    on_redis(url, write_thread, prefix, ODD_ID)
    on_redis(url, write_thread, prefix, "b")
    with pytest.raises(SnapshotFormatError) as caught:
        on_redis(url, deployment_layout, prefix)
    command = shlex.split(str(caught.value).rpartition("move them with: ")[2])
    assert command[:2] == ["threadline", "migrate"]

    Membership_ = Membership  # a live worker: refused
    on_redis(url, lambda c: Membership_(c, layout=KeyLayout(prefix=prefix)).heartbeat("w9"))
    code, out, err = run(*command[1:], "--keep-old")
    assert (code, out) == (1, "")
    assert err.startswith("threadline: error: 1 worker(s)") and "(w9)" in err

    code, out, err = run(*command[1:], "--keep-old", "--force")
    assert (code, err) == (0, "")
    assert out == (
        f"migrated the prefix {prefix!r} on {url} to key layout format 2 (64 partitions): "
        "2 threads, 12 keys copied, old keys kept (run again without --keep-old to delete "
        "them)\n"
    )
    code, out, err = run(*command[1:])  # format 2 now: live workers do not matter
    assert (code, err) == (0, "")
    assert out == (
        f"the prefix {prefix!r} on {url} is at key layout format 2 already (64 partitions): "
        "nothing copied, 12 old keys deleted\n"
    )
    code, out, _ = run(*command[1:])
    assert out.endswith("nothing copied, no old keys left\n")
    assert on_redis(url, deployment_layout, prefix) == KeyLayout(prefix=prefix, partitions=64)


def test_the_command_on_an_empty_prefix_and_its_usage_errors(
    run: Any, redis_server: RedisServer, redis_prefix: str
) -> None:
    code, out, err = run("migrate", "--redis", redis_server.url, "--prefix", redis_prefix)
    assert (code, err) == (0, "")
    assert out.startswith("nothing to migrate: no deployment and no format-1 keys")
    assert "--prefix threadline" in out
    on_redis(redis_server.url, deployment_layout, redis_prefix, 8)
    code, out, err = run(
        "migrate", "--redis", redis_server.url, "--prefix", redis_prefix, "--partitions", "4"
    )
    assert (code, out) == (1, "")
    assert "has 8 partitions, not 4" in err
    code, _, err = run("migrate", "--redis", redis_server.url, "--partitions", "0")
    assert code == 2
    assert err.splitlines()[-1] == "threadline: error: --partitions must be at least 1, got 0"
    code, _, err = run("migrate", "--prefix", redis_prefix)
    assert code == 2 and "the following arguments are required: --redis" in err


def test_the_command_on_a_cluster(
    run: Any, redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    host, port = redis_cluster.startup

    def on_cluster(work: Any, *args: Any, **kwargs: Any) -> Any:
        async def go() -> Any:
            c = RedisCluster(host=host, port=port)
            try:
                await c.initialize()
                return await work(c, *args, **kwargs)
            finally:
                await c.aclose()

        return anyio.run(go)

    threads = [f"{ODD_ID}-{i}" for i in range(6)]
    for thread_id in threads:
        on_cluster(write_thread, redis_prefix, thread_id, indexed=False)
    with pytest.raises(SnapshotFormatError) as caught:
        on_cluster(deployment_layout, redis_prefix)
    command = shlex.split(str(caught.value).rpartition("move them with: ")[2])
    assert "--cluster" in command
    code, out, err = run(*command[1:])
    assert (code, err) == (0, "")
    assert out.endswith(": 6 threads, 36 keys copied, 36 old keys deleted\n")
    assert on_cluster(deployment_layout, redis_prefix).partitions == 64
