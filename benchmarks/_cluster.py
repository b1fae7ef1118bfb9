"""Cluster: threads served by worker processes over Redis, reached with ``Client``.

Workers are separate processes (``python -m threadline.runtime.cli worker
--app benchmarks._cluster_app:agent``), all on the benchmark's redis-server;
the agent is a ``ScriptedModel`` that answers at once, and the in-process peer
(an ``ActorSystem`` on a ``RedisSnapshotStore`` of the same server) runs the
same agent in this process. Every part uses a deployment prefix of its own.

- failover: two workers share the partitions; SIGKILL one right after its
  orphaned threads (one per partition it owned, up to ``orphans``) took a turn
  on it, then ask each of them again. The figure is the time from the kill to
  that ask's reply (sent after the step's commit): the next committed step.
  Also: when Redis first shows another holder of the partition's lease. The
  killed worker is replaced and the partitions settle before the next kill.
- tell: sequential ``Client.tell`` (one worker consuming the messages at the
  same time) vs ``ActorSystem.tell``; the time until each returns (durable).
- ask: sequential ``Client.ask`` on warm threads (Client -> worker -> reply
  stream) vs ``ActorSystem.ask``, in alternating blocks.
- W2: T threads x N turns, K in flight (``_concurrency.drive``), in process,
  and through ``Client.ask`` and 1, 2, 4 workers. The Client gets a pool of
  16 + K connections (every waiting ask holds one for its blocking read of the
  reply stream); one more run with 1 worker and the Client's default pool (16)
  shows what that default costs. With the CPU time each process spent
  (``/proc/<pid>/stat`` of the workers, this process's own, and the server's
  ``INFO cpu``) over the wall time, and the server's commands per turn: what
  limits the throughput.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio

from threadline.persistence import (
    KeyLayout,
    Membership,
    PartitionLeases,
    RedisSnapshotStore,
    assign_partitions,
    deployment_layout,
    open_redis,
)
from threadline.runtime import ActorSystem, Client

from . import _cluster_app
from ._common import note, percentile, temp_dir, user_message
from ._concurrency import drive

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks._cluster_app:agent"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- worker processes ------------------------------------------------------------------


def pid_of(worker_id: str) -> int:
    """The process id inside a CLI worker's id (``<host>-<pid>-<hex>``)."""
    return int(worker_id.rsplit("-", 2)[-2])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Pool:
    """Worker processes of one deployment; every one is stopped on exit."""

    def __init__(self, url: str, prefix: str, partitions: int, lease_ttl: float) -> None:
        self.args = [
            sys.executable,
            "-m",
            "threadline.runtime.cli",
            "worker",
            "--redis",
            url,
            "--app",
            APP,
            "--lease-ttl",
            str(lease_ttl),
            "--partitions",
            str(partitions),
            "--prefix",
            prefix,
        ]
        self.logs = temp_dir()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: list[int] = []

    def start(self) -> int:
        log = (self.logs / f"worker-{len(self.started)}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                self.args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.procs[proc.pid] = proc
        self.started.append(proc.pid)
        return proc.pid

    @property
    def alive(self) -> set[int]:
        return set(self.procs)

    def check(self) -> None:
        for pid, proc in self.procs.items():
            if proc.poll() is not None:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.logs.iterdir()))
                raise RuntimeError(f"worker {pid} exited with {proc.returncode}:\n{logs}")

    def kill(self, pid: int) -> None:
        """SIGKILL: no release, no goodbye."""
        proc = self.procs.pop(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextlib.contextmanager
def pool(url: str, prefix: str, partitions: int, lease_ttl: float) -> Iterator[Pool]:
    p = Pool(url, prefix, partitions, lease_ttl)
    try:
        yield p
    finally:
        p.close()


class Deployment:
    """This process's view of a deployment's leases and members."""

    def __init__(self, r: redis.asyncio.Redis, layout: KeyLayout) -> None:
        self.layout = layout
        self.leases = PartitionLeases(r, layout=layout)
        self.members = Membership(r, layout=layout)

    async def holders(self) -> list[str | None]:
        out: list[str | None] = []
        for p in range(self.layout.partitions):
            lease = await self.leases.holder(p)
            out.append(None if lease is None else lease.worker)
        return out

    async def settled(self, workers: Pool, timeout: float = 120.0) -> list[str | None]:
        """Wait until the live processes hold exactly their planned partitions."""
        with anyio.fail_after(timeout):
            while True:
                workers.check()
                live = [w for w in await self.members.live_workers() if pid_of(w) in workers.alive]
                if {pid_of(w) for w in live} == workers.alive:
                    holders = await self.holders()
                    if holders == list(assign_partitions(self.layout.partitions, live)):
                        return holders
                await anyio.sleep(0.05)

    def thread_in(self, partition: int, stem: str) -> str:
        """A thread id that hashes to ``partition``."""
        i = 0
        while self.layout.partition_of(f"{stem}-{i}") != partition:
            i += 1
        return f"{stem}-{i}"


@contextlib.asynccontextmanager
async def deployment(url: str, prefix: str, partitions: int) -> Any:
    """The deployment ``prefix`` with ``partitions`` fixed, before any worker or Client."""
    async with open_redis(url, "cluster benchmark") as r:
        layout = await deployment_layout(r, prefix, partitions)
        yield Deployment(r, layout)


def _prefix(name: str) -> str:
    return f"cl-{name}-{time.time_ns()}"


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000,
        "n": len(values),
    }


