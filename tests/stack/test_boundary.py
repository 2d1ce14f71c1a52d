"""A hostile host with its own credential, on the shared stack over real NATS (the accounts
layout) and Postgres: what it publishes, or names as a reply subject, lands in no stream or
bucket; bad heartbeats are refused and counted; poison on every consumer is terminated and
counted; slow HTTP clients are cut off. Through all of it, every request is still served."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import KeyNotFoundError, NoKeysError

from llooma import bus, counters, subjects
from llooma.embedded import EmbeddedNats
from llooma.service import MAX_DELIVER, Service
from llooma.settings import DEV_API_KEY, VERSION, Settings, api_key_id
from llooma.stack import Stack
from llooma.v1.host_pb2 import HostChunk, HostHeartbeat, HostToken, ModelCapability
from llooma.v1.service_pb2 import ServiceHeartbeat
from tests.conftest import AUTH
from tests.stack.test_hosts import connect_as, credentials_of
from tests.stack.test_race import chat


async def service_counters(nc: Client, service: str) -> Counter[str]:
    """The counters every live instance of `service` carries in its heartbeat, summed (none
    while the bucket holds no entry, as it can for a moment when heartbeats lag on a loaded
    machine: the callers poll)."""
    kv = await nc.jetstream().key_value(subjects.SERVICES_BUCKET)
    total: Counter[str] = Counter()
    try:
        keys = await kv.keys()
    except NoKeysError:
        return total
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if not entry.value:
            continue
        beat = ServiceHeartbeat.FromString(entry.value)
        if beat.service == service and beat.ready:
            total.update(dict(beat.counters))
    return total


async def counted(nc: Client, service: str, name: str, above: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        value = (await service_counters(nc, service))[name]
        if value > above:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} never counted {name} above {above}")
        await asyncio.sleep(0.2)


async def all_served(http: httpx.AsyncClient, requests: int = 8) -> None:
    """`requests` orchestrated requests, all answered 200 well before any deadline cascade."""
    started = time.monotonic()
    replies = await asyncio.gather(
        *(
            http.post("/v1/chat/completions", json=chat("llooma"), headers=AUTH)
            for _ in range(requests)
        )
    )
    assert [r.status_code for r in replies] == [200] * requests, [r.text for r in replies]
    # Well before the 21 s a stopped dispatcher once cost (the client's timeout), even on a
    # loaded machine.
    assert time.monotonic() - started < 15


class Mallory:
    """A host credential issued as `llooma hosts add` issues one, used as an attacker would."""

    nc: Client

    def __init__(self, server: EmbeddedNats) -> None:
        self.server = server
        self.name = f"mallory-{uuid.uuid4().hex[:6]}"
        self.errors: list[str] = []

    async def __aenter__(self) -> Mallory:
        assert self.server.credentials is not None
        seed = self.server.credentials.issue(self.name)
        self.nc = await connect_as(self.server, seed, self.errors)
        return self

    async def heartbeat(self, payload: bytes, reply: str = "") -> None:
        await self.nc.publish(subjects.host_heartbeat(self.name), payload, reply=reply)

    async def __aexit__(self, *_: object) -> None:
        await self.nc.close()
        assert self.server.credentials is not None
        self.server.credentials.revoke(self.name)


@pytest.fixture
def server(nats_server: EmbeddedNats | None, stack: Stack) -> EmbeddedNats:
    return credentials_of(nats_server)


def every_stream_and_bucket_subject(victim: str, canary: str) -> list[str]:
    """Reply subjects a confused deputy would aim JetStream's acknowledgements at."""
    dev_key = api_key_id("sk-llooma-dev")
    return [
        f"{canary}.ack",
        subjects.kv_put_subject(f"canary_{victim}", "entry"),
        subjects.PIPELINE_PRIVACY,
        subjects.PIPELINE_PLANNER,
        subjects.PIPELINE_DISPATCHER,
        subjects.PIPELINE_RACER,
        subjects.SETTLEMENT_TASK,
        subjects.SETTLEMENT_DUEL,
        subjects.RACE_EVENT,
        subjects.kv_put_subject(subjects.BALANCES_BUCKET, dev_key),
        subjects.kv_put_subject(subjects.BALANCES_BUCKET, subjects.BALANCES_COMPLETE_KEY),
        subjects.kv_put_subject(subjects.LEDGER_BUCKET, subjects.LEDGER_SUMMARY_KEY),
        subjects.kv_put_subject(subjects.STAKES_BUCKET, "host-fast"),
        subjects.kv_put_subject(subjects.HOSTS_BUCKET, "host-fast"),
        subjects.kv_put_subject(subjects.SERVICES_BUCKET, "dispatcher"),
        subjects.host_cancel("host-fast"),
        subjects.host_heartbeat("host-fast"),
        f"$JS.API.STREAM.PURGE.{subjects.PIPELINE_STREAM}",
        f"$JS.API.STREAM.DELETE.{subjects.SETTLEMENT_STREAM}",
        f"$JS.API.CONSUMER.DELETE.{subjects.PIPELINE_STREAM}.{subjects.CONSUMER_PRIVACY}",
    ]


