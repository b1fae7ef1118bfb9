"""The ``threadline`` command: chat with a thread, inspect it, list threads.

Exit codes: 0 done, 1 a runtime failure (a store or a model failed, no such
thread), 2 a usage error (reported like argparse's own, ``threadline: error:
...``), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn, TextIO

import anyio
import httpx
from anyio.from_thread import BlockingPortal

from threadline.actors import (
    AIMessage,
    AnyMessage,
    InvalidInputError,
    ModelError,
    ThreadlineError,
    ThreadNotFoundError,
    ToolCall,
    ToolMessage,
    TurnFailedError,
)
from threadline.persistence import (
    LAYOUT_FORMAT,
    KeyLayout,
    Membership,
    MigrationReport,
    PartitionLeases,
    RedisInbox,
    migrate_layout,
    open_redis,
)

from .._client import ThreadClient
from .._door import check_thread_id
from .._remote import Client
from .._system import ActorSystem
from .._worker import Worker
from ..agent import Agent
from ..models import ChatModel, OpenAIChatModel, demo_model, word_count

DEFAULT_DB = "threadline.db"
USAGE_ERROR = 2  # argparse's own code for a bad command line
FAILURE = 1
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
MAX_THREAD_ID = 256

DESCRIPTION = (
    "Chat with a durable conversation thread, inspect its state and step history, "
    "list the threads of a database. Threads live in SQLite (the default, a file) "
    "or Redis and continue where they left off."
)
EPILOG = f"""examples:
  threadline chat --thread demo              offline demo model, ./{DEFAULT_DB}
  threadline chat --thread t --model openai:gpt-4o-mini
  threadline chat --thread t --model openai:llama3 --base-url http://localhost:11434/v1
  threadline inspect demo
  threadline threads --db redis://localhost:6379/0
  threadline migrate --redis redis://localhost:6379/0 --prefix tl

Logs: -v shows threadline's info logs on stderr, -vv its debug logs."""
SYSTEM_PROMPT = "You are a helpful assistant."
DB_HELP = f"a SQLite path or a redis:// URL (default: ./{DEFAULT_DB})"


class _Parser(argparse.ArgumentParser):
    """argparse's parser; every usage error reads ``threadline: error: ...`` (a
    sub-command's too, after that sub-command's usage line) and exits 2."""

    commands: dict[str, _Parser]

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"threadline: error: {message}\n")


class UsageError(Exception):
    """A bad command line found after parsing: reported like argparse's errors (exit 2)."""


class Failure(Exception):
    """A runtime failure with a message for the user (exit 1)."""


def _version() -> str:
    try:
        return version("threadline")
    except PackageNotFoundError:  # pragma: no cover - a tree that is not installed
        return "0.0.0+unknown"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_calls(calls: Sequence[ToolCall]) -> str:
    """``word_count(text='a b'), other()``: tool calls as Python calls."""
    return ", ".join(
        f"{c.name}({', '.join(f'{key}={value!r}' for key, value in c.args.items())})" for c in calls
    )


def format_message(message: AnyMessage) -> str:
    """A message's text; an AI message's tool calls as ``[calls f(x=1)]``."""
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = f"[calls {format_calls(message.tool_calls)}]"
        return f"{message.content} {calls}" if message.content else calls
    return message.content


def describe(exc: ThreadlineError) -> str:
    """What went wrong, once: a failed model call without the turn bookkeeping."""
    if isinstance(exc, TurnFailedError) and isinstance(exc.__cause__, ModelError):
        return f"the model failed: {exc.__cause__}"
    return str(exc)


# -- chat ----------------------------------------------------------------------------


