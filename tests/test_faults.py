"""Fault injection, judged by the history checker (``tests/_history.py``).

Every test here records what its clients sent and were told, reads back what
the threads committed, and lets :func:`tests._history.check` decide: nothing
acknowledged lost, nothing applied twice, no reordering, no fork, no gap.
Counts are only asserted to prove a fault really happened.

Costs (2 cores, loaded): the SIGKILL loops ~4 s each with forked children,
~8 s with fresh interpreters; the Nth-call sweeps ~4 s per store; the soak
smoke test ~12 s; the rest a few seconds or less each.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from anyio.streams.buffered import BufferedByteReceiveStream

from threadline import (
    PersistenceError,
    SnapshotCorruptError,
    SnapshotFormatError,
    StoreUnavailableError,
)
from threadline.persistence import (
    FORMAT_VERSION,
    KeyLayout,
    RedisSnapshotStore,
    SnapshotStore,
    SqliteSnapshotStore,
)
from threadline.runtime import ActorSystem

from ._faults import (
    ROOT,
    FaultyStore,
    kill_loop,
    make_agent,
    message_id,
    message_text,
    nth_call_sweep,
    worker_command,
)
from ._history import (
    VERDICTS,
    History,
    Op,
    ask_until_replied,
    check,
    decode_histories,
    parse_lines,
    read_histories,
    recorded_ask,
    recorded_tell,
)
from .conftest import RedisServer

pytestmark = pytest.mark.anyio

STORES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


def spec_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str) -> str:
    if kind == "sqlite":
        return str(tmp_path / "threads.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url}#{prefix}"


# -- SIGKILL at random points of turns --------------------------------------------


KILL_LOOPS = [
    # (store, seed, kills, children forked from a fork server or fresh interpreters)
    pytest.param("sqlite", 1, 10, True, id="sqlite-seed1-fork"),
    pytest.param("sqlite", 2, 10, True, id="sqlite-seed2-fork"),
    pytest.param("sqlite", 3, 4, False, id="sqlite-seed3-exec"),
    pytest.param("redis", 1, 10, True, marks=pytest.mark.redis, id="redis-seed1-fork"),
    pytest.param("redis", 2, 10, True, marks=pytest.mark.redis, id="redis-seed2-fork"),
    pytest.param("redis", 3, 4, False, marks=pytest.mark.redis, id="redis-seed3-exec"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "seed", "kills", "fork"), KILL_LOOPS)
def test_sigkill_at_random_points_loses_nothing_acknowledged(
    kind: str,
    seed: int,
    kills: int,
    fork: bool,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    redis_prefix: str,
) -> None:
    spec = spec_for(kind, tmp_path, request, redis_prefix)
    result = kill_loop(
        spec,
        tmp_path / "work",
        seed=seed,
        kills=kills,
        threads=["a", "b", "c"],
        max_delay=0.35,
        fork=fork,
    )
    assert result.report is not None
    result.report.assert_ok(f"SIGKILL loop on {kind}, seed {seed}, delays {result.delays}")
    # The faults really happened, some of them inside turns...
    assert result.kills == kills
    assert result.resumed_rounds >= 1, "no kill left a turn parked: kills never landed mid-turn"
    # ...and every message ended up acknowledged, every turn finished.
    assert result.report.acknowledged == result.report.sent > 3 * kills
    assert result.unfinished == []


# -- a store whose Nth call fails ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
async def test_nth_call_failing_in_each_position_loses_and_duplicates_nothing(
    kind: str, open_store: Any
) -> None:
    async with open_store(kind) as store:
        assert isinstance(FaultyStore(store, mode="before"), SnapshotStore)
        result = await nth_call_sweep(store, "sweep")
    assert result.report is not None
    result.report.assert_ok(f"Nth-call faults on {kind}")
    # Every call position of the workload failed once, in both modes: the
    # activation's acquire and load, and every step's commit.
    assert result.calls >= 16
    assert result.injected == 2 * result.calls
    assert {"acquire/before", "load/before", "commit/before"} <= set(result.faults)
    assert {"acquire/after", "load/after", "commit/after"} <= set(result.faults)
    assert result.retries == result.injected
    assert result.report.acknowledged == result.report.sent


# -- redis-server SIGKILL and restart from its AOF -------------------------------


@pytest.mark.slow
@pytest.mark.redis
async def test_redis_killed_and_restarted_from_aof_loses_nothing_acknowledged(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A server of its own: killing the session's server would disturb other tests.
    binary = shutil.which("redis-server")
    assert binary is not None
    (tmp_path / "redis").mkdir()
    server = RedisServer(binary, tmp_path / "redis")
    server.start()
    rng = random.Random(7)
    history = History()
    threads = [f"t{j}" for j in range(4)]
    kills = 0
    chaos_done = anyio.Event()
    try:
        store = RedisSnapshotStore.from_url(server.url, prefix="aof", socket_timeout=5)
        async with ActorSystem(make_agent(0.002), snapshots=store) as system:

            async def sender(thread: str) -> None:
                i = 0
                while not chaos_done.is_set() or i < 10:
                    await ask_until_replied(
                        history,
                        system,
                        f"client-{thread}",
                        thread,
                        message_text(i),
                        message_id(thread, i),
                        attempts=100,
                        backoff=0.02,
                    )
                    i += 1

            async def chaos() -> None:
                nonlocal kills
                for _ in range(4):
                    await anyio.sleep(rng.uniform(0.1, 0.4))
                    server.kill()
                    kills += 1
                    await anyio.sleep(rng.uniform(0.0, 0.3))
                    await anyio.to_thread.run_sync(server.start)
                chaos_done.set()

            async with anyio.create_task_group() as tg:
                for thread in threads:
                    tg.start_soon(sender, thread)
                tg.start_soon(chaos)
            histories = await read_histories(system, threads)
    finally:
        server.stop()
    report = check(history.ops, histories)
    report.assert_ok("redis SIGKILL + AOF restart")
    assert kills == 4
    assert report.errors > 0, "no client ever saw the server down"
    assert report.acknowledged == report.sent


# -- SQLite locked by another process ---------------------------------------------


@pytest.mark.slow
async def test_sqlite_locked_by_another_process_is_a_typed_error_then_recovers(
    tmp_path: Path,
) -> None:
    db = tmp_path / "threads.db"
    history = History()
    store = SqliteSnapshotStore(db, busy_timeout=0.2)
    async with ActorSystem(make_agent(), snapshots=store) as system:
        for thread in ("a", "b"):
            await recorded_ask(history, system, f"client-{thread}", thread, "say 0", f"{thread}-m0")
        async with await anyio.open_process(
            worker_command("lock", str(db)), cwd=ROOT, stderr=subprocess.STDOUT
        ) as locker:
            assert locker.stdin is not None and locker.stdout is not None
            said = BufferedByteReceiveStream(locker.stdout)
            line = await said.receive_until(b"\n", 1000)
            assert line == b"locked", line
            # Active threads, and one never seen (its activation writes too).
            for thread in ("a", "b", "new"):
                for i in (1, 2):
                    with pytest.raises(StoreUnavailableError, match="locked"):
                        await recorded_ask(
                            history,
                            system,
                            f"client-{thread}",
                            thread,
                            message_text(i),
                            message_id(thread, i),
                            timeout=30,
                        )
            await locker.stdin.aclose()
            line = await said.receive_until(b"\n", 1000)
            assert line == b"released", line
        assert locker.returncode == 0
        # Released: the same messages go through.
        for thread in ("a", "b", "new"):
            for i in (1, 2):
                _, errors = await ask_until_replied(
                    history,
                    system,
                    f"client-{thread}",
                    thread,
                    message_text(i),
                    message_id(thread, i),
                )
                assert errors == []
        histories = await read_histories(system, ["a", "b", "new"])
    report = check(history.ops, histories)
    report.assert_ok("SQLite locked by another process")
    assert report.errors == 6
    assert report.acknowledged == report.sent == 8


# -- disk full ------------------------------------------------------------------------


def _ops_and_histories(stdout: str) -> tuple[list[Op], list[dict[str, Any]]]:
    ops = parse_lines([line[3:].encode() for line in stdout.splitlines() if line.startswith("op ")])
    histories = [
        decode_histories(line.removeprefix("histories "))
        for line in stdout.splitlines()
        if line.startswith("histories ")
    ]
    return ops, histories


@pytest.mark.slow
def test_disk_full_gives_typed_errors_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    threads = "a,b,c"
    full = subprocess.run(
        worker_command("diskfull", str(db), str(512 * 1024), threads, "30"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert full.returncode == 0 and full.stdout.endswith("done\n"), full.stdout + full.stderr
    ops, _ = _ops_and_histories(full.stdout)
    replies = [op for op in ops if op.op == "reply"]
    errors = [op for op in ops if op.op == "error"]
    assert replies, "nothing fit under the limit"
    assert errors, "the file size limit was never reached"
    assert {op.error for op in errors} == {"StoreUnavailableError"}
    # A fresh process loads the file, reads every history and goes on.
    verify = subprocess.run(
        worker_command("verify", str(db), threads),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    more, (before, after) = _ops_and_histories(verify.stdout)
    check(ops, before).assert_ok("disk full, read back in a fresh process")
    report = check(ops + more, after)
    report.assert_ok("disk full, then one more message each")
    assert [op.op for op in more if op.op != "send"] == ["reply"] * 3


# -- corrupt and inconsistent records ------------------------------------------------

Damage = Callable[[bytes], bytes | None]


def _flip(record: bytes) -> bytes:
    damaged = bytearray(record)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def _truncate(record: bytes) -> bytes:
    return record[: len(record) // 2]


def _newer(record: bytes) -> bytes:
    return record[:2] + bytes([FORMAT_VERSION + 1]) + record[3:]


def damage_sqlite(path: Path, thread: str, how: str) -> None:
    with sqlite3.connect(path) as db:
        (version, record) = db.execute(
            "SELECT version, record FROM steps WHERE thread_id = ? ORDER BY version DESC LIMIT 1",
            (thread,),
        ).fetchone()
        if how == "gap":  # a step in the middle vanished
            db.execute("DELETE FROM steps WHERE thread_id = ? AND version = 2", (thread,))
        elif how == "stray":  # a step row beyond the head (a head that lags its steps)
            db.execute(
                "INSERT INTO steps (thread_id, version, record) VALUES (?, ?, ?)",
                (thread, version + 1, record),
            )
        else:
            change = {"flip": _flip, "truncate": _truncate, "newer": _newer}[how]
            db.execute(
                "UPDATE steps SET record = ? WHERE thread_id = ? AND version = ?",
                (change(record), thread, version),
            )


def damage_redis(server: RedisServer, prefix: str, thread: str, how: str) -> None:
    raw: Any = redis.Redis(host="127.0.0.1", port=server.port)  # (its stubs want str values)
    try:
        (key,) = [
            k
            for k in raw.scan_iter(
                match=KeyLayout(prefix=prefix, partitions=64)
                .for_thread(thread)
                .thread(thread, "steps")
            )
            if raw.type(k) == b"list"
        ]
        record = raw.lindex(key, -1)
        assert isinstance(record, bytes)
        if how == "gap":
            raw.lset(key, 1, b"--gone--")
            raw.lrem(key, 1, b"--gone--")
        elif how == "stray":
            raw.rpush(key, record)
        else:
            change = {"flip": _flip, "truncate": _truncate, "newer": _newer}[how]
            raw.lset(key, -1, change(record))
    finally:
        raw.close()


EXPECTED = {
    "flip": SnapshotCorruptError,
    "truncate": SnapshotCorruptError,
    "newer": SnapshotFormatError,
    "gap": SnapshotCorruptError,
    "stray": PersistenceError,
}


BAD_ATTEMPTS = 6


@pytest.mark.parametrize(
    ("kind", "how"),
    [
        *(pytest.param("sqlite", how) for how in EXPECTED),
        *(pytest.param("redis", how, marks=pytest.mark.redis) for how in EXPECTED),
    ],
)
async def test_a_damaged_thread_gets_a_typed_error_and_the_others_are_intact(
    kind: str,
    how: str,
    open_store: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    redis_prefix: str,
) -> None:
    history = History()
    good = [f"good-{j}" for j in range(4)]
    agent = make_agent()

    async def ask(system: ActorSystem[Any], thread: str, i: int) -> None:
        await recorded_ask(
            history, system, f"client-{thread}", thread, message_text(i), message_id(thread, i)
        )

    async with ActorSystem(agent, snapshots=open_store(kind)) as system:
        for i in range(3):
            for thread in ["bad", *good]:
                await ask(system, thread, i)
    if kind == "sqlite":
        damage_sqlite(tmp_path / "threads.db", "bad", how)
    else:
        damage_redis(request.getfixturevalue("redis_server"), redis_prefix, "bad", how)

    bad_errors: list[BaseException] = []
    good_errors: list[str] = []
    async with ActorSystem(agent, snapshots=open_store(kind)) as system:
        # Activate every thread without committing: a message id already
        # consumed is answered as a duplicate. (The damaged thread may not load.)
        for thread in [*good, "bad"]:
            try:
                await ask(system, thread, 2)
            except PersistenceError as exc:
                bad_errors.append(exc)

        async def bad_sender() -> None:
            for i in range(3, 3 + BAD_ATTEMPTS):
                try:
                    await ask(system, "bad", i)
                except PersistenceError as exc:
                    bad_errors.append(exc)

        async def good_sender(thread: str) -> None:
            for i in range(3, 9):
                mid = message_id(thread, i)
                _, errors = await ask_until_replied(
                    history, system, f"client-{thread}", thread, message_text(i), mid
                )
                good_errors.extend(f"{thread} m{i}: {e}" for e in errors)

        # All at once: the first commits of every thread are submitted in one
        # tick, so they share one batch (the store's group commit).
        async with anyio.create_task_group() as tg:
            tg.start_soon(bad_sender)
            for thread in good:
                tg.start_soon(good_sender, thread)
        histories = await read_histories(system, good)
        # Every store checks a load against the thread's records: none of the
        # damage loads (a stray step past the head included).
        with pytest.raises(EXPECTED[how]):
            await system.get_state("bad")
    assert len(bad_errors) == BAD_ATTEMPTS + 1, (
        f"the damaged thread accepted messages: {bad_errors}"
    )
    assert all(isinstance(e, EXPECTED[how]) for e in bad_errors), bad_errors
    report = check([op for op in history.ops if op.thread != "bad"], histories)
    report.assert_ok(f"{how} damage on {kind}: the other threads")
    assert report.acknowledged == report.sent == len(good) * 9
    # Isolation: the damage is the damaged thread's problem only.
    assert good_errors == [], "the other threads failed with the damaged one"


# -- tells, duplicates queued behind their originals ---------------------------------


@pytest.mark.parametrize("kind", STORES)
async def test_accepted_tells_with_duplicates_queued_are_each_applied_once_in_order(
    kind: str, open_store: Any
) -> None:
    """No fault: a returned ``tell`` is then a promise (the system stays up and
    ends cleanly), and re-sending a queued message must not cost any other. A
    small mailbox makes senders wait for room as well."""
    rng = random.Random(3)
    history = History()
    threads = [f"t{j}" for j in range(3)]
    async with ActorSystem(make_agent(), snapshots=open_store(kind), mailbox_capacity=2) as system:

        async def sender(thread: str) -> None:
            client = f"client-{thread}"
            sent: list[str] = []
            for i in range(12):
                mid = message_id(thread, i)
                await recorded_tell(history, system, client, thread, message_text(i), mid)
                sent.append(mid)
                if rng.random() < 0.4:  # a duplicate of a message that may still be queued
                    again = rng.choice(sent[-3:])
                    await recorded_tell(history, system, client, thread, "dup", again)
            # FIFO: once this is answered, every tell before it was handled.
            await recorded_ask(history, system, client, thread, "say end", f"{thread}-end")

        async with anyio.create_task_group() as tg:
            for thread in threads:
                tg.start_soon(sender, thread)
        histories = await read_histories(system, threads)
    report = check(history.ops, histories, tells_acknowledge=True)
    report.assert_ok(f"tells with duplicates on {kind}")
    assert report.acknowledged == report.sent == 3 * 13


# -- the soak command ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
def test_soak_quick_reports_the_checkers_counts(redis_server: RedisServer, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = ["soak", "--quick", "--seed", "11", "--redis-url", redis_server.url, "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["failures"] == []
    rows = {(r["fault"], r["store"]): r for r in report["rows"]}
    assert set(rows) == {(f, s) for f in ("kill", "nth") for s in ("sqlite", "redis")}
    for key, row in rows.items():
        assert row["faults"] > 0 and row["acknowledged"] > 0, key
        assert set(row["counts"]) == set(VERDICTS)
        assert not any(row["counts"].values()), (key, row["counts"])
    assert "## Soak: 1 cycles" in proc.stdout and ": PASS" in proc.stdout
    for column in ("lost", "duplicated", "reordered", "forked"):
        assert column in proc.stdout
