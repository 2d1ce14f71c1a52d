"""The shared limiter's burst on real JetStream counters, with the limiter's clock in the
test's hands: a key's saved-up allowance is taken back to back, and no more."""

from __future__ import annotations

import time
import uuid

from nats.aio.client import Client

from llooma import bus
from llooma.limiter import SharedCounters, window_for


async def test_a_fresh_keys_burst_is_its_allowance_then_the_rate(nc: Client) -> None:
    await bus.ensure_topology(nc.jetstream())
    now = time.time()
    counters = SharedCounters(nc.jetstream(), clock=lambda: now)
    window = window_for(4, 45.0)  # 4 a minute, 45 s saved up: 3 at once
    scope = f"burst-test-{uuid.uuid4().hex[:8]}"
    admitted = []
    for _ in range(4):
        admitted.append(await counters.take(scope, 1, window) == 0.0)
        now += 0.5
    # The first two fall in the scope's first window (its last 2%), the others in the next:
    # what that first window left unused is not added to the burst.
    assert admitted == [True, True, True, False]
    # At 4 a minute the next one is due about 15 s after the burst.
    now += 5.0
    assert await counters.take(scope, 1, window) > 0.0
    now += 15.0
    assert await counters.take(scope, 1, window) == 0.0
