"""Admitting and revoking hosts on the embedded NATS server, verified, not assumed.

`llooma hosts add` / `revoke` re-render the server's config from the credential store and
reload it (SIGHUP), then check the result the only way that cannot lie: by connecting with
the host's key, which must be accepted after `add` and refused after `revoke`. A reload the
server rejects (it keeps its old config and says so only in its log) is reported as a failure.
On reload the server also closes every connection whose key it no longer knows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import yaml

from llooma.cluster import node_dirs
from llooma.credentials import CredentialStore, reload_nats
from llooma.embedded import write_nats_config

# How long a change may take to show: the server applies a reload in milliseconds.
VERIFY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


def nats_dir(data_dir: Path) -> Path:
    return data_dir.resolve() / "nats"


def embedded_port(data_dir: Path) -> int | None:
    port_file = nats_dir(data_dir) / "port"
    try:
        return int(port_file.read_text().strip())
    except (OSError, ValueError):
        return None


async def _accepted(url: str, seed: str) -> bool | None:
    """True: the server took the key; False: it refused it; None: no answer."""
    refused: list[str] = []

    async def on_error(error: Exception) -> None:
        refused.append(str(error))

    try:
        client = await nats.connect(
            url,
            nkeys_seed_str=seed,
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=1,
            max_reconnect_attempts=0,
        )
    except Exception as error:  # nats-py raises several unrelated types here
        text = f"{error} {' '.join(refused)}".lower()
        return False if "authorization" in text else None
    await client.close()
    return True


def _wait_for(url: str, seed: str, accepted: bool) -> bool:
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    while True:
        if asyncio.run(_accepted(url, seed)) is accepted:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def node_ports(data_dir: Path) -> list[tuple[Path, int]]:
    """(folder, client port) of the lone embedded server, or of each `up --cluster` node."""
    found = []
    for folder in node_dirs(data_dir.resolve()):
        try:
            found.append((folder, int((folder / "port").read_text().strip())))
        except (OSError, ValueError):
            continue
    return found


def apply(data_dir: Path, seed: str, *, admitted: bool) -> Outcome:
    """Reload the embedded server (every node of a cluster) with the store's keys; check
    `seed` is (not) admitted on each."""
    nodes = node_ports(data_dir)
    if not nodes:
        return Outcome(True, "no embedded NATS server has run here; `llooma up` will use this")
    store = CredentialStore(data_dir.resolve() / "credentials")
    running = []
    for folder, port in nodes:
        write_nats_config(folder, store, port)
        if reload_nats(folder / "nats-server.pid"):
            running.append((folder, f"nats://127.0.0.1:{port}"))
    if not running:
        return Outcome(True, "no NATS server is running here; the next `llooma up` uses this")
    late = [(folder, url) for folder, url in running if not _wait_for(url, seed, admitted)]
    urls = ", ".join(url for _, url in running)
    if not late:
        done = "admitted" if admitted else "refused, and its connections closed"
        return Outcome(True, f"the running NATS server ({urls}) reloaded: the key is {done}")
    return Outcome(
        False,
        f"the running NATS server ({', '.join(url for _, url in late)}) did not apply the "
        f"change within {VERIFY_TIMEOUT_S:.0f} s; see "
        + ", ".join(str(folder / "nats-server.log") for folder, _ in late),
    )


def host_yaml(name: str, data_dir: Path, seed_path: Path) -> str:
    """A ready host config for `llooma host --config`: edit the model to what it serves."""
    ports = [port for _, port in node_ports(data_dir)] or [embedded_port(data_dir) or 4222]
    config = {
        "name": name,
        "nats_url": ",".join(f"nats://127.0.0.1:{port}" for port in ports),
        "credentials": str(seed_path.resolve()),
        "models": [
            {
                "name": "my-model",
                "backend": "openai",
                "base_url": "http://127.0.0.1:8000/v1",
                "metrics_url": "http://127.0.0.1:8000/metrics",
                "capacity": 4,
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)