@pytest.fixture
async def canary(nc: Client) -> AsyncIterator[str]:
    """A stream and a bucket in the control plane's account: any ack aimed at them shows."""
    suffix = uuid.uuid4().hex[:6]
    js = nc.jetstream()
    name = f"CANARY_{suffix}"
    prefix = f"llooma.v1.canary{suffix}"
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=[f"{prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY,
        )
    )
    await js.create_key_value(KeyValueConfig(bucket=f"canary_{suffix}", storage=StorageType.MEMORY))
    yield prefix
    await js.delete_stream(name)
    await js.delete_key_value(f"canary_{suffix}")


async def test_replies_a_host_names_land_in_no_stream_or_bucket(
    server: EmbeddedNats, nc: Client, http: httpx.AsyncClient, canary: str
) -> None:
    js = nc.jetstream()
    suffix = canary.removeprefix("llooma.v1.canary")
    stream = f"CANARY_{suffix}"
    targets = every_stream_and_bucket_subject(suffix, canary)
    acks: list[tuple[str, bytes]] = []

    async def watch(msg: Msg) -> None:
        # A JetStream ack or API answer, wherever it lands in the control plane's account;
        # but the answers to the control plane's own requests (its services read and write
        # streams all the time, e.g. accounting's anchors) go to their own inboxes, and the
        # server's audit advisories of those calls are the server's, not a deputy's acks.
        if msg.subject.startswith(("_INBOX.", "$JS.EVENT.")):
            return
        if msg.data.startswith(b'{"stream"') or b"io.nats.jetstream.api" in msg.data:
            acks.append((msg.subject, msg.data))

    watchers = [await nc.subscribe(">", cb=watch), await nc.subscribe("$KV.>", cb=watch)]

    # The deputy works inside the control plane's own account (so the canary can see it) ...
    await nc.publish(subjects.kv_put_subject(f"canary_{suffix}", "probe"), b"x", reply=targets[0])
    await nc.flush()
    await asyncio.sleep(0.3)
    assert (await js.stream_info(stream)).state.messages == 1, "the canary must see an ack"
    await js.purge_stream(stream)
    acks.clear()

    # ... and not from the hosts account, whatever a host publishes with whatever reply.
    async with Mallory(server) as mallory:
        attacker = mallory.nc

        async def answer_task(msg: Msg) -> None:
            for target in targets:
                chunk = HostChunk(seq=1, token=HostToken(text="x"))
                await attacker.publish(msg.reply, chunk.SerializeToString(), reply=target)

        await attacker.subscribe(subjects.host_task("echo", mallory.name), cb=answer_task)
        await attacker.flush()
        for target in targets:
            await mallory.heartbeat(b"\xff", reply=target)
            # The subject hosts once wrote their heartbeat to (now refused to them).
            own_entry = subjects.kv_put_subject(subjects.HOSTS_BUCKET, mallory.name)
            await attacker.publish(own_entry, b"\xff", reply=target)
            await attacker.publish(target, b"forged", reply=targets[0])
        await attacker.flush()
        replies: list[bytes] = []

        async def collect(msg: Msg) -> None:
            replies.append(msg.data)

        reply_to = subjects.host_reply("racer-test", uuid.uuid4().hex)
        await nc.subscribe(reply_to, cb=collect)
        await nc.publish(subjects.host_task("echo", mallory.name), b"task", reply=reply_to)
        await nc.flush()
        for _ in range(50):
            if len(replies) >= len(targets):
                break
            await asyncio.sleep(0.05)
        assert len(replies) == len(targets), "the host's replies to a task it was sent arrive"
        await asyncio.sleep(0.5)

    for watcher in watchers:
        await watcher.unsubscribe()
    assert acks == []
    assert (await js.stream_info(stream)).state.messages == 0
    kv = await js.key_value(f"canary_{suffix}")
    with pytest.raises(KeyNotFoundError):
        await kv.get("entry")
    for name in (subjects.PIPELINE_STREAM, subjects.SETTLEMENT_STREAM, subjects.EVENTS_STREAM):
        await js.stream_info(name)
    await js.consumer_info(subjects.PIPELINE_STREAM, subjects.CONSUMER_PRIVACY)
    await all_served(http)


