"""Summarize older messages with the built-in ``SummarizationMiddleware``.

    python examples/summarization.py

The seed uses ``trigger=("tokens", 4000), keep=("messages", 20)`` with real
models; this offline version triggers on message count so the effect shows in
four turns, and its summarizer is a scripted model that keeps the facts it sees.
"""

from __future__ import annotations

import re
from typing import Any

import anyio

from threadline.actors import HumanMessage
from threadline.runtime import (
    ActorSystem,
    Agent,
    ModelRequest,
    ScriptedModel,
    SummarizationMiddleware,
)


def summarizer(request: ModelRequest[Any]) -> str:
    """A 'model' that summarizes by keeping the names it finds in the prompt."""
    names = sorted(set(re.findall(r"my name is (\w+)", request.messages[-1].content, re.I)))
    return "The user's name is " + ", ".join(n.capitalize() for n in names) + "."


def assistant(request: ModelRequest[Any]) -> str:
    """Answers from whatever it still sees: recent messages and the summary."""
    last = request.messages[-1].content
    if "what's my name" in last.lower():
        for message in request.messages:
            if (found := re.search(r"name is (\w+)", message.content, re.I)) is not None:
                return f"Your name is {found[1].capitalize()}!"
        return "I don't know your name."
    return f"Here you go: a short piece about {last.split()[-1]}"


async def main() -> list[str]:
    agent = Agent(
        model=ScriptedModel(assistant),
        middleware=[
            SummarizationMiddleware(
                model=ScriptedModel(summarizer), trigger=("messages", 6), keep=("messages", 2)
            )
        ],
    )
    async with ActorSystem(agent) as system:
        await system.ask("1", "hi, my name is bob")
        await system.ask("1", "write a short poem about cats")
        await system.ask("1", "now do the same but for dogs")
        final_response = await system.ask("1", "what's my name?")
    final_response["messages"][-1].pretty_print()
    out = [
        final_response.text,
        f"{len(final_response.messages)} messages in the thread",
        next(m.content for m in final_response.messages if isinstance(m, HumanMessage)),
    ]
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    anyio.run(main)