def _model(spec: str | None, base_url: str | None) -> ChatModel:
    if spec is None:
        if base_url is not None:
            raise UsageError("--base-url needs --model openai:MODEL_NAME")
        return demo_model()
    provider, _, name = spec.partition(":")
    if provider != "openai" or not name:
        raise UsageError(f"--model must look like openai:MODEL_NAME, got {spec!r}")
    try:
        model = OpenAIChatModel(name, base_url=base_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if model.api_key is None and httpx.URL(model.base_url).host == "api.openai.com":
        raise UsageError(
            f"OPENAI_API_KEY is not set; {model.base_url} needs it "
            "(or use --base-url for another OpenAI-compatible server)"
        )
    return model


async def _readline(stdin: TextIO) -> str:
    """A line of input, read on a daemon thread.

    Ctrl-C cancels the wait at once; the thread, blocked in ``readline``,
    is abandoned (a worker thread would keep the process alive until the
    next line arrived).
    """
    got: list[str | BaseException] = []
    async with BlockingPortal() as portal:
        done = anyio.Event()

        def read() -> None:
            try:
                got.append(stdin.readline())
            except BaseException as exc:
                got.append(exc)
            with contextlib.suppress(RuntimeError):  # the chat is over
                portal.call(done.set)

        threading.Thread(target=read, name="threadline stdin", daemon=True).start()
        await done.wait()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


async def _chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    # The command line is checked before anything is opened (or created).
    check_thread_id(args.thread, MAX_THREAD_ID)
    async with contextlib.AsyncExitStack() as stack:
        system: ThreadClient[Any]
        where = args.db
        if args.workers is not None:
            # The threads run in workers (``threadline worker``); talk over Redis.
            if args.model is not None:
                raise UsageError("--model belongs to the workers' app, not to --workers chat")
            system = await stack.enter_async_context(Client(args.workers))
            where = args.workers
        else:
            model = _model(args.model, args.base_url)
            agent: Agent[Any] = Agent(model=model, tools=[word_count], system_prompt=SYSTEM_PROMPT)
            aclose = getattr(model, "aclose", None)
            if aclose is not None:
                stack.push_async_callback(aclose)  # the HTTP client of a real model
            local = await stack.enter_async_context(
                ActorSystem(agent, snapshots=args.db, max_thread_id_length=MAX_THREAD_ID)
            )
            system = local.client
        try:
            snapshot = await system.get_state(args.thread)
            print(
                f"(thread {args.thread!r} continues: "
                f"{plural(len(snapshot.state.messages), 'message')}, version {snapshot.version})",
                file=stdout,
            )
        except ThreadNotFoundError:
            print(f"(new thread {args.thread!r} in {where})", file=stdout)
        print("Type a message; /quit, end of input or Ctrl-C to leave.", file=stdout)
        while True:
            print("you> ", end="", file=stdout, flush=True)
            line = await _readline(stdin)
            if not line or line.strip() in ("/quit", "/exit"):
                print("", file=stdout)
                return 0
            text = line.strip()
            if not text:
                continue
            try:
                async for part in system.stream(args.thread, text, mode="updates"):
                    for message in _ai_messages(part.data):
                        print(f"ai> {format_message(message)}", file=stdout, flush=True)
            except ThreadlineError as exc:
                print(f"error: {describe(exc)}", file=sys.stderr, flush=True)


def _ai_messages(data: dict[str, list[dict[str, Any]]]) -> list[AIMessage]:
    return [
        message
        for updates in data.values()
        for update in updates
        for message in update.get("messages", ())
        if isinstance(message, AIMessage)
    ]


# -- inspect, threads ----------------------------------------------------------------


def _require_database(db: str) -> None:
    """A typo must not look like an empty database: SQLite would create the file."""
    if db.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    ) or db in ("memory://", ":memory:"):
        return
    if not os.path.exists(db.removeprefix("sqlite://")):
        raise UsageError(f"no such database: {db}")


def _format_update(update: dict[str, Any]) -> str:
    parts = []
    for key, value in update.items():
        if key == "messages":
            for m in value:
                if isinstance(m, AIMessage) and m.tool_calls:
                    parts.append(f"{m.type}: calls {format_calls(m.tool_calls)}")
                elif isinstance(m, ToolMessage):
                    parts.append(f"tool[{m.tool_call_id}]: {m.content[:60]!r}")
                else:
                    parts.append(f"{m.type}: {m.content[:60]!r}")
        else:
            parts.append(f"{key} = {value!r}")
    return "; ".join(parts) or "(no change)"


