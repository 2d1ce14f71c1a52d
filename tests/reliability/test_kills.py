"""kill -9 of service processes at random moments with requests in flight (`pytest -s` prints
the figures reported in docs/RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from llooma import bus
from llooma.stack import SERVICES, Stack
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from tests.reliability.conftest import (
    AUTH,
    Load,
    audit_settlements,
    stack_fixture,
    tally,
    wait_healthy,
)
from tests.stack.test_race import wait_listed
from tests.support.scripted_host import Reply, ScriptedHost

ROUNDS = 2
# The services whose requests in hand JetStream redelivers to a live replica (ack after the
# handler, short ack_wait), and accounting, which acks only what Postgres committed.
LOSSLESS = ("privacy", "planner", "dispatcher", "accounting")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("kills"))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(
        tmp_path_factory.mktemp("replicas"), replicas=dict.fromkeys(LOSSLESS, 2)
    )


async def kill_and_restart(stack: Stack, name: str, rng: random.Random) -> None:
    stack.kill(name)
    # `llooma up` polls every 0.5 s: the restart comes somewhere in that window.
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    assert name in stack.restart_crashed()


@pytest.mark.timeout(240)
async def test_kill_each_service_with_requests_in_flight(single: Stack) -> None:
    rng = random.Random(11)
    load = Load(single.base_url, concurrency=6)
    load.start()
    kills, in_flight = 0, []
    for _ in range(ROUNDS):
        for name in rng.sample(SERVICES, len(SERVICES)):
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            in_flight.append(load.in_flight())
            await kill_and_restart(single, name, rng)
            kills += 1
    await asyncio.sleep(2.0)
    results = await load.stop()
    recovery_s = await wait_healthy(single)
    counts = tally(results)
    audit = await audit_settlements(single)
    print(
        f"\nkills={kills} in_flight_at_kill={sum(in_flight)} requests={len(results)} "
        f"ends={counts} settlements={audit} recovery_s={recovery_s:.2f}"
    )
    # Every request ended: completed, or an error event / status, or (only for requests held by
    # a killed ingress) a dropped connection; none outlived its deadline.
    assert counts.get("hung", 0) == 0
    assert counts.get("unfinished", 0) == 0
    accepted = len(results) - counts.get("refused", 0)
    assert counts.get("completed", 0) > accepted // 2
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0


@pytest.mark.timeout(240)
async def test_a_replica_kill_costs_no_request(replicated: Stack) -> None:
    rng = random.Random(13)
    load = Load(replicated.base_url, concurrency=6)
    load.start()
    kills, in_flight = 0, []
    victims = [f"{name}-2" if rng.random() < 0.5 else name for name in LOSSLESS * 3]
    rng.shuffle(victims)
    for name in victims:
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        in_flight.append(load.in_flight())
        await kill_and_restart(replicated, name, rng)
        kills += 1
    await asyncio.sleep(1.0)
    results = await load.stop()
    counts = tally(results)
    audit = await audit_settlements(replicated)
    print(
        f"\nreplica kills={kills} in_flight_at_kill={sum(in_flight)} requests={len(results)} "
        f"ends={counts} settlements={audit}"
    )
    assert counts == {"completed": len(results)}
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0


@pytest.mark.timeout(120)
async def test_a_killed_racers_stream_ends_at_once_with_a_clear_error(single: Stack) -> None:
    """kill -9 of the racer relaying a stream: the ingress sees that racer stop beating and
    ends the stream with an error event naming it, rather than at its stall limit (here
    1.5 + 3 + 5 s; 17 s by default). Resuming the answer elsewhere is not built (RELIABILITY)."""
    await wait_healthy(single)
    assert single.nats_url is not None
    model = "long-answer"
    stall_limit_s = 1.5 + 3.0 + 5.0

    async def long_answer(task: HostTask, reply: Reply) -> None:
        for index in range(60):
            await reply(HostChunk(token=HostToken(text=f" w{index}")))
            await asyncio.sleep(0.2)
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    nc = await bus.connect(single.nats_url, "llooma-tests-long", nkey_seed_file=single.control_seed)
    lines: list[str] = []
    try:
        async with (
            ScriptedHost(nc, "long-host", model, long_answer),
            httpx.AsyncClient(base_url=single.base_url, timeout=30.0) as http,
        ):
            await wait_listed(http, model)
            body = {
                "model": model,
                "stream": True,
                "messages": [{"role": "user", "content": "tell me a long story"}],
            }
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=AUTH
            ) as reply:
                assert reply.status_code == 200
                killed_at = 0.0
                async for line in reply.aiter_lines():
                    if not line:
                        continue
                    lines.append(line)
                    if not killed_at and len(lines) >= 4:
                        killed_at = time.monotonic()
                        single.kill("racer")
                ended_s = time.monotonic() - killed_at
    finally:
        await nc.close()
        assert "racer" in single.restart_crashed()
    print(f"\nstream ended {ended_s:.2f} s after its racer was killed: {lines[-1]}")
    assert killed_at
    error = orjson.loads(lines[-1][6:])["error"]
    assert error["code"] == "control_plane_unavailable", lines[-1]
    assert "racer" in error["message"]
    assert ended_s < stall_limit_s - 3.0
    assert await wait_healthy(single) >= 0
