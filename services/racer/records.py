"""The NATS side of takeover.py. A race's record in the races bucket, written in the
background, one write after another, so a race never waits on it; its last revision is the
racer's claim on the race. `take_over` moves that claim to another racer (a compare-and-set)
and settles the dead race, so exactly one racer settles each race."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from llooma import bus, subjects
from llooma.v1.pipeline_pb2 import RaceResume, TaskAssignment
from llooma.v1.race_pb2 import RaceRecord
from services.racer.report import race_event, settlements
from services.racer.state import Race
from services.racer.takeover import race_key, resumed_assignment, taken_over

if TYPE_CHECKING:
    from services.racer.race import RaceIO

log = logging.getLogger(__name__)

# Settlements of races taken over, published in the background.
_SETTLING: set[asyncio.Task[None]] = set()

# JetStream's "wrong last sequence": someone else wrote the key since our revision.
_WRONG_LAST_SEQUENCE = (10071, 10164)


def moved_on(error: Exception) -> bool:
    """The key changed since the revision we held: another racer took the race over."""
    return isinstance(error, KeyWrongLastSequenceError) or (
        isinstance(error, APIError) and error.err_code in _WRONG_LAST_SEQUENCE
    )


async def races_bucket(js: JetStreamContext) -> KeyValue:
    return await js.key_value(subjects.RACES_BUCKET)


class RecordWriter:
    """One race's record: `write` queues a version, `release` ends the race's claim."""

    def __init__(self, kv: KeyValue, key: str, revision: int | None = None) -> None:
        self._kv = kv
        self._key = key
        self._revision = revision
        self._writing: asyncio.Task[None] | None = None
        # Another racer holds the race now: this one must neither write nor settle it.
        self.taken_over = False
        self._unrecorded = False

    def write(self, record: RaceRecord) -> None:
        previous = self._writing
        self._writing = asyncio.create_task(self._write(previous, record.SerializeToString()))

    async def _write(self, previous: asyncio.Task[None] | None, value: bytes) -> None:
        if previous is not None:
            await previous
        if self.taken_over or self._unrecorded:
            return
        try:
            if self._revision is None:
                self._revision = await self._kv.create(self._key, value)
            else:
                self._revision = await self._kv.update(self._key, value, last=self._revision)
        except Exception as error:
            if self._revision is not None and moved_on(error):
                self.taken_over = True
            else:
                # Unrecorded (a create that may or may not have landed proves nothing), the
                # race cannot be taken over; it is still settled by this racer.
                self._unrecorded = True
                log.warning("race record %s not written: %r", self._key, error)

    async def written(self) -> None:
        """Wait for the writes queued so far."""
        if self._writing is not None:
            await self._writing

    async def release(self) -> bool:
        """Delete the record if it is still ours: True if this racer is to settle the race
        (also when the record could not be read or written: settling by attempt id is
        idempotent downstream, a lost settlement is not recoverable)."""
        await self.written()
        if self.taken_over:
            return False
        if self._revision is None or self._unrecorded:
            return True
        try:
            await self._kv.delete(self._key, last=self._revision)
        except Exception as error:
            if moved_on(error):
                self.taken_over = True
                return False
            log.warning("race record %s not deleted: %r", self._key, error)
        return True


async def take_over(
    races: KeyValue, io: RaceIO, racer_id: str, resume: RaceResume
) -> str | tuple[TaskAssignment, RecordWriter]:
    """Claim a dead racer's race (compare-and-set on its record's revision: exactly one racer,
    the old one if it was only slow, settles it), cancel its attempts and settle them; the
    assignment to finish the answer under and the claim's writer, or why not."""
    key = race_key(resume.request_id, resume.node_id)
    try:
        entry = await races.get(key)
    except NotFoundError:
        # Deleted: its racer settled it (it was alive after all); absent: never recorded.
        return "its race left no record (finished, or never recorded)"
    assert entry.value is not None
    assert entry.revision is not None
    record = RaceRecord.FromString(entry.value)
    if record.racer_instance_id == racer_id:
        return "its racer is this one, which is alive"
    assignment = resumed_assignment(record.assignment)
    assignment.request.reply_subject = resume.reply_subject
    claim = RaceRecord(assignment=assignment, racer_instance_id=racer_id)
    try:
        revision = await races.update(key, claim.SerializeToString(), last=entry.revision)
    except Exception as error:
        if moved_on(error):
            return "its race was taken over or finished meanwhile"
        raise
    dead = taken_over(record, resume.delivered_tokens, time.monotonic())
    for attempt in dead.attempts.values():
        await io.cancel(attempt.host.host_id, attempt.attempt_id)
    settle = asyncio.create_task(_settle_taken_over(io, dead))
    bus.keep_task(_SETTLING, settle, "settling a race taken over")
    return assignment, RecordWriter(races, key, revision)


async def _settle_taken_over(io: RaceIO, race: Race) -> None:
    """A dead racer's race, settled by the racer that took it over (takeover.taken_over)."""
    now, unix_nanos = time.monotonic(), time.time_ns()
    await asyncio.gather(
        *(
            io.publish(subjects.SETTLEMENT_TASK, s.SerializeToString(), s.attempt_id)
            for s in settlements(race, now, unix_nanos)
        )
    )
    event = race_event(race, now, unix_nanos)
    await io.publish(subjects.RACE_EVENT, event.SerializeToString(), race.assignment.task_id)
