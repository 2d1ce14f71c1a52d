"""A service beats slowly at rest and quickly while it has work; readers follow each promise."""

from __future__ import annotations

import asyncio
import time

from llooma import subjects
from llooma.bus import SERVICE_MEMBERSHIP_TTL_S
from llooma.membership import MISSED_BEATS, ServiceDirectory
from llooma.runtime import ServiceHeartbeater
from llooma.v1.service_pb2 import ServiceHeartbeat


class RecordingConnection:
    """Stands in for the NATS client: keeps each beat with the loop time it was sent."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, ServiceHeartbeat]] = []
        self.arrived = asyncio.Event()

    async def publish(self, subject: str, payload: bytes) -> None:
        assert subject == subjects.kv_put_subject(subjects.SERVICES_BUCKET, "racer-1")
        loop_time = asyncio.get_running_loop().time()
        self.beats.append((loop_time, ServiceHeartbeat.FromString(payload)))
        self.arrived.set()

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109 (the client's signature)
        return None

    async def next_beat(self) -> ServiceHeartbeat:
        self.arrived.clear()
        await asyncio.wait_for(self.arrived.wait(), timeout=5)
        return self.beats[-1][1]


async def test_a_resting_service_promises_the_long_wait_and_work_brings_a_short_beat_at_once() -> (
    None
):
    busy = False
    nc = RecordingConnection()
    beater = ServiceHeartbeater(
        nc,  # type: ignore[arg-type]
        "racer",
        "racer-1",
        busy_s=0.05,
        idle_s=0.4,
        busy=lambda: busy,
    )
    await beater.start()
    try:
        assert nc.beats[0][1].next_beat_ms == 400
        assert nc.beats[0][1].ready
        # At rest no beat comes sooner than promised.
        second = await nc.next_beat()
        assert second.next_beat_ms == 400
        assert nc.beats[1][0] - nc.beats[0][0] >= 0.39
        # Work arrives: a beat at once, promising the short interval, then beats at that pace.
        busy = True
        asked_at = asyncio.get_running_loop().time()
        beater.work_started()
        third = await nc.next_beat()
        assert third.next_beat_ms == 50
        assert nc.beats[-1][0] - asked_at < 0.2
        for _ in range(3):
            await nc.next_beat()
        gaps = [b[0] - a[0] for a, b in zip(nc.beats[-4:-1], nc.beats[-3:], strict=True)]
        assert all(gap < 0.2 for gap in gaps), gaps
        # Further work while the short promise stands sends nothing extra.
        count = len(nc.beats)
        beater.work_started()
        await asyncio.sleep(0)
        assert len(nc.beats) == count
        # Back at rest: the next beat promises the long wait again.
        busy = False
        assert (await nc.next_beat()).next_beat_ms == 400
    finally:
        await beater.stop()
    assert not nc.beats[-1][1].ready


def _heard(directory: ServiceDirectory, key: str, next_beat_ms: int, age_s: float) -> None:
    beat = ServiceHeartbeat(service="racer", instance_id=key, ready=True, next_beat_ms=next_beat_ms)
    directory.members._apply(key, beat.SerializeToString(), "PUT", time.time() - age_s)


def test_the_cutoff_follows_each_instances_promise() -> None:
    directory = ServiceDirectory(stale_after_s=3.0)
    # At rest, promising 5 s: still counted after 10 s of silence, gone after three beats.
    _heard(directory, "resting", 5000, age_s=10.0)
    _heard(directory, "resting-dead", 5000, age_s=MISSED_BEATS * 5.0 + 1.0)
    # Busy, promising 1 s: gone after service_stale_after_s (3 s), as before.
    _heard(directory, "busy", 1000, age_s=1.0)
    _heard(directory, "busy-dead", 1000, age_s=3.5)
    # An older instance that promised nothing: the reader's own cutoff.
    _heard(directory, "old", 0, age_s=3.5)
    assert directory.ready_instances() == {"racer": 2}
    assert not directory.gone("resting")
    assert not directory.gone("busy")
    assert directory.gone("busy-dead")
    assert directory.gone("resting-dead")
    assert directory.gone("old")


def test_instances_dead_longer_than_the_buckets_ttl_are_forgotten_when_a_new_one_joins() -> None:
    directory = ServiceDirectory(stale_after_s=3.0)
    for restart in range(50):
        _heard(directory, f"racer-{restart}", 5000, age_s=SERVICE_MEMBERSHIP_TTL_S + 1.0)
    _heard(directory, "racer-live", 5000, age_s=0.0)
    assert [m.key for m in directory.members._members.values()] == ["racer-live"]


def test_an_instance_known_to_be_busy_is_judged_by_the_busy_beat() -> None:
    directory = ServiceDirectory(stale_after_s=3.0)
    # Its last beat promised 5 s (at rest), but the caller knows it holds work since then.
    _heard(directory, "relaying", 5000, age_s=2.5)
    _heard(directory, "other", 5000, age_s=0.5)
    assert not directory.gone("relaying")
    assert directory.gone("relaying", stale_after_s=2.0)
    assert not directory.gone("relaying", stale_after_s=3.0)
    assert not directory.gone("other", stale_after_s=2.0)
