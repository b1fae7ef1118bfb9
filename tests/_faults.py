"""Fault-injection machinery shared by the fault tests and ``python -m benchmarks soak``.

* :func:`make_agent`: a deterministic agent whose turns take several steps
  (input, model, tools, model) and whose model and tools await a little, so a
  kill lands inside turns, not only between them.
* :class:`FaultyStore`: a ``SnapshotStore`` around a REAL store whose chosen
  calls fail, before delegating (nothing written) or after (written, the
  reply lost).
* :func:`kill_loop`: a child process drives a workload over a store; the
  parent SIGKILLs it at seeded random instants and restarts it, then runs the
  history checker.
* :func:`nth_call_sweep`: the same small workload once per call position, that
  call failing, in each mode; then the checker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import anyio

from threadline import (
    AIMessage,
    HumanMessage,
    StoreUnavailableError,
    ThreadNotFoundError,
    ToolCall,
    ToolMessage,
)
from threadline.persistence import (
    CommitRequest,
    RedisSnapshotStore,
    SnapshotStore,
    SqliteSnapshotStore,
    StoredThread,
    StoredVersion,
)
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel

from ._history import History, Report, ask_until_replied, check, read_histories

ROOT = Path(__file__).resolve().parent.parent

# -- the workload ----------------------------------------------------------------


def message_text(i: int) -> str:
    """Every third message asks for tools (a four-step turn), the rest two steps."""
    return f"tool {i}" if i % 3 == 1 else f"say {i}"


def message_id(thread: str, i: int) -> str:
    return f"{thread}-m{i}"


def make_agent(delay: float = 0.0) -> Agent[Any]:
    """Answers from the conversation (so a resumed turn answers the same way).

    ``delay`` is awaited by every model call and every tool call.
    """

    async def respond(request: ModelRequest[Any]) -> AIMessage | str:
        if delay:
            await anyio.sleep(delay)
        last = request.messages[-1]
        if isinstance(last, HumanMessage) and last.content.startswith("tool"):
            calls = [
                ToolCall(id=f"call-{last.id}-{k}", name="work", args={"k": k}) for k in range(2)
            ]
            return AIMessage("", tool_calls=calls)
        if isinstance(last, ToolMessage):
            return f"tools said {last.content}"
        return f"reply to {last.content}"

    async def work(k: int) -> str:
        """Does some work."""
        if delay:
            await anyio.sleep(delay)
        return f"worked {k}"

    return Agent(model=ScriptedModel(respond), tools=[work])


def open_store(spec: str, **options: Any) -> SnapshotStore:
    """A store from a spec: a SQLite path, or ``redis://host:port/0#prefix``."""
    if spec.startswith("redis://"):
        url, _, prefix = spec.partition("#")
        return RedisSnapshotStore.from_url(url, prefix=prefix or "threadline", **options)
    return SqliteSnapshotStore(spec, **options)


# -- a store that fails chosen calls --------------------------------------------

FaultMode = Literal["before", "after"]
FAULT_MODES: tuple[FaultMode, ...] = ("before", "after")
FAULTED_METHODS = ("acquire", "load", "commit")


