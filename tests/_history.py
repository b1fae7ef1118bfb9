"""A history checker: what the clients were told against what the threads committed.

Fault tests record every client operation in a :class:`History` (in memory,
and for multi-process tests appended as JSON lines to a file each process
writes with one ``write`` per record), then read back each thread's committed
steps (``ActorSystem.history``) and hand both to :func:`check`. The verdicts:

``lost``
    an acknowledged message (an ``ask`` that replied; a ``tell`` that returned,
    when tells count as acknowledgements) whose id is no ``input`` step of its
    thread.
``duplicated``
    two ``input`` steps of one thread consuming the same message id.
``reordered``
    a sender's message X was acknowledged before it first sent Y to the same
    thread, yet Y's input step comes before X's.
``forked``
    the same version twice (or going backwards), or a turn cursor that does
    not continue the turn in flight: an input while a turn is unfinished, a
    step of another message's turn, a step other than the cursor's ``next``,
    a step of a turn parked on interrupts before an ``answer`` step (which
    consumes the ``Command(resume=...)`` message) answered them, an answer
    with no interrupt pending.
``skipped``
    versions that are not 1..n contiguous.
``unbacked``
    a reply reporting a version the history does not hold, or whose step is
    not the end of that message's turn (the state it reported is not durable).
``phantom``
    an input step whose message id no client ever sent to that thread.

The checker needs no knowledge of the faults injected: a history that passes
it lost nothing acknowledged, applied nothing twice and never forked, however
it was produced. ``tests/test_history_checker.py`` proves every verdict fires.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec

from threadline import PersistenceError, StepInfo
from threadline.runtime import ActorSystem, TurnResult

OpKind = Literal["send", "ack", "reply", "error"]

VERDICTS = ("lost", "duplicated", "reordered", "forked", "skipped", "unbacked", "phantom")

# Step kinds the actor writes itself; every other kind is a behavior step and
# must be the one its turn's cursor named as ``next``.
BOOKKEEPING = frozenset({"input", "update", "abort", "resumed", "answer"})
# Steps that consume a message id: an input starts a turn, an answer (to the
# turn's pending interrupts) continues one.
CONSUMING = frozenset({"input", "answer"})


class Op(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One client operation on one message.

    ``send``: about to call ``ask``/``tell`` (written before the call, so a
    message that reaches the store always has one). ``ack``: ``tell``
    returned. ``reply``: ``ask`` returned (``version`` and ``duplicate`` from
    its ``TurnResult``). ``error``: the call raised (``error`` is the class name).
    ``sender`` names a sequential client: its operations are in real-time
    order in the record list (one sender writes to one file, even across
    processes).
    """

    op: OpKind
    thread: str
    id: str
    sender: str
    how: Literal["ask", "tell"] = "ask"
    version: int | None = None
    duplicate: bool = False
    error: str | None = None
    pid: int = 0
    ts: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Op)


class History:
    """The operations of the clients of one test (or one process of it).

    With ``path``, each record is also appended to that file as one JSON line
    in a single ``write`` on an ``O_APPEND`` descriptor: the file holds every
    record written before a SIGKILL (at worst the last line is torn, and
    :meth:`load` drops a torn last line). No fsync: the checker's own file
    only has to survive the death of the process, not of the machine.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.ops: list[Op] = []
        self.path = None if path is None else Path(path)
        self._fd: int | None = None
        if self.path is not None:
            _drop_torn_tail(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._pid = os.getpid()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, op: Op) -> Op:
        self.ops.append(op)
        if self._fd is not None:
            os.write(self._fd, _encoder.encode(op) + b"\n")
        return op

    def record(self, op: OpKind, sender: str, thread: str, message_id: str, **kw: Any) -> Op:
        return self.add(
            Op(
                op=op,
                thread=thread,
                id=message_id,
                sender=sender,
                pid=self._pid,
                ts=time.time(),
                **kw,
            )
        )

    @staticmethod
    def load(*paths: str | os.PathLike[str]) -> list[Op]:
        """Every record of ``paths``, file after file, each file in write order."""
        ops: list[Op] = []
        for path in paths:
            p = Path(path)
            if not p.exists():
                continue
            ops.extend(parse_lines(p.read_bytes().splitlines()))
        return ops


def _drop_torn_tail(path: Path) -> None:
    """Cut a record torn by a kill off the end of the file before appending to it.

    Sound for the checker: a torn ``send`` means the process died before it
    called ``ask``; a torn ``reply`` only makes the checker expect less.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def parse_lines(lines: Sequence[bytes]) -> list[Op]:
    """Decode JSON-line records; only the last line may be torn (a kill mid-write)."""
    ops: list[Op] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            ops.append(_decoder.decode(line))
        except msgspec.DecodeError:
            if i != len(lines) - 1:
                raise
    return ops


