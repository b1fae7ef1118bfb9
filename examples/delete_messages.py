"""Delete messages: the earliest two in ``after_model``, or all of them.

python examples/delete_messages.py
"""

from __future__ import annotations

from typing import Any

import anyio

from threadline.actors import REMOVE_ALL_MESSAGES, AgentState, RemoveMessage
from threadline.runtime import ActorSystem, Agent, Runtime, after_model, demo_model


@after_model
def delete_old_messages(state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
    """Remove old messages to keep conversation manageable."""
    messages = state["messages"]
    if len(messages) > 2:
        # remove the earliest two messages
        return {"messages": [RemoveMessage(id=m.id) for m in messages[:2]]}
    return None


async def main() -> list[str]:
    out: list[str] = []
    agent = Agent(
        model=demo_model(),
        system_prompt="Please be concise and to the point.",
        middleware=[delete_old_messages],
    )
    async with ActorSystem(agent) as system:
        for text in ("hi! I'm bob", "what's my name?"):
            async for event in system.stream("1", {"role": "user", "content": text}, mode="values"):
                line = str([(message.type, message.content) for message in event.data["messages"]])
                print(line)
                out.append(line)
        # To remove **all** messages:
        cleared = await system.update_state(
            "1", {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES)]}
        )
        out.append(f"after removing all: {len(cleared.state.messages)} messages")
        print(out[-1])
    return out


if __name__ == "__main__":
    anyio.run(main)