class FaultyStore:
    """A ``SnapshotStore`` around a real one whose chosen calls fail.

    Calls to ``methods`` are numbered from 1 across all of them; call n fails
    with ``StoreUnavailableError`` when n is in ``fail_on`` (or when ``rng``
    draws below ``probability``). ``mode="before"`` raises without touching
    the real store (nothing written); ``"after"`` lets the real store do the
    call, then raises (the write is durable, its reply is lost) -- the two
    outcomes a real ``StoreUnavailableError`` leaves open.
    """

    def __init__(
        self,
        inner: SnapshotStore,
        *,
        mode: FaultMode,
        fail_on: Collection[int] = (),
        probability: float = 0.0,
        rng: random.Random | None = None,
        methods: Collection[str] = FAULTED_METHODS,
    ) -> None:
        self.inner = inner
        self.mode = mode
        self.fail_on = fail_on
        self.probability = probability
        self.rng = rng or random.Random(0)
        self.methods = frozenset(methods)
        self.calls = 0
        self.faults: Counter[str] = Counter()  # "commit/after" -> how many

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    def _fails(self, method: str) -> bool:
        if method not in self.methods:
            return False
        self.calls += 1
        if self.calls in self.fail_on:
            return True
        return self.probability > 0 and self.rng.random() < self.probability

    def _fault(self, method: str) -> StoreUnavailableError:
        self.faults[f"{method}/{self.mode}"] += 1
        return StoreUnavailableError(
            f"injected fault: call {self.calls} ({method}) failed {self.mode} the real store"
        )

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fails = self._fails(method)
        if fails and self.mode == "before":
            raise self._fault(method)
        result = await getattr(self.inner, method)(*args, **kwargs)
        if fails:
            raise self._fault(method)
        return result

    async def acquire(self, thread_id: str) -> int:
        epoch: int = await self._call("acquire", thread_id)
        return epoch

    async def load(self, thread_id: str) -> StoredThread | None:
        stored: StoredThread | None = await self._call("load", thread_id)
        return stored

    async def commit(self, request: CommitRequest) -> None:
        await self._call("commit", request)

    async def load_at(self, thread_id: str, version: int) -> StoredVersion | None:
        stored: StoredVersion | None = await self._call("load_at", thread_id, version)
        return stored

    async def read_steps_before(
        self, thread_id: str, before: int | None, limit: int
    ) -> list[bytes]:
        steps: list[bytes] = await self._call("read_steps_before", thread_id, before, limit)
        return steps

    async def read_steps(
        self, thread_id: str, start: int = 1, stop: int | None = None
    ) -> list[bytes]:
        steps: list[bytes] = await self._call("read_steps", thread_id, start, stop)
        return steps

    async def threads(self) -> list[str]:
        ids: list[str] = await self._call("threads")
        return ids

    async def delete(self, thread_id: str, *, epoch: int | None = None) -> bool:
        existed: bool = await self._call("delete", thread_id, epoch=epoch)
        return existed

    # The durable inbox: told messages fail like every other call.

    async def enqueue(self, thread_id: str, message_id: str, envelope: bytes) -> None:
        await self._call("enqueue", thread_id, message_id, envelope)

    async def pending(self, thread_id: str) -> list[Any]:
        entries: list[Any] = await self._call("pending", thread_id)
        return entries

    async def dequeue(self, thread_id: str, message_id: str) -> bool:
        removed: bool = await self._call("dequeue", thread_id, message_id)
        return removed

    async def dead_letter(self, thread_id: str, message_id: str, reason: str) -> bool:
        moved: bool = await self._call("dead_letter", thread_id, message_id, reason)
        return moved

    async def dead_letters(self, thread_id: str) -> list[Any]:
        letters: list[Any] = await self._call("dead_letters", thread_id)
        return letters

    async def recoverable_threads(self) -> list[Any]:
        threads: list[Any] = await self._call("recoverable_threads")
        return threads


# -- the Nth-call sweep -----------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
    runs: int = 0
    calls: int = 0  # store calls of one fault-free run
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    retries: int = 0
    report: Report | None = None

    @property
    def injected(self) -> int:
        return sum(self.faults.values())


async def faulted_run(
    store: SnapshotStore,
    history: History,
    tag: str,
    *,
    mode: FaultMode,
    fail_on: Collection[int] = (),
    probability: float = 0.0,
    rng: random.Random | None = None,
    threads: int = 2,
    messages: int = 3,
) -> tuple[FaultyStore, list[str], int]:
    """A small workload over ``FaultyStore(store)``: every message asked until
    it is replied (the same id each time). Returns the faulty store, the
    threads used and the retries made. Deterministic call order: the threads'
    messages are sent in turn, one at a time."""
    faulty = FaultyStore(store, mode=mode, fail_on=fail_on, probability=probability, rng=rng)
    ids = [f"{tag}-t{j}" for j in range(threads)]
    retries = 0
    async with ActorSystem(make_agent(), snapshots=faulty) as system:
        for i in range(messages):
            for thread in ids:
                mid = message_id(thread, i)
                _, errors = await ask_until_replied(
                    history, system, f"client-{thread}", thread, message_text(i), mid
                )
                retries += len(errors)
    return faulty, ids, retries