# -- recording clients ----------------------------------------------------------


async def recorded_ask(
    history: History,
    system: ActorSystem[Any],
    sender: str,
    thread: str,
    text: str,
    message_id: str,
    **kw: Any,
) -> TurnResult[Any]:
    """``system.ask`` with its send and its reply (or error) recorded."""
    history.record("send", sender, thread, message_id)
    try:
        result = await system.ask(thread, text, message_id=message_id, **kw)
    except Exception as exc:
        history.record("error", sender, thread, message_id, error=type(exc).__name__)
        raise
    history.record(
        "reply", sender, thread, message_id, version=result.version, duplicate=result.duplicate
    )
    return result


async def ask_until_replied(
    history: History,
    system: ActorSystem[Any],
    sender: str,
    thread: str,
    text: str,
    message_id: str,
    *,
    attempts: int = 10,
    backoff: float = 0.01,
    max_backoff: float = 0.2,
    retry_on: tuple[type[BaseException], ...] = (PersistenceError,),
) -> tuple[TurnResult[Any], list[str]]:
    """Ask, retrying the same message id on ``retry_on`` (waiting ``backoff``,
    doubling up to ``max_backoff``); the result and the errors seen."""
    errors: list[str] = []
    for attempt in range(attempts):
        try:
            return await recorded_ask(history, system, sender, thread, text, message_id), errors
        except retry_on as exc:
            errors.append(type(exc).__name__)
            if attempt == attempts - 1:
                raise
            await anyio.sleep(min(backoff * 2**attempt, max_backoff))
    raise AssertionError("unreachable")


async def recorded_tell(
    history: History, system: ActorSystem[Any], sender: str, thread: str, text: str, message_id: str
) -> str:
    """``system.tell`` with its send and its acceptance (or error) recorded."""
    history.record("send", sender, thread, message_id, how="tell")
    try:
        await system.tell(thread, text, message_id=message_id)
    except Exception as exc:
        history.record("error", sender, thread, message_id, how="tell", error=type(exc).__name__)
        raise
    history.record("ack", sender, thread, message_id, how="tell")
    return message_id


async def read_histories(
    system: ActorSystem[Any], threads: Iterable[str]
) -> dict[str, list[StepInfo]]:
    """Each thread's committed steps, as the checker wants them."""
    return {thread: await system.history(thread) for thread in sorted(set(threads))}


def encode_histories(histories: Mapping[str, Sequence[StepInfo]]) -> bytes:
    """Histories as JSON, for a process that reads them on another's behalf."""
    return msgspec.json.encode(histories)


def decode_histories(data: bytes | str) -> dict[str, list[StepInfo]]:
    return msgspec.json.decode(data, type=dict[str, list[StepInfo]])


# -- the checker ----------------------------------------------------------------


class Violation(msgspec.Struct, frozen=True):
    kind: str
    thread: str
    message_id: str | None
    detail: str

    def __str__(self) -> str:
        what = f" message {self.message_id!r}" if self.message_id is not None else ""
        return f"{self.kind}: thread {self.thread!r}{what}: {self.detail}"


