"""A race's record in the races bucket on a real nats-server: the claim that lets exactly one
racer settle a race, whether its first racer died or was only slow."""

from __future__ import annotations

import uuid

import pytest
from nats.aio.client import Client
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from llooma import bus
from llooma.race_records import RecordWriter, races_bucket
from llooma.v1.race_pb2 import RaceRecord


async def test_the_racer_holding_the_record_settles_and_deletes_it(nc: Client) -> None:
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
    with pytest.raises(NotFoundError):
        await kv.get(key)


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
    with pytest.raises(NotFoundError):
        await kv.get(key)
