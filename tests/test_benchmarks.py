"""The benchmark suite runs end to end at its ``--quick`` size (so it cannot rot).

Both runs use the session's redis-server (``--redis-url``): the suite starts
no server of its own. Both hide ``psutil`` behind a package that fails to
import: the suite (the memory workload's RSS included) needs nothing beyond
the ``test`` extra, whether or not psutil happens to be installed here. The
second run also hides ``langgraph``, so the peer-less path is exercised
whether or not langgraph is installed here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from benchmarks._common import rss_bytes

if TYPE_CHECKING:
    from tests.conftest import RedisServer

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("w1", "w2", "w3", "raw", "memory", "hooks", "cluster")


def _hide(tmp_path: Path, *packages: str) -> dict[str, str]:
    """Environment whose PYTHONPATH puts first a package per name that fails to import."""
    shadow = tmp_path / "shadow"
    for name in packages:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("{name} hidden by the test", name="{name}")\n'
        )
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def _langgraph_importable() -> bool:
    try:
        return all(
            importlib.util.find_spec(m) is not None
            for m in ("langgraph", "langgraph.checkpoint.sqlite.aio")
        )
    except ImportError:
        return False


def _run(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _by_system(results: list[dict[str, Any]], system: str) -> set[str]:
    return {r["store"] for r in results if r["system"] == system}


def test_rss_bytes_is_this_process_resident_memory() -> None:
    def status_rss() -> int:
        status = Path("/proc/self/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kib) * 1024

    assert abs(rss_bytes() - status_rss()) < 4 << 20  # the same counter, read twice
    before = rss_bytes()
    block = b"x" * (32 << 20)  # written, so every page is resident
    grown = rss_bytes() - before
    assert 30 << 20 <= grown <= 40 << 20, grown
    del block


@pytest.mark.slow
@pytest.mark.redis
def test_quick_suite_runs_every_workload(redis_server: RedisServer, tmp_path: Path) -> None:
    stdout, report = _run(
        ["all", "--redis-url", redis_server.url], tmp_path, _hide(tmp_path, "psutil")
    )
    peer = _langgraph_importable()
    assert report["peer"]["available"] is peer
    for workload in WORKLOADS:
        assert workload in report, workload
    assert report["meta"]["quick"] is True
    assert report["meta"]["versions"]["python"]
    # Every workload has threadline on both stores; the peer's figures when it can run.
    for workload in ("w1", "w2", "w3"):
        assert _by_system(report[workload], "threadline") == {"sqlite", "redis"}, workload
        expected = ({"sqlite", "memory"} if workload != "w3" else {"sqlite"}) if peer else set()
        assert _by_system(report[workload], "langgraph") == expected, workload

    turns = report["meta"]["sizes"]["w1_turns"]
    for r in report["w1"]:
        assert r["turns"] == turns
        assert r["checkpoints"][0]["turn"] == 1
        assert r["checkpoints"][-1]["turn"] == turns
        for c in r["checkpoints"]:
            assert _positive(c["latency_ms"]) and _positive(c["bytes"])
        for key in ("latency_ratio", "bytes_ratio", "store_over_state", "state_bytes"):
            assert _positive(r[key]), (key, r)
        # Two durable steps per threadline turn: input and model.
        if r["system"] == "threadline":
            assert r["commits"] == 2 * turns
            assert r["stored_bytes"] > r["state_bytes"] / 2
        if r["store"] == "sqlite":
            assert _positive(r["file_growth"])

    for r in report["w2"]:
        assert _positive(r["turns_per_s"])
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        if r["system"] == "threadline":
            assert r["commits"] == 2 * r["threads"] * r["turns_per_thread"]

    for r in report["w3"]:
        assert len(r["runs"]) == r["reps"] >= 1
        for key in ("open_ms", "load_ms", "turn_ms", "process_ms"):
            assert _positive(r[key]), (key, r)

    raw = report["raw"]
    for key in ("single_tx_per_s", "batched_tx_per_s", "batched_rows_per_s"):
        assert _positive(raw["sqlite"][key])
    for key in ("single_set_per_s", "pipelined_set_per_s"):
        assert _positive(raw["redis"][key])
    assert {r["store"] for r in raw["threadline"]} == {"sqlite", "redis"}
    for r in raw["threadline"]:
        assert _positive(r["commits_per_s"]) and _positive(r["fraction_of_limit"])

    assert {r["store"] for r in report["hooks"]} == {"memory", "sqlite"}
    for r in report["hooks"]:
        assert _positive(r["no_hooks_us"]) and _positive(r["five_hooks_us"])

    memory = report["memory"]
    assert memory["live_threads"] >= memory["threads"] > 0
    assert memory["rss_after"] > memory["rss_before"] > 0
    assert _positive(memory["state_bytes_per_thread"])

    # The cluster: worker processes were killed and replaced, and served every figure.
    cluster = report["cluster"]
    for f in cluster["failover"]:
        assert f["kills"] >= 1 and len(f["samples_s"]) == f["orphaned_threads"] >= 1, f
        assert 0 < f["lease_moved_p50_s"] <= f["max_s"], f  # the lease moved before the step
        assert 0 < f["p50_s"] <= f["p99_s"] <= f["max_s"], f
    for part in ("tell", "ask"):
        for side in ("cluster", "in_process"):
            r = cluster[part][side]
            assert r["n"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"], (part, side)
    sized = report["meta"]["sizes"]["cluster_workers"]
    assert [r["workers"] for r in cluster["w2"]] == [0, 1, *sized]  # 1: the default pool
    for r in cluster["w2"]:
        assert _positive(r["turns_per_s"]) and _positive(r["cpu_cores"]["client"]), r
        assert _positive(r["cpu_cores"]["workers"]) == (r["workers"] > 0), r

    # The targets table: one row per target, each with a verdict (None only without the peer).
    names = [t["target"] for t in report["targets"]]
    assert any(n.startswith("W1 SQLite bytes/turn") for n in names)
    assert any(n.startswith("W1 Redis latency") for n in names)
    assert any(n.startswith("W3 cold load") for n in names)
    assert sum(n.startswith("durable commits/s") for n in names) == 2
    assert any(n.startswith("memory beyond state") for n in names)
    assert any(n.startswith("a turn with 5 no-op hooks") for n in names)
    assert sum(n.startswith("failover (lease TTL") for n in names) == len(cluster["failover"])
    assert any(n.startswith("Client.tell acknowledgement") for n in names)
    assert any(n.startswith("remote ask p50") for n in names)
    for t in report["targets"]:
        assert (t["holds"] is None) == (not peer and "LangGraph" in t["target"]), t

    for heading in (
        "## W1",
        "## W2",
        "## W3",
        "## Raw limits",
        "## Memory",
        "## Cluster",
        "## Targets",
    ):
        assert heading in stdout
    assert "RediSearch" in stdout  # the peer's Redis saver is reported, not faked


@pytest.mark.slow
@pytest.mark.redis
def test_quick_suite_without_langgraph(redis_server: RedisServer, tmp_path: Path) -> None:
    stdout, report = _run(
        ["w1", "w2", "w3", "--redis-url", redis_server.url],
        tmp_path,
        _hide(tmp_path, "langgraph", "psutil"),
    )
    assert report["peer"]["available"] is False
    assert "langgraph hidden by the test" in report["peer"]["skipped"]
    assert "LangGraph peer skipped" in stdout
    for workload in ("w1", "w2", "w3"):
        assert _by_system(report[workload], "threadline") == {"sqlite", "redis"}
        assert _by_system(report[workload], "langgraph") == set()
    assert "raw" not in report and "memory" not in report
    peer_targets = [t for t in report["targets"] if "LangGraph" in t["target"]]
    assert len(peer_targets) == 3
    assert all(t["holds"] is None and "peer skipped" in t["measured"] for t in peer_targets)
    assert all(t["holds"] is not None for t in report["targets"] if t not in peer_targets)
