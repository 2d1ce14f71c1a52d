"""Throughput benchmark: the most streamed requests per second the stack sustains with p99 time
to first token <= 50 ms, and the tokens per second it relays at that rate.

Each probe offers open-loop Poisson arrivals at one rate for a fixed window against the
zero-latency synthetic host (the overhead suite's), every request streamed to its end by the
lean SSE client. A probe passes when every request succeeded and the p99 time to first token
is within the limit. The rate is found by a bounded search: doubling until a probe fails, then
bisecting between the last pass and the first failure.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
from rich.progress import Progress

from llooma.bench import plots
from llooma.bench.overhead import MODEL, OUTPUT_TOKENS
from llooma.bench.sse_client import SseClient
from llooma.bench.stats import percentile
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack

P99_LIMIT_MS = 50.0
BODY = orjson.dumps(
    {
        "model": MODEL,
        "stream": True,
        "max_tokens": OUTPUT_TOKENS,
        "messages": [{"role": "user", "content": "throughput"}],
    }
)


@dataclass(frozen=True)
class SearchPlan:
    start_rps: float
    ceiling_rps: float
    refine_steps: int
    window_s: float


QUICK = SearchPlan(start_rps=40, ceiling_rps=1280, refine_steps=2, window_s=2.0)
FULL = SearchPlan(start_rps=25, ceiling_rps=1600, refine_steps=4, window_s=6.0)


@dataclass
class Probe:
    offered_rps: float
    requests: int
    failed: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    completed_rps: float
    tokens_per_s: float
    passed: bool


async def search_max_rate(
    passes: Callable[[float], Awaitable[bool]],
    start: float,
    ceiling: float,
    refine_steps: int,
    floor: float | None = None,
) -> float | None:
    """The highest rate found to pass: from `start`, double while probes pass (never above
    `ceiling`) or halve while they fail (never below `floor`), then bisect `refine_steps` times
    between the last pass and the first failure. None if even `floor` fails."""
    floor = start / 8 if floor is None else floor
    rate = start
    bad: float | None = None
    while not await passes(rate):
        bad = rate
        if rate <= floor:
            return None
        rate = max(rate / 2, floor)
    good = rate
    while bad is None and good < ceiling:
        candidate = min(good * 2, ceiling)
        if await passes(candidate):
            good = candidate
        else:
            bad = candidate
            break
    if bad is None:
        return good
    for _ in range(refine_steps):
        middle = (good + bad) / 2
        if await passes(middle):
            good = middle
        else:
            bad = middle
    return good


def poisson_offsets(rate: float, window_s: float, rng: random.Random) -> list[float]:
    """Arrival instants in [0, window_s) of a Poisson process with this rate."""
    offsets: list[float] = []
    at = rng.expovariate(rate)
    while at < window_s:
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


async def probe(http: SseClient, rate: float, window_s: float, seed: int) -> Probe:
    offsets = poisson_offsets(rate, window_s, random.Random(seed))
    ttfts: list[float] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        try:
            timing = await asyncio.wait_for(http.timed_stream("/v1/chat/completions", BODY, {}), 30)
        except (TimeoutError, OSError, RuntimeError):
            failures += 1
            return
        if timing.first_token is None:
            failures += 1
        else:
            ttfts.append((timing.first_token - timing.started) * 1000)

    started = time.perf_counter()
    tasks = []
    for offset in offsets:
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    completed = len(ttfts)
    p99 = percentile(ttfts, 0.99) if ttfts else float("inf")
    return Probe(
        offered_rps=rate,
        requests=len(offsets),
        failed=failures,
        ttft_p50_ms=percentile(ttfts, 0.5) if ttfts else float("inf"),
        ttft_p99_ms=p99,
        completed_rps=completed / elapsed,
        tokens_per_s=completed * OUTPUT_TOKENS / elapsed,
        passed=failures == 0 and completed > 0 and p99 <= P99_LIMIT_MS,
    )


@dataclass
class Outcome:
    best_rps: float | None
    best: Probe | None
    probes: list[Probe]
    plan: SearchPlan


def tokens_per_stream(base_url: str) -> int:
    """What one stream carries, from the stack's own usage count, not from the request."""
    body = {**orjson.loads(BODY), "stream": False}
    answer = httpx.post(
        f"{base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {DEV_API_KEY}"},
        timeout=10,
    )
    answer.raise_for_status()
    return int(answer.json()["usage"]["completion_tokens"])


