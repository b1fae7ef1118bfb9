"""``threadline`` command line: chat with a thread, inspect it, list threads."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import anyio
import anyio.to_thread
import msgspec
import structlog

from threadline.actors import AIMessage, ThreadlineError, ThreadNotFoundError, ToolMessage

from .._system import ActorSystem
from ..agent import Agent
from ..models import ChatModel, demo_model, word_count

DEFAULT_DB = "threadline.db"


def _model(spec: str | None, base_url: str | None) -> ChatModel:
    if spec is None:
        return demo_model()
    provider, _, name = spec.partition(":")
    if provider != "openai" or not name:
        raise SystemExit(f"--model must look like openai:MODEL_NAME, got {spec!r}")
    try:
        from ..models import OpenAIChatModel
    except ImportError as exc:
        raise SystemExit(f"the OpenAI model is not available: {exc}") from exc
    return OpenAIChatModel(name, base_url=base_url)


async def _chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    model = _model(args.model, args.base_url)
    agent: Agent[Any] = Agent(
        model=model, tools=[word_count], system_prompt="You are a helpful assistant."
    )
    async with contextlib.AsyncExitStack() as stack:
        aclose = getattr(model, "aclose", None)
        if aclose is not None:
            stack.push_async_callback(aclose)  # the HTTP client of a real model
        system = await stack.enter_async_context(ActorSystem(agent, snapshots=args.db))
        try:
            state = await system.get_state(args.thread)
            print(
                f"(thread {args.thread!r} continues: {len(state.state.messages)} messages, "
                f"version {state.version})",
                file=stdout,
            )
        except ThreadNotFoundError:
            print(f"(new thread {args.thread!r} in {args.db})", file=stdout)
        print("Type a message; /quit or end of input to leave.", file=stdout)
        while True:
            print("you> ", end="", file=stdout, flush=True)
            line = await anyio.to_thread.run_sync(stdin.readline)
            if not line or line.strip() in ("/quit", "/exit"):
                print("", file=stdout)
                return 0
            text = line.strip()
            if not text:
                continue
            try:
                result = await system.ask(args.thread, text)
            except ThreadlineError as exc:
                print(f"error: {exc}", file=stdout)
                continue
            print(f"ai> {result.text}", file=stdout, flush=True)


def _format_update(update: dict[str, Any]) -> str:
    parts = []
    for key, value in update.items():
        if key == "messages":
            for m in value:
                if isinstance(m, AIMessage) and m.tool_calls:
                    calls = ", ".join(
                        f"{c.name}({msgspec.json.encode(c.args).decode()})" for c in m.tool_calls
                    )
                    parts.append(f"{m.type}: calls {calls}")
                elif isinstance(m, ToolMessage):
                    parts.append(f"tool[{m.tool_call_id}]: {m.content[:60]!r}")
                else:
                    parts.append(f"{m.type}: {m.content[:60]!r}")
        else:
            parts.append(f"{key} = {value!r}")
    return "; ".join(parts) or "(no change)"


async def _inspect(args: argparse.Namespace, stdout: TextIO) -> int:
    agent: Agent[Any] = Agent(model=demo_model(), tools=[word_count])
    async with ActorSystem(agent, snapshots=args.db) as system:
        try:
            snapshot = await system.get_state(args.thread)
        except ThreadNotFoundError:
            print(f"no thread {args.thread!r} in {args.db}", file=stdout)
            return 1
        print(
            f"thread {args.thread!r}: version {snapshot.version}, "
            f"{len(snapshot.state.messages)} messages"
            + (f", unfinished turn (next step: {snapshot.next})" if snapshot.next else ""),
            file=stdout,
        )
        print("\nstate:", file=stdout)
        for message in snapshot.state.messages:
            print(f"  [{message.type}] {message.content}", file=stdout)
        print("\nsteps:", file=stdout)
        for step in await system.history(args.thread):
            note = f"  error: {step.error}" if step.error else ""
            for update in step.updates or [{}]:
                print(
                    f"  v{step.version:<5} {step.kind:<7} {_format_update(update)}{note}",
                    file=stdout,
                )
    return 0


async def _threads(args: argparse.Namespace, stdout: TextIO) -> int:
    agent: Agent[Any] = Agent(model=demo_model())
    async with ActorSystem(agent, snapshots=args.db) as system:
        for thread_id in await system.threads():
            print(thread_id, file=stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="threadline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="hold a conversation with a thread")
    chat.add_argument("--thread", required=True, help="thread id")
    chat.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default ./{DEFAULT_DB})")
    chat.add_argument("--model", default=None, help="openai:MODEL (default: offline demo model)")
    chat.add_argument("--base-url", default=None, help="OpenAI-compatible server URL")
    inspect = sub.add_parser("inspect", help="print a thread's state and step history")
    inspect.add_argument("thread", help="thread id")
    inspect.add_argument("--db", default=DEFAULT_DB)
    threads = sub.add_parser("threads", help="list the threads in a database")
    threads.add_argument("--db", default=DEFAULT_DB)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # This is the application, not the library: keep the library's info/debug
    # logs off the conversation.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        if args.command == "chat":
            return anyio.run(_chat, args, sys.stdin, sys.stdout)
        if args.command == "inspect":
            return anyio.run(_inspect, args, sys.stdout)
        return anyio.run(_threads, args, sys.stdout)
    except ThreadlineError as exc:
        print(f"threadline: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``threadline inspect ID | head``): not an error.
        # Point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
