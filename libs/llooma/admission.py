"""Admitting and revoking hosts on the embedded NATS server, verified, not assumed.

The server's config names no host: it asks the control plane about every host connection
(auth callout, llooma.callout), and the answer comes from the credential store's registry.
`llooma hosts add` is therefore one registry entry, and nothing is reloaded; `revoke` removes
the entry and then closes the host's live connections on every server of a cluster through
the system account (CONNZ to find them, KICK to close them). Either is then checked the only
way that cannot lie: by connecting with the host's key on every server, which must be
accepted after `add` and refused after `revoke`, and, after `revoke`, by asking every server
for the key's connections, of which none may remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nats
import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.cluster import node_dirs
from llooma.credentials import HOSTS_ACCOUNT, CredentialStore, public_key

# How long a change may take to show: the registry is read on the next connection.
VERIFY_TIMEOUT_S = 2.0
# How long to wait for every server's answer to a system request.
SYSTEM_REPLY_S = 1.0


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


async def _wait_for(url: str, seed: str, accepted: bool) -> bool:
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    while True:
        if await _accepted(url, seed) is accepted:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


def node_ports(data_dir: Path) -> list[tuple[Path, int]]:
    """(folder, client port) of the lone embedded server, or of each `up --cluster` node."""
    found = []
    for folder in node_dirs(data_dir.resolve()):
        try:
            found.append((folder, int((folder / "port").read_text().strip())))
        except (OSError, ValueError):
            continue
    return found


def _running(folder: Path) -> bool:
    try:
        os.kill(int((folder / "nats-server.pid").read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


async def _ask_every_server(
    nc: Client, subject: str, body: Mapping[str, object], servers: int
) -> list[dict[str, object]]:
    """A system request answered by each server (PING) or one: every answer until `servers`
    have come or SYSTEM_REPLY_S passed."""
    inbox = nc.new_inbox()
    answers: list[dict[str, object]] = []
    complete = asyncio.Event()

    async def on_answer(msg: Msg) -> None:
        answers.append(json.loads(msg.data))
        if len(answers) >= servers:
            complete.set()

    subscription = await nc.subscribe(inbox, cb=on_answer)
    await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(complete.wait(), SYSTEM_REPLY_S)
    await subscription.unsubscribe()
    return answers


async def connections_of(nc: Client, key: str, servers: int) -> list[tuple[str, int]]:
    """(server id, connection id) of every connection holding `key`, on every server."""
    found = []
    query = {"acc": HOSTS_ACCOUNT, "user": key}
    for answer in await _ask_every_server(nc, subjects.SERVERS_CONNZ, query, servers):
        server = answer.get("server", {})
        data = answer.get("data") or {}
        if not isinstance(server, dict) or not isinstance(data, dict):
            continue
        for connection in data.get("connections") or []:
            found.append((str(server.get("id", "")), int(connection["cid"])))
    return found


async def disconnect(urls: list[str], system_seed: str, key: str) -> list[tuple[str, int]]:
    """Close every connection of `key` on every server; returns those still open after."""
    nc = await nats.connect(urls, nkeys_seed_str=system_seed, connect_timeout=2)
    try:
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        while True:
            left = await connections_of(nc, key, len(urls))
            if not left or time.monotonic() > deadline:
                return left
            for server_id, cid in left:
                await _ask_every_server(nc, subjects.server_kick(server_id), {"cid": cid}, 1)
    finally:
        await nc.close()


async def _apply(
    running: list[tuple[Path, str]], seed: str, admitted: bool, system_seed: str
) -> Outcome:
    urls = [url for _, url in running]
    left: list[tuple[str, int]] = []
    if not admitted:
        left = await disconnect(urls, system_seed, public_key(seed.encode()))
    checks = [_wait_for(url, seed, admitted) for url in urls]
    verdicts = await asyncio.gather(*checks)
    late = [url for url, done in zip(urls, verdicts, strict=True) if not done]
    if not late and not left:
        done = "admitted" if admitted else "refused, and its connections closed"
        return Outcome(True, f"the running NATS server ({', '.join(urls)}): the key is {done}")
    if left:
        return Outcome(False, f"{len(left)} connection(s) of the key stayed open: {left}")
    return Outcome(
        False,
        f"the running NATS server ({', '.join(late)}) did not apply the change within "
        f"{VERIFY_TIMEOUT_S:.0f} s; see "
        + ", ".join(str(folder / "callout.log") for folder, _ in running),
    )


def apply(data_dir: Path, seed: str, *, admitted: bool) -> Outcome:
    """Check `seed` is (not) admitted on the embedded server, on each node of a cluster;
    after a revocation, close its live connections first."""
    nodes = node_ports(data_dir)
    if not nodes:
        return Outcome(True, "no embedded NATS server has run here; `llooma up` will use this")
    running = [(folder, f"nats://127.0.0.1:{port}") for folder, port in nodes if _running(folder)]
    if not running:
        return Outcome(True, "no NATS server is running here; the next `llooma up` uses this")
    store = CredentialStore(data_dir.resolve() / "credentials")
    system_seed = store.system_seed().read_text().strip()
    return asyncio.run(_apply(running, seed, admitted, system_seed))


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
