"""The NATS side of takeover.py. A race's record in the races bucket, one write after
another (the race awaits only the first, see race.py's `_recorded_first`); its last revision
is the racer's claim on the race. `take_over` moves that claim to another racer (a
compare-and-set) and settles the dead race, so exactly one racer settles each race."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from llooma import bus, subjects
from llooma.race_records import RecordWriter, moved_on, race_key
from llooma.v1.pipeline_pb2 import RaceResume, TaskAssignment
from llooma.v1.race_pb2 import RaceRecord
from services.racer.report import race_event, settlements
from services.racer.state import Race
from services.racer.takeover import resumed_assignment, taken_over

if TYPE_CHECKING:
    from services.racer.race import RaceIO

log = logging.getLogger(__name__)

# Settlements of races taken over, published in the background.
_SETTLING: set[asyncio.Task[None]] = set()


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
        return "its race left no record (never recorded)"
    if not entry.value:
        # Its racer settled it: it was alive after all.
        return "its race finished"
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
    # A split request's record (its aggregator died) launched nothing itself: its node races
    # are settled by their own racers.
    if dead.attempts:
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