def bad_heartbeats() -> dict[str, bytes]:
    def with_model(**fields: object) -> bytes:
        model: dict[str, object] = {"name": "fine-model", "capacity": 4, "stake": 1.0, **fields}
        capability = ModelCapability(**model)  # type: ignore[arg-type]
        beat = HostHeartbeat(version=VERSION, models=[capability], load=0.1, stake=1.0)
        return beat.SerializeToString()

    def with_host(**fields: object) -> bytes:
        beat = {"version": VERSION, "models": [ModelCapability(name="fine-model", capacity=4)]}
        fields = {**beat, "load": 0.1, **fields}
        return HostHeartbeat(**fields).SerializeToString()  # type: ignore[arg-type]

    return {
        "stake nan": with_model(stake=math.nan),
        "stake inf": with_model(stake=math.inf),
        "host stake inf": with_host(stake=math.inf),
        "stake negative": with_model(stake=-5.0),
        "stake huge": with_model(stake=1e300),
        "load nan": with_host(load=math.nan),
        "load negative": with_host(load=-1.0),
        "capacity huge": with_model(capacity=4_000_000_000),
        "model *": with_model(name="*"),
        "model >": with_model(name=">"),
        "model with a space": with_model(name="a b"),
        "model llooma": with_model(name="llooma"),
        "undecodable": b"\xff\xff\xff\xff",
        "huge": b"\x00" * 100_000,
    }


async def test_bad_heartbeats_are_refused_counted_and_every_request_is_served(
    server: EmbeddedNats, nc: Client, http: httpx.AsyncClient
) -> None:
    before = sum(
        v
        for k, v in (await service_counters(nc, "dispatcher")).items()
        if k.startswith("heartbeat_refused.")
    )
    bad = bad_heartbeats()
    async with Mallory(server) as mallory:
        # As fast as the intake lets one host (10 a second): every one must be read.
        for payload in bad.values():
            await mallory.heartbeat(payload)
            await mallory.nc.flush()
            await asyncio.sleep(0.12)
        refused = await counted_refusals(nc, before + len(bad))
        assert refused >= before + len(bad)
        listed = (await http.get("/v1/models", headers=AUTH)).json()["data"]
        names = [m["id"] for m in listed]
        assert "fine-model" not in names
        assert not {"*", ">", "a b"} & set(names)
        assert names.count("llooma") == 1
        await all_served(http)

    # A flood from one host is refused past 10 a second, and counted.
    async with Mallory(server) as mallory:
        flood_before = (await service_counters(nc, "dispatcher"))["heartbeat_refused.rate"]
        for _ in range(50):
            await mallory.heartbeat(b"\xff")
        await mallory.nc.flush()
        await counted(nc, "dispatcher", "heartbeat_refused.rate", flood_before + 30)

    # What reaches the bucket by another way (only the control plane can write it) is refused
    # by every reader too: the second line.
    bypass = f"bypass-{uuid.uuid4().hex[:6]}"
    view_before = (await service_counters(nc, "dispatcher"))["membership_refused.llooma_hosts"]
    await nc.publish(subjects.kv_put_subject(subjects.HOSTS_BUCKET, bypass), bad["stake nan"])
    await nc.flush()
    await counted(nc, "dispatcher", "membership_refused.llooma_hosts", view_before)
    await all_served(http)