async def _inspect(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    _require_database(args.db)
    agent: Agent[Any] = Agent(model=demo_model(), tools=[word_count])
    async with ActorSystem(agent, snapshots=args.db) as system:
        try:
            snapshot = await system.get_state(args.thread)
        except ThreadNotFoundError:
            raise Failure(f"no thread {args.thread!r} in {args.db}") from None
        messages = snapshot.state.messages
        print(
            f"thread {args.thread!r}: version {snapshot.version}, "
            f"{plural(len(messages), 'message')}"
            + (f", unfinished turn (next step: {snapshot.next})" if snapshot.next else ""),
            file=stdout,
        )
        print("\nstate:", file=stdout)
        for message in messages:
            print(f"  [{message.type}] {format_message(message)}", file=stdout)
        print("\nsteps:", file=stdout)
        for step in await system.history(args.thread):
            note = f"  error: {step.error}" if step.error else ""
            for update in step.updates or [{}]:
                print(
                    f"  v{step.version:<5} {step.kind:<7} {_format_update(update)}{note}",
                    file=stdout,
                )
    return 0


async def _threads(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    _require_database(args.db)
    agent: Agent[Any] = Agent(model=demo_model())
    async with ActorSystem(agent, snapshots=args.db) as system:
        for thread_id in await system.threads():
            print(thread_id, file=stdout)
    return 0


def make_worker(args: argparse.Namespace, agent: Agent[Any]) -> Worker[Any]:
    """The ``Worker`` that ``threadline worker`` runs, with its command-line options."""
    return Worker(
        agent,
        args.redis,
        prefix=args.prefix,
        partitions=args.partitions,
        lease_ttl=args.lease_ttl,
        max_active_turns=args.max_active_turns,
        max_deliveries=args.max_deliveries,
        handoff_timeout=args.handoff_timeout,
    )


async def _worker(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    agent = load_app(args.app) if args.app else demo_agent()
    async with make_worker(args, agent) as worker:
        print(
            f"worker {worker.worker_id} serving {args.app or 'the demo agent'} "
            f"from {args.redis} ({worker.layout.partitions if worker.layout else '?'} partitions, "
            f"at most {worker.max_active_turns} active turns)",
            file=stdout,
            flush=True,
        )
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.serve)
                async for _ in signals:
                    tg.cancel_scope.cancel()
    return 0


async def _workers(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """Live workers, and each partition's owner (lease holder, epoch) and inbox backlog."""
    async with open_redis(args.redis, "threadline workers") as client:
        config = KeyLayout(prefix=args.prefix).config
        stored = await client.hget(config, "partitions")
        if stored is None:
            raise Failure(f"no deployment under the prefix {args.prefix!r} on {args.redis}")
        layout = KeyLayout(prefix=args.prefix, partitions=int(stored))
        workers = await Membership(client, layout=layout).live_workers()
        leases = PartitionLeases(client, layout=layout)
        inbox = RedisInbox(client, layout)
        print(
            f"deployment {args.prefix!r}: {layout.partitions} partitions, "
            f"{plural(len(workers), 'live worker')}",
            file=stdout,
        )
        for worker in workers:
            print(f"  worker {worker}", file=stdout)
        print(
            f"{'partition':<10} {'owner':<40} {'epoch':>6} {'backlog':>8} {'pending':>8}",
            file=stdout,
        )
        for partition in range(layout.partitions):
            lease = await leases.holder(partition)
            owner, epoch = ("-", "-") if lease is None else (lease.worker, str(lease.epoch))
            backlog = await inbox.backlog(partition)
            pending = await inbox.pending(partition)
            print(f"{partition:<10} {owner:<40} {epoch:>6} {backlog:>8} {pending:>8}", file=stdout)
    return 0


async def _migrate(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """Move a prefix's threads from key layout format 1 to format 2 (workers stopped)."""
    if args.partitions is not None and args.partitions < 1:
        raise UsageError(f"--partitions must be at least 1, got {args.partitions}")
    url = args.redis
    if args.cluster and "+cluster://" not in url:  # the same as a redis+cluster:// URL
        scheme, _, rest = url.partition("://")
        url = f"{scheme}+cluster://{rest}"
    async with open_redis(url, "threadline migrate") as client:
        try:
            report = await migrate_layout(
                client,
                args.prefix,
                partitions=args.partitions,
                delete_old=not args.keep_old,
                force=args.force,
            )
        except ValueError as exc:  # a partition count other than the stored one
            raise Failure(str(exc)) from exc
    print(migration_summary(report, args.redis, keep_old=args.keep_old), file=stdout)
    return 0


def migration_summary(report: MigrationReport, url: str, *, keep_old: bool) -> str:
    """What ``threadline migrate`` did, in one line."""
    where = f"the prefix {report.prefix!r} on {url}"
    if keep_old:
        old = "old keys kept (run again without --keep-old to delete them)"
    elif report.already_migrated and not report.keys_deleted:
        old = "no old keys left"
    else:
        old = f"{plural(report.keys_deleted, 'old key')} deleted"
    if report.already_migrated:
        return (
            f"{where} is at key layout format {LAYOUT_FORMAT} already "
            f"({report.partitions} partitions): nothing copied, {old}"
        )
    if not report.format_set:
        return (
            f"nothing to migrate: no deployment and no format-1 keys under {where} "
            "(a RedisSnapshotStore used on its own has the prefix 'threadline': "
            "--prefix threadline)"
        )
    return (
        f"migrated {where} to key layout format {LAYOUT_FORMAT} "
        f"({report.partitions} partitions): {plural(report.threads, 'thread')}, "
        f"{plural(report.keys_copied, 'key')} copied, {old}"
    )


def demo_agent() -> Agent[Any]:
    return Agent(model=demo_model(), tools=[word_count], system_prompt=SYSTEM_PROMPT)


def load_app(spec: str) -> Agent[Any]:
    """The Agent named by ``module:attribute`` (an Agent, or a function returning one)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--app must look like module:name, got {spec!r}")
    sys.path.insert(0, os.getcwd())  # as python -m does: apps in the working directory
    try:
        target: Any = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load --app {spec}: {exc}") from exc
    if callable(target) and not isinstance(target, Agent):
        target = target()
    if not isinstance(target, Agent):
        raise UsageError(f"--app {spec} is a {type(target).__name__}, not an Agent")
    return target


_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], Awaitable[int]]] = {
    "chat": _chat,
    "inspect": _inspect,
    "threads": _threads,
    "worker": _worker,
    "workers": _workers,
    "migrate": _migrate,
}


# -- the command line ----------------------------------------------------------------


def _count(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _parser() -> _Parser:
    parser = _Parser(
        prog="threadline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"threadline {_version()}")
    verbosity = _Parser(add_help=False)
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show threadline's logs on stderr (-v info, -vv debug)",
    )
    common = _Parser(add_help=False, parents=[verbosity])
    common.add_argument("--db", default=DEFAULT_DB, metavar="PATH_OR_URL", help=DB_HELP)
    deployment = _Parser(add_help=False, parents=[verbosity])
    deployment.add_argument("--redis", required=True, metavar="URL", help="the deployment's Redis")
    deployment.add_argument(
        "--prefix", default="tl", help="the deployment's key prefix (default tl)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="hold a conversation with a thread",
        description="Hold a conversation with a thread; it continues where it left off.",
    )
    chat.add_argument("--thread", required=True, metavar="ID", help="the thread id")
    chat.add_argument(
        "--model",
        default=None,
        metavar="openai:NAME",
        help="an OpenAI-compatible chat model (default: an offline demo model); "
        "needs OPENAI_API_KEY unless --base-url points elsewhere",
    )
    chat.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="the OpenAI-compatible server (default: $OPENAI_BASE_URL or OpenAI's)",
    )
    chat.add_argument(
        "--workers",
        default=None,
        metavar="REDIS_URL",
        help="talk to threads served by workers on this Redis (threadline worker)",
    )
    worker = sub.add_parser(
        "worker",
        parents=[deployment],
        help="serve threads from a Redis deployment, beside other workers",
        description="Serve an app's threads from a Redis deployment: lease a share of "
        "its partitions, read their inboxes, run the turns. Stop with Ctrl-C or SIGTERM "
        "(in-flight steps finish, the partitions are handed back).",
    )
    worker.add_argument(
        "--app",
        default=None,
        metavar="MODULE:NAME",
        help="the Agent to serve, e.g. myapp.agents:support (default: the offline demo agent)",
    )
    worker.add_argument(
        "--partitions",
        type=int,
        default=None,
        metavar="N",
        help="the partition count of a new deployment (fixed once used; default 64)",
    )
    worker.add_argument(
        "--lease-ttl",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long a crashed worker's partitions wait for a new owner (default 10)",
    )
    worker.add_argument(
        "--max-active-turns",
        type=_count,
        default=256,
        metavar="N",
        help="the most threads with a turn in flight at once; at the cap the worker "
        "stops reading its inboxes until one ends (default 256)",
    )
    worker.add_argument(
        "--max-deliveries",
        type=_count,
        default=5,
        metavar="N",
        help="deliveries of a message (its worker dying each time) before it is "
        "dead-lettered as poison and its turn aborted (default 5)",
    )
    worker.add_argument(
        "--handoff-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long a partition moving to another worker waits for its turns in "
        "flight (default 30)",
    )
    workers = sub.add_parser(
        "workers",
        parents=[deployment],
        help="show a Redis deployment's live workers, partition owners and backlogs",
        description="Print the live workers of a Redis deployment, then one line per "
        "partition: its owner (lease holder) and lease epoch, its inbox backlog (entries "
        "not yet acknowledged) and how many of them a worker has read (pending).",
    )
    migrate = sub.add_parser(
        "migrate",
        parents=[deployment],
        help="move a Redis store's threads to the current key layout (workers stopped)",
        description="Move the threads under a prefix from the old Redis key layout "
        f"(format 1: <prefix>:t:{{<id>}}:<part>) to format {LAYOUT_FORMAT} "
        "(<prefix>:{pNNN}:t:<id>:<part>, under the partition's hash tag), then mark "
        f"the prefix format {LAYOUT_FORMAT}. Stop every worker and client of the "
        "deployment first: the command refuses while a worker is registered live. "
        "Safe to run again, also after it was cut short. The prefix is the deployment's "
        "(--prefix of threadline worker, default tl); a RedisSnapshotStore used on its "
        "own, or threadline chat --db redis://..., uses the prefix threadline.",
    )
    migrate.add_argument(
        "--partitions",
        type=int,
        default=None,
        metavar="N",
        help="the partition count if the prefix has no deployment yet "
        "(default 64; an existing deployment keeps its count)",
    )
    migrate.add_argument(
        "--keep-old",
        action="store_true",
        help="keep the old keys (a later run without it deletes them)",
    )
    migrate.add_argument(
        "--force",
        action="store_true",
        help="migrate although workers are registered live (only if they are gone "
        "without deregistering: a running worker would write keys the move misses)",
    )
    migrate.add_argument(
        "--cluster",
        action="store_true",
        help="--redis is a node of a Redis Cluster",
    )
    inspect = sub.add_parser(
        "inspect",
        parents=[common],
        help="print a thread's state and step history",
        description="Print a thread's committed state and every step of its history.",
    )
    inspect.add_argument("thread", metavar="ID", help="the thread id")
    threads = sub.add_parser(
        "threads",
        parents=[common],
        help="list the threads in a database",
        description="List the threads in a database, one id a line.",
    )
    parser.commands = {
        "chat": chat,
        "inspect": inspect,
        "threads": threads,
        "worker": worker,
        "workers": workers,
        "migrate": migrate,
    }
    return parser


def _configure_logging(verbose: int) -> None:
    """The command is an application: it decides what of threadline's logs shows.

    Without ``-v`` only errors show: the failures a user must see (a model
    that fails, a store that fails) are reported once, as error lines.
    """
    logger = logging.getLogger("threadline")
    if not verbose:
        logger.setLevel(logging.ERROR)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return anyio.run(_COMMANDS[args.command], args, sys.stdin, sys.stdout)
    except (UsageError, InvalidInputError) as exc:  # InvalidInputError: a bad thread id
        parser.commands[args.command].error(str(exc))
    except (Failure, ThreadlineError) as exc:
        message = describe(exc) if isinstance(exc, ThreadlineError) else str(exc)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            print(file=sys.stdout, flush=True)  # the shell prompt starts on a new line
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``threadline inspect ID | head``): not an error.
        # Point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
