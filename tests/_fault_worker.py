"""Child processes of the fault tests (run as ``python -m tests._fault_worker MODE ...``
from the repository root).

    drive    STORE HISTORY THREADS [--messages N] [--stop-file PATH] [--delay S]
        Sends messages 0, 1, 2, ... (up to N-1) to each thread, one sender per
        thread, skipping those HISTORY shows replied and retrying the same id
        on a PersistenceError; appends every operation to HISTORY. Once
        PATH exists it sends no new message, only the ones sent before and
        never replied. Prints ``ready K`` (K = turns found parked) once
        running, ``done`` at the end.
    forkserver
        Reads requests ``{"args": [...], "stderr": PATH}`` as JSON lines on
        stdin; for each forks a child that runs those arguments (its stderr
        to PATH), prints ``pid P``, waits for it and prints ``exit P CODE``.
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
import itertools
import json
import logging
import os
import resource
import signal
import sqlite3
import sys
import traceback
from pathlib import Path
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
    before = History.load(args.history)
    replied = {(op.thread, op.id) for op in before if op.op == "reply"}
    sent = {(op.thread, op.id) for op in before if op.op == "send"}
    stop = Path(args.stop_file) if args.stop_file else None
    with History(args.history) as history:
        async with ActorSystem(make_agent(args.delay), snapshots=open_store(args.store)) as system:
            parked = 0
            for thread in threads:
                with contextlib.suppress(ThreadNotFoundError):
                    parked += (await system.get_state(thread)).next is not None
            print(f"ready {parked}", flush=True)

            async def sender(thread: str) -> None:
                for i in itertools.count():
                    mid = message_id(thread, i)
                    if args.messages is not None and i >= args.messages:
                        break
                    if (thread, mid) in replied:
                        continue
                    if stop is not None and stop.exists() and (thread, mid) not in sent:
                        break
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


def forkserver() -> None:
    """Fork a child per request: everything is imported once, here.

    This process never opens a store nor runs an event loop, so a fork of it
    starts clean: the child makes its own loop and its own connections.
    """
    for request in sys.stdin.buffer:
        spec = json.loads(request)
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                err = os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(err, 2)
                main(spec["args"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests._fault_worker")
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("drive")
    p.add_argument("store")
    p.add_argument("history")
    p.add_argument("threads")
    p.add_argument("--messages", type=int)
    p.add_argument("--stop-file")
    p.add_argument("--delay", type=float, default=0.005)
    modes.add_parser("forkserver")
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
    if args.mode == "forkserver":
        forkserver()
    elif args.mode == "lock":
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
