"""Run the benchmarks.

``python -m benchmarks [w1 w2 w3 raw memory hooks cluster timetravel | all] [--quick]
[--json PATH]
[--redis-url URL]``

``python -m benchmarks soak [--minutes N | --quick]``: fault injection judged by the
history checker (``benchmarks/_soak.py``).

Prints a markdown table per workload (threadline on SQLite ``synchronous=FULL``
and on Redis with ``appendfsync always``; LangGraph on AsyncSqliteSaver and
InMemorySaver from the same run when ``langgraph`` is importable), then the
targets. ``cluster`` runs worker processes (``threadline worker``) on the same
Redis and compares them with the in-process system (``benchmarks/_cluster.py``).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis

from . import _cluster, _concurrency, _history, _hooks, _memory, _raw, _rehydrate, _timetravel
from ._common import (
    fresh_heap,
    note,
    peer_redis_status,
    peer_unavailable,
    quiet_logs,
    redis_server,
    remove_temp_dirs,
    table,
)

WORKLOADS = ("w1", "w2", "w3", "raw", "memory", "hooks", "cluster", "timetravel")


@dataclasses.dataclass(frozen=True)
class Sizes:
    w1_turns: int = 500
    w2_threads: int = 200
    w2_turns: int = 20
    w2_inflight: int = 50
    w3_turns: int = 500
    w3_reps: int = 5
    raw_sqlite_single: int = 1000
    raw_sqlite_batches: int = 100
    raw_redis_single: int = 2000
    raw_redis_batches: int = 300
    commit_threads: int = 1000
    commit_turns: int = 5
    memory_threads: int = 100_000
    hook_turns: int = 400
    cluster_lease_ttls: tuple[float, ...] = (10.0, 2.0)
    cluster_kills: int = 5
    cluster_partitions: int = 16
    cluster_orphans: int = 3
    cluster_tells: int = 1000
    cluster_asks: int = 500
    cluster_workers: tuple[int, ...] = (1, 2, 4)
    timetravel_steps: int = 5000
    timetravel_reps: int = 20


FULL = Sizes()
QUICK = Sizes(
    w1_turns=12,
    w2_threads=8,
    w2_turns=3,
    w2_inflight=4,
    w3_turns=12,
    w3_reps=1,
    raw_sqlite_single=30,
    raw_sqlite_batches=5,
    raw_redis_single=50,
    raw_redis_batches=5,
    commit_threads=40,
    commit_turns=2,
    memory_threads=2000,
    hook_turns=10,
    cluster_lease_ttls=(1.0,),
    cluster_kills=1,
    cluster_partitions=4,
    cluster_orphans=2,
    cluster_tells=40,
    cluster_asks=30,
    cluster_workers=(1, 2),
    timetravel_steps=60,
    timetravel_reps=2,
)

LABELS = {
    ("threadline", "sqlite"): "threadline / SQLite FULL",
    ("threadline", "redis"): "threadline / Redis (appendfsync always)",
    ("langgraph", "sqlite"): "LangGraph / AsyncSqliteSaver (WAL, FULL)",
    ("langgraph", "memory"): "LangGraph / InMemorySaver (not durable)",
}


def label(r: dict[str, Any]) -> str:
    return LABELS[(r["system"], r["store"])]


def _find(results: list[dict[str, Any]], system: str, store: str) -> dict[str, Any] | None:
    return next((r for r in results if r["system"] == system and r["store"] == store), None)


# -- running -------------------------------------------------------------------


async def measured(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """``await fn(...)`` on a fresh heap (see ``_common.fresh_heap``)."""
    with fresh_heap():
        return await fn(*args, **kwargs)


async def run_suite(
    workloads: list[str],
    sizes: Sizes,
    redis_url: str,
    *,
    peer: bool = True,
    show: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Run ``workloads``; the report (plain JSON data). ``show`` gets each section's
    markdown as soon as its workload is done."""
    skipped = peer_unavailable() if peer else "disabled with --no-peer"
    report: dict[str, Any] = {
        "meta": _meta(redis_url, sizes),
        "peer": {"available": skipped is None, "skipped": skipped},
        "peer_redis": peer_redis_status(redis_url),
    }
    with_peer = skipped is None
    show(_header(report))
    if "w1" in workloads:
        n = sizes.w1_turns
        note(f"W1 history growth: one thread, {n} turns")
        results = [
            await measured(_history.run, "sqlite", n),
            await measured(_history.run, "redis", n, redis_url=redis_url),
        ]
        if with_peer:
            results += [
                await measured(_history.run_peer, "sqlite", n),
                await measured(_history.run_peer, "memory", n),
            ]
        report["w1"] = results
        show(_w1(results, n))
    if "w2" in workloads:
        t, n, k = sizes.w2_threads, sizes.w2_turns, sizes.w2_inflight
        note(f"W2 concurrency: {t} threads x {n} turns, at most {k} in flight")
        results = [
            await measured(_concurrency.run, "sqlite", t, n, k),
            await measured(_concurrency.run, "redis", t, n, k, redis_url=redis_url),
        ]
        if with_peer:
            results += [
                await measured(_concurrency.run_peer, "sqlite", t, n, k),
                await measured(_concurrency.run_peer, "memory", t, n, k),
            ]
        report["w2"] = results
        show(_w2(results))
    if "w3" in workloads:
        n, reps = sizes.w3_turns, sizes.w3_reps
        note(f"W3 rehydration: a {n}-turn thread, {reps} fresh processes each")
        results = [
            await _rehydrate.run("sqlite", n, reps),
            await _rehydrate.run("redis", n, reps, redis_url=redis_url),
        ]
        if with_peer:
            results.append(await _rehydrate.run_peer(n, reps))
        report["w3"] = results
        show(_w3(results))
    if "raw" in workloads:
        note("raw limits: aiosqlite, redis-py; threadline's durable commits/s")
        raw: dict[str, Any] = {
            "sqlite": await _raw.sqlite_limits(sizes.raw_sqlite_single, sizes.raw_sqlite_batches),
            "redis": await _raw.redis_limits(
                redis_url, sizes.raw_redis_single, sizes.raw_redis_batches
            ),
        }
        ours = [
            await measured(_raw.ours, "sqlite", sizes.commit_threads, sizes.commit_turns),
            await measured(
                _raw.ours, "redis", sizes.commit_threads, sizes.commit_turns, redis_url=redis_url
            ),
        ]
        ours[0]["fraction_of_limit"] = (
            ours[0]["commits_per_s"] / raw["sqlite"]["batched_rows_per_s"]
        )
        ours[1]["fraction_of_limit"] = (
            ours[1]["commits_per_s"] / raw["redis"]["pipelined_set_per_s"]
        )
        raw["threadline"] = ours
        report["raw"] = raw
        show(_raw_table(raw))
    if "memory" in workloads:
        note(f"memory: {sizes.memory_threads} live idle threads in a fresh process")
        report["memory"] = await _memory.run(sizes.memory_threads)
        show(_memory_table(report["memory"]))
    if "hooks" in workloads:
        note("hook overhead: turns with 5 no-op hooks vs none")
        report["hooks"] = [
            await measured(_hooks.run, "memory", sizes.hook_turns),
            await measured(_hooks.run, "sqlite", sizes.hook_turns),
        ]
        show(_hooks_table(report["hooks"]))
    if "timetravel" in workloads:
        n, reps = sizes.timetravel_steps, sizes.timetravel_reps
        note(f"time travel: get_state(version=), fork, kept full records on {n}-step threads")
        report["timetravel"] = [
            *await measured(_timetravel.run, "sqlite", n, reps),
            *await measured(_timetravel.run, "redis", n, reps, redis_url=redis_url),
        ]
        headers, rows = _timetravel.table(report["timetravel"])
        show(
            f"## Time travel: {n}-step threads\n\n"
            + table(headers, rows)
            + "\n\nMedian of "
            + f"{reps} calls each. growing: W1's conversation; trimmed: the two oldest "
            "messages removed after each turn once there are 40 (the state stays small). "
            "Kept full records: older full records the journal keeps as checkpoints "
            "(CHECKPOINT_RATIO); a store written before keeps none."
        )
    if "cluster" in workloads:
        note("cluster: worker processes and Client vs the in-process system, same Redis")
        report["cluster"] = await _cluster.run(
            redis_url,
            lease_ttls=sizes.cluster_lease_ttls,
            kills=sizes.cluster_kills,
            partitions=sizes.cluster_partitions,
            orphans=sizes.cluster_orphans,
            tells=sizes.cluster_tells,
            asks=sizes.cluster_asks,
            threads=sizes.w2_threads,
            turns=sizes.w2_turns,
            inflight=sizes.w2_inflight,
            worker_counts=sizes.cluster_workers,
        )
        show(_cluster_table(report["cluster"]))
    report["targets"] = targets(report)
    show(_targets_table(report["targets"]))
    return report