class Report:
    """What :func:`check` found: the violations and the figures of the run."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.threads = 0
        self.steps = 0
        self.inputs = 0
        self.sent = 0
        self.acknowledged = 0
        self.replies = 0
        self.errors = 0

    def add(self, kind: str, thread: str, message_id: str | None, detail: str) -> None:
        assert kind in VERDICTS, kind
        self.violations.append(Violation(kind, thread, message_id, detail))

    @property
    def ok(self) -> bool:
        return not self.violations

    def count(self, kind: str) -> int:
        return sum(v.kind == kind for v in self.violations)

    def counts(self) -> dict[str, int]:
        return {kind: self.count(kind) for kind in VERDICTS}

    def figures(self) -> dict[str, int]:
        return {
            "threads": self.threads,
            "steps": self.steps,
            "inputs": self.inputs,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "errors": self.errors,
            **self.counts(),
        }

    def summary(self, limit: int = 10) -> str:
        head = (
            f"{self.threads} threads, {self.steps} steps, {self.inputs} inputs; "
            f"{self.sent} messages sent, {self.acknowledged} acknowledged, "
            f"{self.errors} errors seen by clients; "
            + ", ".join(f"{kind} {n}" for kind, n in self.counts().items())
        )
        lines = [head]
        for kind in VERDICTS:
            found = [v for v in self.violations if v.kind == kind]
            lines.extend(f"  {v}" for v in found[:limit])
            if len(found) > limit:
                lines.append(f"  ... and {len(found) - limit} more {kind}")
        return "\n".join(lines)

    def assert_ok(self, context: str = "") -> None:
        if not self.ok:
            prefix = f"{context}: " if context else ""
            raise AssertionError(f"{prefix}the history checker failed:\n{self.summary()}")

    def __repr__(self) -> str:
        return f"Report({self.summary(limit=3)})"


def check(
    ops: Iterable[Op],
    histories: Mapping[str, Sequence[StepInfo]],
    *,
    tells_acknowledge: bool = True,
    phantoms: bool = True,
) -> Report:
    """Judge ``histories`` (thread id -> committed steps) against the clients' ``ops``.

    Every thread named in ``ops`` must be in ``histories`` (an absent thread
    is taken as empty). ``tells_acknowledge=False`` when a returned ``tell``
    promises nothing durable (the in-process system's mailbox is memory: a
    killed process or a failed commit loses what it held). ``phantoms=False``
    when some clients of these threads did not record their operations.
    """
    report = Report()
    ops = list(ops)
    threads = sorted(set(histories) | {op.thread for op in ops})
    report.threads = len(threads)
    positions: dict[str, dict[str, int]] = {}
    for thread in threads:
        steps = list(histories.get(thread, ()))
        report.steps += len(steps)
        positions[thread] = _check_steps(report, thread, steps)
        report.inputs += len(positions[thread])
    _check_ops(report, ops, histories, positions, tells_acknowledge, phantoms)
    return report


def _check_steps(report: Report, thread: str, steps: Sequence[StepInfo]) -> dict[str, int]:
    """The version chain and the turn cursors; returns message id -> input version."""
    inputs: dict[str, int] = {}
    expected = 1
    turn: Any = None  # the cursor in flight after the previous step
    for step in steps:
        v = step.version
        if v < expected:
            report.add(
                "forked",
                thread,
                None,
                f"version {v} appears again after version {expected - 1} "
                f"(a second {step.kind!r} step at an existing version)",
            )
        elif v > expected:
            report.add(
                "skipped",
                thread,
                None,
                f"versions {expected}..{v - 1} are missing (next step found is version {v})",
            )
        expected = max(expected, v + 1)
        _check_cursor(report, thread, step, turn)
        turn = step.turn
        if step.kind in CONSUMING:
            message_id = step.consumed
            if message_id is None:
                report.add("forked", thread, None, f"{step.kind} step {v} consumed no message id")
                continue
            if message_id in inputs:
                report.add(
                    "duplicated",
                    thread,
                    message_id,
                    f"applied twice: steps at versions {inputs[message_id]} and {v}",
                )
            else:
                inputs[message_id] = v
    return inputs


def _check_cursor(report: Report, thread: str, step: StepInfo, turn: Any) -> None:
    v, kind, new = step.version, step.kind, step.turn
    in_flight = (
        "no turn in flight"
        if turn is None
        else f"the turn of message {turn.message_id!r} is in flight (next {turn.next!r})"
    )
    if kind == "input":
        if turn is not None:
            report.add(
                "forked",
                thread,
                step.consumed,
                f"input step {v} starts a turn while {in_flight}",
            )
        if new is None or new.message_id != step.consumed:
            report.add(
                "forked",
                thread,
                step.consumed,
                f"input step {v}'s cursor does not belong to its message ({new!r})",
            )
        return
    if kind == "update":
        same = (new is None and turn is None) or (
            new is not None and turn is not None and new.message_id == turn.message_id
        )
        if not same:
            report.add("forked", thread, None, f"update step {v} changed the turn in flight")
        return
    if turn is None:
        report.add("forked", thread, None, f"{kind!r} step {v} with {in_flight}")
        return
    if kind == "abort":
        if new is not None:
            report.add("forked", thread, turn.message_id, f"abort step {v} left a turn open")
        return
    if kind == "answer":
        if not turn.interrupts:
            report.add("forked", thread, step.consumed, f"answer step {v}: nothing pending")
        elif new is None or (new.message_id, new.next) != (turn.message_id, turn.next):
            report.add("forked", thread, turn.message_id, f"answer step {v} moved the turn")
        elif new.interrupts:
            report.add("forked", thread, turn.message_id, f"answer step {v} left them pending")
        return
    if turn.interrupts:
        report.add(
            "forked",
            thread,
            turn.message_id,
            f"{kind!r} step {v} while the turn waited on interrupts no answer step answered",
        )
        return
    if kind == "resumed":
        if new is None or (new.message_id, new.next) != (turn.message_id, turn.next):
            report.add("forked", thread, turn.message_id, f"resumed step {v} moved the turn")
        return
    if kind not in BOOKKEEPING and kind != turn.next:
        report.add(
            "forked",
            thread,
            turn.message_id,
            f"{kind!r} step {v} where {in_flight}",
        )
    if new is not None:
        if new.message_id != turn.message_id:
            report.add(
                "forked",
                thread,
                new.message_id,
                f"{kind!r} step {v} continues message {new.message_id!r} but {in_flight}",
            )
        elif new.model_calls < turn.model_calls or new.tool_calls < turn.tool_calls:
            report.add(
                "forked",
                thread,
                turn.message_id,
                f"{kind!r} step {v}: the turn's call counters went backwards",
            )


def _turn_end(steps: Sequence[StepInfo], index: int) -> tuple[str | None, bool]:
    """The message whose reply may report ``steps[index]`` (that of the last step
    consuming one) and whether that step ends the reply's part of the turn
    (the turn ended, or parked on interrupts)."""
    turn = steps[index].turn
    ends = turn is None or bool(turn.interrupts)
    for s in reversed(steps[: index + 1]):
        if s.kind in CONSUMING:
            return s.consumed, ends
    return None, ends


def _check_ops(
    report: Report,
    ops: Sequence[Op],
    histories: Mapping[str, Sequence[StepInfo]],
    positions: Mapping[str, Mapping[str, int]],
    tells_acknowledge: bool,
    phantoms: bool,
) -> None:
    sent: dict[str, set[str]] = defaultdict(set)
    acked: dict[str, dict[str, Op]] = defaultdict(dict)
    # Per (sender, thread): the ids acknowledged so far, in order, and for each
    # message the number of them acknowledged before its first send.
    done: dict[tuple[str, str], list[str]] = defaultdict(list)
    barrier: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    index: dict[str, dict[int, int]] = {}  # thread -> version -> position in its history
    for op in ops:
        key = (op.sender, op.thread)
        if op.op == "send":
            sent[op.thread].add(op.id)
            barrier[key].setdefault(op.id, len(done[key]))
        elif op.op == "error":
            report.errors += 1
        elif op.op == "reply" or (op.op == "ack" and tells_acknowledge):
            if op.id not in acked[op.thread]:
                done[key].append(op.id)
            acked[op.thread].setdefault(op.id, op)
            if op.op == "reply":
                report.replies += 1
                steps = histories.get(op.thread, ())
                if op.thread not in index:
                    index[op.thread] = {}
                    for i, step in enumerate(steps):
                        index[op.thread].setdefault(step.version, i)
                _check_reply(report, op, steps, index[op.thread], positions[op.thread])
    report.sent = sum(len(ids) for ids in sent.values())
    report.acknowledged = sum(len(ids) for ids in acked.values())
    for thread, ids in sorted(acked.items()):
        where = positions[thread]
        for message_id, op in ids.items():
            if message_id not in where:
                how = "ask replied" if op.op == "reply" else "tell returned"
                report.add(
                    "lost",
                    thread,
                    message_id,
                    f"acknowledged ({how}, sender {op.sender!r}) but no input step consumed it",
                )
    for (sender, thread), firsts in sorted(barrier.items()):
        where = positions[thread]
        order = done[(sender, thread)]
        # prefix[i] = (latest input version, id) among the first i acknowledged ids
        prefix: list[tuple[int, str | None]] = [(0, None)]
        for message_id in order:
            latest, other = prefix[-1]
            version = where.get(message_id)
            if version is not None and version > latest:
                latest, other = version, message_id
            prefix.append((latest, other))
        for message_id, before in firsts.items():
            mine = where.get(message_id)
            latest, other = prefix[before]
            if mine is not None and other is not None and latest > mine:
                report.add(
                    "reordered",
                    thread,
                    message_id,
                    f"sender {sender!r} sent it after {other!r} was acknowledged, yet it was "
                    f"applied at version {mine}, before {other!r} (version {latest})",
                )
    if phantoms:
        for thread, where in sorted(positions.items()):
            for message_id, version in where.items():
                if message_id not in sent[thread]:
                    report.add(
                        "phantom",
                        thread,
                        message_id,
                        f"input step {version} consumed a message no client sent to this thread",
                    )


def _check_reply(
    report: Report,
    op: Op,
    steps: Sequence[StepInfo],
    at: Mapping[int, int],
    where: Mapping[str, int],
) -> None:
    v = op.version
    if v is None:
        return
    index = at.get(v)
    if index is None:
        report.add(
            "unbacked",
            op.thread,
            op.id,
            f"the reply reported version {v}; the history holds no such step ({len(steps)} steps)",
        )
        return
    applied = where.get(op.id)
    if applied is not None and applied > v:
        report.add(
            "unbacked",
            op.thread,
            op.id,
            f"the reply reported version {v}, before its input step (version {applied})",
        )
        return
    if op.duplicate:
        return
    owner, ends = _turn_end(steps, index)
    if owner != op.id or not ends:
        report.add(
            "unbacked",
            op.thread,
            op.id,
            f"the reply reported version {v}, which "
            + ("does not end a turn" if owner == op.id else f"is in the turn of {owner!r}"),
        )
