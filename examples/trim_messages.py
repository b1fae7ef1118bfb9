"""Trim messages in ``before_model``: keep the first message and the last 3 or 4.

python examples/trim_messages.py
"""

from __future__ import annotations

from typing import Any

import anyio

from threadline.actors import REMOVE_ALL_MESSAGES, AgentState, RemoveMessage
from threadline.runtime import ActorSystem, Agent, Runtime, before_model, demo_model


@before_model
def trim_messages(state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
    """Keep only the last few messages to fit context window."""
    messages = state["messages"]

    if len(messages) <= 3:
        return None  # No changes needed

    first_msg = messages[0]
    recent_messages = messages[-3:] if len(messages) % 2 == 0 else messages[-4:]
    new_messages = [first_msg, *recent_messages]

    return {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), *new_messages]}


async def main() -> list[str]:
    agent = Agent(model=demo_model(), middleware=[trim_messages])
    async with ActorSystem(agent) as system:
        await system.ask("1", "hi, my name is bob")
        await system.ask("1", "write a short poem about cats")
        await system.ask("1", "now do the same but for dogs")
        final_response = await system.ask("1", "what's my name?")
    final_response["messages"][-1].pretty_print()
    return [final_response.text, f"{len(final_response.messages)} messages kept"]


if __name__ == "__main__":
    anyio.run(main)
