"""The real-engine rig: two llama-servers serving Gemma 3 270M, each behind a host worker with the
`openai` backend, on a stack of their own (own NATS, own database on the session's Postgres).

Only these two hosts exist on that stack, so `llooma` is answered by real engines alone. Each
host also serves its engine under a name only it announces (`ONLY[key]`), which makes one host's
eligibility visible in `/v1/models` while the shared model stays listed by the other.

The engine comes from `make engine` (`llooma engine build`); without it these tests are skipped,
unless `LLOOMA_ENGINE_REQUIRED` is set (as `make test` does), when they fail.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from nats.aio.client import Client

from llooma import bus
from llooma.engine import UPSTREAM_MODEL, EnginePaths, LlamaServer, engine_paths
from llooma.host.config import Features, Generation, HostConfig, ModelConfig
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from tests.conftest import AUTH
from tests.support.ledger_db import new_database

MODEL = "gemma-3-270m"
KEYS = ("a", "b")
ONLY = {key: f"{MODEL}-{key}" for key in KEYS}
HOSTS = {key: f"engine-host-{key}" for key in KEYS}
# Tasks in flight per model on each host; llama-server decodes `PARALLEL` of them at once and
# defers the rest.
CAPACITY = 4
PARALLEL = 2
CTX_SIZE = 4096
# The stack's default: a host without a heartbeat for this long is ineligible.
HOST_STALE_S = 2.0
ENGINE_ENV = {
    # Duels would send judge prompts to a base model; they are tested on synthetic hosts.
    "LLOOMA_DUEL_FRACTION": "0",
    # A probed loser would hold an engine slot to its first token; the kill tests want idle ones.
    "LLOOMA_SILENCE_PROBE_FRACTION": "0",
    # `llooma` uses the shared model, not the per-host names.
    "LLOOMA_ORCHESTRATION_EXCLUDED_MODELS": ",".join(["echo", *ONLY.values()]),
}


def engine_model(name: str, server: LlamaServer) -> ModelConfig:
    return ModelConfig(
        name=name,
        backend="openai",
        base_url=server.openai_url,
        upstream_model=UPSTREAM_MODEL,
        metrics_url=server.metrics_url,
        capacity=CAPACITY,
        generation=Generation(max_tokens=1024),
        # What this llama-server serves (started --no-jinja: no tools).
        features=Features(json_mode=True, json_schema=True, logprobs=True),
    )


def engine_host(key: str, server: LlamaServer) -> HostConfig:
    return HostConfig(
        name=HOSTS[key], models=[engine_model(MODEL, server), engine_model(ONLY[key], server)]
    )


def listed_models(base_url: str) -> set[str]:
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=AUTH, timeout=2.0)
    except httpx.HTTPError:
        return set()
    if response.status_code != 200:
        return set()
    return {entry["id"] for entry in response.json()["data"]}


def engine_busy(server: LlamaServer) -> int:
    """Requests llama-server is decoding or holding back, from its Prometheus metrics."""
    text = httpx.get(server.metrics_url, timeout=2.0).text
    busy = 0.0
    for line in text.splitlines():
        if line.startswith(("llamacpp:requests_processing", "llamacpp:requests_deferred")):
            busy += float(line.rsplit(" ", 1)[1])
    return int(busy)


@dataclass
class EngineRig:
    stack: Stack
    engines: dict[str, LlamaServer]

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def wait_listed(self, models: set[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not models <= (listed := listed_models(self.base_url)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sorted(models - listed)} not listed after {timeout_s} s")
            time.sleep(0.1)

    def restore(self) -> None:
        """Bring back whatever a test killed or stopped: engines first, then host workers."""
        for server in self.engines.values():
            if not server.running():
                server.start()
        if self.stack.restart_crashed():
            # A killed host's last heartbeat stays fresh for HOST_STALE_S: wait it out, so
            # what is listed next is the new process's.
            time.sleep(HOST_STALE_S + 0.5)
        self.wait_listed({MODEL, *ONLY.values()})
        self.wait_idle()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no engine decodes or queues anything: a test that left requests running there
        (llama-server finishes a non-streamed request whose client went away) would otherwise
        hold the slots a later test's hosts need."""
        deadline = time.monotonic() + timeout_s
        for key, server in self.engines.items():
            while (busy := engine_busy(server)) > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine {key} still busy ({busy}) after {timeout_s} s")
                time.sleep(0.1)

    def host_pid(self, key: str) -> int:
        process = self.stack.child(HOSTS[key]).process
        assert process is not None
        return process.pid


@pytest.fixture(scope="session")
def built_engine() -> EnginePaths:
    paths = engine_paths()
    if not paths.ready():
        message = f"the real engine is not built in {paths.root}: run `make engine`"
        if os.environ.get("LLOOMA_ENGINE_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    return paths


@pytest.fixture(scope="package")
def rig(
    built_engine: EnginePaths, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineRig]:
    root = tmp_path_factory.mktemp("engine")
    engines = {
        key: LlamaServer(
            built_engine,
            root / "logs" / f"llama-server-{key}.log",
            ctx_size=CTX_SIZE,
            parallel=PARALLEL,
            # The tests compare the stack's greedy texts with the engine's own.
            cache_prompt=False,
        )
        for key in KEYS
    }
    stack = Stack(
        root=root / "stack",
        http_port=free_port(),
        database_url=new_database(database_url, "engine"),
        hosts=[engine_host(key, server) for key, server in engines.items()],
        extra_env=ENGINE_ENV,
    )
    try:
        for server in engines.values():
            server.start()
        stack.start()
        running = EngineRig(stack, engines)
        running.wait_listed({MODEL, *ONLY.values()})
        yield running
    finally:
        stack.stop()
        for server in engines.values():
            server.stop()


@pytest.fixture
def restored(rig: EngineRig) -> Iterator[EngineRig]:
    """The rig, brought back to two live engines and hosts after the test, whatever it broke."""
    yield rig
    rig.restore()


@pytest.fixture
async def client(rig: EngineRig) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client on the stack; no retries, so what the stack answers is what we see."""
    async with openai.AsyncOpenAI(
        base_url=f"{rig.base_url}/v1", api_key=DEV_API_KEY, max_retries=0, timeout=120.0
    ) as stack_client:
        yield stack_client


@pytest.fixture
async def direct(rig: EngineRig) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client on engine a's llama-server itself: the reference."""
    async with openai.AsyncOpenAI(
        base_url=rig.engines["a"].openai_url, api_key="none", max_retries=0, timeout=120.0
    ) as engine_client:
        yield engine_client


@pytest.fixture
async def rig_nc(rig: EngineRig) -> AsyncIterator[Client]:
    assert rig.stack.nats_url is not None
    nc = await bus.connect(
        rig.stack.nats_url, "llooma-engine-tests", nkey_seed_file=rig.stack.control_seed
    )
    yield nc
    await nc.drain()


async def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> float:
    """Seconds until `check()` is true; raises after timeout_s."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not true after {timeout_s} s")
        await asyncio.sleep(interval_s)
    return time.monotonic() - started
