"""A worker process for the scale-out tests (run as ``python -m tests._scaleout_worker``).

    python -m tests._scaleout_worker URL PREFIX PARTITIONS LEASE_TTL [CALL_LOG]

Serves :func:`make_agent`'s threads from the deployment ``PREFIX`` on the
Redis at ``URL`` with a ``Worker``. Prints ``ready <worker id>`` once the
worker has joined (before it serves); SIGTERM stops it gracefully (it prints
``stopped`` on the way out). ``CALL_LOG``: every model and tool call appends
one line (``model <thread> <n>`` / ``tool <tool call id>``) there, in one
``write`` on an ``O_APPEND`` descriptor, so a SIGKILL never tears one.
A message ``hold ...`` asks for the tool ``hold``, which logs ``hold-start
<call id>``, waits until the file ``CALL_LOG.gate`` exists, then logs
``hold-end <call id>`` (a turn the F4 test stops a worker in).
Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import anyio
import structlog

from threadline import AIMessage, HumanMessage, ToolCall, ToolMessage, ToolRuntime
from threadline.runtime import Agent, ModelRequest, ScriptedModel, Worker

STEP_DELAY = 0.005
"""Every model call and every tool call awaits this long: turns take a few
steps of a few milliseconds, so a kill lands inside turns, not only between."""


def message_text(i: int) -> str:
    """Every third message asks for tools (a four-step turn), the rest two steps."""
    return f"tool {i}" if i % 3 == 1 else f"say {i}"


def make_agent(call_log: str | None = None) -> Agent[Any]:
    fd = None if call_log is None else os.open(call_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def note(line: str) -> None:
        if fd is not None:
            os.write(fd, line.encode() + b"\n")

    async def respond(request: ModelRequest[Any]) -> AIMessage | str:
        await anyio.sleep(STEP_DELAY)
        note(f"model {request.runtime.thread_id} {len(request.messages)}")
        last = request.messages[-1]
        if isinstance(last, HumanMessage) and last.content.startswith("hold"):
            return AIMessage("", tool_calls=[ToolCall(id=f"hold-{last.id}", name="hold", args={})])
        if isinstance(last, HumanMessage) and last.content.startswith("tool"):
            calls = [
                ToolCall(id=f"call-{last.id}-{k}", name="work", args={"k": k}) for k in range(2)
            ]
            return AIMessage("", tool_calls=calls)
        if isinstance(last, ToolMessage):
            return f"tools said {last.content}"
        return f"reply to {last.content}"

    async def work(k: int, runtime: ToolRuntime) -> str:
        """Does some work."""
        await anyio.sleep(STEP_DELAY)
        note(f"tool {runtime.tool_call_id}")
        return f"worked {k}"

    async def hold(runtime: ToolRuntime) -> str:
        """Waits for the test's gate."""
        note(f"hold-start {runtime.tool_call_id}")
        while call_log is not None and not os.path.exists(call_log + ".gate"):
            await anyio.sleep(0.01)
        note(f"hold-end {runtime.tool_call_id}")
        return "held"

    return Agent(model=ScriptedModel(respond), tools=[work, hold])


def dump_tasks() -> None:
    """Every asyncio task's stack, to stderr (on SIGUSR1: where is a worker stuck?)."""
    for task in asyncio.all_tasks():
        print(f"task {task.get_name()}:", file=sys.stderr)
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                print(
                    f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                    file=sys.stderr,
                )
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)


async def main(url: str, prefix: str, partitions: int, lease_ttl: float, log: str | None) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    agent = make_agent(log)
    async with Worker(
        agent, url, prefix=prefix, partitions=partitions, lease_ttl=lease_ttl
    ) as worker:
        print(f"ready {worker.worker_id}", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.serve)
                async for _ in signals:
                    tg.cancel_scope.cancel()
    print("stopped", flush=True)


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    url, prefix, partitions, ttl = sys.argv[1:5]
    anyio.run(main, url, prefix, int(partitions), float(ttl), (sys.argv[5:] or [None])[0])
