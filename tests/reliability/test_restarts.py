"""nats-server and Postgres crash (kill -9) and restart mid-load: the stack reconnects by
itself, and every settlement acknowledged before the crash ends up in the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.service import Service, _InProgress
from llooma.settings import Settings
from llooma.stack import Stack
from llooma.v1.host_pb2 import HostTask
from tests.reliability.conftest import (
    AUTH,
    Load,
    audit_settlements,
    ledger_rows,
    published_settlements,
    stack_fixture,
    tally,
    wait_healthy,
)
from tests.stack.test_race import wait_listed
from tests.support.scripted_host import Reply, ScriptedHost


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("restarts"))


@pytest.mark.timeout(150)
async def test_nats_server_crash_and_restart_mid_load(own: Stack) -> None:
    load = Load(own.base_url, concurrency=6)
    load.start()
    await asyncio.sleep(3.0)
    acknowledged = {s.attempt_id for s in await published_settlements(own)}
    in_flight = load.in_flight()
    crashed_at = time.monotonic()
    await asyncio.to_thread(own.restart_nats)
    await wait_healthy(own)
    await asyncio.sleep(6.0)
    results = await load.stop()
    counts = tally(results)
    audit = await audit_settlements(own)
    stored = {r["attempt_id"] for r in await ledger_rows(own)}
    # Recovered once every request started later completed: measured from the last one that
    # did not, which the hosts' next heartbeats (heard again once reconnected) mostly bound.
    failed_starts = [r.started_at for r in results if r.end != "completed"]
    recovery_s = max(failed_starts, default=crashed_at) - crashed_at
    print(
        f"\nnats restart: in_flight={in_flight} requests={len(results)} ends={counts} "
        f"acknowledged_before={len(acknowledged)} missing_after={len(acknowledged - stored)} "
        f"settlements={audit} recovery_s={recovery_s:.2f}"
    )
    assert acknowledged <= stored
    assert counts.get("hung", 0) == 0
    assert counts.get("unfinished", 0) == 0
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    assert recovery_s < 10.0
    assert sum(1 for r in results if r.started_at > crashed_at + recovery_s) >= 10


@pytest.mark.timeout(150)
async def test_postgres_crash_and_restart_mid_load(own: Stack) -> None:
    load = Load(own.base_url, concurrency=6)
    load.start()
    await asyncio.sleep(2.0)
    crashed_at = time.monotonic()
    await asyncio.to_thread(own.restart_postgres)
    restarted_s = time.monotonic() - crashed_at
    await asyncio.sleep(3.0)
    results = await load.stop()
    counts = tally(results)
    audit = await audit_settlements(own, timeout_s=60.0)
    caught_up_s = time.monotonic() - crashed_at
    print(
        f"\npostgres restart: requests={len(results)} ends={counts} settlements={audit} "
        f"postgres_back_s={restarted_s:.2f} ledger_caught_up_within_s={caught_up_s:.2f}"
    )
    # Postgres is off the request path: no request notices it.
    assert counts == {"completed": len(results)}
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0


@pytest.mark.timeout(120)
async def test_a_request_waiting_on_a_broken_connection_is_refused_at_once(own: Stack) -> None:
    """The ingress's NATS connection breaks while a request waits for its first token: the
    events sent to it until it reconnects are lost, so it refuses the request at once (503,
    Retry-After) rather than after the race's failure or its own 14 s first-event limit."""
    await wait_healthy(own)
    assert own.nats_url is not None
    model = "slow-first-token"

    async def never_in_time(task: HostTask, reply: Reply) -> None:
        await asyncio.sleep(30.0)

    nc = await bus.connect(own.nats_url, "llooma-tests-slow", nkey_seed_file=own.control_seed)
    try:
        async with (
            ScriptedHost(nc, "slow-host", model, never_in_time),
            httpx.AsyncClient(base_url=own.base_url, timeout=30.0) as http,
        ):
            await wait_listed(http, model)
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
            asked = asyncio.create_task(http.post("/v1/chat/completions", json=body, headers=AUTH))
            await asyncio.sleep(1.0)  # handed to the racer, waiting for a first token (1 s + 3 s)
            assert not asked.done()
            crashed_at = time.monotonic()
            restarting = asyncio.create_task(asyncio.to_thread(own.restart_nats))
            reply = await asked
            answered_s = time.monotonic() - crashed_at
            await restarting
    finally:
        # The client lived through the restart too: its close may meet the old socket's reset.
        with contextlib.suppress(OSError):
            await nc.close()
    print(f"\nrefused {answered_s:.2f} s after the crash: {reply.status_code} {reply.text}")
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "control_plane_unavailable"
    assert reply.headers["retry-after"]
    assert answered_s < 1.5
    assert await wait_healthy(own) >= 0


# -- the service runner on a nats-server of its own ------------------------------------------


@pytest.fixture
def lone_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats.start(tmp_path_factory.mktemp("lone-nats"), sync_always=False)
    yield server
    server.stop()


