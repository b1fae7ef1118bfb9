"""A real Redis Cluster for the tests: three primaries, no replicas, on loopback.

Each node is a ``redis-server --cluster-enabled yes`` child process with its
own temporary directory, a free client port and a free cluster-bus port
(never 6379). ``redis-cli --cluster create`` assigns the 16384 slots; the
cluster is ready when every node reports ``cluster_state:ok`` and knows all
the others.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["ClusterNode", "RedisClusterProcesses", "free_port"]


def free_port(taken: set[int] | None = None) -> int:
    """A loopback port nobody listens on now (never 6379, nor one in ``taken``)."""
    taken = taken or set()
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379 and port not in taken:
            return port


class ClusterNode:
    """One cluster-enabled redis-server process."""

    def __init__(self, binary: str, directory: Path, port: int, bus_port: int) -> None:
        self.binary = binary
        self.dir = directory
        self.port = port
        self.bus_port = bus_port
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert 6379 not in (self.port, self.bus_port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.bus_port),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
                "--save",
                "",
                "--appendonly",
                "no",
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

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def wait_for_ping(self, deadline: float) -> None:
        client = self.client()
        try:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"cluster node {self.address} exited:\n{self.tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {self.address} did not answer PING")
                time.sleep(0.02)
        finally:
            client.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class RedisClusterProcesses:
    """``nodes`` primaries forming one cluster; ``start()`` returns when it serves."""

    def __init__(self, server: str, cli: str, directory: Path, nodes: int = 3) -> None:
        self.server = server
        self.cli = cli
        self.dir = directory
        self.size = nodes
        self.nodes: list[ClusterNode] = []

    @property
    def startup(self) -> tuple[str, int]:
        """Host and port of one node: enough for a cluster client to find the rest."""
        return "127.0.0.1", self.nodes[0].port

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        taken: set[int] = set()
        for i in range(self.size):
            port = free_port(taken)
            taken.add(port)
            bus = free_port(taken)
            taken.add(bus)
            node = ClusterNode(self.server, self.dir / f"node{i}", port, bus)
            self.nodes.append(node)
            node.start()
        for node in self.nodes:
            node.wait_for_ping(deadline)
        created = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=max(deadline - time.monotonic(), 1.0),
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        self._wait_until_ok(deadline)

    def _wait_until_ok(self, deadline: float) -> None:
        clients = [node.client() for node in self.nodes]
        try:
            while True:
                infos = []
                for client in clients:
                    try:
                        infos.append(client.cluster("INFO"))
                    except (redis.ConnectionError, redis.TimeoutError):
                        infos.append({})
                if all(
                    str(info.get("cluster_state")) == "ok"
                    and int(info.get("cluster_known_nodes", 0)) == self.size
                    and int(info.get("cluster_slots_ok", 0)) == 16384
                    for info in infos
                ):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not become ok: {infos}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def node_of_slot(self, slot: int) -> ClusterNode:
        """The node serving ``slot``, as the first node sees it."""
        client = self.nodes[0].client()
        try:
            text = client.execute_command("CLUSTER", "NODES")
        finally:
            client.close()
        lines = text.decode() if isinstance(text, bytes) else str(text)
        for line in lines.splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for spec in fields[8:]:
                if spec.startswith("["):
                    continue  # a slot being migrated or imported
                low, _, high = spec.partition("-")
                if int(low) <= slot <= int(high or low):
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, target: ClusterNode) -> None:
        """Reshard ``slot`` with its keys to ``target``, as ``redis-cli --cluster reshard`` does."""
        source = self.node_of_slot(slot)
        if source is target:
            return
        src, dst = source.client(), target.client()
        try:
            src_id = src.execute_command("CLUSTER", "MYID")
            dst_id = dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            for node in (target, source, *self.nodes):
                client = node.client()
                try:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                finally:
                    client.close()
        finally:
            src.close()
            dst.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
