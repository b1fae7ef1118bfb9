"""Shared fixtures: the anyio backend, a private redis-server, snapshot stores.

The redis server runs on a free loopback port in a temporary directory (never
127.0.0.1:6379), and so do the nodes of the 3-node Redis Cluster. Tests are
isolated by a unique key prefix, not by flushing. Without a ``redis-server``
binary the redis tests are skipped, unless ``THREADLINE_REQUIRE_REDIS=1``
turns that into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from threadline.persistence import (
    MemorySnapshotStore,
    RedisSnapshotStore,
    SnapshotStore,
    SqliteSnapshotStore,
)

from ._cluster import RedisClusterProcesses

STORE_KINDS = ("memory", "sqlite", "redis")
CLUSTER_KIND = "redis-cluster"
"""A ``RedisSnapshotStore`` on a ``RedisCluster`` client of the 3-node cluster."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- redis-server -------------------------------------------------------------


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


class RedisServer:
    """A redis-server child process with append-only durability (fsync always)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        """Start (or restart, same port and dir) and wait until PING answers."""
        assert self.port != 6379
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.log),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                if self.proc.poll() is not None:
                    log = self.log.read_text(errors="replace") if self.log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{log}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save, no goodbye to the clients)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server binary not found"
        if os.environ.get("THREADLINE_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message} (THREADLINE_REQUIRE_REDIS=1)")
        pytest.skip(message)
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RuntimeError:
        # The port may have been taken between probing and binding: one more try.
        server.port = _free_port()
        server.start()
    try:
        yield server
    finally:
        server.stop()


# -- snapshot stores ------------------------------------------------------------

OpenStore = Callable[..., SnapshotStore]


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid4().hex}"


@pytest.fixture
def open_store(request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str) -> OpenStore:
    """``open_store(kind, **options)``: a new, not yet entered store on this test's backend.

    Every store of a kind made by the same test shares its backend: the memory
    store is one shared instance, sqlite stores open ``tmp_path / "threads.db"``
    (or ``path=``), redis stores use the test's server and key prefix (or
    ``prefix=``) -- so a second store stands for a second process. A
    ``"redis-cluster"`` store has a cluster client of its own, which it closes
    on exit (as a store made by ``from_url`` does).
    """
    memory = MemorySnapshotStore()

    def _open(kind: str, **options: Any) -> SnapshotStore:
        if kind == "memory":
            return memory
        if kind == "sqlite":
            path = options.pop("path", tmp_path / "threads.db")
            return SqliteSnapshotStore(path, **options)
        if kind == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            prefix = str(options.pop("prefix", redis_prefix))
            return RedisSnapshotStore.from_url(server.url, prefix=prefix, **options)
        if kind == CLUSTER_KIND:
            cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
            prefix = str(options.pop("prefix", redis_prefix))
            host, port = cluster.startup
            store = RedisSnapshotStore(RedisCluster(host=host, port=port), prefix=prefix, **options)
            store._owns_client = True
            return store
        raise ValueError(f"unknown store kind {kind!r}")

    return _open


def store_kind_params(*kinds: str) -> list[Any]:
    """``kinds`` as parameters of a ``store_kind`` fixture (redis ones marked ``redis``)."""
    return [
        pytest.param(kind, id=kind, marks=pytest.mark.redis if kind.startswith("redis") else ())
        for kind in kinds
    ]


def start_backend(request: pytest.FixtureRequest, kind: str) -> str:
    """Start the server or cluster ``kind`` needs (or skip before the test); ``kind``."""
    if kind == "redis":
        request.getfixturevalue("redis_server")
    elif kind == CLUSTER_KIND:
        request.getfixturevalue("redis_cluster")
    return kind


@pytest.fixture(params=store_kind_params(*STORE_KINDS))
def store_kind(request: pytest.FixtureRequest) -> str:
    return start_backend(request, str(request.param))


@pytest.fixture
async def snapshot_store(store_kind: str, open_store: OpenStore) -> AsyncIterator[SnapshotStore]:
    async with open_store(store_kind) as store:
        yield store


# -- a 3-node Redis Cluster -------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """Three cluster-enabled redis-servers on free loopback ports, slots assigned.

    Skipped without ``redis-server`` or ``redis-cli``, unless
    ``THREADLINE_REQUIRE_REDIS=1`` (then it fails). Torn down at session end.
    """
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "redis-server or redis-cli binary not found"
        if os.environ.get("THREADLINE_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message} (THREADLINE_REQUIRE_REDIS=1)")
        pytest.skip(message)
    cluster = RedisClusterProcesses(server, cli, tmp_path_factory.mktemp("redis-cluster"))
    try:
        try:
            cluster.start()
        except RuntimeError:
            # A port may have been taken between probing and binding: one more try.
            cluster.stop()
            cluster = RedisClusterProcesses(server, cli, tmp_path_factory.mktemp("redis-cluster"))
            cluster.start()
        yield cluster
    finally:
        cluster.stop()