async def test_a_replica_started_while_the_server_was_down_leaves_the_others_receiving(
    lone_nats: EmbeddedNats,
) -> None:
    """The restart window, in the order that hurt: the memory stream and its consumers are
    gone, a new replica re-creates the consumer first, the old one restores it afterwards."""
    settings = Settings(nats_url=lone_nats.url)
    received: Counter[str] = Counter()
    all_received = asyncio.Event()

    def counting(replica: str) -> Any:
        async def handle(_: Msg) -> None:
            received[replica] += 1
            if received.total() == 40:
                all_received.set()

        return handle

    old = Service("restart-test", settings)
    await old.connect()
    await old.consume(subjects.PIPELINE_PRIVACY, "restart-test", counting("old"))
    admin = await bus.connect(lone_nats.url, "llooma-test-admin")
    new = Service("restart-test", settings)
    try:
        # What a restarted server has lost: the memory stream, and with it the consumer.
        await admin.jetstream().delete_stream(subjects.PIPELINE_STREAM)
        await new.connect()
        await new.consume(subjects.PIPELINE_PRIVACY, "restart-test", counting("new"))
        await old._reconnected()
        js = admin.jetstream()
        for index in range(40):
            await bus.hand_off(js, subjects.PIPELINE_PRIVACY, b"x", f"restart-test-{index}")
        await asyncio.wait_for(all_received.wait(), 10.0)
        assert received["old"] > 0, f"the older replica stopped receiving: {received}"
        assert received["new"] > 0, f"the new replica receives nothing: {received}"
    finally:
        for client in (admin, old.nc, new.nc):
            await client.drain()


class _SlowSignal:
    """A message whose in-progress signal takes a while and then fails (a lost connection)."""

    def __init__(self) -> None:
        self.calls = 0

    async def in_progress(self) -> None:
        self.calls += 1
        await asyncio.sleep(0.05)
        raise ConnectionError("connection closed")


async def test_every_in_progress_signal_is_kept_and_its_error_read() -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    msg = _SlowSignal()
    try:
        progress = _InProgress(cast(Msg, msg), 0.01)
        await asyncio.sleep(0.2)
        progress.cancel()
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert msg.calls >= 5
    assert unretrieved == []


async def _dies_holding_one_message(
    url: str, subject: str, settings: Settings, *, claim_first: bool
) -> None:
    """A replica that takes one message of a claiming consumer (claimed or not), then dies
    with its handler still running: its connection closes without another word."""
    dying = Service("claims-test", settings)
    await dying.connect()
    received = asyncio.Event()
    hold = asyncio.Event()

    async def handle(msg: Msg) -> None:
        if claim_first:
            dying.claim(msg)
        received.set()
        await hold.wait()

    await dying.consume(subject, "claims-test", handle, claims=True)
    admin = await bus.connect(url, "llooma-test-admin")
    try:
        await bus.hand_off(admin.jetstream(), subject, b"work", f"claims-{claim_first}")
        await asyncio.wait_for(received.wait(), 10.0)
        # Its claim's ack, if any, is on its way (the server answers it).
        await asyncio.sleep(0.2)
    finally:
        await admin.drain()
    await dying.nc.close()
    for task in dying._running:
        task.cancel()


@pytest.mark.parametrize("claim_first", [False, True], ids=["unclaimed", "claimed"])
async def test_a_replica_gets_a_dead_processs_message_only_if_it_was_not_claimed(
    lone_nats: EmbeddedNats, claim_first: bool
) -> None:
    """The racer's contract (services/racer/main.py): a race taken but not yet recorded when
    its process dies is run by a replica; one claimed (recorded) is never run again."""
    ack_wait_s = 0.5
    settings = Settings(nats_url=lone_nats.url, pipeline_ack_wait_s=ack_wait_s)
    await _dies_holding_one_message(
        lone_nats.url, subjects.PIPELINE_RACER, settings, claim_first=claim_first
    )
    heir = Service("claims-test", settings)
    await heir.connect()
    deliveries: list[int] = []
    redelivered = asyncio.Event()

    async def handle(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        redelivered.set()

    try:
        await heir.consume(subjects.PIPELINE_RACER, "claims-test", handle, claims=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(redelivered.wait(), 6 * ack_wait_s)
        await asyncio.sleep(2 * ack_wait_s)
    finally:
        await heir.nc.drain()
    assert deliveries == ([] if claim_first else [2])


async def test_a_claiming_handler_that_raises_is_not_run_again(lone_nats: EmbeddedNats) -> None:
    """Its work may have begun (a race's hosts were sent their tasks): a raise claims it."""
    ack_wait_s = 0.5
    settings = Settings(nats_url=lone_nats.url, pipeline_ack_wait_s=ack_wait_s)
    service = Service("claims-test", settings)
    await service.connect()
    deliveries: list[int] = []

    async def handle(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        raise RuntimeError("a bug, after hosts were launched")

    try:
        await service.consume(subjects.PIPELINE_RACER, "claims-test", handle, claims=True)
        await bus.hand_off(service.js, subjects.PIPELINE_RACER, b"work", "claims-raise")
        await asyncio.sleep(6 * ack_wait_s)
    finally:
        await service.nc.drain()
    assert deliveries == [1]
