"""``python -m benchmarks soak [--minutes N | --quick] [--seed S] [--redis-url URL] [--json PATH]``

Runs fault injection for N minutes and lets the history checker judge every
run (``tests/_history.py``; the machinery is ``tests/_faults.py``):

* the SIGKILL loop, on SQLite and on Redis: a child process drives a
  workload (turns of two and four steps, model and tools awaiting a little),
  the parent kills it at seeded random instants and restarts it;
* the Nth-call sweep, on SQLite and on Redis: a small workload once per store
  call position, that call failing before or after the real store did it.

Cycles repeat (seed, seed + 1, ...) until the time is up; then a table of
the checker's counts. Exits 1 if any run lost, duplicated, reordered or
forked anything (the violations are printed), 0 otherwise. Run it from the
repository root (it imports ``tests``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from threadline.persistence import RedisSnapshotStore, SqliteSnapshotStore

from ._common import note, quiet_logs, redis_server, remove_temp_dirs, table, temp_dir

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the machinery lives with the tests
    sys.path.insert(0, str(ROOT))

from tests._faults import kill_loop, nth_call_sweep  # noqa: E402
from tests._history import VERDICTS, Report  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SoakSizes:
    kills: int = 25  # per SIGKILL loop
    threads: int = 3
    max_delay: float = 0.4
    sweep_threads: int = 2
    sweep_messages: int = 3


FULL = SoakSizes()
QUICK = SoakSizes(kills=2, threads=2, max_delay=0.25, sweep_threads=1, sweep_messages=2)


@dataclasses.dataclass
class Row:
    """One kind of fault on one store, summed over the cycles."""

    fault: str
    store: str
    runs: int = 0
    faults: int = 0
    mid_turn: int = 0  # SIGKILL loops: restarts that found a turn parked
    acknowledged: int = 0
    steps: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))

    def add(self, report: Report) -> None:
        self.acknowledged += report.acknowledged
        self.steps += report.steps
        for kind, n in report.counts().items():
            self.counts[kind] += n


def _run_cycle(
    cycle: int, seed: int, sizes: SoakSizes, redis_url: str, rows: dict[str, Row]
) -> list[str]:
    """One cycle of every fault on every store; the failures' summaries."""
    failures: list[str] = []
    work = temp_dir()
    threads = [f"c{cycle}-t{j}" for j in range(sizes.threads)]
    specs = {
        "sqlite": str(work / "threads.db"),
        "redis": f"{redis_url}#soak{seed}c{cycle}",
    }
    for store, spec in specs.items():
        row = rows[f"kill/{store}"]
        try:
            result = kill_loop(
                spec,
                work / f"kill-{store}",
                seed=seed + cycle,
                kills=sizes.kills,
                threads=threads,
                max_delay=sizes.max_delay,
            )
        except AssertionError as exc:  # a worker failed: a finding, not a crash of the soak
            failures.append(f"SIGKILL loop on {store}, seed {seed + cycle}: {exc}")
            continue
        assert result.report is not None
        row.runs += 1
        row.faults += result.kills
        row.mid_turn += result.resumed_rounds
        row.add(result.report)
        if not result.report.ok:
            failures.append(
                f"SIGKILL loop on {store}, seed {seed + cycle}:\n{result.report.summary()}"
            )

    async def sweeps() -> None:
        stores: dict[str, Any] = {
            "sqlite": SqliteSnapshotStore(work / "sweep.db"),
            "redis": RedisSnapshotStore.from_url(redis_url, prefix=f"soak{seed}s{cycle}"),
        }
        for store, backend in stores.items():
            async with backend:
                result = await nth_call_sweep(
                    backend,
                    f"c{cycle}",
                    threads=sizes.sweep_threads,
                    messages=sizes.sweep_messages,
                )
            assert result.report is not None
            row = rows[f"nth/{store}"]
            row.runs += result.runs
            row.faults += result.injected
            row.add(result.report)
            if not result.report.ok:
                failures.append(f"Nth-call sweep on {store}:\n{result.report.summary()}")

    anyio.run(sweeps)
    remove_temp_dirs()
    return failures


def run(minutes: float, sizes: SoakSizes, seed: int, redis_url: str) -> dict[str, Any]:
    rows = {
        f"{fault}/{store}": Row(fault, store)
        for fault in ("kill", "nth")
        for store in ("sqlite", "redis")
    }
    failures: list[str] = []
    start = time.monotonic()
    deadline = start + minutes * 60
    cycle = 0
    while True:
        note(f"soak cycle {cycle} (seed {seed + cycle}), {time.monotonic() - start:.0f} s in")
        failures += _run_cycle(cycle, seed, sizes, redis_url, rows)
        cycle += 1
        if time.monotonic() >= deadline:
            break
    return {
        "seed": seed,
        "cycles": cycle,
        "seconds": time.monotonic() - start,
        "rows": [dataclasses.asdict(r) for r in rows.values()],
        "failures": failures,
    }


LABELS = {"kill": "SIGKILL loop", "nth": "Nth store call fails"}


def render(report: dict[str, Any]) -> str:
    rows = []
    totals = dict.fromkeys(("runs", "faults", "acknowledged", *VERDICTS), 0)
    for r in report["rows"]:
        rows.append(
            [
                LABELS[r["fault"]],
                r["store"],
                r["runs"],
                f"{r['faults']} kills ({r['mid_turn']} mid-turn)"
                if r["fault"] == "kill"
                else f"{r['faults']} faults",
                r["acknowledged"],
                r["steps"],
                *(r["counts"][k] for k in VERDICTS),
            ]
        )
        for key in ("runs", "faults", "acknowledged"):
            totals[key] += r[key]
        for k in VERDICTS:
            totals[k] += r["counts"][k]
    kills = sum(r["faults"] for r in report["rows"] if r["fault"] == "kill")
    rows.append(
        [
            "**all**",
            "",
            totals["runs"],
            f"{kills} kills, {totals['faults'] - kills} faults",
            totals["acknowledged"],
            sum(r["steps"] for r in report["rows"]),
            *(totals[k] for k in VERDICTS),
        ]
    )
    verdict = "PASS" if not report["failures"] else "FAIL"
    return (
        f"## Soak: {report['cycles']} cycles in {report['seconds']:.0f} s, "
        f"seed {report['seed']}: {verdict}\n\n"
        + table(
            [
                "fault",
                "store",
                "runs",
                "injected",
                "messages acknowledged",
                "steps checked",
                *VERDICTS,
            ],
            rows,
        )
        + "\n\nEvery run is judged by the history checker (tests/_history.py); a kill "
        "is mid-turn when the next process found a turn parked."
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks soak")
    parser.add_argument("--minutes", type=float, default=1.0, help="how long (default 1)")
    parser.add_argument("--quick", action="store_true", help="one tiny cycle (the smoke test)")
    parser.add_argument("--seed", type=int, help="first seed (default: from the clock)")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    quiet_logs()
    # Injected faults make the library warn at every one: errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    sizes = QUICK if args.quick else FULL
    minutes = 0.0 if args.quick else args.minutes
    try:
        with redis_server(args.redis_url) as url:
            report = run(minutes, sizes, seed, url)
    finally:
        remove_temp_dirs()
    report["quick"] = args.quick
    print(render(report) + "\n", flush=True)
    for failure in report["failures"]:
        print(failure + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if report["failures"]:
        sys.exit(1)
