"""A race's record in the races bucket (`llooma_races`), written in the background, one write
after another (`written` waits for them); its last revision is the writer's claim on the
race, and a finished race's record is marked `FINISHED`. Racers keep one per race
(services/racer/records.py), an aggregator one per split request it relays
(services/aggregator): whoever holds the last revision settles or ends it."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from llooma import subjects
from llooma.v1.race_pb2 import RaceRecord

log = logging.getLogger(__name__)

# JetStream's "wrong last sequence": someone else wrote the key since our revision.
_WRONG_LAST_SEQUENCE = (10071, 10164)


def moved_on(error: Exception) -> bool:
    """The key changed since the revision we held: another racer took the race over."""
    return isinstance(error, KeyWrongLastSequenceError) or (
        isinstance(error, APIError) and error.err_code in _WRONG_LAST_SEQUENCE
    )


# A finished race's record: its racer settled it (`RecordWriter.release`).
FINISHED = b""


def race_key(request_id: str, node_id: str = "") -> str:
    """A race's record: the request's, or one node's of a split request."""
    return f"{request_id}.{node_id}" if node_id else request_id


async def racer_of(races: KeyValue, key: str) -> str:
    """The instance holding the race recorded under `key`; "" while there is no record (not
    written yet, never recorded), once it is finished (an empty record names no one), or when
    the bucket cannot say."""
    try:
        entry = await races.get(key)
    except Exception:
        return ""
    return RaceRecord.FromString(entry.value or b"").racer_instance_id


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
            if moved_on(error):
                # Updated by another racer since our revision, or (a create) recorded first by
                # the assignment's other delivery.
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
        """Mark the race finished if the record is still ours: True if this racer is to settle
        the race (also when the record could not be read or written: settling by attempt id is
        idempotent downstream, a lost settlement is not recoverable). The mark (`FINISHED`, an
        empty value) rather than a delete: a create is refused on it as on a live record, so
        an assignment redelivered after its race ended (its racer's ack lost in a NATS node's
        election) is not raced again; it leaves with the bucket's TTL, as a delete marker
        would."""
        await self.written()
        if self.taken_over:
            return False
        if self._revision is None or self._unrecorded:
            return True
        try:
            await self._kv.update(self._key, FINISHED, last=self._revision)
        except Exception as error:
            if moved_on(error):
                self.taken_over = True
                return False
            log.warning("race record %s not marked finished: %r", self._key, error)
        return True
