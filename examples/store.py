"""Cross-conversation memory: remember a preference in one thread, use it in another.

python examples/store.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import msgspec

from threadline.actors import AIMessage, HumanMessage, ToolCall, ToolMessage
from threadline.persistence import SqliteStore
from threadline.runtime import (
    ActorSystem,
    Agent,
    ModelRequest,
    ScriptedModel,
    ToolRuntime,
    dynamic_prompt,
)


class UserContext(msgspec.Struct, frozen=True):
    user_id: str


async def save_preference(key: str, value: str, runtime: ToolRuntime[UserContext, Any]) -> str:
    """Remember a preference of the current user, for every conversation.

    Args:
        key: what the preference is about, e.g. "language".
        value: the preferred value.
    """
    namespace = ("users", runtime.context.user_id, "preferences")
    item = await runtime.store.get(namespace, "all")
    prefs = dict(item.value) if item else {}
    prefs[key] = value
    await runtime.store.put(namespace, "all", prefs)
    return f"saved {key}={value}"


@dynamic_prompt
async def personalised(request: ModelRequest[Any]) -> str:
    user_id = request.runtime.context.user_id
    item = await request.runtime.store.get(("users", user_id, "preferences"), "all")
    prefs = ", ".join(f"{k}: {v}" for k, v in sorted((item.value if item else {}).items()))
    return f"You are a helpful assistant. Known preferences: {prefs or 'none'}."


def model(request: ModelRequest[Any]) -> AIMessage | str:
    last = request.messages[-1]
    if isinstance(last, HumanMessage) and last.content.startswith("I prefer "):
        args = {"key": "language", "value": last.content.removeprefix("I prefer ").rstrip(".")}
        return AIMessage("", tool_calls=[ToolCall(id="p1", name="save_preference", args=args)])
    if isinstance(last, ToolMessage):
        return f"Noted ({last.content})."
    return f"[{request.system_prompt}] Hello!"


async def main() -> list[str]:
    db = Path(tempfile.mkdtemp()) / "memory.db"
    agent = Agent(
        model=ScriptedModel(model),
        tools=[save_preference],
        middleware=[personalised],
        context_schema=UserContext,
    )
    ann, bo = UserContext("ann"), UserContext("bo")
    async with ActorSystem(agent, snapshots=db, store=SqliteStore(db)) as system:
        first = await system.ask("thread-1", "I prefer French.", context=ann)
        other_thread = await system.ask("thread-2", "hi", context=ann)
        other_user = await system.ask("thread-3", "hi", context=bo)
    out = [first.text, other_thread.text, other_user.text]
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    anyio.run(main)