async def measure(stack: Stack, plan: SearchPlan, progress: Progress) -> Outcome:
    tokens = await asyncio.to_thread(tokens_per_stream, stack.base_url)
    if tokens != OUTPUT_TOKENS:
        raise RuntimeError(f"the zero host streamed {tokens} tokens, expected {OUTPUT_TOKENS}")
    port = int(stack.base_url.rsplit(":", 1)[1])
    http = SseClient("127.0.0.1", port, DEV_API_KEY)
    await probe(http, plan.start_rps, 1.0, seed=0)  # warm up connections and consumers
    probes: list[Probe] = []
    task = progress.add_task("throughput search (probes)", total=None)

    async def passes(rate: float) -> bool:
        result = await probe(http, rate, plan.window_s, seed=len(probes) + 1)
        probes.append(result)
        progress.update(
            task,
            advance=1,
            description=f"throughput: {rate:.0f}/s p99 {result.ttft_p99_ms:.0f} ms",
        )
        # Let the stack settle so one probe's backlog does not count against the next.
        await asyncio.sleep(0.5)
        return result.passed

    best_rps = await search_max_rate(passes, plan.start_rps, plan.ceiling_rps, plan.refine_steps)
    await http.close()
    best = next((p for p in probes if p.offered_rps == best_rps), None)
    return Outcome(best_rps, best, probes, plan)


def write_results(outcome: Outcome, results_dir: Path, note: str) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    plan = outcome.plan
    (results_dir / "throughput.json").write_text(
        json.dumps(
            {
                "p99_limit_ms": P99_LIMIT_MS,
                "best_rps": outcome.best_rps,
                "plan": asdict(plan),
                "probes": [asdict(p) for p in outcome.probes],
            },
            indent=2,
        )
    )
    lines = [
        "| offered req/s | requests | failed | TTFT p50 ms | TTFT p99 ms | completed req/s "
        "| tokens/s relayed | sustained |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in outcome.probes:
        lines.append(
            f"| {p.offered_rps:.0f} | {p.requests} | {p.failed} | {p.ttft_p50_ms:.1f} "
            f"| {p.ttft_p99_ms:.1f} | {p.completed_rps:.1f} | {p.tokens_per_s:.0f} "
            f"| {'yes' if p.passed else 'no'} |"
        )
    table = "\n".join(lines)
    best = outcome.best
    headline = (
        f"**{best.offered_rps:.0f} streamed requests/s sustained** with p99 time to first "
        f"token {best.ttft_p99_ms:.1f} ms (limit {P99_LIMIT_MS:.0f} ms), relaying "
        f"**{best.tokens_per_s:.0f} tokens/s**."
        if best is not None
        else f"Not even {plan.start_rps:.0f} requests/s kept p99 within {P99_LIMIT_MS:.0f} ms."
    )
    plots.throughput(
        [p.offered_rps for p in outcome.probes],
        [min(p.ttft_p99_ms, 1e6) for p in outcome.probes],
        [p.passed for p in outcome.probes],
        P99_LIMIT_MS,
        results_dir / "throughput.png",
    )
    (results_dir / "throughput.md").write_text(
        "# Throughput: streamed requests per second within p99 TTFT <= 50 ms\n\n"
        f"{note}\n\n{headline}\n\n{table}\n\n![probes](throughput.png)\n\n"
        f"Each probe offers Poisson arrivals at one rate for {plan.window_s:.0f} s (open loop: "
        "arrivals do not wait for earlier answers) to the zero-latency synthetic host through "
        "the whole stack; each request streams {OUTPUT_TOKENS} tokens (checked against the "
        "stack's own usage count) to its end through the lean SSE client, which runs in the "
        "same process as the load generator and shares the machine's cores with the stack "
        "and the host. Search: from "
        f"{plan.start_rps:.0f}/s, double (ceiling {plan.ceiling_rps:.0f}/s) while probes pass or "
        f"halve (floor {plan.start_rps / 8:.0f}/s) while they fail, then "
        f"bisect {plan.refine_steps} times. A probe passes if no request failed and p99 is "
        "within the limit. `tokens/s relayed` = completed streams x tokens per stream / "
        "probe duration.\n"
    )
    return headline + "\n" + table
