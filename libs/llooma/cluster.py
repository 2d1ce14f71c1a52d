"""A NATS cluster on one machine: N nats-server nodes with JetStream, routed to each other on
loopback, each with its own ports and store (`llooma up --cluster 3`, the cluster tests).

Every node renders the same credentials, accounts and auth callout as the lone embedded
server, plus its name and a `cluster` block, and runs a callout responder of its own (one
queue group: a node's connections are answered by any responder the cluster can reach);
streams and buckets on it get 3 replicas (see bus.replicas_for), so any one node may die
without losing a stream, a hand-off or a settlement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llooma.credentials import CredentialStore
from llooma.embedded import EmbeddedNats
from llooma.processes import free_port, port_is_free

CLUSTER_NAME = "llooma"
# Replicas on a cluster of N nodes: 3, or N when it has fewer.
MAX_REPLICAS = 3


def node_name(index: int) -> str:
    return f"nats-{index + 1}"


def cluster_block(name: str, cluster_port: int, route_ports: list[int]) -> str:
    """A node's name and its `cluster` block (routes to every node, itself included: a server
    ignores the route to itself, and every node's config is then the same but for its name)."""
    routes = [f"nats-route://127.0.0.1:{port}" for port in route_ports]
    return (
        f"server_name: {json.dumps(name)}\n"
        "cluster {\n"
        f"  name: {json.dumps(CLUSTER_NAME)}\n"
        f'  listen: "127.0.0.1:{cluster_port}"\n'
        f"  routes: {json.dumps(routes)}\n"
        "}\n"
    )


def replicas_for_size(size: int) -> int:
    return min(MAX_REPLICAS, size)


@dataclass
class NatsCluster:
    """N clustered nodes under `root/nats-<i>`; `kill(i)` and `restart(i)` for fault tests."""

    root: Path
    client_ports: list[int]
    cluster_ports: list[int]
    credentials: CredentialStore | None = None
    nodes: list[EmbeddedNats | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.client_ports)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what NATS_URL takes)."""
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.client_ports)

    @property
    def replicas(self) -> int:
        return replicas_for_size(self.size)

    def node_dir(self, index: int) -> Path:
        return self.root / node_name(index)

    @classmethod
    def start(
        cls,
        root: Path,
        size: int = 3,
        *,
        credentials: CredentialStore | None = None,
        client_ports: list[int] | None = None,
    ) -> NatsCluster:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        # A restarted `llooma up --cluster` keeps its nodes' ports: hosts' configs name them.
        if client_ports is None:
            client_ports = [_kept_port(root / node_name(i) / "port") for i in range(size)]
        cluster_ports = [_kept_port(root / node_name(i) / "cluster_port") for i in range(size)]
        cluster = cls(root, client_ports, cluster_ports, credentials)
        for index, port in enumerate(cluster_ports):
            (root / node_name(index)).mkdir(parents=True, exist_ok=True)
            (root / node_name(index) / "cluster_port").write_text(str(port))
            (root / node_name(index) / "port").write_text(str(client_ports[index]))
        if credentials is not None:
            credentials.control_plane_seed()
        try:
            for index in range(size):
                cluster.nodes.append(cluster._start_node(index))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_node(self, index: int) -> EmbeddedNats:
        extra = cluster_block(node_name(index), self.cluster_ports[index], self.cluster_ports)
        return EmbeddedNats.start(
            self.node_dir(index),
            self.client_ports[index],
            credentials=self.credentials,
            extra_config=extra,
        )

    def node(self, index: int) -> EmbeddedNats:
        running = self.nodes[index]
        if running is None:
            raise RuntimeError(f"{node_name(index)} is not running")
        return running

    def kill(self, index: int) -> int:
        """kill -9 one node (a fault: its memory is gone, its files stay); returns its pid."""
        node = self.node(index)
        node.process.kill()
        node.process.wait()
        # Its callout responder goes with it (a restart starts another).
        node.stop_responder()
        self.nodes[index] = None
        return node.process.pid

    def restart(self, index: int) -> None:
        """Start a killed (or stopped) node again on the same ports and store."""
        if self.nodes[index] is not None:
            self.node(index).stop()
        self.nodes[index] = self._start_node(index)

    def pids(self) -> list[int]:
        return [node.process.pid for node in self.nodes if node is not None]

    def stop(self) -> None:
        for node in self.nodes:
            if node is not None:
                node.stop()
        self.nodes = [None] * len(self.nodes)


def _kept_port(path: Path) -> int:
    """The port a node used last time (kept in its folder) if it is free, else a free one."""
    if path.exists():
        port = int(path.read_text())
        if port_is_free(port):
            return port
    return free_port()


def node_dirs(data_dir: Path) -> list[Path]:
    """The NATS data folders `llooma up` left under `data_dir`: the lone server's, or each
    cluster node's (each checked by `llooma hosts add/revoke`)."""
    return [d for d in [data_dir / "nats", *sorted(data_dir.glob("nats-*"))] if d.is_dir()]
