"""A custom state schema, passed at invocation (``user_id``, ``preferences``).

python examples/custom_state.py
"""

from __future__ import annotations

from typing import Any

import anyio

from threadline.actors import AgentState, AIMessage, HumanMessage, ToolCall, ToolMessage
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel, ToolRuntime


class CustomAgentState(AgentState):
    user_id: str
    preferences: dict[str, str] = {}


def get_user_info(runtime: ToolRuntime[None, CustomAgentState]) -> str:
    """Look up user info."""
    user_id = runtime.state["user_id"]
    theme = runtime.state["preferences"].get("theme", "default")
    return f"User is John Smith (theme: {theme})" if user_id == "user_123" else "Unknown user"


def model(request: ModelRequest[Any]) -> AIMessage | str:
    last = request.messages[-1]
    if isinstance(last, HumanMessage):
        return AIMessage("", tool_calls=[ToolCall(id="call_1", name="get_user_info", args={})])
    assert isinstance(last, ToolMessage)
    return f"{last.content}."


async def main() -> list[str]:
    agent = Agent(model=ScriptedModel(model), tools=[get_user_info], state_schema=CustomAgentState)
    async with ActorSystem(agent) as system:
        result = await system.ask(
            "1",
            {
                "messages": [{"role": "user", "content": "Hello"}],
                "user_id": "user_123",
                "preferences": {"theme": "dark"},
            },
        )
    out = [result.text, f"user_id={result['user_id']} preferences={result['preferences']}"]
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    anyio.run(main)
