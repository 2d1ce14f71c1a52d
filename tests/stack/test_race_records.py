"""A race's record in the races bucket on a real nats-server: the claim that lets exactly one
racer settle a race, whether its first racer died or was only slow."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from llooma import bus, subjects
from llooma.race_records import RecordWriter, race_key, races_bucket
from llooma.v1.host_pb2 import HostAccepted, HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.pipeline_pb2 import ClientEvent
from llooma.v1.race_pb2 import RaceRecord
from services.racer.race import Racer
from tests.unit.race_sim import Reply, assignment


async def test_the_racer_holding_the_record_settles_and_marks_it_finished(nc: Client) -> None:
    js = nc.jetstream()
    await bus.ensure_topology(js)
    kv = await races_bucket(js)
    key = uuid.uuid4().hex
    writer = RecordWriter(kv, key)
    writer.write(RaceRecord(racer_instance_id="racer-1"))
    writer.write(RaceRecord(racer_instance_id="racer-1", winner_attempt_id="a1"))
    # One write after another: the last one is what another racer would read.
    await writer.written()
    entry = await kv.get(key)
    assert entry.value is not None
    assert RaceRecord.FromString(entry.value).winner_attempt_id == "a1"
    assert await writer.release()
    assert not (await kv.get(key)).value  # FINISHED: nats-py reads an empty value as None
    # A delivery of the same assignment after the race ended is refused the record.
    again = RecordWriter(kv, key)
    again.write(RaceRecord(racer_instance_id="racer-2"))
    await again.written()
    assert again.taken_over


async def test_a_slow_racer_taken_over_settles_nothing(nc: Client) -> None:
    js = nc.jetstream()
    await bus.ensure_topology(js)
    kv = await races_bucket(js)
    key = uuid.uuid4().hex
    slow = RecordWriter(kv, key)
    slow.write(RaceRecord(racer_instance_id="slow", winner_attempt_id="a1"))
    await slow.written()
    entry = await kv.get(key)
    assert entry.value is not None
    assert RaceRecord.FromString(entry.value).winner_attempt_id == "a1"
    # Another racer claims the race at the revision it read (what records.take_over does).
    claim = RaceRecord(racer_instance_id="heir").SerializeToString()
    read_revision = entry.revision
    revision = await kv.update(key, claim, last=read_revision)
    # The slow racer's next write and its settlement are refused: it was taken over.
    slow.write(RaceRecord(racer_instance_id="slow", winner_attempt_id="a2"))
    assert not await slow.release()
    assert slow.taken_over
    entry = await kv.get(key)
    assert entry.value is not None
    assert RaceRecord.FromString(entry.value).racer_instance_id == "heir"
    # A second claim at the revision the first one read loses: one racer takes a race over.
    with pytest.raises(KeyWrongLastSequenceError):
        await kv.update(key, claim, last=read_revision)
    heir = RecordWriter(kv, key, revision)
    assert await heir.release()
    assert not (await kv.get(key)).value  # FINISHED: nats-py reads an empty value as None


class RecordCheckingIO:
    """Hosts that answer at once; each launch reads the race's record as the host hears of
    it, and everything the racer sends is kept."""

    def __init__(self, kv: KeyValue, key: str) -> None:
        self.kv = kv
        self.key = key
        self.racer: Racer | None = None
        self.recorded_at_launch: list[bool] = []
        self.emitted: list[ClientEvent] = []
        self.published: list[str] = []

    async def launch(self, host_id: str, task: HostTask, headers: dict[str, str] | None) -> None:
        try:
            await self.kv.get(self.key)
            self.recorded_at_launch.append(True)
        except NotFoundError:
            self.recorded_at_launch.append(False)
        assert self.racer is not None
        racer = self.racer
        reply = subjects.host_reply("unit", task.attempt_id)

        async def answer() -> None:
            for chunk in (
                HostChunk(seq=0, accepted=HostAccepted()),
                HostChunk(seq=1, token=HostToken(text="one")),
                HostChunk(seq=2, finished=HostFinished(finish_reason="stop")),
            ):
                await racer._on_host_chunk(cast(Msg, Reply(reply, chunk.SerializeToString())))

        asyncio.get_running_loop().create_task(answer())

    async def cancel(self, host_id: str, attempt_id: str) -> None:
        pass

    async def emit(self, reply: str, event: ClientEvent) -> None:
        self.emitted.append(event)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        self.published.append(subject)


class SlowCreates:
    """The real races bucket, its creates landing 0.1 s late (a busy nats-server)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.created = False

    async def create(self, key: str, value: bytes) -> int:
        await asyncio.sleep(0.1)
        revision = await self._kv.create(key, value)
        self.created = True
        return revision

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


async def _race_on_record(
    nc: Client, *, recorded_by: str = "", finished: bool = False
) -> tuple[RecordCheckingIO, list[str]]:
    """A single-choice race run by a racer on the real races bucket (creates slowed), its
    record already written by `recorded_by` (or not), or marked finished; what its hosts saw,
    and what had happened when it claimed its assignment."""
    js = nc.jetstream()
    await bus.ensure_topology(js)
    kv = SlowCreates(await races_bucket(js))
    race = assignment(["h1", "h2"])
    request_id = uuid.uuid4().hex
    race.request.request_id = request_id
    race.request.reply_subject = subjects.client_reply("ingress-unit", request_id)
    key = race_key(request_id)
    if recorded_by or finished:
        earlier = RecordWriter(cast(KeyValue, kv), key)
        earlier.write(RaceRecord(racer_instance_id=recorded_by or "racer-done"))
        if finished:
            assert await earlier.release()
        await earlier.written()
        kv.created = False
    io = RecordCheckingIO(cast(KeyValue, kv), key)
    racer = Racer("racer-unit", io=io)
    racer._races = cast(KeyValue, kv)
    io.racer = racer
    claims: list[str] = []

    def claim() -> None:
        claims.append(f"recorded={kv.created} after {len(io.recorded_at_launch)} launches")

    await asyncio.wait_for(racer.run(race, claim=claim), 10)
    return io, claims


async def test_a_race_is_recorded_before_any_host_hears_of_it_and_claimed_then(
    nc: Client,
) -> None:
    io, claims = await _race_on_record(nc)
    assert io.recorded_at_launch == [True, True]
    assert claims == ["recorded=True after 0 launches"]
    assert any(event.HasField("finished") for event in io.emitted)
    assert subjects.SETTLEMENT_TASK in io.published


@pytest.mark.parametrize("finished", [False, True], ids=["running", "finished"])
async def test_an_assignment_delivered_again_is_left_to_the_race_on_record(
    nc: Client, finished: bool
) -> None:
    """Its first racer recorded the race and its claim never reached JetStream (it died, or
    its ack was lost in a NATS node's election): the race on record is resumed, or finished,
    and the second delivery must not reach hosts or the client."""
    io, claims = await _race_on_record(nc, recorded_by="racer-first", finished=finished)
    assert io.recorded_at_launch == []
    assert io.emitted == []
    assert io.published == []
    # Claimed by the consumer once the handler returns (Service.consume).
    assert claims == []
