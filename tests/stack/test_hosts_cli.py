"""`llooma up` and `llooma hosts add` / `revoke` exactly as the README writes them, on a
running stack of this module's own: no demo hosts, a fixed NATS port it prints, a ready host
YAML, admission and revocation that are real (a revoked host is cut off within 2 s and cannot
come back), and no way to hand out the control plane's key."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest
import yaml

from llooma import bus
from llooma.host.config import HostConfig
from llooma.processes import die_with_parent, free_port
from tests.conftest import AUTH
from tests.support.ledger_db import new_database


@dataclass
class Running:
    folder: Path
    http_port: int
    nats_port: int
    output: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def llooma(folder: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One `llooma` command, run from the folder `llooma up` runs in."""
    return subprocess.run(
        [sys.executable, "-m", "llooma.cli", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("readme")
    http_port, nats_port = free_port(), free_port()
    output = folder / "up.log"
    env = {
        **os.environ,
        "COLUMNS": "200",
        "LLOOMA_HTTP_PORT": str(http_port),
        "LLOOMA_NATS_PORT": str(nats_port),
        "DATABASE_URL": new_database(database_url, "readme"),
    }
    env.pop("NATS_URL", None)
    with output.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llooma.cli", "up", "--no-demo-hosts"],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        deadline = time.monotonic() + 120
        while "LLooMA is up" not in output.read_text():
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        yield Running(folder, http_port, nats_port, output)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def models_listed(running: Running) -> list[str]:
    response = httpx.get(f"{running.base_url}/v1/models", headers=AUTH, timeout=5)
    return [m["id"] for m in response.json()["data"]]


def test_up_prints_its_fixed_nats_port_and_starts_no_demo_hosts(running: Running) -> None:
    printed = running.output.read_text()
    assert f"nats://127.0.0.1:{running.nats_port}" in printed
    assert (running.folder / ".llooma" / "nats" / "port").read_text() == str(running.nats_port)
    assert models_listed(running) == ["llooma"]


def host_yaml_from(printed: str) -> dict[str, object]:
    marker = re.search(r"host config \(edit `models`.*\):\n", printed)
    assert marker is not None, printed
    loaded = yaml.safe_load(printed[marker.end() :])
    assert isinstance(loaded, dict)
    return loaded


def start_host(config_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llooma.cli", "host", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=die_with_parent,
    )


def wait_until(check: object, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


async def refused(url: str, seed: str) -> bool:
    try:
        client = await nats.connect(
            url, nkeys_seed_str=seed, allow_reconnect=False, connect_timeout=2
        )
    except Exception as error:
        return "authorization" in str(error).lower()
    await client.close()
    return False


async def closed_at(running: Running, seed: str, polls: int = 1) -> float | None:
    """When the stack's server first answered that it holds no connection of the key, asked
    as its system user up to `polls` times 20 ms apart; None if it held one every time."""
    from llooma import admission
    from llooma.credentials import CredentialStore, public_key

    store = CredentialStore(running.folder / ".llooma" / "credentials")
    system = await nats.connect(
        f"nats://127.0.0.1:{running.nats_port}",
        nkeys_seed_str=store.system_seed().read_text().strip(),
    )
    try:
        for _ in range(polls):
            if not await admission.connections_of(system, public_key(seed.encode()), 1):
                return time.time()
            await asyncio.sleep(0.02)
        return None
    finally:
        await system.close()


async def has_connection(running: Running, seed: str) -> bool:
    return await closed_at(running, seed) is None


async def connection_gone(running: Running, seed: str) -> float:
    """When the key's last connection to the stack's server closed (polled for 10 s)."""
    gone = await closed_at(running, seed, polls=500)
    assert gone is not None, "the key's connection never closed"
    return gone


def test_hosts_add_and_revoke_as_the_readme_writes_them(running: Running) -> None:
    added = llooma(running.folder, "hosts", "add", "my-host")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "admitted" in added.stdout
    config = host_yaml_from(added.stdout)
    assert config["nats_url"] == f"nats://127.0.0.1:{running.nats_port}"
    seed_path = Path(str(config["credentials"]))
    assert seed_path.is_absolute()
    assert seed_path.exists()
    assert oct(seed_path.stat().st_mode & 0o777) == "0o600"
    HostConfig.model_validate(config)  # ready as printed; only its model is an example
    config["models"] = [{"name": "readme-model", "backend": "synthetic", "capacity": 4}]
    config_path = running.folder / "my-host.yaml"
    config_path.write_text(yaml.safe_dump(config))
    seed = seed_path.read_text().strip()

    host = start_host(config_path)
    try:
        wait_until(lambda: "readme-model" in models_listed(running), 15)
        answer = httpx.post(
            f"{running.base_url}/v1/chat/completions",
            json={"model": "readme-model", "messages": [{"role": "user", "content": "hi"}]},
            headers=AUTH,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text

        exited: list[float] = []

        def watch_exit() -> None:
            host.wait(30)
            exited.append(time.time())

        watcher = threading.Thread(target=watch_exit, daemon=True)
        watcher.start()
        assert asyncio.run(has_connection(running, seed))
        gone: list[float] = []
        poller = threading.Thread(
            target=lambda: gone.append(asyncio.run(connection_gone(running, seed))), daemon=True
        )
        poller.start()
        revoke_started = time.monotonic()
        revoked = llooma(running.folder, "hosts", "revoke", "my-host")
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        assert "refused, and its connections closed" in revoked.stdout
        poller.join(10)
        # From the registry change to the server holding no connection of the key (the
        # command's own start, Python importing its modules, is not the revocation's doing).
        registry = running.folder / ".llooma" / "credentials" / "registry.json"
        cut_off_after = gone[0] - registry.stat().st_mtime
        assert not asyncio.run(has_connection(running, seed))
        took = time.monotonic() - revoke_started
        print(f"revoke took {took:.2f} s; the host was cut off {cut_off_after:.2f} s after it")
        # Refused on every reconnect, it leaves once the grace for a restarting server is over.
        watcher.join(bus.REFUSAL_GRACE_S + 10)
        assert exited, "the revoked host is still running"
    finally:
        if host.poll() is None:
            host.kill()
        said = host.communicate(timeout=10)[0]
    assert cut_off_after < 2.0
    assert host.returncode == 3
    assert "refused this host's credential" in said, said
    assert "llooma hosts add my-host" in said, said
    assert asyncio.run(refused(f"nats://127.0.0.1:{running.nats_port}", seed))
    assert not seed_path.exists()
    wait_until(lambda: "readme-model" not in models_listed(running), 5)
    listed = llooma(running.folder, "hosts", "list")
    assert "my-host" not in listed.stdout


def test_a_host_never_admitted_exits_with_a_clear_message(running: Running) -> None:
    from llooma.credentials import new_seed

    stranger = running.folder / "stranger.nk"
    stranger.write_bytes(new_seed())
    config = {
        "name": "stranger",
        "nats_url": f"nats://127.0.0.1:{running.nats_port}",
        "credentials": str(stranger),
        "models": [{"name": "m", "backend": "synthetic"}],
    }
    path = running.folder / "stranger.yaml"
    path.write_text(yaml.safe_dump(config))
    host = start_host(path)
    said = host.communicate(timeout=20)[0]
    assert host.returncode == 3
    assert "refused the credential" in said, said


@pytest.mark.parametrize("name", ["control-plane", "system", "callout-issuer"])
def test_the_control_planes_credentials_cannot_be_handed_out(running: Running, name: str) -> None:
    attempt = llooma(running.folder, "hosts", "add", name)
    assert attempt.returncode == 2
    assert f"{name}.nk" not in attempt.stdout
    revoke = llooma(running.folder, "hosts", "revoke", name)
    assert revoke.returncode == 1
    assert (running.folder / ".llooma" / "credentials" / f"{name}.nk").exists()


def test_two_hundred_hosts_are_admitted_without_touching_the_server(running: Running) -> None:
    """`hosts add` as the CLI does it (issue, then verify by connecting), 200 times on the
    running stack: the server's config and process stay as they were, every key is admitted
    the moment it is issued."""
    from llooma import admission
    from llooma.credentials import CredentialStore

    data_dir = running.folder / ".llooma"
    config = data_dir / "nats" / "nats.conf"
    before = (config.read_text(), config.stat().st_mtime_ns)
    pid = (data_dir / "nats" / "nats-server.pid").read_text()
    store = CredentialStore(data_dir / "credentials")
    count = 200
    started = time.monotonic()
    for index in range(count):
        seed = store.issue(f"many-{index}").read_text().strip()
        outcome = admission.apply(data_dir, seed, admitted=True)
        assert outcome.ok, outcome.message
    took = time.monotonic() - started
    load = os.getloadavg()[0]
    each = 1000 * took / count
    print(f"{count} hosts admitted in {took:.2f} s ({each:.1f} ms each), load average {load}")
    assert (config.read_text(), config.stat().st_mtime_ns) == before
    assert (data_dir / "nats" / "nats-server.pid").read_text() == pid
    assert "Reloaded" not in (data_dir / "nats" / "nats-server.log").read_text()
    for index in range(0, count, 50):
        outcome = admission.apply(
            data_dir, store.seed_path(f"many-{index}").read_text().strip(), admitted=True
        )
        assert outcome.ok, outcome.message
