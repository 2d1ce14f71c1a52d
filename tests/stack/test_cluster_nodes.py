"""`llooma up --cluster` nodes: `llooma hosts add/revoke` admit a host, and cut it off, on
each node without touching any node's config (auth callout); a restarted cluster keeps its
ports, its R3 streams and their messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from llooma import bus, subjects
from llooma.cli import app
from llooma.cluster import NatsCluster
from llooma.credentials import CredentialStore


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    root = tmp_path_factory.mktemp("cluster-creds")
    running = NatsCluster.start(root, 3, credentials=CredentialStore(root / "credentials"))
    yield running
    running.stop()


async def admitted(url: str, seed: Path) -> bool:
    try:
        async with asyncio.timeout(3):
            nc = await bus.connect(url, "llooma-tests-host", nkey_seed_file=str(seed), attempts=1)
    except (TimeoutError, ConnectionError):
        return False
    await nc.close()
    return True


async def test_a_host_is_admitted_and_cut_off_on_every_node(cluster: NatsCluster) -> None:
    """Admitted on every node with no node's config touched; on revocation, a live connection
    to each node is closed within 2 s of the registry change, and no node takes the key back."""
    configs = [(cluster.node_dir(i) / "nats.conf").read_text() for i in range(3)]
    runner = CliRunner()
    added = await asyncio.to_thread(
        runner.invoke, app, ["hosts", "add", "edge-1", "--data-dir", str(cluster.root)]
    )
    assert added.exit_code == 0, added.output
    assert cluster.credentials is not None
    seed = cluster.credentials.seed_path("edge-1")
    for url in cluster.url.split(","):
        assert await admitted(url, seed), url
    cut_off: dict[str, float] = {}
    live = []
    for url in cluster.url.split(","):

        async def on_disconnect(url: str = url) -> None:
            cut_off.setdefault(url, time.time())

        live.append(
            await nats.connect(
                url,
                nkeys_seed_str=seed.read_text().strip(),
                disconnected_cb=on_disconnect,
                dont_randomize=True,
                reconnect_time_wait=0.1,
                max_reconnect_attempts=-1,
            )
        )
    revoked = await asyncio.to_thread(
        runner.invoke, app, ["hosts", "revoke", "edge-1", "--data-dir", str(cluster.root)]
    )
    assert revoked.exit_code == 0, revoked.output
    revoked_at = cluster.credentials.registry_path.stat().st_mtime
    try:
        assert set(cut_off) == set(cluster.url.split(",")), cut_off
        after = {url: round(at - revoked_at, 3) for url, at in cut_off.items()}
        print(f"cut off after revocation, per node (s): {after}")
        assert all(seconds < 2.0 for seconds in after.values()), after
        # Reconnecting all along (every 0.1 s), none is back in.
        await asyncio.sleep(1.0)
        assert not any(nc.is_connected for nc in live)
    finally:
        for nc in live:
            await nc.close()
    for url in cluster.url.split(","):
        assert not await admitted(url, seed), url
    assert [(cluster.node_dir(i) / "nats.conf").read_text() for i in range(3)] == configs


async def test_a_restarted_cluster_keeps_its_ports_streams_and_messages(tmp_path: Path) -> None:
    first = NatsCluster.start(tmp_path, 3)
    try:
        nc = await bus.connect(first.url, "llooma-tests-cluster")
        js = nc.jetstream()
        assert await bus.keep_topology(js, "test", timeout_s=60)
        await bus.hand_off(js, subjects.SETTLEMENT_TASK, b"kept", "m-1", budget_s=10)
        await nc.close()
    finally:
        first.stop()
    again = NatsCluster.start(tmp_path, 3)
    try:
        assert again.client_ports == first.client_ports
        nc = await bus.connect(again.url, "llooma-tests-cluster")
        js = nc.jetstream()
        assert await bus.keep_topology(js, "test", timeout_s=60)
        info = await js.stream_info(subjects.SETTLEMENT_STREAM)
        assert info.config.num_replicas == 3
        assert info.state.messages == 1
        await nc.close()
    finally:
        again.stop()
