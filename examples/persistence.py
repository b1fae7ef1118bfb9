"""Thread persistence across invocations (and across processes): the seed's first pattern.

python examples/persistence.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

from threadline.runtime import ActorSystem, Agent, demo_model


async def main() -> list[str]:
    out: list[str] = []
    db = Path(tempfile.mkdtemp()) / "threads.db"
    agent = Agent(model=demo_model())
    async with ActorSystem(agent, snapshots=db) as system:
        result = await system.ask("1", "hi, my name is bob")
        out.append(result.text)
    # A new system (think: a restarted process) on the same file continues thread "1".
    async with ActorSystem(agent, snapshots=db) as system:
        result = await system.ask("1", "what's my name?")
        out.append(result.text)
        out.append(f"{len(result.messages)} messages, version {result.version}")
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    anyio.run(main)
