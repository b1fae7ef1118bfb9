"""The Worker/Client slice under real faults (issue 10: F1, F2, F3, F6, F7).

Every worker is a separate OS process (``tests/_scaleout_worker.py``), every
client here runs in the test process (or, for F6, in a child it kills). The
workload: one sequential sender per thread, telling even messages and asking
odd ones, retrying a failed or timed-out call with the same message id; at
the end each sender asks once more, which is processed after everything it
sent before (per-thread order), so nothing is left in flight. Then each
thread's committed history is judged by the history checker
(``tests/_history.py``): nothing acknowledged lost, nothing applied twice,
per-sender order, no fork. Times are printed (``-s``), never asserted.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from threadline import (
    AIMessage,
    PersistenceError,
    StepInfo,
    SystemClosedError,
    ToolCall,
    ToolMessage,
)
from threadline.persistence import (
    KeyLayout,
    PartitionLeases,
    deployment_layout,
    open_redis,
    partition_of,
)
from threadline.runtime import Agent, Client, ModelRequest, ScriptedModel, Worker

from ._cluster import RedisClusterProcesses
from ._faults import Lines
from ._history import History, check
from ._scaleout_worker import make_agent, message_text
from .conftest import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LEASE_TTL = 1.0
ASK_TIMEOUT = 10.0
RETRYABLE = (PersistenceError, TimeoutError, SystemClosedError)


# -- processes -------------------------------------------------------------------


class WorkerProcess:
    """One ``tests._scaleout_worker`` process."""

    def __init__(
        self,
        url: str,
        prefix: str,
        partitions: int,
        workdir: Path,
        name: str,
        call_log: Path | None = None,
    ) -> None:
        self.name = name
        self.errors = workdir / f"{name}.err"
        args = [url, prefix, str(partitions), str(LEASE_TTL)]
        if call_log is not None:
            args.append(str(call_log))
        with self.errors.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests._scaleout_worker", *args],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout.fileno())
        self.worker_id = ""

    def _tail(self) -> str:
        return self.errors.read_text(errors="replace")[-3000:]

    async def ready(self, timeout: float = 60.0) -> str:
        line = await anyio.to_thread.run_sync(self.lines.next, timeout)
        if line is None or not line.startswith("ready "):
            raise AssertionError(f"worker {self.name} not ready (said {line!r}):\n{self._tail()}")
        self.worker_id = line.split(" ", 1)[1]
        return self.worker_id

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, and wait for a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: self.proc.wait(timeout))
        said = self.lines.next(1.0)
        if code != 0 or said != "stopped":
            raise AssertionError(
                f"worker {self.name} did not stop cleanly (exit {code}, said {said!r}):\n"
                + self._tail()
            )

    def close(self) -> None:
        self.kill()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class Workers:
    """The worker processes of one test; every one is killed at the end."""

    def __init__(
        self, url: str, prefix: str, partitions: int, workdir: Path, call_log: Path | None = None
    ) -> None:
        self.url, self.prefix, self.partitions = url, prefix, partitions
        self.workdir, self.call_log = workdir, call_log
        self.started: list[WorkerProcess] = []
        self.live: list[WorkerProcess] = []

    async def start(self, n: int = 1) -> list[WorkerProcess]:
        new = [
            WorkerProcess(
                self.url,
                self.prefix,
                self.partitions,
                self.workdir,
                f"w{len(self.started) + k}",
                self.call_log,
            )
            for k in range(n)
        ]
        self.started += new
        for worker in new:
            await worker.ready()
        self.live += new
        return new

    def kill(self, worker: WorkerProcess) -> None:
        self.live.remove(worker)
        worker.kill()

    async def stop(self, worker: WorkerProcess) -> None:
        self.live.remove(worker)
        await worker.stop()

    def close(self) -> None:
        for worker in self.started:
            worker.close()


@contextlib.contextmanager
def workers_of(
    url: str, prefix: str, partitions: int, workdir: Path, call_log: Path | None = None
) -> Iterator[Workers]:
    workers = Workers(url, prefix, partitions, workdir, call_log)
    try:
        yield workers
    finally:
        workers.close()


# -- leases ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lease_table(url: str, prefix: str, partitions: int) -> AsyncIterator[PartitionLeases]:
    async with open_redis(url, "test leases") as redis:
        yield PartitionLeases(redis, layout=KeyLayout(prefix=prefix, partitions=partitions))


async def holders(leases: PartitionLeases) -> dict[int, str | None]:
    """Partition -> the worker holding its lease (as Redis sees it now)."""
    out: dict[int, str | None] = {}
    for p in range(leases.layout.partitions):
        lease = await leases.holder(p)
        out[p] = None if lease is None else lease.worker
    return out


def balanced(owners: dict[int, str | None], live: Sequence[str], slack: float = 0.3) -> bool:
    """Every partition held by a live worker, each within ``slack`` of P/N."""
    if any(owner not in live for owner in owners.values()):
        return False
    loads = Counter(owners.values())
    mean = len(owners) / len(live)
    return all(abs(loads[w] - mean) <= slack * mean for w in live)


async def wait_until_balanced(
    leases: PartitionLeases, live: Sequence[str], timeout: float = 30.0
) -> tuple[float, dict[int, str | None]]:
    """Poll the lease table until :func:`balanced`; the seconds it took."""
    start = time.monotonic()
    owners: dict[int, str | None] = {}
    with anyio.move_on_after(timeout):
        while True:
            owners = await holders(leases)
            if balanced(owners, live):
                return time.monotonic() - start, owners
            await anyio.sleep(0.05)
    loads = Counter(owners.values())
    raise AssertionError(f"not balanced over {list(live)} after {timeout} s: {dict(loads)}")


# -- the workload ---------------------------------------------------------------------


class Workload:
    """One sequential sender per thread, recording every operation in ``history``."""

    def __init__(self, client: Client[Any], history: History, threads: Sequence[str]) -> None:
        self.client = client
        self.history = history
        self.threads = list(threads)
        self.stopping = anyio.Event()
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.progress = anyio.Event()  # set (and replaced) on every acknowledgement
        self.acknowledged = 0

    async def send(self, thread: str, i: int, *, ask: bool | None = None, text: str = "") -> None:
        """Message ``i`` of ``thread``, retried with the same id until acknowledged."""
        sender, mid = f"c-{thread}", f"{thread}-m{i}"
        text = text or message_text(i)
        how = "ask" if (i % 2 == 1 if ask is None else ask) else "tell"
        for attempt in range(200):
            self.history.record("send", sender, thread, mid, how=how)
            try:
                if how == "tell":
                    await self.client.tell(thread, text, message_id=mid)
                    self.history.record("ack", sender, thread, mid, how="tell")
                else:
                    result = await self.client.ask(
                        thread, text, message_id=mid, timeout=ASK_TIMEOUT
                    )
                    self.history.record(
                        "reply",
                        sender,
                        thread,
                        mid,
                        version=result.version,
                        duplicate=result.duplicate,
                    )
            except RETRYABLE as exc:
                self.errors[type(exc).__name__] += 1
                self.history.record("error", sender, thread, mid, how=how, error=type(exc).__name__)
                await anyio.sleep(min(0.02 * 2**attempt, 0.5))
                continue
            self.sent += 1
            self.acknowledged += 1
            self.progress.set()
            self.progress = anyio.Event()
            return
        raise AssertionError(f"{mid}: never acknowledged after 200 attempts ({self.errors})")

    async def sender(self, thread: str) -> None:
        i = 0
        while not self.stopping.is_set():
            await self.send(thread, i)
            i += 1
        # Asked after everything this sender sent: its reply means they were all processed.
        await self.send(thread, i, ask=True, text="final")

    async def wait_for(self, acknowledgements: int) -> None:
        """Until ``acknowledgements`` more messages were acknowledged."""
        target = self.acknowledged + acknowledgements
        while self.acknowledged < target:
            await self.progress.wait()

    async def histories(self) -> dict[str, list[StepInfo]]:
        return {t: await self.client.history(t) for t in self.threads}


@contextlib.asynccontextmanager
async def running(workload: Workload) -> AsyncIterator[Workload]:
    """Senders run for the body; on exit they stop and their final asks are replied."""
    async with anyio.create_task_group() as tg:
        for thread in workload.threads:
            tg.start_soon(workload.sender, thread)
        yield workload
        workload.stopping.set()


def judge(history: History, histories: dict[str, list[StepInfo]], what: str) -> dict[str, int]:
    report = check(history.ops, histories)
    print(f"\n{what}: {report.summary()}")
    report.assert_ok(what)
    assert report.acknowledged > 0
    return report.figures()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- the lease's time to live -------------------------------------------------------------


@pytest.mark.parametrize("lease_ttl", [0.5, 3.0])
async def test_a_workers_leases_last_its_lease_ttl(
    redis_server: RedisServer, redis_prefix: str, lease_ttl: float
) -> None:
    """A crashed worker's partitions wait ``lease_ttl`` for a new owner, not the
    table's default 10 s (the Worker once left its leases at the default)."""
    url, P = redis_server.url, 4
    async with (
        Worker(make_agent(), url, prefix=redis_prefix, partitions=P, lease_ttl=lease_ttl) as w,
        lease_table(url, redis_prefix, P) as leases,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(w.serve)
        with anyio.fail_after(10):
            while len(w.partitions) < P:
                await anyio.sleep(0.01)
        for p in range(P):
            lease = await leases.holder(p)
            assert lease is not None and lease.worker == w.worker_id
            assert 0 < lease.expires_ms - lease.server_ms <= lease_ttl * 1000
        tg.cancel_scope.cancel()


async def test_a_partition_that_comes_back_reloads_its_threads(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """Worker A serves every thread; B joins (threads move to B and on), B
    leaves: A must not answer from the actors it kept in memory, whose epochs
    B has since fenced (the commit failed and the message stayed pending)."""
    url, prefix, P = redis_server.url, redis_prefix, 4
    threads = [f"back-{k}" for k in range(8)]
    history = History()
    workload = None
    async with (
        Worker(make_agent(), url, prefix=prefix, partitions=P, lease_ttl=0.5) as a,
        lease_table(url, prefix, P) as leases,
        Client(url, prefix=prefix) as client,
        anyio.create_task_group() as tg,
    ):
        workload = Workload(client, history, threads)
        tg.start_soon(a.serve)
        await wait_until_balanced(leases, [a.worker_id])
        with anyio.fail_after(30):
            for thread in threads:
                await workload.send(thread, 1)
            async with (
                Worker(make_agent(), url, prefix=prefix, partitions=P, lease_ttl=0.5) as b,
                anyio.create_task_group() as tg_b,
            ):
                tg_b.start_soon(b.serve)
                await wait_until_balanced(leases, [a.worker_id, b.worker_id])
                moved = [t for t in threads if partition_of(t, P) in b.partitions]
                assert moved
                for thread in threads:
                    await workload.send(thread, 3)
                tg_b.cancel_scope.cancel()
            await wait_until_balanced(leases, [a.worker_id])
            for thread in threads:
                await workload.send(thread, 5)
        histories = await workload.histories()
        tg.cancel_scope.cancel()
    assert not workload.errors, workload.errors
    check(history.ops, histories).assert_ok()


async def test_a_worker_recovers_when_its_connections_are_dropped(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Every inbox read fails at once (CLIENT KILL): each reader hands its
    partition back and the tick acquires it again. (A reader whose lease the
    tick had renewed once kept the lease renewed and read nothing, for good.)"""
    url, prefix, P = redis_server.url, redis_prefix, 4
    threads = [f"drop-{k}" for k in range(4)]
    history = History()
    async with (
        Worker(make_agent(), url, prefix=prefix, partitions=P, lease_ttl=0.5) as w,
        lease_table(url, prefix, P) as leases,
        Client(url, prefix=prefix) as client,
        anyio.create_task_group() as tg,
    ):
        workload = Workload(client, history, threads)
        tg.start_soon(w.serve)
        await wait_until_balanced(leases, [w.worker_id])
        with anyio.fail_after(30):
            for thread in threads:
                await workload.send(thread, 1)
            await anyio.sleep(0.3)  # a few ticks: every lease renewed
            async with open_redis(url, "test") as redis:
                await redis.client_kill_filter(_type="normal", skipme=True)
            for thread in threads:
                await workload.send(thread, 3)
            histories = await workload.histories()
        tg.cancel_scope.cancel()
    check(history.ops, histories).assert_ok()


async def test_a_stopping_worker_keeps_its_leases_until_its_steps_are_done(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A graceful stop finishes the step in flight before it hands the partition
    back; the lease must last that long (it once expired after ``lease_ttl``,
    and another worker took the thread over and redid the step)."""
    url, prefix, P = redis_server.url, redis_prefix, 2
    entered, gate = anyio.Event(), anyio.Event()

    def respond(request: ModelRequest[Any]) -> AIMessage | str:
        if isinstance(request.messages[-1], ToolMessage):
            return "done"
        return AIMessage("", tool_calls=[ToolCall(id="c1", name="slow", args={})])

    async def slow() -> str:
        """Takes its time."""
        entered.set()
        await gate.wait()
        return "slow"

    agent: Agent[Any] = Agent(model=ScriptedModel(respond), tools=[slow])
    thread = "stopping"
    async with open_redis(url, "test") as redis:
        await deployment_layout(redis, prefix, P)  # before the client: P partitions
    async with lease_table(url, prefix, P) as leases, Client(url, prefix=prefix) as client:
        worker = Worker(agent, url, prefix=prefix, partitions=P, lease_ttl=0.3)

        async def run() -> None:
            async with worker, anyio.create_task_group() as serving:
                serving.start_soon(worker.serve)
                await entered.wait()
                serving.cancel_scope.cancel()  # stop: the tool call is in flight

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await client.tell(thread, "go", message_id="m1")
                await entered.wait()
                await anyio.sleep(1.0)  # > 3 lease_ttl: stopping, not yet done
                held = await leases.holder(partition_of(thread, P))
                gate.set()
            assert held is not None and held.worker == worker.worker_id
            # Handed back once the step was done; the turn is complete.
            assert await leases.holder(partition_of(thread, P)) is None
        steps = await client.history(thread)
    assert [s.kind for s in steps][-1] == "model" and steps[-1].turn is None


# -- F1: SIGKILL a worker, again and again ----------------------------------------------

F1_PARTITIONS = 8
F1_KILLS = 8


async def test_f1_sigkilled_workers_lose_nothing_and_apply_once(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    url, prefix, P = redis_server.url, redis_prefix, F1_PARTITIONS
    rng = random.Random(1)
    threads = [f"f1-{k}" for k in range(10)]
    calls = tmp_path / "calls.log"
    kills: list[tuple[float, str, list[int]]] = []
    with (
        workers_of(url, prefix, P, tmp_path, calls) as workers,
        History(tmp_path / "history.jsonl") as history,
        anyio.fail_after(150),
    ):
        await workers.start(2)
        async with (
            lease_table(url, prefix, P) as leases,
            Client(url, prefix=prefix) as client,
        ):
            await wait_until_balanced(leases, [w.worker_id for w in workers.live])
            workload = Workload(client, history, threads)
            async with running(workload):
                for _ in range(F1_KILLS):
                    await workload.wait_for(rng.randint(5, 40))
                    victim = rng.choice(workers.live)
                    at = time.time()
                    workers.kill(victim)
                    # Read after the kill: the dead hand nothing back, so these
                    # partitions are orphaned (none moved away just before it).
                    owners = await holders(leases)
                    owned = [p for p, w in owners.items() if w == victim.worker_id]
                    kills.append((at, victim.worker_id, owned))
                    print(f"F1: {time.strftime('%X')} killed {victim.name} holding {owned}")
                    await workers.start(1)
                # Work goes on until both workers own partitions again.
                await wait_until_balanced(leases, [w.worker_id for w in workers.live])
                await workload.wait_for(20)
            histories = await workload.histories()
    figures = judge(history, histories, "F1")
    # Takeover: SIGKILL -> the next committed step of a thread of a partition the
    # victim held. A step within 0.1 s of the kill is the victim's own last commit
    # (a new owner waits for the lease to expire: up to LEASE_TTL).
    takeovers = []
    for at, _, owned in kills:
        later = [
            s.ts - at
            for t in threads
            if partition_of(t, P) in owned
            for s in histories[t]
            if s.ts > at + 0.1
        ]
        if later:
            takeovers.append(min(later))
    lines = calls.read_text().splitlines()
    redone = sum(n - 1 for n in Counter(lines).values())
    print(
        f"F1: {len(kills)} SIGKILLs, {len(takeovers)} takeovers measured, takeover "
        f"p50 {percentile(takeovers, 0.5):.2f} s p99 {percentile(takeovers, 0.99):.2f} s "
        f"(all {[round(t, 2) for t in takeovers]}); {len(lines)} model/tool calls, "
        f"{redone} redone after a kill; client errors {dict(workload.errors)}; {figures}"
    )
    assert len(kills) == F1_KILLS and takeovers


# -- F2: graceful stop, rolling restart --------------------------------------------------


async def test_f2_rolling_restart_loses_and_redoes_nothing(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    url, prefix, P = redis_server.url, redis_prefix, 8
    rng = random.Random(2)
    threads = [f"f2-{k}" for k in range(8)]
    calls = tmp_path / "calls.log"
    pauses = []
    with (
        workers_of(url, prefix, P, tmp_path, calls) as workers,
        History(tmp_path / "history.jsonl") as history,
        anyio.fail_after(120),
    ):
        await workers.start(2)
        async with (
            lease_table(url, prefix, P) as leases,
            Client(url, prefix=prefix) as client,
        ):
            await wait_until_balanced(leases, [w.worker_id for w in workers.live])
            workload = Workload(client, history, threads)
            async with running(workload):
                for _ in range(2):  # two rounds: every worker restarted twice
                    for old in list(workers.live):
                        await workload.wait_for(rng.randint(5, 30))
                        await workers.stop(old)
                        await workers.start(1)
                        took, _ = await wait_until_balanced(
                            leases, [w.worker_id for w in workers.live]
                        )
                        pauses.append(took)
                await workload.wait_for(10)
            histories = await workload.histories()
    figures = judge(history, histories, "F2")
    # A graceful stop finishes the step in flight: no model or tool call ran twice.
    lines = calls.read_text().splitlines()
    twice = {line: n for line, n in Counter(lines).items() if n > 1}
    print(
        f"F2: {len(pauses)} graceful restarts; rebalanced after "
        f"{[round(p, 2) for p in pauses]} s; {len(lines)} model/tool calls; "
        f"client errors {dict(workload.errors)}; {figures}"
    )
    assert not twice, f"calls redone after a graceful stop: {twice}"


# -- F3: scale out and back in under load ------------------------------------------------


async def test_f3_scaling_1_2_4_1_balances_and_loses_nothing(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    # P = 32: with the placement's 20% tolerance every worker count here lands
    # within the test's 30%.
    url, prefix, P = redis_server.url, redis_prefix, 32
    threads = [f"f3-{k}" for k in range(10)]
    steps = []
    with (
        workers_of(url, prefix, P, tmp_path) as workers,
        History(tmp_path / "history.jsonl") as history,
        anyio.fail_after(150),
    ):
        await workers.start(1)
        async with (
            lease_table(url, prefix, P) as leases,
            Client(url, prefix=prefix) as client,
        ):
            await wait_until_balanced(leases, [w.worker_id for w in workers.live])
            workload = Workload(client, history, threads)
            async with running(workload):
                for target in (2, 4, 1):
                    await workload.wait_for(20)
                    if target > len(workers.live):
                        await workers.start(target - len(workers.live))
                    else:
                        async with anyio.create_task_group() as tg:
                            for old in workers.live[target:]:
                                tg.start_soon(workers.stop, old)
                    live = [w.worker_id for w in workers.live]
                    took, owners = await wait_until_balanced(leases, live)
                    steps.append(
                        (target, round(took, 2), sorted(Counter(owners.values()).values()))
                    )
                await workload.wait_for(20)
            histories = await workload.histories()
    figures = judge(history, histories, "F3")
    errors = dict(workload.errors)
    # A moved partition's acknowledgements go out before its lease is released:
    # the next owner redelivers nothing (a duplicate here is only a client's retry).
    duplicates = sum(
        w.errors.read_text(errors="replace").count("message.duplicate") for w in workers.started
    )
    print(
        f"F3: (workers, seconds to balance, loads) {steps}; errors {errors}; "
        f"redelivered duplicates {duplicates}; {figures}"
    )
    if not errors:
        found = [
            line
            for w in workers.started
            for line in w.errors.read_text(errors="replace").splitlines()
            if "message.duplicate" in line
        ]
        assert duplicates == 0, found[:5]


# -- F4: a worker SIGSTOPped past its lease, then SIGCONT --------------------------------


async def test_f4_a_stopped_worker_commits_nothing_after_its_lease_and_its_turn_is_finished(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """The worker is stopped inside a tool call; its lease expires and another
    holder takes the partition without touching the thread (the thread's own
    fencing epoch is unchanged, so only the lease can refuse the stale write).
    Woken, the worker finishes the tool and tries to commit: refused. Once the
    partition is free again the turn is resumed from its last committed step
    (the tool runs again, nothing before it does), and the history checker
    finds nothing lost, duplicated, reordered or forked."""
    url, prefix, P = redis_server.url, redis_prefix, 4
    thread = "f4"
    partition = partition_of(thread, P)
    call_log = tmp_path / "calls.log"
    gate = tmp_path / "calls.log.gate"
    with (
        workers_of(url, prefix, P, tmp_path, call_log) as workers,
        anyio.fail_after(120),
        History(tmp_path / "history.jsonl") as history,
    ):
        (worker,) = await workers.start(1)
        async with Client(url, prefix=prefix) as client, lease_table(url, prefix, P) as leases:
            workload = Workload(client, history, [thread])
            await workload.send(thread, 0, ask=True, text="say 0")
            asking = anyio.Event()

            async def ask_hold() -> None:
                await workload.send(thread, 1, ask=True, text="hold 1")
                asking.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask_hold)

                def calls() -> list[str]:
                    return call_log.read_text().split("\n") if call_log.exists() else []

                while not any(line.startswith("hold-start") for line in calls()):
                    await anyio.sleep(0.01)
                worker.proc.send_signal(signal.SIGSTOP)
                try:
                    while await leases.holder(partition) is not None:
                        await anyio.sleep(0.05)
                    intruder = await leases.acquire(partition, "intruder")
                    assert intruder is not None
                    before = await client.history(thread)
                    gate.touch()
                finally:
                    worker.proc.send_signal(signal.SIGCONT)
                # Woken: the tool ends, the commit of its step is refused.
                while "lease of partition" not in worker.errors.read_text(errors="replace"):
                    assert await client.history(thread) == before  # nothing committed
                    await anyio.sleep(0.05)
                assert [line for line in calls() if line.startswith("hold-end")]
                assert await client.history(thread) == before
                parked = before[-1].turn
                assert parked is not None and parked.next == "tools"  # parked before the tool step
                assert await leases.release(intruder)
                await asking.wait()
            await workload.send(thread, 2, ask=True, text="final")
            histories = await workload.histories()
    figures = judge(history, histories, "F4")
    holds = [line.split()[1] for line in calls() if line.startswith("hold-start")]
    assert len(holds) == 2 and holds[0] == holds[1]  # the one tool call, run again once
    tool_steps = [s for s in histories[thread] if s.kind == "tools"]
    assert len(tool_steps) == 1
    print(f"F4: {figures}")


# -- the whole deployment on a Redis Cluster -------------------------------------------


async def test_workers_and_a_client_on_a_redis_cluster_lose_nothing_when_a_worker_dies(
    redis_cluster: RedisClusterProcesses, redis_prefix: str, tmp_path: Path
) -> None:
    """Two worker processes and a client on the 3-node Cluster
    (``redis+cluster://``): every script of the inbox, the leases and the
    snapshot store runs there; one worker is SIGKILLed under load and the
    other takes its partitions over."""
    host, port = redis_cluster.startup
    url, prefix, P = f"redis+cluster://{host}:{port}", redis_prefix, 8
    threads = [f"c-{k}" for k in range(6)]
    with (
        workers_of(url, prefix, P, tmp_path) as workers,
        History(tmp_path / "history.jsonl") as history,
        anyio.fail_after(120),
    ):
        await workers.start(2)
        async with Client(url, prefix=prefix) as client:
            workload = Workload(client, history, threads)
            async with running(workload):
                await workload.wait_for(30)
                workers.kill(workers.live[0])
                await workload.wait_for(30)
            histories = await workload.histories()
    figures = judge(history, histories, "cluster")
    print(f"cluster: errors {dict(workload.errors)}; {figures}")


# -- F6: a client dies right after tell returns ---------------------------------------------


def start_client(
    url: str, prefix: str, path: Path, thread: str, n: int, errors: Path
) -> subprocess.Popen[bytes]:
    """A ``tests._scaleout_client`` process (see there)."""
    with errors.open("wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._scaleout_client",
                url,
                prefix,
                str(path),
                thread,
                str(n),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )


@pytest.mark.parametrize("kill_after", ["told", "asking"])
async def test_f6_a_killed_clients_retried_ids_are_processed_once(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path, kill_after: str
) -> None:
    url, prefix, P = redis_server.url, redis_prefix, 8
    rng = random.Random(6)
    thread, n = f"f6-{kill_after}", 12
    path = tmp_path / "history.jsonl"
    with workers_of(url, prefix, P, tmp_path) as workers, anyio.fail_after(90):
        await workers.start(1)
        # The doomed client: SIGKILLed right after its k-th line of the kind.
        k = rng.randint(2, 4)
        child = start_client(url, prefix, path, thread, n, tmp_path / "client.err")
        assert child.stdout is not None
        lines = Lines(child.stdout.fileno())
        said: list[str] = []
        try:
            while sum(line.startswith(kill_after) for line in said) < k:
                line = await anyio.to_thread.run_sync(lines.next, 60.0)
                assert line is not None and line != "done", (said, line)
                said.append(line)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        last = said[-1].split()[1]
        async with Client(url, prefix=prefix) as client, open_redis(url, "test") as redis:
            layout = KeyLayout(prefix=prefix, partitions=P)
            idem = layout.for_thread(thread).idem(last)
            first_entry = await redis.get(idem)
            if kill_after == "told":
                assert first_entry is not None, f"{last} was told but is not in the inbox"
            # A new client (the same sender, continuing its history) retries every id.
            with History(path) as history:
                workload = Workload(client, history, [thread])
                for i in range(n):
                    await workload.send(thread, i)
                await workload.send(thread, n, ask=True, text="final")
                if kill_after == "told":
                    assert await redis.get(idem) == first_entry  # the retried tell appended nothing
                histories = await workload.histories()
            ops = History.load(path)
    report = check(ops, histories)
    print(f"\nF6 ({kill_after} #{k}, killed after {said[-1]!r}): {report.summary()}")
    report.assert_ok("F6")
    inputs = [s.consumed for s in histories[thread] if s.kind == "input"]
    assert inputs == [f"{thread}-m{i}" for i in range(n + 1)]


# -- F7: redis-server SIGKILLed and restarted from its AOF ---------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_f7_redis_sigkill_and_aof_restart_loses_nothing_acknowledged(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    url, prefix, P = private_redis.url, "f7", 8
    rng = random.Random(7)
    threads = [f"f7-{k}" for k in range(8)]
    outages = []
    with (
        workers_of(url, prefix, P, tmp_path) as workers,
        History(tmp_path / "history.jsonl") as history,
        anyio.fail_after(150),
    ):
        await workers.start(2)
        async with (
            lease_table(url, prefix, P) as leases,
            Client(url, prefix=prefix) as client,
        ):
            await wait_until_balanced(leases, [w.worker_id for w in workers.live])
            workload = Workload(client, history, threads)
            async with running(workload):
                for _ in range(2):
                    await workload.wait_for(rng.randint(10, 40))
                    private_redis.kill()
                    down = rng.uniform(0.2, 1.0)
                    await anyio.sleep(down)  # the outage itself is the fault
                    await anyio.to_thread.run_sync(private_redis.start)
                    outages.append(round(down, 2))
                    await workload.wait_for(10)
                await workload.wait_for(10)
            histories = await workload.histories()
    figures = judge(history, histories, "F7")
    print(
        f"F7: redis SIGKILLed {len(outages)} times, down {outages} s; client errors "
        f"{dict(workload.errors)}; {figures}"
    )
    assert workload.errors, "the clients never saw the outage"
