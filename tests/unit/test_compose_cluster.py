"""docker-compose.cluster.yml (the stack on a 3-node NATS cluster, over docker-compose.yml)
stays in step with the base file and the code: static checks and `nats-server -t`."""

from __future__ import annotations

import subprocess
from functools import cache
from typing import Any

import pytest
import yaml

from llooma import bus
from llooma.embedded import nats_server_binary
from llooma.host.config import HostConfig
from tests.unit.test_compose import (
    HOST_CONFIG_TARGET,
    ROOT,
    bind_mounts,
    command_of,
    compose_services,
    environment_of,
    host_worker_configs,
    service_folders,
)

CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
NODES = 3
ROUTE_PORT = 6222


@cache
def overrides() -> dict[str, dict[str, Any]]:
    loaded = yaml.safe_load(CLUSTER_FILE.read_text())
    services = loaded.get("services")
    assert isinstance(services, dict), f"{CLUSTER_FILE.name} has no `services` mapping"
    return services


def merged(name: str) -> dict[str, Any]:
    """A service as compose merges it: the override's keys over the base's."""
    return {**compose_services().get(name, {}), **overrides().get(name, {})}


def nats_nodes() -> dict[str, list[str]]:
    """Node name -> its nats-server arguments."""
    nodes = {}
    for name in {*compose_services(), *overrides()}:
        definition = merged(name)
        if str(definition.get("image", "")).startswith("nats:"):
            nodes[name] = command_of(definition)
    return nodes


def option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def test_three_nodes_route_to_each_other_with_jetstream() -> None:
    nodes = nats_nodes()
    assert len(nodes) == NODES, f"{CLUSTER_FILE.name} runs {sorted(nodes)}"
    names = {option(args, "--name") for args in nodes.values()}
    assert len(names) == NODES, "two nodes share a server name"
    assert {option(args, "--cluster_name") for args in nodes.values()} == {"llooma"}
    for node, args in nodes.items():
        assert "-js" in args, f"{node} runs without JetStream"
        routes = option(args, "--routes").split(",")
        hosts = {r.removeprefix("nats-route://").partition(":")[0] for r in routes}
        assert hosts == set(nodes), f"{node} routes to {hosts}, not to every node"
        assert all(r.endswith(f":{ROUTE_PORT}") for r in routes)
        assert option(args, "--cluster").endswith(f":{ROUTE_PORT}")
        stores = [src for src, dst in bind_mounts(merged(node)) if dst == "/data"]
        assert len(stores) == 1, f"{node} has no store of its own at /data"


@pytest.mark.parametrize("node", sorted(nats_nodes()))
def test_each_nodes_config_and_flags_pass_nats_server_check(node: str) -> None:
    args = nats_nodes()[node]
    config = option(args, "-c")
    sources = [src for src, dst in bind_mounts(merged(node)) if dst == config]
    assert sources, f"{node}: nothing is mounted at {config}"
    local = [*args]
    local[local.index(config)] = str(ROOT / sources[0])
    checked = subprocess.run(
        [nats_server_binary(), *local, "-t"], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr or checked.stdout
    store = {src for src, dst in bind_mounts(merged(node)) if dst == "/data"}
    others = {
        src
        for other in nats_nodes()
        if other != node
        for src, dst in bind_mounts(merged(other))
        if dst == "/data"
    }
    assert not store & others, f"{node} shares its store with another node"


@pytest.mark.parametrize("folder", service_folders())
def test_every_service_lists_every_node_and_asks_for_three_replicas(folder: str) -> None:
    environment = {
        **environment_of(compose_services()[folder]),
        **environment_of(overrides().get(folder, {})),
    }
    servers = bus.server_list(environment.get("NATS_URL", ""))
    hosts = {url.removeprefix("nats://").partition(":")[0] for url in servers}
    assert hosts == set(nats_nodes()), f"{folder}: NATS_URL names {hosts}"
    assert environment.get("LLOOMA_NATS_REPLICAS") == str(NODES)


@pytest.mark.parametrize("worker", sorted(host_worker_configs()))
def test_every_host_lists_every_node(worker: str) -> None:
    mounts = [
        src for src, dst in bind_mounts(overrides().get(worker, {})) if dst == HOST_CONFIG_TARGET
    ]
    assert mounts, f"{worker}: {CLUSTER_FILE.name} mounts no cluster config for it"
    path = ROOT / mounts[0]
    config = HostConfig.model_validate(yaml.safe_load(path.read_text()))
    hosts = {u.removeprefix("nats://").partition(":")[0] for u in bus.server_list(config.nats_url)}
    assert hosts == set(nats_nodes()), f"{path.name}: nats_url names {hosts}"
