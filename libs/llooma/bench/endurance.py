"""Does the cost stay flat with work? CPU per request and memory, checkpoint by checkpoint.

    .venv/bin/python -m llooma.bench.endurance [--requests 20000] [--checkpoint 1000]
                                               [--concurrency 8]

Starts the embedded stack with the zero-latency synthetic host (the overhead suite's) and
streams `--requests` 16-token requests through it, `--concurrency` at a time, on keep-alive
connections. After each `--checkpoint` requests it reads every process's CPU time and resident
memory from /proc: CPU ms per request over that stretch (the whole stack, the host included),
the memory of each process (PSS: shared pages split between the processes that map them, so
Postgres's backends sharing its buffers are not counted once each) and the minutes since the
start (JetStream keeps message ids for 2 minutes and race records for 10: nats-server's
memory should grow until then and level after). A leak shows as memory or CPU per request that keeps
rising.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil
import uvloop

from llooma.bench.overhead import MODEL, OUTPUT_TOKENS, bench_hosts
from llooma.bench.peers import cpu_seconds, process_names
from llooma.bench.sse_client import SseClient
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack

PATH = "/v1/chat/completions"


@dataclass
class Checkpoint:
    requests: int
    cpu_ms_per_request: float
    memory_mb: dict[str, float]
    minutes: float


def _memory_mb(pids: dict[str, int]) -> dict[str, float]:
    found = {}
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            # Postgres's backends are its own: their memory counts for it.
            found[name] = sum(
                p.memory_full_info().pss for p in [process, *process.children(recursive=True)]
            ) / (1024 * 1024)
        except psutil.NoSuchProcess:
            found[name] = 0.0
    return found


async def run(stack: Stack, total: int, checkpoint: int, concurrency: int) -> list[Checkpoint]:
    body = orjson.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": OUTPUT_TOKENS,
            "messages": [{"role": "user", "content": "Say something short, please."}],
        }
    )
    pids = process_names(stack)
    client = SseClient("127.0.0.1", stack.http_port, DEV_API_KEY)
    checkpoints = []
    started = time.monotonic()
    try:
        done = 0
        while done < total:
            stretch = min(checkpoint, total - done)
            remaining = stretch
            failures = 0

            async def worker() -> None:
                nonlocal remaining, failures
                while remaining > 0:
                    remaining -= 1
                    timing = await client.timed_stream(PATH, body, {})
                    if timing.first_token is None:
                        failures += 1

            before = cpu_seconds(pids.values())
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            used_s = cpu_seconds(pids.values()) - before
            if failures:
                raise RuntimeError(f"{failures} of {stretch} requests got no token")
            done += stretch
            minutes = (time.monotonic() - started) / 60
            checkpoints.append(Checkpoint(done, 1000 * used_s / stretch, _memory_mb(pids), minutes))
            print(f"{done} requests: {1000 * used_s / stretch:.2f} CPU ms per request", flush=True)
    finally:
        await client.close()
    return checkpoints


def report(checkpoints: list[Checkpoint]) -> str:
    names = sorted(checkpoints[0].memory_mb)
    lines = [
        "| after requests | minutes | CPU ms / request | "
        + " | ".join(f"{n} MB" for n in names)
        + " |",
        "|---:|---:|---:|" + "---:|" * len(names),
    ]
    for c in checkpoints:
        cells = " | ".join(f"{c.memory_mb[n]:.1f}" for n in names)
        lines.append(f"| {c.requests} | {c.minutes:.1f} | {c.cpu_ms_per_request:.2f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--checkpoint", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llooma-endurance-") as scratch:
        stack = Stack(
            root=Path(scratch),
            http_port=free_port(),
            hosts=bench_hosts(""),
            extra_env={"LLOOMA_DUEL_FRACTION": "0"},
        )
        stack.start()
        try:
            load_before = os.getloadavg()[0]
            checkpoints = uvloop.run(run(stack, args.requests, args.checkpoint, args.concurrency))
            load_after = os.getloadavg()[0]
        finally:
            stack.stop()
    cores = os.cpu_count()
    print(f"load average {load_before:.1f} before, {load_after:.1f} after; {cores} cores\n")
    print(report(checkpoints))


if __name__ == "__main__":
    main()
