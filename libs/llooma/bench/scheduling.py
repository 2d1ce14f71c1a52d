"""WWW.Serve's scheduling experiment (its Setting 2) on synthetic hosts, time scaled down.

Four heterogeneous hosts, each with its own users arriving as a piecewise Poisson process
(the paper's Table 3, Setting 2: 750 s, mean inter-arrival times 4 to 30 s). Hosts have a
fixed number of slots (`capacity`, like a serving engine's running batch); a request that
finds no slot waits. The same arrivals (per seed) are served three ways:

(a) own users only: each host serves its own users, who queue for its slots (direct calls);
(b) LLooMA: every request goes through the real stack, whose dispatcher picks the hosts;
    LLooMA keeps no queue, so a request refused with 503 (every host busy) is sent again
    after a short back-off, and the wait counts in its latency;
(c) oracle: one central FIFO queue, each request sent to the least-loaded host (in flight /
    capacity, known exactly) as soon as any host has a free slot (direct calls).

Direct calls publish the HostTask to the host's capability subject: the same host processes
serve the stack. Latency is from the request's scheduled arrival to its last token.

Its size (~490 lines): one experiment, arrivals, the three strategies and its report; a
benchmark, not on any service's path.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.progress import Progress, TaskID

from llooma import bus, subjects
from llooma.bench import plots
from llooma.bench.sse_client import SseClient
from llooma.bench.stats import percentile
from llooma.host.config import Generation, HostConfig, Latency, ModelConfig
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from llooma.v1.common_pb2 import ERROR_CODE_HOST_BUSY, ChatMessage, GenerationParams
from llooma.v1.host_pb2 import HostChunk, HostTask

MODEL = "sched-setting2"
OUTPUT_TOKENS = 16
DURATION_S = 750.0
FULL_SCALE = 0.01
QUICK_SCALE = 0.005
# LLooMA answers 503 when every host is busy; the client tries again after this long.
RETRY_AFTER_S = 2.0
# The paper's Table 2, Setting 2 (s): single node, centralized, WWW.Serve.
PAPER_LATENCY_S = {"single": 226.578, "centralized": 168.221, "decentralized": 168.485}


@dataclass(frozen=True)
class Interval:
    start_s: float
    end_s: float
    mean_gap_s: float


@dataclass(frozen=True)
class Node:
    host: str
    stands_for: str
    capacity: int
    first_token_median_ms: float
    inter_token_ms: float
    schedule: tuple[Interval, ...]

    @property
    def unloaded_latency_s(self) -> float:
        return (self.first_token_median_ms + (OUTPUT_TOKENS - 1) * self.inter_token_ms) / 1000


def _fast(host: str, schedule: tuple[Interval, ...]) -> Node:
    return Node(host, "Qwen3 8B, ADA6000, SGLang", 18, 2000, 7500, schedule)


def _slow(host: str, schedule: tuple[Interval, ...]) -> Node:
    return Node(host, "Qwen3 4B, RTX3090, SGLang", 12, 3000, 10000, schedule)


SETTING_2 = (
    _fast("sched-1", (Interval(0, 300, 4), Interval(300, 750, 20))),
    _fast("sched-2", (Interval(0, 750, 20),)),
    _slow("sched-3", (Interval(0, 750, 30),)),
    _slow("sched-4", (Interval(0, 450, 30), Interval(450, 750, 6))),
)
# Headline SLO: 1.5x the fast host's latency with no queue.
SLO_S = 1.5 * SETTING_2[0].unloaded_latency_s
CURVE_THRESHOLDS_S = [float(t) for t in range(0, 601, 10)]


def piecewise_poisson(schedule: Sequence[Interval], rng: random.Random) -> list[float]:
    """Arrival times (s): within each interval, exponential gaps with its mean. The process is
    memoryless, so starting afresh at each boundary is exact."""
    arrivals: list[float] = []
    for interval in schedule:
        at = interval.start_s + rng.expovariate(1.0 / interval.mean_gap_s)
        while at < interval.end_s:
            arrivals.append(at)
            at += rng.expovariate(1.0 / interval.mean_gap_s)
    return arrivals


@dataclass(frozen=True, order=True)
class Arrival:
    at_s: float
    origin: str


def arrivals_for(nodes: Sequence[Node], seed: int) -> list[Arrival]:
    found = [
        Arrival(at, node.host)
        for node in nodes
        for at in piecewise_poisson(node.schedule, random.Random(f"{seed}-{node.host}"))
    ]
    return sorted(found)


def slo_attainment(latencies_s: Sequence[float | None], threshold_s: float) -> float:
    """Share of requests that completed within the threshold; a failed request (None) misses."""
    if not latencies_s:
        raise ValueError("no requests")
    return sum(1 for x in latencies_s if x is not None and x <= threshold_s) / len(latencies_s)


def bench_hosts(nats_url: str, scale: float) -> list[HostConfig]:
    return [
        HostConfig(
            name=node.host,
            nats_url=nats_url,
            seed=700 + index,
            models=[
                ModelConfig(
                    name=MODEL,
                    capacity=node.capacity,
                    generation=Generation(max_tokens=OUTPUT_TOKENS),
                    first_token=Latency(
                        kind="lognormal", median_ms=node.first_token_median_ms * scale, sigma=0.3
                    ),
                    inter_token=Latency(kind="fixed", ms=node.inter_token_ms * scale),
                )
            ],
        )
        for index, node in enumerate(SETTING_2)
    ]


@dataclass
class Served:
    origin: str
    latency_s: float | None
    retries: int = 0


class DirectCalls:
    """Runs tasks straight on a host, as the racer would, without the control plane."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    async def complete(self, host: str) -> str:
        """One task to its end: 'finished', 'busy' or 'failed'."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_chunk(msg: Msg) -> None:
            chunk = HostChunk.FromString(msg.data)
            kind = chunk.WhichOneof("event")
            if done.done():
                return
            if kind == "finished":
                done.set_result("finished")
            elif kind == "failed":
                busy = chunk.failed.code == ERROR_CODE_HOST_BUSY
                done.set_result("busy" if busy else "failed")

        inbox = self._nc.new_inbox()
        subscription = await self._nc.subscribe(inbox, cb=on_chunk)
        task = HostTask(
            attempt_id=uuid.uuid4().hex,
            model=MODEL,
            messages=[ChatMessage(role="user", content="solve the next problem")],
            params=GenerationParams(max_tokens=OUTPUT_TOKENS),
        )
        try:
            await self._nc.publish(
                subjects.host_task(MODEL, host), task.SerializeToString(), reply=inbox
            )
            return await asyncio.wait_for(done, 60)
        except TimeoutError:
            return "failed"
        finally:
            await subscription.unsubscribe()


async def _until_done(calls: DirectCalls, host: str, scale: float) -> tuple[bool, int]:
    retries = 0
    while (outcome := await calls.complete(host)) == "busy":
        # Only if the host has not yet counted the previous task out; rare and brief.
        retries += 1
        await asyncio.sleep(RETRY_AFTER_S * scale)
    return outcome == "finished", retries


Handler = Callable[[Arrival, float], Coroutine[None, None, Served]]


def own_users(calls: DirectCalls, nodes: Sequence[Node], scale: float) -> Handler:
    slots = {node.host: asyncio.Semaphore(node.capacity) for node in nodes}

    async def handle(arrival: Arrival, due: float) -> Served:
        async with slots[arrival.origin]:
            ok, retries = await _until_done(calls, arrival.origin, scale)
        return Served(arrival.origin, (time.perf_counter() - due) / scale if ok else None, retries)

    return handle


@dataclass
class LeastLoaded:
    """The oracle's central FIFO queue and exact view of every host's slots."""

    nodes: Sequence[Node]
    in_flight: dict[str, int] = field(default_factory=dict)
    waiting: collections.deque[object] = field(default_factory=collections.deque)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def pick(self) -> str | None:
        free = [n for n in self.nodes if self.in_flight.get(n.host, 0) < n.capacity]
        if not free:
            return None
        best = min(
            free, key=lambda n: (self.in_flight.get(n.host, 0) / n.capacity, n.unloaded_latency_s)
        )
        return best.host

    async def acquire(self) -> str:
        ticket = object()
        self.waiting.append(ticket)
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.waiting[0] is ticket and self.pick() is not None
            )
            self.waiting.popleft()
            host = self.pick()
            assert host is not None
            self.in_flight[host] = self.in_flight.get(host, 0) + 1
            self.changed.notify_all()
        return host

    async def release(self, host: str) -> None:
        async with self.changed:
            self.in_flight[host] -= 1
            self.changed.notify_all()


def oracle(calls: DirectCalls, nodes: Sequence[Node], scale: float) -> Handler:
    queue = LeastLoaded(nodes)

    async def handle(arrival: Arrival, due: float) -> Served:
        host = await queue.acquire()
        try:
            ok, retries = await _until_done(calls, host, scale)
        finally:
            await queue.release(host)
        return Served(arrival.origin, (time.perf_counter() - due) / scale if ok else None, retries)

    return handle


def through_stack(http: SseClient, scale: float, race_width: int | None) -> Handler:
    body = orjson.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": OUTPUT_TOKENS,
            "messages": [{"role": "user", "content": "solve the next problem"}],
        }
    )
    headers = {"x-llooma-race-width": str(race_width)} if race_width else {}

    async def handle(arrival: Arrival, due: float) -> Served:
        retries = 0
        while True:
            try:
                timing = await asyncio.wait_for(
                    http.timed_stream("/v1/chat/completions", body, headers), 60
                )
            except (TimeoutError, OSError):
                return Served(arrival.origin, None, retries)
            if timing.status == 503:
                retries += 1
                await asyncio.sleep(RETRY_AFTER_S * scale)
                continue
            ok = timing.status == 200 and timing.first_token is not None
            latency = (timing.ended - due) / scale if ok else None
            return Served(arrival.origin, latency, retries)

    return handle


async def replay(
    arrivals: Sequence[Arrival], scale: float, handle: Handler, progress: Progress, task: TaskID
) -> list[Served]:
    start = time.perf_counter() + 0.05
    running: list[asyncio.Task[Served]] = []
    for arrival in arrivals:
        due = start + arrival.at_s * scale
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        running.append(asyncio.create_task(handle(arrival, due)))
        progress.advance(task)
    return list(await asyncio.gather(*running))


@dataclass
class StrategyResult:
    strategy: str
    requests: int
    failed: int
    retries: int
    mean_latency_s: float
    p50_latency_s: float
    p95_latency_s: float
    slo_attainment: float
    curve: list[float]
    by_origin_attainment: dict[str, float]


STRATEGIES = (
    "(a) own users only",
    "(b) LLooMA, k=2 (default)",
    "(b) LLooMA, k=1",
    "(c) least-loaded oracle",
)


def summarise(strategy: str, served: Sequence[Served]) -> StrategyResult:
    latencies = [s.latency_s for s in served]
    done = [x for x in latencies if x is not None]
    origins = sorted({s.origin for s in served})
    return StrategyResult(
        strategy=strategy,
        requests=len(served),
        failed=len(latencies) - len(done),
        retries=sum(s.retries for s in served),
        mean_latency_s=statistics.fmean(done) if done else float("nan"),
        p50_latency_s=percentile(done, 0.5) if done else float("nan"),
        p95_latency_s=percentile(done, 0.95) if done else float("nan"),
        slo_attainment=slo_attainment(latencies, SLO_S),
        curve=[slo_attainment(latencies, t) for t in CURVE_THRESHOLDS_S],
        by_origin_attainment={
            o: slo_attainment([s.latency_s for s in served if s.origin == o], SLO_S)
            for o in origins
        },
    )


@dataclass
class Outcome:
    scale: float
    seeds: list[int]
    arrivals_per_seed: list[int]
    results: list[StrategyResult]


async def measure(stack: Stack, scale: float, seeds: Sequence[int], progress: Progress) -> Outcome:
    assert stack.nats_url is not None
    nc = await bus.connect(stack.nats_url, "llooma-bench-sched", nkey_seed_file=stack.control_seed)
    calls = DirectCalls(nc)
    port = int(stack.base_url.rsplit(":", 1)[1])
    served: dict[str, list[Served]] = {s: [] for s in STRATEGIES}
    counts = []
    plans = [arrivals_for(SETTING_2, seed) for seed in seeds]
    task = progress.add_task(
        "scheduling (arrivals)", total=sum(len(p) for p in plans) * len(STRATEGIES)
    )
    for round_index, arrivals in enumerate(plans):
        counts.append(len(arrivals))
        # Rotate the order per seed so slow drift on a shared machine hits every strategy.
        order = STRATEGIES[round_index % 4 :] + STRATEGIES[: round_index % 4]
        for strategy in order:
            http = SseClient("127.0.0.1", port, DEV_API_KEY)
            if strategy == STRATEGIES[0]:
                handler = own_users(calls, SETTING_2, scale)
            elif strategy == STRATEGIES[3]:
                handler = oracle(calls, SETTING_2, scale)
            else:
                handler = through_stack(http, scale, 1 if strategy == STRATEGIES[2] else None)
            served[strategy] += await replay(arrivals, scale, handler, progress, task)
            await http.close()
            # Heartbeats (every 0.5 s) must show idle hosts before the next strategy starts.
            await asyncio.sleep(1.2)
    await nc.drain()
    return Outcome(scale, list(seeds), counts, [summarise(s, served[s]) for s in STRATEGIES])


def write_results(outcome: Outcome, results_dir: Path, note: str) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "scheduling.json").write_text(
        json.dumps(
            {
                "scale": outcome.scale,
                "seeds": outcome.seeds,
                "arrivals_per_seed": outcome.arrivals_per_seed,
                "slo_s": SLO_S,
                "curve_thresholds_s": CURVE_THRESHOLDS_S,
                "nodes": [asdict(n) for n in SETTING_2],
                "results": [asdict(r) for r in outcome.results],
                "paper_setting2_latency_s": PAPER_LATENCY_S,
            },
            indent=2,
        )
    )
    own = outcome.results[0]
    lines = [
        f"| strategy | requests | failed | 503 retries | mean latency s | p50 s | p95 s "
        f"| SLO ≤ {SLO_S:.0f} s | vs (a): attainment | vs (a): mean latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in outcome.results:
        ratio = r.slo_attainment / own.slo_attainment if own.slo_attainment else float("nan")
        change = r.mean_latency_s / own.mean_latency_s - 1.0
        lines.append(
            f"| {r.strategy} | {r.requests} | {r.failed} | {r.retries} | {r.mean_latency_s:.1f} "
            f"| {r.p50_latency_s:.1f} | {r.p95_latency_s:.1f} | {r.slo_attainment:.1%} "
            f"| {ratio:.2f}x | {change:+.1%} |"
        )
    table = "\n".join(lines)
    nodes = [
        "| host | stands for | slots | first token (median) | per token | unloaded latency "
        "| arrivals: mean gap |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for n in SETTING_2:
        schedule = ", ".join(
            f"{i.start_s:.0f} to {i.end_s:.0f} s: {i.mean_gap_s:.0f} s" for i in n.schedule
        )
        nodes.append(
            f"| {n.host} | {n.stands_for} | {n.capacity} | {n.first_token_median_ms / 1000:.1f} s "
            f"| {n.inter_token_ms / 1000:.1f} s | {n.unloaded_latency_s:.1f} s | {schedule} |"
        )
    plots.scheduling(
        CURVE_THRESHOLDS_S,
        {r.strategy: r.curve for r in outcome.results},
        {r.strategy: r.mean_latency_s for r in outcome.results},
        SLO_S,
        results_dir / "scheduling.png",
    )
    paper = PAPER_LATENCY_S
    (results_dir / "scheduling.md").write_text(
        "# Scheduling: WWW.Serve's Setting 2 on synthetic hosts\n\n"
        f"{note}\n\n{table}\n\n![SLO attainment and latency](scheduling.png)\n\n"
        f"Time runs {1 / outcome.scale:.0f}x faster than the paper's (scale {outcome.scale}): "
        f"its 750 s schedule takes {DURATION_S * outcome.scale:.1f} s here, and every latency "
        "above is measured at that speed and divided back into the paper's seconds. "
        f"Seeds {outcome.seeds} ({', '.join(str(c) for c in outcome.arrivals_per_seed)} "
        "arrivals); each seed's arrivals are replayed identically for every strategy, in an "
        "order rotated per seed. A request's latency runs from its scheduled arrival to its "
        f"last token ({OUTPUT_TOKENS} tokens); a failed request misses every SLO.\n\n"
        "Hosts (the paper's GPUs and models stand behind synthetic hosts with these speeds; "
        "`slots` is how many requests a host runs at once, a request that finds none waits):\n\n"
        + "\n".join(nodes)
        + "\n\n"
        "- (a) each host serves only its own users, who queue for its slots (direct calls to "
        "the host).\n"
        "- (b) every request through the stack: LLooMA's dispatcher picks the hosts (S(h) and "
        "stake, best bucket of 4, so with four hosts the pick is stake-weighted and a busy "
        "host's refusal moves the task to the fallback hosts), the racer races them. LLooMA "
        "keeps no queue: a 503 (every host busy) is retried by the client after "
        f"{RETRY_AFTER_S:.0f} s (scaled), counted in `503 retries`. The stack's own overhead "
        "(a few ms per request, more under load) is multiplied by "
        f"{1 / outcome.scale:.0f} when scaled back.\n"
        "- (c) one central FIFO queue; a request goes to the least-loaded host (in flight / "
        "slots, known exactly) as soon as any slot is free (direct calls).\n\n"
        f"The paper (Table 2, Setting 2, real GPUs) reports mean latency {paper['single']:.1f} s "
        f"single node, {paper['centralized']:.1f} s centralized and {paper['decentralized']:.1f} "
        "s WWW.Serve (25.6% below single), and up to 1.5x the single node's SLO attainment "
        "across its settings.\n"
    )
    return table
