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


async def run(kind: str, turns: int, *, repeats: int = 3) -> dict[str, Any]:
    """Median turn latency with 0 and with 5 hooks.

    Both systems run side by side and take turns one after the other, so disk
    and machine noise (fsync times drift a lot) hits both alike; best of
    ``repeats`` such runs.
    """
    best = {0: float("inf"), 5: float("inf")}
    for _ in range(repeats):
        medians = await _side_by_side(kind, turns)
        for hooks, value in medians.items():
            best[hooks] = min(best[hooks], value)
    return {
        "workload": "hook overhead",
        "store": kind,
        "turns": turns,
        "no_hooks_us": best[0] * 1e6,
        "five_hooks_us": best[5] * 1e6,
        "overhead": best[5] / best[0] - 1,
    }


async def _side_by_side(kind: str, turns: int) -> dict[int, float]:
    directory: Path | None = None if kind == "memory" else temp_dir()
    systems = {
        hooks: ActorSystem(
            Agent(model=FakeModel(), middleware=[NoopHook(i) for i in range(hooks)]),
            snapshots=None if directory is None else directory / f"hooks{hooks}.db",
        )
        for hooks in (0, 5)
    }
    latencies: dict[int, list[float]] = {0: [], 5: []}
    async with systems[0], systems[5]:
        for turn in range(turns + 50):
            # Alternate who goes first: going second in a pair is measurably
            # cheaper on SQLite.
            for hooks in (0, 5) if turn % 2 else (5, 0):
                system = systems[hooks]
                start = time.perf_counter()
                await system.ask(f"t{turn % 20}", user_message(turn))
                if turn >= 50:  # the first 50 warm up (activation, caches)
                    latencies[hooks].append(time.perf_counter() - start)
    return {hooks: statistics.median(values) for hooks, values in latencies.items()}
