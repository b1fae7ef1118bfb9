"""Tools that read state (``runtime.state``) and write it (``Command(update=...)``).

python examples/tools_state.py
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec

from threadline.actors import AgentState, AIMessage, Command, HumanMessage, ToolCall, ToolMessage
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel, ToolRuntime, tool


class CustomState(AgentState):
    user_name: str | None = None


class CustomContext(msgspec.Struct, frozen=True):
    user_id: str


@tool
def update_user_info(runtime: ToolRuntime[CustomContext, CustomState]) -> Command:
    """Look up and update user info."""
    user_id = runtime.context.user_id
    name = "John Smith" if user_id == "user_123" else "Unknown user"
    return Command(
        update={
            "user_name": name,
            # update the message history
            "messages": [
                ToolMessage(
                    "Successfully looked up user information", tool_call_id=runtime.tool_call_id
                )
            ],
        }
    )


@tool
def greet(runtime: ToolRuntime[CustomContext, CustomState]) -> str | Command:
    """Use this to greet the user once you found their info."""
    user_name = runtime.state.get("user_name", None)
    if user_name is None:
        return Command(
            update={
                "messages": [
                    ToolMessage(
                        "Please call the 'update_user_info' tool it will get and update the "
                        "user's name.",
                        tool_call_id=runtime.tool_call_id,
                    )
                ]
            }
        )
    return f"Hello {user_name}!"


def model(request: ModelRequest[Any]) -> AIMessage | str:
    """Greets first; when told to look the user up, does, then greets again."""
    last = request.messages[-1]
    if isinstance(last, HumanMessage):
        return AIMessage("", tool_calls=[ToolCall(id="call_1", name="greet", args={})])
    assert isinstance(last, ToolMessage)
    if "update_user_info" in last.content:
        return AIMessage("", tool_calls=[ToolCall(id="call_2", name="update_user_info", args={})])
    if last.content.startswith("Successfully"):
        return AIMessage("", tool_calls=[ToolCall(id="call_3", name="greet", args={})])
    return last.content


async def main() -> list[str]:
    agent = Agent(
        model=ScriptedModel(model),
        tools=[update_user_info, greet],
        state_schema=CustomState,
        context_schema=CustomContext,
    )
    async with ActorSystem(agent) as system:
        result = await system.ask(
            "1",
            {"messages": [{"role": "user", "content": "greet the user"}]},
            context=CustomContext(user_id="user_123"),
        )
    out = [m.content for m in result.messages if isinstance(m, ToolMessage)]
    out += [result.text, f"user_name={result['user_name']}"]
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    anyio.run(main)
