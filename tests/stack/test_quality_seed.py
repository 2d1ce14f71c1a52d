"""Duel quality survives a dispatcher restart: the dispatcher's feed replays duel results from
the settlements stream (real NATS), then follows live ones through the same consumer."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.host_stats import HostStats
from llooma.v1.duel_pb2 import (
    DUEL_VERDICT_A,
    DUEL_VERDICT_B,
    DUEL_VERDICT_TIE,
    DUEL_VERDICT_UNSPECIFIED,
    DuelResult,
)
from services.dispatcher.quality import DuelQualityFeed

# What a judged duel is worth to side A; B gets 1 minus it. UNSPECIFIED says nothing.
SCORE_OF_A = {DUEL_VERDICT_A: 1.0, DUEL_VERDICT_B: 0.0, DUEL_VERDICT_TIE: 0.5}
OUTCOMES = (DUEL_VERDICT_A, DUEL_VERDICT_B, DUEL_VERDICT_TIE, DUEL_VERDICT_UNSPECIFIED)


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    context = nc.jetstream()
    await bus.ensure_topology(context)
    return context


class WatchedStats(HostStats):
    """The dispatcher's tracker, telling the test each time a duel is folded in."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded = asyncio.Event()

    def record_duel(self, result: DuelResult) -> None:
        super().record_duel(result)
        self.recorded.set()


def expected_quality(results: list[DuelResult]) -> dict[str, tuple[float, int]]:
    """The EWMA (alpha 0.2, from 0.5) folded by hand, in publication order."""
    quality: dict[str, tuple[float, int]] = {}
    for result in results:
        if result.outcome not in SCORE_OF_A:
            continue
        score_a = SCORE_OF_A[result.outcome]
        for host, score in ((result.host_a, score_a), (result.host_b, 1.0 - score_a)):
            q, n = quality.get(host, (0.5, 0))
            quality[host] = (q + 0.2 * (score - q), n + 1)
    return quality


def duels(hosts: list[str], count: int, rng: random.Random) -> list[DuelResult]:
    made = []
    for _ in range(count):
        a, b = rng.sample(hosts, 2)
        made.append(
            DuelResult(
                duel_id=uuid.uuid4().hex,
                task_id=uuid.uuid4().hex,
                host_a=a,
                host_b=b,
                outcome=rng.choice(OUTCOMES),
                finished_unix_nanos=time.time_ns(),
            )
        )
    return made


async def publish(js: JetStreamContext, results: list[DuelResult]) -> None:
    for result in results:
        await bus.hand_off(
            js, subjects.SETTLEMENT_DUEL, result.SerializeToString(), f"{result.task_id}.duel"
        )


def observed(stats: HostStats, hosts: list[str]) -> dict[str, tuple[float, int]]:
    return {h: (stats.quality(h), stats.duels(h)) for h in hosts if stats.duels(h)}


def assert_matches(seen: dict[str, tuple[float, int]], want: dict[str, tuple[float, int]]) -> None:
    assert want, "the seeded results must judge someone"
    assert {h: n for h, (_, n) in seen.items()} == {h: n for h, (_, n) in want.items()}
    for host, (quality, _) in want.items():
        assert seen[host][0] == pytest.approx(quality, abs=1e-12), host


async def wait_for_duels(stats: WatchedStats, hosts: list[str], total: int) -> None:
    async with asyncio.timeout(10):
        while sum(n for _, n in observed(stats, hosts).values()) < total:
            stats.recorded.clear()
            await stats.recorded.wait()


async def test_replay_then_live_counts_each_result_once(js: JetStreamContext) -> None:
    rng = random.Random(7)
    hosts = [f"seed-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    history = duels(hosts, 60, rng)
    await publish(js, history)
    # Enough more (ties, whose order does not matter) that the replay outlasts start().
    fillers = [f"filler-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    filler = [
        DuelResult(host_a=fillers[0], host_b=fillers[1], outcome=DUEL_VERDICT_TIE)
        for _ in range(2000)
    ]
    for at in range(0, len(filler), 250):
        await asyncio.gather(
            *(
                js.publish(subjects.SETTLEMENT_DUEL, result.SerializeToString())
                for result in filler[at : at + 250]
            )
        )
    hosts += fillers
    history += filler

    stats = WatchedStats()
    feed = DuelQualityFeed(stats, replay_s=3600)
    await feed.start(js)
    try:
        assert await feed.wait_caught_up(10)
        # Caught up means counted: no waiting for the replay after the event.
        assert_matches(observed(stats, hosts), expected_quality(history))

        live = duels(hosts, 25, rng)
        await publish(js, live)
        everything = expected_quality(history + live)
        await wait_for_duels(stats, hosts, sum(n for _, n in everything.values()))
        await asyncio.sleep(0.2)  # a result delivered twice would show up by now
        assert_matches(observed(stats, hosts), everything)
    finally:
        await feed.stop()


async def test_results_older_than_the_window_are_not_replayed(js: JetStreamContext) -> None:
    rng = random.Random(11)
    hosts = [f"window-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    old = duels(hosts, 20, rng)
    await publish(js, old)
    await asyncio.sleep(3.0)
    recent = duels(hosts, 15, rng)
    await publish(js, recent)

    stats = WatchedStats()
    feed = DuelQualityFeed(stats, replay_s=1.5)
    await feed.start(js)
    try:
        assert await feed.wait_caught_up(10)
        assert_matches(observed(stats, hosts), expected_quality(recent))
    finally:
        await feed.stop()


async def test_no_replay_window_starts_from_live_results(js: JetStreamContext) -> None:
    rng = random.Random(13)
    hosts = [f"live-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    await publish(js, duels(hosts, 10, rng))

    stats = WatchedStats()
    feed = DuelQualityFeed(stats, replay_s=0)
    await feed.start(js)
    try:
        assert await feed.wait_caught_up(1)
        live = duels(hosts, 10, rng)
        await publish(js, live)
        expected = expected_quality(live)
        await wait_for_duels(stats, hosts, sum(n for _, n in expected.values()))
        assert_matches(observed(stats, hosts), expected)
    finally:
        await feed.stop()