async def nth_call_sweep(
    store: SnapshotStore,
    tag: str,
    *,
    modes: Sequence[FaultMode] = FAULT_MODES,
    positions: Sequence[int] | None = None,
    threads: int = 2,
    messages: int = 3,
) -> SweepResult:
    """For each mode and each call position n (default: every call of a
    fault-free run, and one past it), the workload with call n failing; then
    the checker over every thread of every run. ``store`` must be entered."""
    result = SweepResult()
    history = History()
    all_threads: list[str] = []
    clean, ids, _ = await faulted_run(
        store, history, f"{tag}-clean", mode="before", threads=threads, messages=messages
    )
    all_threads += ids
    result.calls = clean.calls
    result.runs += 1
    for mode in modes:
        for n in positions if positions is not None else range(1, clean.calls + 2):
            faulty, ids, retries = await faulted_run(
                store,
                history,
                f"{tag}-{mode}-{n}",
                mode=mode,
                fail_on={n},
                threads=threads,
                messages=messages,
            )
            all_threads += ids
            result.faults.update(faulty.faults)
            result.retries += retries
            result.runs += 1
    async with ActorSystem(make_agent(), snapshots=store) as reader:
        histories = await read_histories(reader, all_threads)
    result.report = check(history.ops, histories)
    return result


# -- the SIGKILL loop ------------------------------------------------------------


@dataclasses.dataclass
class KillLoopResult:
    seed: int
    kills: int = 0
    rounds: int = 0
    resumed_rounds: int = 0  # rounds that found turns parked by the previous kill
    parked_turns: int = 0
    delays: list[float] = dataclasses.field(default_factory=list)
    report: Report | None = None
    unfinished: list[str] = dataclasses.field(default_factory=list)  # threads still parked


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests._fault_worker", *args]


