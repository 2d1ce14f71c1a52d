"""What `sync_interval: always` costs a settlement publish: the same publishes (a real
settlement's size, on a file stream like LLOOMA_SETTLEMENTS) against a server that fsyncs
before every ack and one that syncs every 2 min (nats-server's default), side by side.

    .venv/bin/python -m tests.reliability.jetstream_sync_cost
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.v1.common_pb2 import Usage
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_WON, TaskSettlement

PUBLISHES = 2000


async def measure(server: EmbeddedNats) -> tuple[float, float]:
    nc = await bus.connect(server.url, "sync-cost")
    js = nc.jetstream()
    await bus.ensure_topology(js)
    payload = TaskSettlement(
        attempt_id="a" * 32,
        request_id="r" * 32,
        task_id="t" * 32,
        host_id="host-fast",
        model="synthetic-small",
        outcome=ATTEMPT_OUTCOME_WON,
        usage=Usage(input_tokens=20, output_tokens=64),
        api_key_id="k" * 32,
    ).SerializeToString()
    latencies = []
    for i in range(PUBLISHES):
        started = time.perf_counter()
        await bus.hand_off(js, subjects.SETTLEMENT_TASK, payload, f"attempt-{i}")
        latencies.append(time.perf_counter() - started)
    await nc.close()
    latencies.sort()
    return latencies[len(latencies) // 2] * 1e6, latencies[int(len(latencies) * 0.99)] * 1e6


async def main() -> None:
    for sync_always in (False, True):
        with tempfile.TemporaryDirectory() as root:
            server = EmbeddedNats.start(Path(root), sync_always=sync_always)
            try:
                p50, p99 = await measure(server)
            finally:
                server.stop()
        label = "sync_interval: always" if sync_always else "default (sync every 2 min)"
        print(f"{label:28} p50 {p50:7.0f} us   p99 {p99:7.0f} us per settlement publish")


if __name__ == "__main__":
    asyncio.run(main())
