"""Streams and buckets: created with the configured replicas, never put back to the code's
config by a service start (a difference is logged), topology errors retried, not fatal; and
several NATS URLs where one is taken."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import BadRequestError

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.processes import free_port


@pytest.fixture(scope="module")
def lone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats.start(tmp_path_factory.mktemp("topology"), sync_always=False)
    yield server
    server.stop()


@pytest.fixture
async def client(lone_server: EmbeddedNats) -> AsyncIterator[Client]:
    # A dead server first in the list: a process starts while any one of them is up.
    dead = f"nats://127.0.0.1:{free_port()}"
    nc = await bus.connect(f"{dead}, {lone_server.url}", "llooma-tests-topology")
    yield nc
    await nc.close()


def test_server_list_takes_commas_and_spaces() -> None:
    assert bus.server_list("nats://a:4222,nats://b:4222 nats://c:4222") == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]
    assert bus.server_list(["nats://a:4222"]) == ["nats://a:4222"]
    with pytest.raises(ValueError, match="no NATS server"):
        bus.server_list(" , ")


def test_access_takes_a_creds_file_or_a_seed(tmp_path: Path) -> None:
    creds = tmp_path / "user.txt"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ...\n------END NATS USER JWT------\n")
    seed = tmp_path / "host.nk"
    seed.write_text("SUAAAA")
    assert bus.access_for(str(creds)).creds_file == str(creds)
    assert bus.access_for(str(seed)).nkey_seed_file == str(seed)
    assert bus.access_for(str(seed)).connect_options() == {"nkeys_seed": str(seed)}
    assert "user_credentials" in bus.access_for(str(creds)).connect_options()
    with pytest.raises(ValueError, match="needs its key"):
        bus.NatsAccess(tls_cert_file="cert.pem")
    with pytest.raises(ValueError, match="not both"):
        bus.NatsAccess(nkey_seed_file="a", creds_file="b")


async def test_lone_server_gets_one_replica_and_a_second_start_changes_nothing(
    client: Client,
) -> None:
    assert bus.replicas_for(client) == 1
    assert bus.replicas_for(client, 3) == 3
    js = client.jetstream()
    await bus.ensure_topology(js)
    streams, buckets = bus.topology(1)
    for config in [*streams, *buckets]:
        assert config.name is not None
        info = await js.stream_info(config.name)
        assert info.config.num_replicas == 1
        assert bus.differences(config, info.config) == {}, config.name
    await bus.ensure_topology(js)
    # The buckets still work through nats-py's KV API.
    kv = await js.key_value(subjects.BALANCES_BUCKET)
    await kv.put("probe", b"1")


async def test_an_operators_change_is_kept_and_reported(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    js = client.jetstream()
    await bus.ensure_topology(js)
    info = await js.stream_info(subjects.EVENTS_STREAM)
    longer = (info.config.max_age or 0.0) * 2
    await js.update_stream(config=dataclasses.replace(info.config, max_age=longer))
    with caplog.at_level(logging.WARNING, logger="llooma.bus"):
        await bus.ensure_topology(js)
    after = await js.stream_info(subjects.EVENTS_STREAM)
    assert after.config.max_age == pytest.approx(longer)
    assert any(
        subjects.EVENTS_STREAM in r.getMessage() and "max_age" in r.getMessage()
        for r in caplog.records
    )


def test_more_replicas_are_applied_fewer_never() -> None:
    wanted = dataclasses.replace(bus.STREAMS[0], num_replicas=3)
    lower = dataclasses.replace(bus.STREAMS[0], num_replicas=1)
    raised = bus.safe_update(wanted, lower)
    assert raised is not None
    assert raised.num_replicas == 3
    assert bus.safe_update(lower, wanted) is None
    assert bus.differences(lower, wanted) == {"num_replicas": (1, 3)}
    wider = dataclasses.replace(lower, subjects=[*(lower.subjects or []), "extra.>"])
    assert bus.safe_update(wider, lower) is not None
    # A stream with more subjects than the code's keeps them all.
    assert bus.safe_update(lower, wider) is None
    # A field the code leaves to the server's default is no difference.
    defaulted = dataclasses.replace(lower, duplicate_window=0)
    assert bus.differences(defaulted, dataclasses.replace(lower, duplicate_window=120.0)) == {}


async def test_an_impossible_topology_is_retried_not_fatal(client: Client) -> None:
    js = client.jetstream()
    await bus.ensure_topology(js)
    # A lone server refuses replicas it cannot place: the missing stream is named in the
    # error, and keep_topology logs and retries, giving up only at its deadline, unraised.
    await js.delete_stream(subjects.PIPELINE_STREAM)
    with pytest.raises(bus.TopologyError, match=subjects.PIPELINE_STREAM):
        await bus.ensure_topology(js, replicas=3)
    assert await bus.keep_topology(js, "test", timeout_s=1.0, replicas=3) is False
    assert await bus.keep_topology(js, "test", timeout_s=5.0) is True
    info = await js.stream_info(subjects.PIPELINE_STREAM)
    assert info.config.num_replicas == 1


class FlakyStream:
    """A JetStream stand-in whose publish fails `failures` times first (no NATS)."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def publish(self, *_: object, **__: object) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error


async def test_a_hand_off_is_retried_while_a_stream_elects_a_leader() -> None:
    flaky = FlakyStream(2, TimeoutError())
    await bus.hand_off(flaky, "s", b"", "id")  # type: ignore[arg-type]
    assert flaky.calls == 3
    dead = FlakyStream(10**6, TimeoutError())
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bus.hand_off(dead, "s", b"", "id", budget_s=0.5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    refused = FlakyStream(10**6, BadRequestError(code=400, description="refused"))
    with pytest.raises(BadRequestError):
        await bus.hand_off(refused, "s", b"", "id")  # type: ignore[arg-type]
    assert refused.calls == 1


async def test_a_cancelled_flush_leaves_the_connection_receiving(client: Client) -> None:
    # nats-py resolves a cancelled flush's future on its PONG and its read loop dies of it:
    # every message after that would be lost without a word.
    received: list[bytes] = []

    async def on_message(msg: Msg) -> None:
        received.append(msg.data)

    subscription = await client.subscribe("llooma.tests.after-cancelled-flush", cb=on_message)
    for _ in range(3):
        flushing = asyncio.create_task(client.flush())
        await asyncio.sleep(0)  # its PING is queued
        flushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flushing
    for index in range(200):
        await client.publish("llooma.tests.after-cancelled-flush", str(index).encode())
    await client.flush(timeout=5)
    for _ in range(100):
        if len(received) == 200:
            break
        await asyncio.sleep(0.02)
    await subscription.unsubscribe()
    assert received == [str(index).encode() for index in range(200)]
