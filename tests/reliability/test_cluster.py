"""The stack on a 3-node NATS cluster (streams and buckets at R3), two of every request-path
service and two ingresses: each node is killed (-9) in turn under a bounded streaming load
over both ingresses, and started again; then one replica each of the racer, the dispatcher,
the aggregator and an ingress is killed (-9) in turn under the same load and restarted. No
request hangs, every one is answered or refused fast with Retry-After (or, held by the killed
process, ends as the docs say: see `process_kill_problems`), no settlement is lost or paid
twice, and every stream and bucket is still at 3 replicas, all current, after each restart;
a service start asking for fewer replicas changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from llooma import bus
from llooma.processes import free_port
from llooma.stack import Stack
from tests.reliability.conftest import (
    AUTH,
    FAULT_ENV,
    Load,
    Result,
    audit_settlements,
    ledger_rows,
    published_settlements,
    tally,
    wait_healthy,
)

pytestmark = pytest.mark.cluster

NODES = 3
REPLICATED = ("privacy", "planner", "dispatcher", "racer", "aggregator", "ingress")
# How long each node stays down under load, and the load's width per ingress.
DOWN_S = 6.0
CONCURRENCY = 3
# A refusal is fast when it comes within this of the request. A kill -9 gives no leader a
# chance to step down: each stream and bucket the node led elects another after nats-server's
# raft election timeout (4 to 9 s), and a request whose hand-off or hosts' heartbeats fall in
# that window is refused (503, Retry-After) when it ends; a hang is CLIENT_DEADLINE_S.
FAST_REFUSAL_S = 10.0
# Every stream and bucket has all its replicas current again within this of a restart.
CATCH_UP_S = 45.0


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        root=tmp_path_factory.mktemp("cluster"),
        http_port=free_port(),
        nats_cluster=NODES,
        extra_env=FAULT_ENV,
        replicas=dict.fromkeys(REPLICATED, 2),
    )
    stack.start(ready_timeout_s=150)
    try:
        yield stack
    finally:
        stack.stop()


async def replica_state(stack: Stack) -> dict[str, tuple[int, int]]:
    """Stream -> (configured replicas, peers current: the leader and caught-up followers)."""
    assert stack.nats_url is not None
    nc = await bus.connect(
        stack.nats_url, "llooma-tests-replicas", nkey_seed_file=stack.control_seed
    )
    try:
        js: JetStreamContext = nc.jetstream()
        state: dict[str, tuple[int, int]] = {}
        streams, buckets = bus.topology()
        for config in [*streams, *buckets]:
            assert config.name is not None
            info = await js.stream_info(config.name)
            cluster = info.cluster
            peers = cluster.replicas or [] if cluster is not None else []
            current = (1 if cluster is not None and cluster.leader else 0) + sum(
                1 for peer in peers if peer.current and not peer.offline
            )
            state[config.name] = (info.config.num_replicas or 1, current)
        return state
    finally:
        await nc.close()


async def wait_all_current(stack: Stack, timeout_s: float = CATCH_UP_S) -> float:
    """Seconds until every stream and bucket has NODES replicas configured and current."""
    started = time.monotonic()
    state: dict[str, tuple[int, int]] = {}
    while time.monotonic() - started < timeout_s:
        try:
            state = await replica_state(stack)
            if all(state_of == (NODES, NODES) for state_of in state.values()):
                return time.monotonic() - started
        except Exception as error:  # no leader yet for some stream
            state = {f"error: {error}": (0, 0)}
        await asyncio.sleep(0.5)
    raise AssertionError(f"replicas not all current after {timeout_s} s: {state}")


async def all_ingresses_healthy(stack: Stack) -> None:
    for url in stack.ingress_urls:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
            while True:
                # The stack waited for the first ingress only: a later one may still be starting.
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"{url} not healthy"
                await asyncio.sleep(0.2)


def refused_fast(r: Result) -> bool:
    """Refused before any stream, with Retry-After, within FAST_REFUSAL_S."""
    refused = r.end == "http_error" and r.status in (429, 503) and bool(r.retry_after)
    return refused and r.ended_at - r.started_at <= FAST_REFUSAL_S


def refusal_problems(results: list[Result], killed_at: float) -> list[str]:
    """Every request that neither completed nor was refused fast with Retry-After, but for
    an error event ending one in flight when the node died: a racer whose connection the kill
    cut loses the tokens on the wire (finishing those from the client's prefix on another
    racer is the racer-death work, not this suite's)."""
    problems = []
    for r in results:
        took = r.ended_at - r.started_at
        if r.end == "completed":
            continue
        if r.end == "error_event" and r.started_at <= killed_at <= r.ended_at:
            continue
        if refused_fast(r):
            continue
        problems.append(f"{r.end} status={r.status} after {took:.1f}s id={r.request_id}")
    return problems


async def cluster_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
        snapshot: dict[str, Any] = (await http.get("/v1/stats")).json()
        return {key: snapshot[key] for key in ("requests", "rejections")}


async def test_every_ingress_answers_the_same_cluster_wide_stats(clustered: Stack) -> None:
    """Each ingress counts the requests and refusals of both (tallies on NATS), not its own."""
    await all_ingresses_healthy(clustered)
    first, second = clustered.ingress_urls
    before = [await cluster_stats(url) for url in (first, second)]
    body = {"model": "echo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    sent = {first: 5, second: 3}
    for url, count in sent.items():
        async with httpx.AsyncClient(base_url=url, timeout=20.0) as http:
            for _ in range(count):
                reply = await http.post("/v1/chat/completions", json=body, headers=AUTH)
                assert reply.status_code == 200, reply.text
            refused = await http.post(
                "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}
            )
            assert refused.status_code == 401
    wanted = sum(sent.values())
    deadline = time.monotonic() + 15.0
    while True:
        after = [await cluster_stats(url) for url in (first, second)]
        grown = [
            (
                a["requests"]["total"] - b["requests"]["total"],
                a["rejections"]["by_status"].get("401", {}).get("invalid_api_key", 0)
                - b["rejections"]["by_status"].get("401", {}).get("invalid_api_key", 0),
            )
            for a, b in zip(after, before, strict=True)
        ]
        if (grown == [(wanted, 2)] * 2 and after[0] == after[1]) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    print(f"\ncluster-wide stats: growth per ingress {grown}, totals {after[0]['requests']}")
    assert grown == [(wanted, 2), (wanted, 2)]
    assert after[0] == after[1]


@pytest.mark.timeout(420)
async def test_each_node_killed_in_turn_under_load(clustered: Stack) -> None:
    stack = clustered
    assert stack.cluster is not None
    await all_ingresses_healthy(stack)
    assert await wait_all_current(stack) >= 0
    figures = []
    problems: list[str] = []
    all_results: list[Result] = []
    for node in range(NODES):
        loads = [Load(url, concurrency=CONCURRENCY) for url in stack.ingress_urls]
        for load in loads:
            load.start()
        await asyncio.sleep(3.0)
        in_flight = sum(load.in_flight() for load in loads)
        killed_at = time.monotonic()
        await asyncio.to_thread(stack.kill_nats_node, node)
        await asyncio.sleep(DOWN_S)
        await asyncio.to_thread(stack.restart_nats_node, node)
        restarted_at = time.monotonic()
        catch_up_s = await wait_all_current(stack)
        await asyncio.sleep(2.0)
        results = [r for load in loads for r in await load.stop()]
        all_results.extend(results)
        refused = [r for r in results if r.end == "http_error"]
        slowest_refusal = max((r.ended_at - r.started_at for r in refused), default=0.0)
        during = [r for r in results if killed_at <= r.started_at <= restarted_at]
        figures.append(
            f"nats-{node + 1}: requests={len(results)} in_flight_at_kill={in_flight} "
            f"ends={tally(results)} started_while_down={len(during)} "
            f"slowest_refusal_s={slowest_refusal:.2f} catch_up_s={catch_up_s:.1f}"
        )
        print(f"\n{figures[-1]}")
        problems.extend(f"nats-{node + 1}: {p}" for p in refusal_problems(results, killed_at))
        state = await replica_state(stack)
        assert all(configured == NODES for configured, _ in state.values()), state
    audit = await audit_settlements(stack, timeout_s=90.0)
    print(f"\ncluster kills: {len(all_results)} requests, settlements={audit}")
    if audit["lost"]:
        stored = {r["attempt_id"] for r in await ledger_rows(stack)}
        missing = [s for s in await published_settlements(stack) if s.attempt_id not in stored]
        print(f"lost: {[(s.attempt_id, s.task_id) for s in missing]}")
    assert not problems, problems[:10]
    assert audit["lost"] == 0, audit
    assert audit["paid_twice"] == 0, audit
    assert await wait_healthy(stack) >= 0


# One replica of each process that holds requests in flight, killed in turn.
PROCESS_VICTIMS = ("racer-2", "dispatcher", "aggregator-2", "ingress-2")
# How long the killed process stays down before its supervisor's restart.
PROCESS_DOWN_S = 2.0


def process_kill_problems(victim: str, results: list[Result], killed_at: float) -> list[str]:
    """Every request that ended otherwise than docs/RELIABILITY.md says a kill of `victim`
    may end it: completed, or refused fast with Retry-After; only a killed ingress's own
    streams dropped (it holds their connections), and its port refusing until it is back.
    A racer's, a dispatcher's or an aggregator's requests in flight are finished by a live
    replica, direct and split alike: a race a killed racer had received and not yet recorded
    too (it had not acked it: JetStream hands it to the other racer)."""
    problems = []
    ingress = victim.startswith("ingress")
    for r in results:
        in_flight = r.started_at <= killed_at <= r.ended_at
        if r.end == "completed" or refused_fast(r):
            continue
        if ingress and (r.end == "refused" or (r.end == "dropped" and in_flight)):
            continue
        problems.append(
            f"{victim}: {r.end} status={r.status} split={r.split} in_flight={in_flight} "
            f"after {r.ended_at - r.started_at:.1f}s id={r.request_id}"
        )
    return problems


@pytest.mark.timeout(300)
async def test_each_request_path_process_killed_in_turn_under_load(clustered: Stack) -> None:
    stack = clustered
    await all_ingresses_healthy(stack)
    problems: list[str] = []
    all_results: list[Result] = []
    for victim in PROCESS_VICTIMS:
        loads = [Load(url, concurrency=CONCURRENCY) for url in stack.ingress_urls]
        for load in loads:
            load.start()
        await asyncio.sleep(3.0)
        in_flight = sum(load.in_flight() for load in loads)
        killed_at = time.monotonic()
        stack.kill(victim)
        await asyncio.sleep(PROCESS_DOWN_S)
        assert victim in stack.restart_crashed()
        if victim.startswith("ingress"):
            await all_ingresses_healthy(stack)
        await asyncio.sleep(3.0)
        results = [r for load in loads for r in await load.stop()]
        all_results.extend(results)
        slowest = max(
            (r.ended_at - r.started_at for r in results if r.end != "completed"), default=0
        )
        print(
            f"\n{victim}: requests={len(results)} in_flight_at_kill={in_flight} "
            f"ends={tally(results)} slowest_not_completed_s={slowest:.1f}"
        )
        problems.extend(process_kill_problems(victim, results, killed_at))
    audit = await audit_settlements(stack, timeout_s=90.0)
    print(f"\nprocess kills: {len(all_results)} requests, settlements={audit}")
    assert not problems, problems[:10]
    assert tally(all_results).get("hung", 0) == 0
    assert audit["lost"] == 0, audit
    assert audit["paid_twice"] == 0, audit
    state = await replica_state(stack)
    assert all(configured == NODES for configured, _ in state.values()), state


async def test_a_start_asking_for_fewer_replicas_changes_nothing(clustered: Stack) -> None:
    assert clustered.nats_url is not None
    nc = await bus.connect(
        clustered.nats_url, "llooma-tests-r1", nkey_seed_file=clustered.control_seed
    )
    try:
        assert bus.replicas_for(nc) == NODES
        await bus.ensure_topology(nc.jetstream(), replicas=1)
    finally:
        await nc.close()
    state = await replica_state(clustered)
    assert all(configured == NODES for configured, _ in state.values()), state