def _meta(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for dist in ("threadline", "langgraph", "langgraph-checkpoint-sqlite", "aiosqlite", "redis"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("server")
        aof = client.config_get("appendfsync").get("appendfsync", "?")
        versions["redis-server"] = f"{info.get('redis_version', '?')} (appendfsync {aof})"
    finally:
        client.close()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(),
        "cores": os.cpu_count(),
        "versions": versions,
        "sizes": dataclasses.asdict(sizes),
    }


# -- targets -------------------------------------------------------------------


def _target(name: str, measured: str, holds: bool | None) -> dict[str, Any]:
    return {
        "target": name,
        "measured": measured,
        "holds": None if holds is None else bool(holds),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target whose figures are in ``report`` (ratios from this one run)."""
    out: list[dict[str, Any]] = []
    skipped = report["peer"]["skipped"]
    if "w2" in report:
        ours = _find(report["w2"], "threadline", "sqlite")
        theirs = _find(report["w2"], "langgraph", "sqlite")
        assert ours is not None
        if theirs is None:
            out.append(
                _target("W2 turns/s >= 50x LangGraph+AsyncSqliteSaver (SQLite)", "n/a", None)
            )
            out.append(
                _target("W2 p99 <= 1/20 of LangGraph+AsyncSqliteSaver (SQLite)", "n/a", None)
            )
        else:
            ratio = ours["turns_per_s"] / theirs["turns_per_s"]
            out.append(
                _target(
                    "W2 turns/s >= 50x LangGraph+AsyncSqliteSaver (SQLite)",
                    f"x{ratio:.1f} ({ours['turns_per_s']:.0f} vs {theirs['turns_per_s']:.0f})",
                    ratio >= 50,
                )
            )
            ratio = theirs["p99_ms"] / ours["p99_ms"]
            out.append(
                _target(
                    "W2 p99 <= 1/20 of LangGraph+AsyncSqliteSaver (SQLite)",
                    f"1/{ratio:.1f} ({ours['p99_ms']:.1f} ms vs {theirs['p99_ms']:.1f} ms)",
                    ratio >= 20,
                )
            )
    if "w1" in report:
        for r in report["w1"]:
            if r["system"] != "threadline":
                continue
            store = "SQLite" if r["store"] == "sqlite" else "Redis"
            last = r["checkpoints"][-1]["turn"]
            out.append(
                _target(
                    f"W1 {store} bytes/turn at turn {last} <= 1.2x turn 1",
                    f"x{r['bytes_ratio']:.2f}",
                    r["bytes_ratio"] <= 1.2,
                )
            )
            out.append(
                _target(
                    f"W1 {store} latency at turn {last} <= 1.2x turn 1",
                    f"x{r['latency_ratio']:.2f}",
                    r["latency_ratio"] <= 1.2,
                )
            )
            out.append(
                _target(
                    f"W1 {store} store after {r['turns']} turns <= 3x final state",
                    f"x{r['store_over_state']:.2f}",
                    r["store_over_state"] <= 3,
                )
            )
    if "w3" in report:
        ours = _find(report["w3"], "threadline", "sqlite")
        theirs = _find(report["w3"], "langgraph", "sqlite")
        assert ours is not None
        name = "W3 cold load <= 1/8 of LangGraph+AsyncSqliteSaver (SQLite)"
        if theirs is None:
            out.append(_target(name, "n/a", None))
        else:
            ratio = theirs["load_ms"] / ours["load_ms"]
            out.append(
                _target(
                    name,
                    f"1/{ratio:.1f} ({ours['load_ms']:.2f} ms vs {theirs['load_ms']:.2f} ms)",
                    ratio >= 8,
                )
            )
    if "raw" in report:
        for r in report["raw"]["threadline"]:
            limit = (
                "raw batched SQLite rows/s (100/tx)"
                if r["store"] == "sqlite"
                else "pipelined Redis SET/s"
            )
            out.append(
                _target(
                    f"durable commits/s ({r['threads']} threads) >= 50% of {limit}",
                    f"{r['fraction_of_limit']:.0%} ({r['commits_per_s']:.0f}/s)",
                    r["fraction_of_limit"] >= 0.5,
                )
            )
    if "memory" in report:
        m = report["memory"]
        out.append(
            _target(
                f"memory beyond state <= 1 KiB per idle live thread ({m['threads']} threads)",
                f"{m['beyond_state_per_thread']:.0f} B",
                m["beyond_state_per_thread"] <= 1024,
            )
        )
    for r in report.get("hooks", []):
        if r["store"] == "memory":
            out.append(
                _target(
                    "a turn with 5 no-op hooks costs < 10% more (memory store, no I/O)",
                    f"{100 * r['overhead']:+.1f}% "
                    f"({r['five_hooks_us'] - r['no_hooks_us']:+.1f} us)",
                    r["overhead"] < 0.10,
                )
            )
    if "cluster" in report:
        out += [_target(*t) for t in _cluster.targets(report["cluster"])]
    if skipped:
        for t in out:
            if t["holds"] is None:
                t["measured"] = f"n/a: peer skipped ({skipped})"
    return out


# -- printing ------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _header(report: dict[str, Any]) -> str:
    meta = report["meta"]
    v = meta["versions"]
    skipped = report["peer"]["skipped"]
    peer_line = (
        f"LangGraph peer skipped: {skipped}"
        if skipped
        else "LangGraph peer: StateGraph(messages: add_messages) + one async model node with "
        "the same reply; AsyncSqliteSaver uses WAL (its setup) and synchronous=FULL (ours)"
    )
    return "\n\n".join(
        [
            f"# threadline benchmarks, {meta['date']}",
            f"{meta['machine']}, {meta['cores']} cores; Python {v['python']}, "
            f"threadline {v['threadline']}, langgraph {v['langgraph']} "
            f"(langgraph-checkpoint-sqlite {v['langgraph-checkpoint-sqlite']}), "
            f"SQLite {v['sqlite']}, redis-server {v['redis-server']}",
            peer_line,
            f"LangGraph / Redis: {report['peer_redis']}",
            "Every in-process run starts on a fresh heap (`gc.collect(); gc.freeze()`), so "
            "neither the other system's imports nor earlier workloads bill its GC pauses; "
            "W3 and memory run in fresh processes.",
        ]
    )


def _hooks_table(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            "memory (no I/O: the worst case)" if r["store"] == "memory" else "SQLite FULL",
            f"{r['no_hooks_us']:.1f}",
            f"{r['five_hooks_us']:.1f}",
            f"{r['five_hooks_us'] - r['no_hooks_us']:+.1f} us ({100 * r['overhead']:+.1f}%)",
        ]
        for r in results
    ]
    return (
        f"## Hook overhead: median turn of {results[0]['turns']}, the two systems taking "
        "turns, best of 3\n\n"
        + table(["store", "no hooks (us)", "5 no-op before_model hooks (us)", "difference"], rows)
        + "\n\nHooks cost CPU only, so the memory store (no I/O to hide it) is the strict "
        "measure; on SQLite the fsync time varies by more than the hooks cost."
    )


def _targets_table(rows: list[dict[str, Any]]) -> str:
    verdict = {True: "yes", False: "**no**", None: "n/a"}
    return "## Targets\n\n" + table(
        ["target", "measured", "holds"],
        [[t["target"], t["measured"], verdict[t["holds"]]] for t in rows],
    )


def _w1(results: list[dict[str, Any]], turns: int) -> str:
    rows = []
    for r in results:
        for c in r["checkpoints"]:
            rows.append([label(r), c["turn"], f"{c['latency_ms']:.2f}", f"{c['bytes']:.0f}"])
        rows.append(
            [
                label(r),
                f"{r['checkpoints'][-1]['turn']}/1",
                f"x{r['latency_ratio']:.2f}",
                f"x{r['bytes_ratio']:.2f}",
            ]
        )
    head = table(
        ["system / store", "turn", "latency ms (median of 9)", "bytes written/turn (median of 9)"],
        rows,
    )
    totals = table(
        [
            "system / store",
            "final state B",
            "stored B",
            "stored / state",
            "mean bytes/turn",
            "SQLite file growth B",
            "commits",
            "total s",
        ],
        [
            [
                label(r),
                r["state_bytes"],
                r["stored_bytes"],
                f"x{r['store_over_state']:.2f}",
                f"{r['bytes_mean_per_turn']:.0f}",
                _fmt(r["file_growth"]),
                r["commits"],
                f"{r['total_seconds']:.2f}",
            ]
            for r in results
        ],
    )
    return (
        f"## W1 history growth: one thread, {turns} turns (200-character messages)\n\n"
        f"{head}\n\n{totals}\n\n"
        "Bytes written: payloads handed to the store (threadline: step records and any "
        "full record; LangGraph: checkpoint, metadata and pending-write blobs). Stored: what "
        "the store holds for the thread at the end. SQLite file growth: database size after "
        "close (WAL checkpointed) minus its size with the schema alone. Final state: msgpack of "
        "the state (threadline) / the saver's serialization of the messages (LangGraph)."
    )


def _w2(results: list[dict[str, Any]]) -> str:
    r0 = results[0]
    rows = [
        [
            label(r),
            f"{r['turns_per_s']:.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['max_ms']:.2f}",
            f"{r['first_turn_p50_ms']:.1f} / {r['first_turn_p99_ms']:.1f}",
            f"{_fmt(r['later_p50_ms'], '.1f')} / {_fmt(r['later_p99_ms'], '.1f')}",
            f"{r['gc_seconds']:.2f} ({r['gc_longest_ms']:.0f})",
            r["commits"],
            f"{r['seconds']:.2f}",
        ]
        for r in results
    ]
    head = table(
        [
            "system / store",
            "turns/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "first turns p50 / p99 ms",
            "other turns p50 / p99 ms",
            "GC s (longest ms)",
            "commits",
            "wall s",
        ],
        rows,
    )
    return (
        f"## W2 concurrency: {r0['threads']} threads x {r0['turns_per_thread']} turns, "
        f"at most {r0['inflight']} in flight\n\n{head}\n\n"
        "First turns: threadline activates the thread's actor (takes ownership, loads). "
        "GC: time this process spent in the cyclic garbage collector during the run."
    )


def _w3(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            label(r),
            f"{r['open_ms']:.2f}",
            f"{r['load_ms']:.2f}",
            f"{r['turn_ms']:.2f}",
            f"{r['process_ms']:.0f}",
        ]
        for r in results
    ]
    head = table(
        ["system / store", "open ms", "cold load ms", "next turn ms", "whole child process ms"],
        rows,
    )
    r0 = results[0]
    return (
        f"## W3 rehydration: a {r0['turns']}-turn thread in a fresh process "
        f"(median of {r0['reps']})\n\n{head}\n\n"
        "Cold load: threadline `get_state` in a fresh ActorSystem, LangGraph `aget_state`. "
        "Next turn: threadline `ask` (activates the actor: ownership, load, replay, two "
        "durable steps), LangGraph `ainvoke`. The OS page cache is warm."
    )


def _raw_table(raw: dict[str, Any]) -> str:
    s, r = raw["sqlite"], raw["redis"]
    rows = [
        [
            "aiosqlite, 1 row (1 KiB) per transaction",
            "transactions/s",
            f"{s['single_tx_per_s']:.0f}",
        ],
        [
            "aiosqlite, 100 rows (1 KiB) per transaction",
            "rows/s (transactions/s)",
            f"{s['batched_rows_per_s']:.0f} ({s['batched_tx_per_s']:.0f})",
        ],
        ["redis-py asyncio, SET 1 KiB one at a time", "SET/s", f"{r['single_set_per_s']:.0f}"],
        [
            "redis-py asyncio, SET 1 KiB x100 pipelined",
            "SET/s (pipelines/s)",
            f"{r['pipelined_set_per_s']:.0f} ({r['pipelines_per_s']:.0f})",
        ],
    ]
    for o in raw["threadline"]:
        limit = "batched rows/s" if o["store"] == "sqlite" else "pipelined SET/s"
        rows.append(
            [
                f"{label(o)}, {o['threads']} threads at once",
                "durable commits/s (turns/s)",
                f"{o['commits_per_s']:.0f} ({o['turns_per_s']:.0f}) = "
                f"{o['fraction_of_limit']:.0%} of {limit}; GC {o['gc_seconds']:.2f} s "
                f"of {o['seconds']:.2f} s",
            ]
        )
    notes = "".join(
        f"\n\n{label(o)}: with the client of `RedisSnapshotStore.from_url` (redis-py's default "
        f"pool) {o['default_client_error']}; the figure above is with a client on a "
        f"{o['client']}."
        for o in raw["threadline"]
        if o.get("default_client_error")
    )
    return (
        "## Raw limits and threadline's durable commits/s (same run, same disk and server)\n\n"
        + table(["what", "measure", "rate"], rows)
        + "\n\nA threadline commit is one step (a turn is two: input and model); the first "
        "turn of every thread (activation) runs before the clock starts." + notes
    )


def _memory_table(m: dict[str, Any]) -> str:
    row = [
        m["threads"],
        f"{m['rss_per_thread']:.0f}",
        f"{m['state_bytes_per_thread']:.0f}",
        f"{m['beyond_state_per_thread']:.0f}",
        f"{m['state_python_bytes_per_thread']:.0f}",
        f"{m['beyond_python_state_per_thread']:.0f}",
        f"{(m['rss_after'] - m['rss_before']) / 2**20:.1f}",
        f"{m['activations_per_s']:.0f}",
    ]
    return (
        "## Memory: live idle threads in a fresh process (SQLite store on disk)\n\n"
        + table(
            [
                "threads",
                "RSS delta B/thread",
                "state B/thread (msgpack)",
                "beyond state B/thread",
                "state as Python objects B/thread",
                "beyond that B/thread",
                "RSS delta MiB",
                "activations/s",
            ],
            [row],
        )
        + "\n\nOne message each (`hello <n>`), answered with the 200-character reply; "
        "the target is on RSS delta minus the msgpack size of the state."
    )


def _cluster_table(c: dict[str, Any]) -> str:
    verdict = {True: "yes", False: "**no**"}
    holds = {name: verdict[ok] for name, _, ok in _cluster.targets(c)}
    names = list(holds)

    def ms(r: dict[str, Any]) -> str:
        return f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms (n={r['n']})"

    rows = []
    for i, f in enumerate(c["failover"]):
        rows.append(
            [
                f"failover, lease TTL {f['lease_ttl']:g} s: SIGKILL -> next committed step of "
                f"an orphaned thread, p50 / p99 ({f['kills']} kills, {f['orphaned_threads']} "
                f"threads; 2 workers, {f['partitions']} partitions)",
                f"{f['p50_s']:.2f} / {f['p99_s']:.2f} s (lease taken over after "
                f"{f['lease_moved_p50_s']:.2f} s p50)",
                "n/a (one process)",
                f"<= {f['lease_ttl'] + 2:g} s",
                holds[names[i]],
            ]
        )
    n = len(c["failover"])
    rows.append(
        [
            "tell acknowledgement (durable), p50 / p99",
            ms(c["tell"]["cluster"]),
            ms(c["tell"]["in_process"]),
            "p99 <= 5 ms",
            holds[names[n]],
        ]
    )
    rows.append(
        [
            "ask (Client -> worker process -> reply stream), p50 / p99",
            ms(c["ask"]["cluster"]),
            ms(c["ask"]["in_process"]),
            "p50 <= in-process + 3 ms",
            holds[names[n + 1]],
        ]
    )
    w2 = c["w2"]
    local = next(r for r in w2 if r["system"] == "in-process")
    sized = [r for r in w2 if r["system"] == "cluster" and r["client_pool"] > 16]
    one = next((r for r in sized if r["workers"] == 1), None)

    def run_name(r: dict[str, Any]) -> str:
        if r["system"] == "in-process":
            return "in process (ActorSystem)"
        pool = (
            "default pool of 16 connections"
            if r["client_pool"] <= 16
            else f"pool of {r['client_pool']} connections"
        )
        return f"Client ({pool}) + {r['workers']} worker process(es)"

    for r in w2:
        if r["system"] != "cluster":
            continue
        rows.append(
            [
                f"W2 through {run_name(r)}: turns/s, p99",
                f"{r['turns_per_s']:.0f} turns/s, p99 {r['p99_ms']:.1f} ms",
                f"{local['turns_per_s']:.0f} turns/s, p99 {local['p99_ms']:.1f} ms",
                "",
                "",
            ]
        )
    head = table(
        [
            "workload",
            "threadline cluster (Client + worker processes)",
            "in-process peer (ActorSystem, same Redis)",
            "target",
            "holds",
        ],
        rows,
    )

    def cores(r: dict[str, Any]) -> str:
        k = r["cpu_cores"]
        return (
            f"{_fmt(k['workers'] if r['workers'] else None, '.2f')} / {k['client']:.2f} / "
            f"{k['redis']:.2f} / {k['total']:.2f}"
        )

    def machine(r: dict[str, Any]) -> str:
        k = r["cpu_cores"]
        return f"{k['machine']:.2f} / {k['others']:.2f} / {k['iowait']:.2f}"

    cpu = table(
        [
            "W2 run",
            "turns/s",
            "p50 / p99 ms",
            "x 1 worker",
            "x in process",
            "CPU cores used: workers / client / redis-server / total",
            "machine busy / other processes / iowait (cores)",
            "Redis commands/turn",
            "wall s",
        ],
        [
            [
                run_name(r),
                f"{r['turns_per_s']:.0f}",
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
                _fmt(r["turns_per_s"] / one["turns_per_s"] if one else None, ".2f"),
                f"{r['turns_per_s'] / local['turns_per_s']:.2f}",
                cores(r),
                machine(r),
                f"{r['redis_commands_per_turn']:.1f}",
                f"{r['seconds']:.2f}",
            ]
            for r in w2
        ],
    )
    return (
        f"## Cluster: worker processes on one Redis (appendfsync always), "
        f"{c['cores']} cores\n\n{head}\n\n"
        f"### W2 ({local['threads']} threads x {local['turns_per_thread']} turns, "
        f"{local['inflight']} in flight): where the CPU goes\n\n{cpu}\n\n"
        "Workers are `threadline worker` processes serving a ScriptedModel agent that answers "
        "at once; the peer is an ActorSystem with the same agent on a RedisSnapshotStore of "
        "the same server. Failover: two workers; each kill is a SIGKILL of one of them right "
        "after its orphaned threads took a turn on it, then one ask per orphaned thread; the "
        "time runs from the kill to that ask's reply (sent once the step is committed); the "
        "killed worker is replaced and the partitions settle before the next kill. CPU: "
        "`/proc/<pid>/stat` of each worker, this process's own (the client), the server's "
        "`INFO cpu`, each over the wall time of the run; the total against the cores is the "
        "ceiling; machine busy (`/proc/stat`, every process) shows what the machine's other "
        "tenants took meanwhile. x 1 worker: against Client (a connection per request in "
        "flight) + 1 worker. Redis commands/turn: every command the server processed during "
        "the run (blocking reads that time out and lease renewals included) over the turns."
    )


# -- entry point ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from . import _soak

        _soak.main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument(
        "workloads", nargs="*", default=["all"], help=f"{' '.join(WORKLOADS)} or all (default)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the smoke test)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--no-peer", action="store_true", help="do not run the LangGraph peer")
    args = parser.parse_args(argv)
    workloads = list(WORKLOADS) if "all" in args.workloads else args.workloads
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)} or all")
    quiet_logs()
    sizes = QUICK if args.quick else FULL

    def show(text: str) -> None:
        print(text + "\n", flush=True)

    try:
        with redis_server(args.redis_url) as url:
            report = anyio.run(
                lambda: run_suite(workloads, sizes, url, peer=not args.no_peer, show=show)
            )
    finally:
        remove_temp_dirs()
    report["meta"]["quick"] = args.quick
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
