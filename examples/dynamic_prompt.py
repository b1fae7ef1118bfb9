"""A dynamic system prompt built from the static runtime context.

python examples/dynamic_prompt.py
"""

from __future__ import annotations

import re
from typing import Any, TypedDict

import anyio

from threadline.actors import AIMessage, HumanMessage, ToolCall, ToolMessage
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel, dynamic_prompt


class CustomContext(TypedDict):
    user_name: str


def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return f"The weather in {city} is always sunny!"


@dynamic_prompt
def dynamic_system_prompt(request: ModelRequest[Any]) -> str:
    user_name = request.runtime.context["user_name"]
    return f"You are a helpful assistant. Address the user as {user_name}."


def model(request: ModelRequest[Any]) -> AIMessage | str:
    """Calls the weather tool, then answers addressing the user as the prompt says."""
    last = request.messages[-1]
    if isinstance(last, HumanMessage):
        return AIMessage(
            "",
            tool_calls=[ToolCall(id="call_1", name="get_weather", args={"city": "San Francisco"})],
        )
    assert isinstance(last, ToolMessage)
    match = re.search(r"Address the user as (.+)\.", request.system_prompt or "")
    name = match[1] if match else "there"
    return f"Hi {name}, {last.content[0].lower()}{last.content[1:]}"


async def main() -> list[str]:
    agent = Agent(
        model=ScriptedModel(model),
        tools=[get_weather],
        middleware=[dynamic_system_prompt],
        context_schema=CustomContext,
    )
    async with ActorSystem(agent) as system:
        result = await system.ask(
            "1",
            {"messages": [{"role": "user", "content": "What is the weather in SF?"}]},
            context=CustomContext(user_name="John Smith"),
        )
    for msg in result.messages:
        msg.pretty_print()
    return [m.content for m in result.messages]


if __name__ == "__main__":
    anyio.run(main)
