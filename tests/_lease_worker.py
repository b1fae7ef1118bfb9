"""A separate process for the lease race and SIGSTOP tests (run as a script).

    python tests/_lease_worker.py race URL PREFIX WORKER PARTITIONS TTL_MS SECONDS SEED GO LOG
    python tests/_lease_worker.py hold URL PREFIX WORKER PARTITION TTL_MS LOG

``race``: one task per partition races for it until SECONDS have passed after
the file GO appears: acquire, hold a random short time, renew a few times
(sometimes too late), then release or let the lease expire. ``hold``: acquire
one partition, then every TTL/5 append to a fenced list and renew, until
fenced. Both write one JSON object per line to LOG, with the Redis time
(``t``, ms) each acquire or renew returned, and the client-side latency
(``us``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import anyio
import redis.asyncio

from threadline.actors import FencedError, StoreUnavailableError
from threadline.persistence import KeyLayout, Lease, PartitionLeases, fenced_script

# KEYS: lease, list. ARGV: token, value. A lease-checked write.
APPEND_LUA = fenced_script("return redis.call('RPUSH', KEYS[2], ARGV[2])")


def emit(out: TextIO, **event: Any) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def micros(start: float) -> int:
    return int((time.perf_counter() - start) * 1e6)


async def race_one(
    leases: PartitionLeases,
    partition: int,
    worker: str,
    deadline: float,
    rng: random.Random,
    out: TextIO,
) -> None:
    ttl_s = leases.ttl_ms / 1000
    while time.monotonic() < deadline:
        start = time.perf_counter()
        lease = await leases.acquire(partition, worker)
        if lease is None:
            await anyio.sleep(rng.uniform(0.001, 0.01))
            continue
        emit(
            out,
            op="acquire",
            p=partition,
            epoch=lease.epoch,
            w=worker,
            t=lease.server_ms,
            us=micros(start),
        )
        current: Lease | None = lease
        for _ in range(rng.randint(0, 3)):
            # One hold in ten outlives the lease: its renew must fail.
            late = rng.random() < 0.1
            await anyio.sleep(ttl_s * (rng.uniform(1.2, 1.5) if late else rng.uniform(0, 0.3)))
            assert current is not None
            start = time.perf_counter()
            try:
                renewed = await leases.renew(current)
            except FencedError:
                emit(out, op="fenced", p=partition, epoch=lease.epoch, w=worker)
                current = None
                break
            if renewed is None:
                emit(out, op="lost", p=partition, epoch=lease.epoch, w=worker)
                current = None
                break
            emit(
                out,
                op="renew",
                p=partition,
                epoch=renewed.epoch,
                w=worker,
                t=renewed.server_ms,
                us=micros(start),
            )
            current = renewed
        if current is not None and rng.random() < 0.7:
            start = time.perf_counter()
            if await leases.release(current):
                emit(
                    out, op="release", p=partition, epoch=current.epoch, w=worker, us=micros(start)
                )
        # Otherwise walk away: the lease expires on Redis's clock.


async def race(argv: list[str], out: TextIO) -> None:
    url, prefix, worker, partitions, ttl_ms, seconds, seed, go = argv
    client = redis.asyncio.Redis.from_url(url)
    leases = PartitionLeases(
        client, layout=KeyLayout(prefix=prefix, partitions=int(partitions)), ttl_ms=int(ttl_ms)
    )
    rng = random.Random(int(seed))
    emit(out, op="ready", w=worker)
    while not Path(go).exists():
        await anyio.sleep(0.01)
    deadline = time.monotonic() + float(seconds)
    try:
        async with anyio.create_task_group() as tg:
            for p in range(int(partitions)):
                tg.start_soon(
                    race_one, leases, p, worker, deadline, random.Random(rng.random()), out
                )
    finally:
        await client.aclose()
    emit(out, op="done", w=worker)


async def hold(argv: list[str], out: TextIO) -> None:
    url, prefix, worker, partition_text, ttl_ms = argv
    partition = int(partition_text)
    client = redis.asyncio.Redis.from_url(url)
    layout = KeyLayout(prefix=prefix)
    leases = PartitionLeases(client, layout=layout, ttl_ms=int(ttl_ms))
    keys = layout.partition(partition)
    append = client.register_script(APPEND_LUA)
    try:
        lease = await leases.acquire(partition, worker)
        assert lease is not None, "the partition was taken"
        emit(out, op="acquire", epoch=lease.epoch, t=lease.server_ms)
        beat = 0
        while True:
            await anyio.sleep(leases.ttl_ms / 5000)
            beat += 1
            try:
                await append(
                    keys=[keys.lease, keys.thread("t", "steps")],
                    args=[lease.token, f"{worker}:{beat}"],
                )
            except redis.ResponseError as exc:
                emit(out, op="write-refused", error=str(exc))
            try:
                renewed = await leases.renew(lease)
            except FencedError as exc:
                emit(out, op="fenced", error=str(exc))
                return
            if renewed is None:
                emit(out, op="lost")
                return
            lease = renewed
            emit(out, op="renew", t=lease.server_ms)
    except StoreUnavailableError as exc:
        emit(out, op="unavailable", error=str(exc))
    finally:
        await client.aclose()


def main() -> None:
    mode, argv, log = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    with Path(log).open("a") as out:
        anyio.run(race if mode == "race" else hold, argv, out)


if __name__ == "__main__":
    main()
