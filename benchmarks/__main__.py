"""Run the benchmarks: ``python -m benchmarks [w1 ...] [--quick] [--json PATH]``."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import Any

import anyio
import structlog

from . import _history
from ._common import redis_server, table


def _w1_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for c in r["checkpoints"]:
            rows.append([r["store"], c["turn"], f"{c['latency_ms']:.2f}", f"{c['bytes']:.0f}"])
        rows.append(
            [
                r["store"],
                "500/1" if r["turns"] >= 500 else "last/1",
                f"x{r['latency_ratio']:.2f}",
                f"x{r['bytes_ratio']:.2f}",
            ]
        )
    out = table(["store", "turn", "latency ms (median of 9)", "bytes written/turn"], rows)
    sizes = "\n".join(
        f"- {r['store']}: final state {r['state_bytes']} B, stored records "
        f"{r['stored_record_bytes']} B (x{r['store_over_state']:.2f} the state)"
        + (f", SQLite files {r['sqlite_file_bytes']} B" if r["sqlite_file_bytes"] else "")
        for r in results
    )
    return f"{out}\n\n{sizes}"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version()}
    turns = 60 if args.quick else 500
    if "w1" in args.workloads:
        with redis_server(args.redis_url) as url:
            results = [await _history.run("sqlite", turns)]
            results.append(await _history.run("redis", turns, redis_url=url))
        report["w1"] = results
        print(f"\n## W1 history growth: one thread, {turns} turns (200-char messages)\n")
        print(_w1_table(results))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("workloads", nargs="*", default=["w1"], help="w1 (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the smoke test)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = anyio.run(_main, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