# -- failover ----------------------------------------------------------------------------


async def _kill_once(
    d: Deployment,
    workers: Pool,
    client: Client[Any],
    k: int,
    orphans: int,
    lease_ttl: float,
    steps: list[float],
    moved: list[float],
) -> None:
    """Settle, SIGKILL the older worker, time its orphaned threads' next steps; replace it."""
    holders = await d.settled(workers)
    victim = min(workers.alive, key=workers.started.index)
    owned = [p for p, w in enumerate(holders) if w and pid_of(w) == victim]
    orphaned = {p: d.thread_in(p, f"fo-{k}-{p}") for p in owned[:orphans]}
    for thread in orphaned.values():  # live on the victim
        await client.ask(thread, user_message(0))
    start = time.perf_counter()
    workers.kill(victim)

    async def step(thread: str) -> None:
        await client.ask(thread, user_message(1), timeout=lease_ttl + 120)
        steps.append(time.perf_counter() - start)

    async def lease_moves(partition: int) -> None:
        while True:
            lease = await d.leases.holder(partition)
            if lease is not None and pid_of(lease.worker) != victim:
                moved.append(time.perf_counter() - start)
                return
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        for partition, thread in orphaned.items():
            tg.start_soon(step, thread)
            tg.start_soon(lease_moves, partition)
    workers.start()


async def failover(
    url: str, lease_ttl: float, kills: int, partitions: int, orphans: int
) -> dict[str, Any]:
    """SIGKILL a worker ``kills`` times; kill -> next committed step of its threads."""
    prefix = _prefix(f"failover{lease_ttl:g}")
    steps: list[float] = []
    moved: list[float] = []
    async with deployment(url, prefix, partitions) as d:
        with pool(url, prefix, partitions, lease_ttl) as workers:
            workers.start()
            workers.start()
            async with Client[Any](url, prefix=prefix) as client:
                for k in range(kills):
                    await _kill_once(d, workers, client, k, orphans, lease_ttl, steps, moved)
                    note(
                        f"  failover (lease TTL {lease_ttl:g} s) kill {k + 1}/{kills}: "
                        f"{steps[-1]:.2f} s"
                    )
    return {
        "lease_ttl": lease_ttl,
        "kills": kills,
        "workers": 2,
        "partitions": partitions,
        "orphaned_threads": len(steps),
        "p50_s": percentile(steps, 50),
        "p99_s": percentile(steps, 99),
        "max_s": max(steps),
        "lease_moved_p50_s": percentile(moved, 50),
        "lease_moved_max_s": max(moved),
        "samples_s": steps,
    }