class Lines:
    """Lines read from a file descriptor, each within a timeout (None if none came)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.closed = False

    def next(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 4096)
                self.closed = not chunk
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode().strip()


class Child:
    """A worker process running ``drive``: ``ready()``, then ``kill()`` or ``finish()``."""

    pid: int
    said: list[str]

    def ready(self, timeout: float) -> str | None:
        """The child's ``ready K`` line (None if it died or took too long)."""
        raise NotImplementedError

    def wait(self, timeout: float) -> int | None:
        """Its exit code once it exits within ``timeout``, else None."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        raise NotImplementedError


class ExecChild(Child):
    """A fresh interpreter per round (``subprocess`` with ``sys.executable``)."""

    def __init__(self, args: Sequence[str], stderr: Path) -> None:
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                worker_command(*args),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        self.pid = self.proc.pid
        self.lines = Lines(self.proc.stdout.fileno())
        self.said = []

    def ready(self, timeout: float) -> str | None:
        line = self.lines.next(timeout)
        if line is not None:
            self.said.append(line)
        return line

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        while (line := self.lines.next(1.0)) is not None:
            self.said.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class ForkServer:
    """One interpreter that has imported everything and forks a child per round.

    The rounds of a kill loop then start in milliseconds instead of the
    interpreter's second of imports: several times the kills per minute.
    Each child is a new process (its own store connections, its own event
    loop); the server holds no store and runs no loop, so forking it is safe.
    The server writes ``pid P`` and ``exit P CODE`` lines, the children their
    own lines, on the one stdout pipe (every line is one small write).
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            worker_command("forkserver"),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout.fileno())

    def start(self, args: Sequence[str], stderr: Path, timeout: float) -> ForkedChild:
        assert self.proc.stdin is not None
        request = json.dumps({"args": list(args), "stderr": str(stderr)})
        self.proc.stdin.write(request.encode() + b"\n")
        self.proc.stdin.flush()
        child = ForkedChild(self)
        line = child.next(timeout)
        if line is None or not line.startswith("pid "):
            raise AssertionError(f"the fork server did not fork (said {line!r})")
        child.pid = int(line.split()[1])
        return child

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ForkedChild(Child):
    def __init__(self, server: ForkServer) -> None:
        self.server = server
        self.pid = 0
        self.code: int | None = None
        self.said = []

    def next(self, timeout: float) -> str | None:
        line = self.server.lines.next(timeout)
        if line is None:
            return None
        if line.startswith("exit "):
            _, pid, code = line.split()
            assert int(pid) == self.pid, line
            self.code = int(code)
        elif not line.startswith("pid "):
            self.said.append(line)
        return line

    def ready(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while self.code is None:
            line = self.next(max(deadline - time.monotonic(), 0.0))
            if line is None:
                return None
            if line.startswith("ready"):
                return line
        return None

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.code is None:
            if self.next(max(deadline - time.monotonic(), 0.0)) is None:
                return None
        return self.code

    def kill(self) -> None:
        if self.code is None:
            # Still ours: the server reaps it and says so only after it died.
            os.kill(self.pid, signal.SIGKILL)
            if self.wait(60) is None:
                raise AssertionError(f"child {self.pid} did not die")

    def close(self) -> None:
        if self.code is None:
            self.kill()


def kill_loop(
    spec: str,
    workdir: Path,
    *,
    seed: int,
    kills: int,
    threads: Sequence[str],
    messages: int | None = None,
    max_delay: float = 0.4,
    delay: float = 0.005,
    fork: bool = True,
    timeout: float = 60.0,
) -> KillLoopResult:
    """Run the workload in a child; SIGKILL it ``kills`` times, each at a delay
    drawn from ``random.Random(seed)`` after it reported ready; then let a last
    child finish what was sent (it sends nothing new); then check the histories.

    Each child resumes the parked turns (on activation) and re-sends every
    message not yet replied, with the same id; until the last round it keeps
    sending new ones (up to ``messages`` per thread, if given), so every kill
    lands in work whatever the machine's speed. The kill instants are
    reproducible relative to each child's start; where in the workload they
    land depends on timing as well. ``fork``: children are forked from a
    :class:`ForkServer` (fast); otherwise each is a fresh interpreter.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    history_path = workdir / "history.jsonl"
    stop_file = workdir / "stop"
    stop_file.unlink(missing_ok=True)
    rng = random.Random(seed)
    result = KillLoopResult(seed=seed)
    args = [
        "drive",
        spec,
        str(history_path),
        ",".join(threads),
        "--stop-file",
        str(stop_file),
        "--delay",
        str(delay),
    ]
    if messages is not None:
        args += ["--messages", str(messages)]
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ForkServer()) if fork else None
        while True:
            if result.kills >= kills:
                stop_file.touch()
            errors = workdir / f"round-{result.rounds}.err"
            child: ExecChild | ForkedChild = (
                server.start(args, errors, timeout) if server else ExecChild(args, errors)
            )
            try:
                ready = child.ready(timeout)
                if ready is None:
                    child.kill()
                    raise AssertionError(
                        f"round {result.rounds}: the worker never got ready "
                        f"(said {child.said}):\n" + errors.read_text(errors="replace")
                    )
                parked = int(ready.split()[1])
                if result.rounds and parked:
                    result.resumed_rounds += 1
                    result.parked_turns += parked
                result.rounds += 1
                if result.kills < kills:
                    wait = rng.uniform(0.0, max_delay)
                    if child.wait(wait) is None:
                        child.kill()
                        result.kills += 1
                        result.delays.append(wait)
                        continue
                code = child.wait(timeout * 4)
                if code != 0 or child.said[-1:] != ["done"]:
                    raise AssertionError(
                        f"round {result.rounds}: the worker failed (exit {code}, "
                        f"said {child.said}):\n" + errors.read_text(errors="replace")
                    )
                break
            finally:
                child.close()

    async def histories() -> tuple[dict[str, Any], list[str]]:
        async with ActorSystem(make_agent(), snapshots=open_store(spec)) as reader:
            found = await read_histories(reader, threads)
            parked = []
            for thread in threads:
                with contextlib.suppress(ThreadNotFoundError):
                    if (await reader.get_state(thread)).next is not None:
                        parked.append(thread)
        return found, parked

    found, result.unfinished = anyio.run(histories)
    result.report = check(History.load(history_path), found)
    return result
