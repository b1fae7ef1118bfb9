"""Child processes of the fault tests (run as ``python -m tests._fault_worker MODE ...``
from the repository root).

    drive    STORE HISTORY THREADS N [--delay S]
        Sends messages 0..N-1 to each thread (one sender per thread), skipping
        those HISTORY already shows replied, retrying the same id on a
        PersistenceError; appends every operation to HISTORY. Prints
        ``ready K`` (K = turns found parked) once running, ``done`` at the end.
    lock     DB
        Holds ``BEGIN EXCLUSIVE`` on the SQLite file; prints ``locked``; lets
        go when stdin closes.
    diskfull DB LIMIT THREADS N
        With RLIMIT_FSIZE = LIMIT bytes (SIGXFSZ ignored), sends N messages to
        each thread over SQLite, each tried once; every operation is printed
        to stdout as a JSON line (the limit applies to files, not pipes).
    verify   STORE THREADS
        Prints ``histories <json>`` (every thread's committed steps), asks
        each thread one more message (``<thread>-verify``, its operations
        printed as ``op <json>`` lines), then prints the histories again.

STORE is a SQLite path or ``redis://host:port/0#prefix``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sqlite3
import sys
from typing import Any

import anyio
import msgspec
import structlog

from threadline import PersistenceError, ThreadlineError, ThreadNotFoundError
from threadline.runtime import ActorSystem

from ._faults import make_agent, message_id, message_text, open_store
from ._history import (
    History,
    Op,
    ask_until_replied,
    encode_histories,
    read_histories,
    recorded_ask,
)


class StdoutHistory(History):
    """Records as JSON lines on stdout (for a process that cannot write files)."""

    def add(self, op: Op) -> Op:
        self.ops.append(op)
        sys.stdout.write(f"op {_json(op)}\n")
        sys.stdout.flush()
        return op


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def drive(args: argparse.Namespace) -> None:
    threads = args.threads.split(",")
    replied = {(op.thread, op.id) for op in History.load(args.history) if op.op == "reply"}
    with History(args.history) as history:
        async with ActorSystem(make_agent(args.delay), snapshots=open_store(args.store)) as system:
            parked = 0
            for thread in threads:
                with contextlib.suppress(ThreadNotFoundError):
                    parked += (await system.get_state(thread)).next is not None
            print(f"ready {parked}", flush=True)

            async def sender(thread: str) -> None:
                for i in range(args.messages):
                    mid = message_id(thread, i)
                    if (thread, mid) in replied:
                        continue
                    await ask_until_replied(
                        history,
                        system,
                        f"client-{thread}",
                        thread,
                        message_text(i),
                        mid,
                        attempts=50,
                        backoff=0.02,
                    )

            async with anyio.create_task_group() as tg:
                for thread in threads:
                    tg.start_soon(sender, thread)
    print("done", flush=True)


def lock(args: argparse.Namespace) -> None:
    db = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    db.execute("ROLLBACK")
    db.close()
    print("released", flush=True)


async def diskfull(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (args.limit, hard))
    # Past the limit a write fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    history = StdoutHistory()
    threads = args.threads.split(",")
    async with ActorSystem(make_agent(), snapshots=open_store(args.db)) as system:
        for i in range(args.messages):
            for thread in threads:
                # A typed error is recorded (and expected, past the limit).
                with contextlib.suppress(ThreadlineError):
                    await recorded_ask(
                        history,
                        system,
                        f"client-{thread}",
                        thread,
                        message_text(i),
                        message_id(thread, i),
                    )
    print("done", flush=True)


async def verify(args: argparse.Namespace) -> None:
    threads = args.threads.split(",")
    history = StdoutHistory()
    async with ActorSystem(make_agent(), snapshots=open_store(args.store)) as system:
        print("histories " + encode_histories(await read_histories(system, threads)).decode())
        for thread in threads:
            await ask_until_replied(
                history, system, f"verify-{thread}", thread, "say after", f"{thread}-verify"
            )
        print("histories " + encode_histories(await read_histories(system, threads)).decode())
    print("done", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests._fault_worker")
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("drive")
    p.add_argument("store")
    p.add_argument("history")
    p.add_argument("threads")
    p.add_argument("messages", type=int)
    p.add_argument("--delay", type=float, default=0.005)
    p = modes.add_parser("lock")
    p.add_argument("db")
    p = modes.add_parser("diskfull")
    p.add_argument("db")
    p.add_argument("limit", type=int)
    p.add_argument("threads")
    p.add_argument("messages", type=int)
    p = modes.add_parser("verify")
    p.add_argument("store")
    p.add_argument("threads")
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if args.mode == "lock":
        lock(args)
    elif args.mode == "drive":
        anyio.run(drive, args)
    elif args.mode == "diskfull":
        anyio.run(diskfull, args)
    else:
        anyio.run(verify, args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except PersistenceError as exc:
        print(f"worker failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)
