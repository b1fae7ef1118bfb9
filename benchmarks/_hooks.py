"""Hook overhead: a turn with 5 no-op hooks vs a turn with none (target < 10%)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from threadline.runtime import ActorSystem, Agent, AgentMiddleware, Runtime

from ._common import FakeModel, temp_dir, user_message


class NoopHook(AgentMiddleware):
    """A ``before_model`` hook that changes nothing."""

    def __init__(self, index: int) -> None:
        self._index = index

    @property
    def name(self) -> str:
        return f"noop{self._index}"

    def before_model(self, state: Any, runtime: Runtime[Any]) -> None:
        return None


async def _median_turn(hooks: int, snapshots: Path | None, turns: int) -> float:
    agent = Agent(model=FakeModel(), middleware=[NoopHook(i) for i in range(hooks)])
    async with ActorSystem(agent, snapshots=snapshots) as system:
        for turn in range(min(50, turns)):  # warm up: activation, caches
            await system.ask("warm", user_message(turn))
        latencies = []
        for turn in range(turns):
            start = time.perf_counter()
            await system.ask(f"t{turn % 20}", user_message(turn))
            latencies.append(time.perf_counter() - start)
    return statistics.median(latencies)


async def run(kind: str, turns: int, *, repeats: int = 3) -> dict[str, Any]:
    """Median turn latency with 0 and 5 hooks, best of ``repeats`` interleaved runs."""
    best: dict[int, float] = {0: float("inf"), 5: float("inf")}
    for _ in range(repeats):
        for hooks in (0, 5):
            snapshots = None if kind == "memory" else temp_dir() / "hooks.db"
            best[hooks] = min(best[hooks], await _median_turn(hooks, snapshots, turns))
    return {
        "workload": "hook overhead",
        "store": kind,
        "turns": turns,
        "no_hooks_us": best[0] * 1e6,
        "five_hooks_us": best[5] * 1e6,
        "overhead": best[5] / best[0] - 1,
    }