# -- tell and ask latency ------------------------------------------------------------


async def _timed(
    fn: Callable[[str, str], Awaitable[Any]], threads: list[str], n: int, offset: int = 0
) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await fn(threads[i % len(threads)], user_message(offset + i))
        out.append(time.perf_counter() - start)
    return out


@contextlib.asynccontextmanager
async def in_process(url: str, name: str) -> Any:
    store = RedisSnapshotStore.from_url(url, prefix=_prefix(name))
    async with ActorSystem[Any](_cluster_app.agent(), snapshots=store) as system:
        yield system


async def latencies(url: str, tells: int, asks: int, partitions: int) -> dict[str, Any]:
    """``tell`` and ``ask``: one worker process vs in process, same run."""
    prefix = _prefix("latency")
    block = 25
    async with deployment(url, prefix, partitions) as d:
        with pool(url, prefix, partitions, 10.0) as workers:
            workers.start()
            await d.settled(workers)
            async with (
                Client[Any](url, prefix=prefix) as client,
                in_process(url, "latency") as local,
            ):
                threads = [f"lat-{i}" for i in range(10)]
                for thread in threads:  # activated in both: the figures are warm turns
                    await client.ask(thread, "warm")
                    await local.ask(thread, "warm")
                note(f"  tell: {tells} sequential tells each way")
                tell_remote = await _timed(client.tell, threads, tells)
                tell_local = await _timed(local.tell, threads, tells)
                for thread in threads:  # the tells are consumed before the asks
                    await client.ask(thread, "drain")
                    await local.ask(thread, "drain")
                note(f"  ask: {asks} sequential asks each way, alternating blocks of {block}")
                ask_remote: list[float] = []
                ask_local: list[float] = []
                for i in range(0, asks, block):
                    n = min(block, asks - i)
                    ask_remote += await _timed(client.ask, threads, n, i)
                    ask_local += await _timed(local.ask, threads, n, i)
    return {
        "tell": {"cluster": _ms(tell_remote), "in_process": _ms(tell_local)},
        "ask": {"cluster": _ms(ask_remote), "in_process": _ms(ask_local)},
    }


# -- W2 through Client + worker processes ------------------------------------------------


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine so far, all cores (``/proc/stat``)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks[:8]) - idle - iowait) / CLK_TCK, iowait / CLK_TCK


class CpuMeter:
    """CPU seconds of the workers, this process and the Redis server over a block."""

    def __init__(self, r: redis.asyncio.Redis, pids: set[int]) -> None:
        self.r = r
        self.pids = sorted(pids)

    async def _redis(self) -> float:
        info = await self.r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def sample(self) -> dict[str, float]:
        busy, iowait = machine_cpu_seconds()
        return {
            "workers": sum(cpu_seconds(pid) for pid in self.pids),
            "client": time.process_time(),
            "redis": await self._redis(),
            "machine": busy,
            "iowait": iowait,
        }

    async def commands(self) -> int:
        return int((await self.r.info("stats"))["total_commands_processed"])


async def _w2_measured(
    label: str,
    ask: Callable[[str, str], Awaitable[Any]],
    meter: CpuMeter,
    threads: int,
    turns: int,
    inflight: int,
) -> dict[str, Any]:
    commands = await meter.commands()
    before = await meter.sample()
    out = await drive(label, ask, threads, turns, inflight, prefix="cw2")
    after = await meter.sample()
    out["redis_commands_per_turn"] = (await meter.commands() - commands - 2) / (threads * turns)
    wall = out["seconds"]
    cores = {k: (after[k] - before[k]) / wall for k in before}
    cores["total"] = cores["workers"] + cores["client"] + cores["redis"]
    cores["others"] = max(0.0, cores["machine"] - cores["total"])
    out["cpu_cores"] = cores
    return out


DEFAULT_POOL = 16
"""``Client``'s default ``max_connections`` (``client_from_url``): each waiting ask
holds one for its blocking read of the reply stream."""


