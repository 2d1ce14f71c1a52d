"""A second ingress with its own settings, and extra hosts, joined to the session's stack.

Limits live in each ingress process, so tests of them start an ingress of their own next to
the stack's (the same NATS, the same pipeline services) instead of a whole second stack.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from llooma.embedded import EmbeddedNats, child_environment
from llooma.host.config import HostConfig, ModelConfig
from llooma.processes import die_with_parent, free_port
from llooma.stack import Stack
from tests.conftest import AUTH


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_until(
    check: str, ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{check}: exited with {process.returncode}; see {log}")
        if ready():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{check} not ready after 30 s; see {log}")


@contextmanager
def extra_ingress(stack: Stack, log_dir: Path, env: dict[str, str]) -> Iterator[str]:
    """An ingress process with `env` on top of the stack's settings; yields its base URL."""
    with extra_ingress_process(stack, log_dir, env) as (base_url, _):
        yield base_url


@contextmanager
def extra_ingress_process(
    stack: Stack, log_dir: Path, env: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As `extra_ingress`, with the process (for a test that kills it)."""
    assert stack.nats_url is not None
    assert stack.database_url is not None
    port = free_port()
    log = log_dir / f"ingress-{port}.log"
    environment = child_environment(
        {
            **stack.extra_env,
            "NATS_URL": stack.nats_url,
            "DATABASE_URL": stack.database_url,
            "LLOOMA_NATS_NKEY_SEED_FILE": stack.control_seed or "",
            **env,
            "LLOOMA_HTTP_PORT": str(port),
        }
    )
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingress"],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        _wait_until("ingress", healthy, process, log)
        yield base_url, process
    finally:
        _stop(process)


@contextmanager
def extra_host(
    server: EmbeddedNats, log_dir: Path, ingress_url: str, name: str, model: ModelConfig
) -> Iterator[None]:
    """A host worker serving `model`, with its own credential; ready once the ingress lists it."""
    assert server.credentials is not None
    seed = server.credentials.issue(name)
    config = HostConfig(
        name=name, nats_url=server.url, credentials=seed, heartbeat_interval_s=0.5, models=[model]
    )
    config_path = log_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log = log_dir / f"{name}.log"

    def listed() -> bool:
        try:
            response = httpx.get(f"{ingress_url}/v1/models", headers=AUTH, timeout=1.0)
        except httpx.HTTPError:
            return False
        return model.name in [entry["id"] for entry in response.json()["data"]]

    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "llooma.cli", "host", "--config", str(config_path)],
            env=child_environment({}),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        _wait_until(name, listed, process, log)
        yield
    finally:
        _stop(process)