async def counted_refusals(nc: Client, at_least: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        total = sum(
            v
            for k, v in (await service_counters(nc, "dispatcher")).items()
            if k.startswith("heartbeat_refused.")
        )
        if total >= at_least or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.2)


POISONED = [
    ("privacy", subjects.PIPELINE_STREAM, subjects.PIPELINE_PRIVACY, subjects.CONSUMER_PRIVACY),
    ("planner", subjects.PIPELINE_STREAM, subjects.PIPELINE_PLANNER, subjects.CONSUMER_PLANNER),
    (
        "dispatcher",
        subjects.PIPELINE_STREAM,
        subjects.PIPELINE_DISPATCHER,
        subjects.CONSUMER_DISPATCHER,
    ),
    ("racer", subjects.PIPELINE_STREAM, subjects.PIPELINE_RACER, subjects.CONSUMER_RACER),
    (
        "accounting",
        subjects.SETTLEMENT_STREAM,
        subjects.SETTLEMENT_TASK,
        subjects.CONSUMER_ACCOUNTING,
    ),
    (
        "accounting",
        subjects.SETTLEMENT_STREAM,
        subjects.SETTLEMENT_DUEL,
        subjects.CONSUMER_ACCOUNTING_DUELS,
    ),
]


@pytest.mark.parametrize(("service", "stream", "subject", "consumer"), POISONED)
async def test_poison_on_each_consumer_is_terminated_counted_and_the_next_is_served(
    service: str,
    stream: str,
    subject: str,
    consumer: str,
    stack: Stack,
    nc: Client,
    http: httpx.AsyncClient,
) -> None:
    js = nc.jetstream()
    name = f"poison_terminated.{consumer}"
    before = (await service_counters(nc, service))[name]
    for _ in range(3):
        await bus.hand_off(js, subject, b"\xff\xff\xff\xff", uuid.uuid4().hex)
    # Accounting takes settlements in batches and is slow to catch up on a busy machine.
    await counted(nc, service, name, before + 2, timeout_s=45)
    # Nothing left pending: the poison is not waiting for a redelivery (accounting may still
    # be committing the settlements of earlier requests, so it may take a while).
    deadline = time.monotonic() + 45
    while (await js.consumer_info(stream, consumer)).num_ack_pending:
        assert time.monotonic() < deadline, await js.consumer_info(stream, consumer)
        await asyncio.sleep(0.2)
    await all_served(http, 4)


async def test_a_handler_that_always_fails_gives_up_after_max_deliver_and_blocks_nothing(
    nc: Client, nats_url: str, control_seed: str | None
) -> None:
    suffix = uuid.uuid4().hex[:6]
    js = nc.jetstream()
    stream, subject, queue = f"POISON_{suffix}", f"llooma.v1.poison{suffix}.in", f"poison{suffix}"
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.MEMORY,
        )
    )
    settings = Settings(nats_url=nats_url, nats_nkey_seed_file=control_seed or "")
    runner = Service(f"poison-{suffix}", settings)
    await runner.connect()
    seen: Counter[bytes] = Counter()

    async def handler(msg: Msg) -> None:
        seen[msg.data] += 1
        if msg.data == b"bad":
            raise RuntimeError("this handler fails on this message every time")

    try:
        await runner.consume(subject, queue, handler)
        await js.publish(subject, b"bad")
        await js.publish(subject, b"good")
        for _ in range(20):
            if seen[b"good"]:
                break
            await asyncio.sleep(0.05)
        assert seen[b"good"] == 1, "the next message is served while the bad one waits"
        deadline = time.monotonic() + 20
        while counters.snapshot().get(f"poison_terminated.{queue}", 0) < 1:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # no redelivery after the last
        assert seen[b"bad"] == MAX_DELIVER
        info = await js.consumer_info(stream, queue)
        assert info.num_ack_pending == 0
        assert info.config.max_deliver == MAX_DELIVER
    finally:
        await runner.nc.close()
        await js.delete_stream(stream)