async def _w2_cluster(
    r: redis.asyncio.Redis,
    url: str,
    n: int,
    pool_size: int | None,
    threads: int,
    turns: int,
    inflight: int,
    partitions: int,
) -> dict[str, Any]:
    prefix = _prefix(f"w2x{n}")
    options: dict[str, Any] = {} if pool_size is None else {"max_connections": pool_size}
    label = f"W2 cluster x{n}" + ("" if pool_size else " (default Client pool)")
    note(f"  {label}")
    async with deployment(url, prefix, partitions) as d:
        with pool(url, prefix, partitions, 2.0) as workers:
            for _ in range(n):
                workers.start()
            await d.settled(workers)
            async with Client[Any](url, prefix=prefix, **options) as client:
                out = await _w2_measured(
                    label, client.ask, CpuMeter(r, workers.alive), threads, turns, inflight
                )
                state = await client.get_state("cw2-0")
                assert len(state.state.messages) == 2 * turns
    out.update(system="cluster", workers=n, client_pool=pool_size or DEFAULT_POOL)
    return out


async def w2(
    url: str,
    threads: int,
    turns: int,
    inflight: int,
    counts: tuple[int, ...],
    partitions: int,
) -> list[dict[str, Any]]:
    """In process; Client (default pool) + 1 worker; Client (a connection per
    request in flight) + each of ``counts`` workers."""
    results = []
    async with open_redis(url, "cluster benchmark cpu") as r:
        note(f"  W2 in process: {threads} threads x {turns} turns, {inflight} in flight")
        async with in_process(url, "w2") as local:
            out = await _w2_measured(
                "W2 in process", local.ask, CpuMeter(r, set()), threads, turns, inflight
            )
        out.update(system="in-process", workers=0, client_pool=None)
        results.append(out)
        sized = DEFAULT_POOL + inflight
        for n, pool_size in [(1, None), *((n, sized) for n in counts)]:
            results.append(
                await _w2_cluster(r, url, n, pool_size, threads, turns, inflight, partitions)
            )
    return results


async def run(
    url: str,
    *,
    lease_ttls: tuple[float, ...],
    kills: int,
    partitions: int,
    orphans: int,
    tells: int,
    asks: int,
    threads: int,
    turns: int,
    inflight: int,
    worker_counts: tuple[int, ...],
) -> dict[str, Any]:
    report: dict[str, Any] = {"failover": []}
    for ttl in lease_ttls:
        note(f"  failover: lease TTL {ttl:g} s, 2 workers, {kills} SIGKILLs")
        report["failover"].append(await failover(url, ttl, kills, partitions, orphans))
    report.update(await latencies(url, tells, asks, partitions))
    report["w2"] = await w2(url, threads, turns, inflight, worker_counts, partitions)
    report["cores"] = os.cpu_count()
    return report


# -- targets -------------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, holds) for the cluster figures of ``report``."""
    out = []
    for f in report["failover"]:
        ttl = f["lease_ttl"]
        out.append(
            (
                f"failover (lease TTL {ttl:g} s): kill -> next step p99 <= TTL + 2 s",
                f"{f['p99_s']:.2f} s (p50 {f['p50_s']:.2f} s)",
                f["p99_s"] <= ttl + 2,
            )
        )
    tell = report["tell"]["cluster"]
    out.append(
        (
            "Client.tell acknowledgement p99 <= 5 ms (appendfsync always)",
            f"{tell['p99_ms']:.2f} ms",
            tell["p99_ms"] <= 5,
        )
    )
    remote, local = report["ask"]["cluster"], report["ask"]["in_process"]
    out.append(
        (
            "remote ask p50 <= in-process ask p50 + 3 ms",
            f"{remote['p50_ms']:.2f} ms vs {local['p50_ms']:.2f} ms "
            f"({remote['p50_ms'] - local['p50_ms']:+.2f} ms)",
            remote["p50_ms"] <= local["p50_ms"] + 3,
        )
    )
    return out
