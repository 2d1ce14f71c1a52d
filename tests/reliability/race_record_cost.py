"""What a race's record costs (services/racer/records.py): the writes of one typical race's
record (create at launch, one compare-and-set when the winner is known, the compare-and-set
delete at settlement) against the writes every race already makes (two attempts' settlements
and the race event), interleaved race by race on one server.

    .venv/bin/python -m tests.reliability.race_record_cost
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.race_records import RecordWriter, races_bucket
from llooma.v1.common_pb2 import ChatMessage, Usage
from llooma.v1.pipeline_pb2 import ChatRequest, HostCandidate, TaskAssignment
from llooma.v1.race_pb2 import ATTEMPT_ROLE_RACER, LaunchedAttempt, RaceEvent, RaceRecord
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_WON, TaskSettlement

RACES = 1000
# A prompt of about 300 tokens: the record carries the assignment whole.
PROMPT = "Explain how a write-ahead log keeps a database consistent. " * 20


def record(race: int) -> RaceRecord:
    hosts = [HostCandidate(host_id=f"host-{n}", model="synthetic-small") for n in range(2)]
    assignment = TaskAssignment(
        request=ChatRequest(
            request_id=f"r{race}",
            model="llooma",
            messages=[ChatMessage(role="user", content=PROMPT)],
            reply_subject=subjects.client_reply("ingress-1", f"r{race}"),
        ),
        task_id=f"t{race}",
        hosts=hosts,
    )
    launched = [
        LaunchedAttempt(attempt_id=f"a{race}-{n}", host=h, role=ATTEMPT_ROLE_RACER)
        for n, h in enumerate(hosts)
    ]
    return RaceRecord(assignment=assignment, racer_instance_id="racer-1", attempts=launched)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        server = EmbeddedNats.start(Path(root))
        try:
            nc = await bus.connect(server.url, "record-cost")
            js = nc.jetstream()
            await bus.ensure_topology(js)
            kv = await races_bucket(js)
            settlement = TaskSettlement(
                attempt_id="a" * 32,
                request_id="r" * 32,
                task_id="t" * 32,
                host_id="host-0",
                model="synthetic-small",
                outcome=ATTEMPT_OUTCOME_WON,
                usage=Usage(input_tokens=300, output_tokens=64),
                api_key_id="k" * 32,
            ).SerializeToString()
            event = RaceEvent(request_id="r" * 32, task_id="t" * 32).SerializeToString()
            recorded: list[float] = []
            settled: list[float] = []
            for race in range(RACES):
                started = time.perf_counter()
                writer = RecordWriter(kv, f"r{race}")
                first = record(race)
                writer.write(first)
                first.winner_attempt_id = first.attempts[0].attempt_id
                writer.write(first)
                assert await writer.release()
                recorded.append(time.perf_counter() - started)
                started = time.perf_counter()
                for n in range(2):
                    await bus.hand_off(js, subjects.SETTLEMENT_TASK, settlement, f"a{race}-{n}")
                await bus.hand_off(js, subjects.RACE_EVENT, event, f"t{race}")
                settled.append(time.perf_counter() - started)
            await nc.close()
        finally:
            server.stop()
    size = len(record(0).SerializeToString())
    print(f"{RACES} races, record {size} bytes, load average {os.getloadavg()[0]:.2f}")
    for label, values in (("record (3 KV writes)", recorded), ("settle (3 publishes)", settled)):
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(f"{label:22} p50 {p50:7.0f} us   p99 {p99:7.0f} us per race")


if __name__ == "__main__":
    asyncio.run(main())