async def test_undecodable_messages_are_terminated_at_once(
    nc: Client, nats_url: str, control_seed: str | None
) -> None:
    suffix = uuid.uuid4().hex[:6]
    js = nc.jetstream()
    stream, subject, queue = f"UNDECODABLE_{suffix}", f"llooma.v1.undec{suffix}.in", f"un{suffix}"
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.MEMORY,
        )
    )
    runner = Service(
        f"undecodable-{suffix}", Settings(nats_url=nats_url, nats_nkey_seed_file=control_seed or "")
    )
    await runner.connect()
    calls: list[bytes] = []

    async def handler(msg: Msg) -> None:
        calls.append(msg.data)
        HostHeartbeat.FromString(msg.data)

    try:
        await runner.consume(subject, queue, handler)
        await js.publish(subject, b"\xff\xff\xff\xff")
        deadline = time.monotonic() + 5
        while counters.snapshot().get(f"poison_terminated.{queue}", 0) < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        assert calls == [b"\xff\xff\xff\xff"], "terminated, never redelivered"
        assert (await js.stream_info(stream)).state.messages == 0
    finally:
        await runner.nc.close()
        await js.delete_stream(stream)


async def open_raw(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", stack.http_port)


async def closed_after(reader: asyncio.StreamReader, limit_s: float) -> tuple[float, bytes]:
    started = time.monotonic()
    try:
        answer = await asyncio.wait_for(reader.read(), limit_s)  # until EOF: the server closed
    except ConnectionResetError:  # closed with bytes of ours still unread
        answer = b"reset"
    return time.monotonic() - started, answer


async def test_slow_clients_are_cut_off_and_others_served(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    read_timeout_s = Settings().http_read_timeout_s
    limit_s = read_timeout_s + 3
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer sk-llooma-dev\r\n"
    )

    async def short_body() -> tuple[float, bytes]:
        reader, writer = await open_raw(stack)
        writer.write(f"{head}Content-Length: 1000\r\n\r\n".encode() + b'{"model":')
        await writer.drain()
        return await closed_after(reader, limit_s)

    async def slowloris() -> tuple[float, bytes]:
        reader, writer = await open_raw(stack)
        writer.write(head.encode())
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                while time.monotonic() - started < limit_s:
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.5)

        dripping = asyncio.create_task(trickle())
        try:
            return await closed_after(reader, limit_s)
        finally:
            dripping.cancel()

    async def silent() -> tuple[float, bytes]:
        reader, _ = await open_raw(stack)
        return await closed_after(reader, limit_s)

    async def huge_headers() -> tuple[float, bytes]:
        reader, writer = await open_raw(stack)
        writer.write(head.encode() + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        return await closed_after(reader, limit_s)

    slow = [asyncio.create_task(c) for c in (short_body(), slowloris(), silent())]
    slow += [asyncio.create_task(slowloris()) for _ in range(50)]
    took, answer = await huge_headers()
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset", answer[:100]
    assert took < 2.0, "oversized headers are refused at once, not read to the end"
    await all_served(http, 4)  # while 53 slow connections are open
    results = await asyncio.gather(*slow)
    assert all(took < limit_s for took, _ in results)
    assert results[0][1].startswith(b"HTTP/1.1 408"), results[0][1][:100]
    assert results[1][1].startswith(b"HTTP/1.1 408"), results[1][1][:100]


async def test_a_large_body_sent_with_its_headers_is_not_taken_for_large_headers(
    stack: Stack,
) -> None:
    """One write holding small headers and a body well over the header limit (but within the
    body limit): the header bound counts the headers only, so the request is served."""
    body = orjson.dumps(
        {
            "model": "echo",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "x" * 300_000}],
        }
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {DEV_API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await open_raw(stack)
    writer.write(head + body)
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200"), status
