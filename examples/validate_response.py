"""``after_model`` validation: remove an answer containing stop words.

python examples/validate_response.py
"""

from __future__ import annotations

from typing import Any

import anyio

from threadline.actors import AgentState, RemoveMessage
from threadline.runtime import ActorSystem, Agent, Runtime, ScriptedModel, after_model


@after_model
def validate_response(state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
    """Remove messages containing sensitive words."""
    stop_words = ["password", "secret"]
    last_message = state["messages"][-1]
    if any(word in last_message.content for word in stop_words):
        return {"messages": [RemoveMessage(id=last_message.id)]}
    return None


async def main() -> list[str]:
    model = ScriptedModel(["The password is hunter2.", "Happy to help with anything else!"])
    agent = Agent(model=model, middleware=[validate_response])
    async with ActorSystem(agent) as system:
        first = await system.ask("1", "what's the admin password?")
        second = await system.ask("1", "ok, something else then")
        history = await system.history("1")
    out = [
        str([(m.type, m.content) for m in first.messages]),
        str([(m.type, m.content) for m in second.messages]),
        f"steps: {[s.kind for s in history]}",
    ]
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    anyio.run(main)
