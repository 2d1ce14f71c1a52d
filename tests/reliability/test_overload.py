"""Load shedding at twice the sustainable rate, on an ingress of its own over the real stack.

One synthetic host serves `overload-model` with a capacity of 4 tasks; the ingress admits at
most that many requests for it at once. The sustainable rate is measured first (4 clients in a
closed loop), then the ingress is offered twice that, open loop, then half of it. Figures are
printed (`pytest -s`) and reported in docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.embedded import EmbeddedNats
from llooma.host.config import Generation, Latency, ModelConfig
from llooma.membership import HostDirectory
from llooma.settings import ORCHESTRATED_MODEL, VERSION, Settings
from llooma.stack import Stack
from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability
from services.ingress.limits import Limits, Ticket
from services.ingress.schema import ChatCompletionRequest
from tests.conftest import AUTH
from tests.support.extra_processes import extra_host, extra_ingress

MODEL = "overload-model"
SLOW_MODEL = "overload-slow-first-token"
CAPACITY = 4
FIRST_TOKEN_MS = 100
INTER_TOKEN_MS = 40
MAX_TOKENS = 12
# Admitted requests must see their first token well inside the first-token deadline δ.
P99_TTFT_BOUND_S = 1.0
WAITING_LIMIT = 3


@dataclass
class Outcome:
    sent_at: float
    status: int
    ttft_s: float | None = None
    completed: bool = False
    retry_after: str | None = None
    code: str | None = None
    request_id: str | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@pytest.fixture(scope="module")
def shedding_ingress(
    stack: Stack, nats_server: EmbeddedNats | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if nats_server is None or nats_server.credentials is None:
        pytest.skip("needs the embedded nats-server's credentials to add a host")
    log_dir = tmp_path_factory.mktemp("overload")
    # Shedding by capacity only here: the waiting-for-a-first-token limit has its own test.
    env = {"LLOOMA_MAX_WAITING_FIRST_TOKEN": "0", "LLOOMA_ADMISSION_CAPACITY_FACTOR": "1"}
    with extra_ingress(stack, log_dir, env) as base_url:
        model = ModelConfig(
            name=MODEL,
            capacity=CAPACITY,
            generation=Generation(max_tokens=MAX_TOKENS),
            first_token=Latency(kind="fixed", ms=FIRST_TOKEN_MS),
            inter_token=Latency(kind="fixed", ms=INTER_TOKEN_MS),
        )
        with extra_host(nats_server, log_dir, base_url, "host-overload", model):
            yield base_url


async def stream_once(client: httpx.AsyncClient, model: str = MODEL) -> Outcome:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "Say something."}],
    }
    sent_at = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        outcome = Outcome(
            sent_at,
            response.status_code,
            retry_after=response.headers.get("retry-after"),
            request_id=response.headers.get("x-llooma-request-id"),
        )
        if response.status_code != 200:
            outcome.code = orjson.loads(await response.aread())["error"]["code"]
            return outcome
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                outcome.completed = True
            elif line.startswith("data: ") and outcome.ttft_s is None:
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    outcome.ttft_s = time.monotonic() - sent_at
    return outcome


async def closed_loop(
    fire: Callable[[], Awaitable[Outcome]], clients: int, duration_s: float
) -> list[Outcome]:
    stop_at = time.monotonic() + duration_s
    outcomes: list[Outcome] = []

    async def client() -> None:
        while time.monotonic() < stop_at:
            outcomes.append(await fire())

    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


async def open_loop(
    fire: Callable[[], Coroutine[Any, Any, Outcome]], rate: float, duration_s: float
) -> list[Outcome]:
    """Requests at fixed intervals, whether or not earlier ones have finished."""
    started = time.monotonic()
    tasks: list[asyncio.Task[Outcome]] = []
    for index in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
        tasks.append(asyncio.create_task(fire()))
    return list(await asyncio.gather(*tasks))


async def test_twice_the_sustainable_rate_is_shed_with_retry_after_and_ttft_stays_bounded(
    shedding_ingress: str, nc: Client
) -> None:
    handed_off: list[str] = []

    async def on_hand_off(msg: Msg) -> None:
        handed_off.append((msg.headers or {}).get("Nats-Msg-Id", ""))

    subscription = await nc.subscribe(subjects.PIPELINE_PRIVACY, cb=on_hand_off)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=shedding_ingress, timeout=30, limits=limits) as client:

        def fire() -> Coroutine[Any, Any, Outcome]:
            return stream_once(client)

        baseline = await closed_loop(fire, CAPACITY, 4.0)
        assert all(o.status == 200 and o.completed for o in baseline), [
            (o.status, o.code) for o in baseline if o.status != 200
        ]
        span = max(o.sent_at for o in baseline) - min(o.sent_at for o in baseline)
        sustainable = (len(baseline) - CAPACITY) / span
        baseline_ttft = [o.ttft_s for o in baseline if o.ttft_s is not None]

        await nc.flush()
        handed_off.clear()
        overload = await open_loop(fire, 2 * sustainable, 8.0)
        await nc.flush()
        await asyncio.sleep(0.2)
        overload_hand_offs = list(handed_off)

        await asyncio.sleep(1.0)
        recovery = await open_loop(fire, 0.5 * sustainable, 4.0)
    await subscription.unsubscribe()

    admitted = [o for o in overload if o.status == 200]
    shed = [o for o in overload if o.status != 200]
    ttfts = [o.ttft_s for o in admitted if o.ttft_s is not None]
    shed_rate = len(shed) / len(overload)
    p99 = percentile(ttfts, 0.99)
    print(
        f"\noverload: sustainable {sustainable:.2f} req/s (4 clients, p50 TTFT "
        f"{percentile(baseline_ttft, 0.5) * 1000:.0f} ms); offered {2 * sustainable:.2f} req/s "
        f"for 8 s: {len(overload)} requests, {len(shed)} shed ({shed_rate:.0%}), "
        f"admitted p50/p99 TTFT {percentile(ttfts, 0.5) * 1000:.0f}/{p99 * 1000:.0f} ms; "
        f"recovery at {0.5 * sustainable:.2f} req/s: {len(recovery)} requests, "
        f"{sum(o.status != 200 for o in recovery)} shed"
    )
    # Shed requests got a cheap, well-formed 503 that says when to come back ...
    assert all(o.status == 503 and o.code == "overloaded" for o in shed), [
        (o.status, o.code) for o in shed
    ]
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in shed)
    # ... and never reached NATS: exactly the admitted requests were handed off.
    assert sorted(handed_off_id for handed_off_id in overload_hand_offs) == sorted(
        str(o.request_id) for o in admitted
    )
    assert 0.25 <= shed_rate <= 0.75
    # Every admitted request was served in full, with its first token in bounded time.
    assert all(o.completed for o in admitted)
    assert len(ttfts) == len(admitted)
    assert p99 <= P99_TTFT_BOUND_S
    # Shedding keeps the hosts busy rather than idle: admitted throughput near sustainable.
    assert len(admitted) / 8.0 >= 0.75 * sustainable
    # Once the offered load is below the sustainable rate, nothing is shed.
    assert all(o.status == 200 and o.completed for o in recovery), [
        (o.status, o.code) for o in recovery if o.status != 200
    ]


@pytest.fixture(scope="module")
def waiting_limited_ingress(
    stack: Stack, nats_server: EmbeddedNats | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if nats_server is None or nats_server.credentials is None:
        pytest.skip("needs the embedded nats-server's credentials to add a host")
    log_dir = tmp_path_factory.mktemp("waiting")
    env = {
        "LLOOMA_MAX_WAITING_FIRST_TOKEN": str(WAITING_LIMIT),
        "LLOOMA_ADMISSION_CAPACITY_FACTOR": "0",
    }
    with extra_ingress(stack, log_dir, env) as base_url:
        model = ModelConfig(
            name=SLOW_MODEL,
            capacity=64,
            generation=Generation(max_tokens=2),
            first_token=Latency(kind="fixed", ms=700),
            inter_token=Latency(kind="fixed", ms=5),
        )
        with extra_host(nats_server, log_dir, base_url, "host-slow-first-token", model):
            yield base_url


async def test_requests_waiting_for_a_first_token_are_capped(waiting_limited_ingress: str) -> None:
    async with httpx.AsyncClient(base_url=waiting_limited_ingress, timeout=30) as client:
        burst = await asyncio.gather(*(stream_once(client, SLOW_MODEL) for _ in range(10)))
        # Once the first tokens came, the ingress takes requests again.
        after = await stream_once(client, SLOW_MODEL)
    admitted = [o for o in burst if o.status == 200]
    shed = [o for o in burst if o.status != 200]
    assert len(admitted) == WAITING_LIMIT
    assert all(o.completed for o in admitted)
    assert all(o.status == 503 and o.code == "overloaded" and o.retry_after for o in shed)
    assert after.status == 200
    assert after.completed


# -- admission by capacity, on the ingress's own state ---------------------------------------


def _hosts_announcing(*hosts: tuple[str, dict[str, int]]) -> HostDirectory:
    directory = HostDirectory(stale_after_s=5.0, min_version="0.1.0")
    for host_id, capacities in hosts:
        beat = HostHeartbeat(
            version=VERSION,
            models=[ModelCapability(name=n, capacity=c) for n, c in capacities.items()],
        )
        directory.members._apply(host_id, beat.SerializeToString(), "PUT", time.time())
    return directory


def _admitted(limits: Limits, model: str, count: int) -> list[Ticket]:
    request = ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )
    tickets = []
    for _ in range(count):
        answer = limits.admit("key", request)
        if not isinstance(answer, Ticket):
            assert answer.status_code == 503
            break
        tickets.append(answer)
    return tickets


def test_a_host_announcing_a_huge_capacity_counts_for_the_cap_only() -> None:
    settings = Settings(max_waiting_first_token=0, admission_max_host_capacity=8)
    limits = Limits(settings, _hosts_announcing(("liar", {"m": 100_000}), ("honest", {"m": 2})))
    assert len(_admitted(limits, "m", 50)) == 10
    assert limits.shed == 1


def test_direct_and_orchestrated_requests_share_the_hosts_capacity() -> None:
    settings = Settings(max_waiting_first_token=0)
    hosts = _hosts_announcing(("a", {"m": 2}), ("b", {"n": 2}), ("e", {"echo": 5}))
    limits = Limits(settings, hosts)
    assert len(_admitted(limits, "m", 5)) == 2
    # The orchestrated pool is m and n (echo is excluded): 2 of its 4 slots are taken.
    assert len(_admitted(limits, ORCHESTRATED_MODEL, 5)) == 2
    assert _admitted(limits, "n", 1) == []
    # echo is outside the pool: its own capacity only.
    assert len(_admitted(limits, "echo", 9)) == 5
